"""The Equinox and Flax DEQ modules (deqcore_jax.equinox.DEQ, deqcore_jax.flax.DEQ): the same fixed
point and gradients as the functional ``deqcore.solve`` under each framework's jit and gradient
transforms, their training and inference settings, setting errors at construction, ``jax.vmap``
per sample, and serialisation round trips. JAX, Equinox and Flax are imported by the tests that use
them, so that the other environments collect (and deselect) this file without them."""

from __future__ import annotations

import numpy as np
import pytest
from problems import tanh_deq, tanh_layer, two_scale_deq, two_scale_layer

import deqcore

pytestmark = pytest.mark.backend("jax")

FRAMEWORKS = ("equinox", "flax")
SOLVE = {"solver": "anderson", "tol": 1e-12, "max_iter": 80}


def _tanh_problem(seed):
    W, U, b, x = tanh_deq(seed=seed, d=8, batch=3, rho=0.8)
    return tanh_layer, {"W": W, "U": U, "b": b}, x, None


def _two_scale_problem(seed):
    params, x, z0 = two_scale_deq(seed=seed)
    return two_scale_layer, params, x, z0


def _loss(z):
    """A scalar of every leaf of the state, weighted differently per leaf."""
    import jax
    import jax.numpy as jnp

    return sum(jnp.sum(jnp.sin(leaf) * (k + 1.5)) for k, leaf in enumerate(jax.tree.leaves(z)))


IMPLICIT = {"tol": 1e-12, "max_iter": 100}
CASES = [  # (framework, problem, gradient mode, its options)
    ("equinox", _tanh_problem, "implicit", IMPLICIT),
    ("equinox", _tanh_problem, "jfb", None),
    ("equinox", _two_scale_problem, "npg", {"k": 4, "lam": 0.7}),
    ("flax", _tanh_problem, "jfb", None),
    ("flax", _two_scale_problem, "implicit", IMPLICIT),
]


def _assert_module_equals_functional_solve(framework, problem, settings, of=lambda solution: solution.z):
    """``_loss(of(solution))`` and its gradients (weights, ``x``) through the module equal the
    functional solve's with the same ``settings``, under jit."""
    import jax
    import jax.numpy as jnp
    from jax_module_layers import build, value_and_grads

    fn, params, x_np, z0 = problem(seed=5)
    z0 = None if z0 is None else tuple(jnp.asarray(z) for z in z0)
    model = build(framework, fn, params, **settings)
    x = jnp.asarray(x_np)
    value, grads, gx = value_and_grads(framework, model, _loss, x, z0, of=lambda out: of(out[1]))

    def reference(p, x):
        f = lambda z, x_: fn(jnp.tanh, p, z, x_)  # noqa: E731
        return _loss(of(deqcore.solve(f, x, z0, **settings)))

    ref_value, (ref_grads, ref_gx) = jax.jit(jax.value_and_grad(reference, argnums=(0, 1)))(
        {k: jnp.asarray(v) for k, v in params.items()}, x)
    np.testing.assert_allclose(value, ref_value, rtol=1e-12, atol=0)
    for name in params:
        np.testing.assert_allclose(grads[name], ref_grads[name], rtol=1e-12, atol=1e-13, err_msg=name)
    np.testing.assert_allclose(gx, ref_gx, rtol=1e-12, atol=1e-13)
    assert float(jnp.max(jnp.abs(ref_gx))) > 0.1  # a gradient that is really there


@pytest.mark.parametrize(("framework", "problem", "grad", "grad_options"), CASES,
                         ids=[f"{fw}-{p.__name__.strip('_')}-{g}" for fw, p, g, _ in CASES])
def test_module_equals_functional_solve(framework, problem, grad, grad_options):
    settings = dict(SOLVE, grad=grad, grad_options=grad_options)
    _assert_module_equals_functional_solve(framework, problem, settings)


def test_equinox_correction_states_pass_through_with_the_functional_solves_gradients():
    """``correction_states`` reaches the solve unchanged: the states and the gradients of a loss
    on them equal the functional solve's."""
    settings = dict(SOLVE, max_iter=10, correction_states=2, correction_grad_options={"k": 3, "lam": 0.7})
    _assert_module_equals_functional_solve("equinox", _tanh_problem, settings,
                                           of=lambda solution: solution.correction_states)


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_training_and_inference_settings(framework):
    import jax.numpy as jnp
    from jax_module_layers import build

    fn, params, x_np, _ = _tanh_problem(seed=6)
    settings = {"solver": "fixed_point", "tol": 1e-3, "max_iter": 40,
                "inference_settings": {"solver": "anderson", "tol": 1e-11}}
    model = build(framework, fn, params, **settings)
    assert (model.settings["tol"], model.inference_settings["tol"]) == (1e-3, 1e-11)
    assert model.inference_settings["max_iter"] == 40  # merged over the training settings
    if framework == "equinox":
        import equinox as eqx

        evaluating = eqx.nn.inference_mode(model)
        training = eqx.nn.inference_mode(evaluating, value=False)
        assert (model.inference, evaluating.inference, training.inference) == (False, True, False)
        override = {"inference": True}
    else:
        evaluating, training = model, build(framework, fn, params, **settings)
        evaluating.eval()
        assert (evaluating.deterministic, training.deterministic) == (True, False)
        override = {"deterministic": True}
    x = jnp.asarray(x_np)
    solutions = []
    for module, kwargs, expected in ((training, {}, ("fixed_point", 1e-3)),
                                     (evaluating, {}, ("anderson", 1e-11)),
                                     (training, override, ("anderson", 1e-11))):
        _, sol = module(x, **kwargs)
        assert (sol.solver, sol.tol) == expected
        assert bool(jnp.all(sol.rel_residual <= expected[1])) and bool(jnp.all(sol.converged))
        solutions.append(sol)
    assert float(jnp.max(solutions[0].rel_residual)) > 1e-9  # training really stopped early


@pytest.mark.parametrize("framework", FRAMEWORKS)
@pytest.mark.parametrize(("settings", "error", "match"), [
    ({"memroy": 4}, TypeError, r"solver 'anderson': unknown option 'memroy'. Valid options: beta, lam"),
    ({"memory": 0}, ValueError, r"option 'memory' must be an int >= 1, got 0"),
    ({"tol": -1.0}, ValueError, r"DEQ: option 'tol' must be a finite float > 0, got -1.0"),
    ({"stop_mode": "max"}, ValueError, r"option 'stop_mode' must be one of 'rel', 'abs'"),
    ({"solver": "newton"}, Exception, r"newton"),
    ({"grad": "gdeq"}, ValueError, r"'gdeq' .* needs solver='broyden'"),
    ({"grad": "npg", "grad_options": {"k": 0}}, ValueError, r"option 'k' must be an int >= 1"),
    ({"grad": None, "grad_options": {"k": 2}}, TypeError, r"grad_options were given but grad=None"),
    ({"backend": "torch"}, TypeError, r"'backend' cannot be a setting: the module passes it"),
    ({"z0": 0}, TypeError, r"'z0' cannot be a setting"),
    ({"inference_settings": {"max_iter": 0}}, ValueError,
     r"DEQ \(inference_settings\): option 'max_iter' must be an int >= 1, got 0"),
    ({"inference_settings": [("tol", 1e-3)]}, TypeError, r"inference_settings must be a dict"),
])
def test_bad_settings_are_errors_at_construction(framework, settings, error, match):
    from jax_module_layers import build

    fn, params, _, _ = _tanh_problem(seed=7)
    with pytest.raises(error, match=match):
        build(framework, fn, params, **settings)


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_flags_and_layer_are_checked(framework):
    from jax_module_layers import build

    fn, params, _, _ = _tanh_problem(seed=7)
    flag = {"equinox": "inference", "flax": "deterministic"}[framework]
    with pytest.raises(TypeError, match=rf"{flag} must be True or False, got 1"):
        build(framework, fn, params, **{flag: 1})
    from importlib import import_module

    DEQ = import_module(f"deqcore_jax.{framework}").DEQ
    with pytest.raises(TypeError, match=r"layer must be callable as layer\(z, x\), got ndarray"):
        DEQ(np.zeros(3))


def test_equinox_vmap_per_sample_equals_batched_solve():
    import equinox as eqx
    import jax
    import jax.numpy as jnp
    from jax_module_layers import build

    fn, params, x_np, _ = _tanh_problem(seed=8)
    x = jnp.asarray(x_np)
    batched = build("equinox", fn, params, **SOLVE)
    per_sample = build("equinox", fn, params, batched=False, **SOLVE)
    z, sol = batched(x)
    zv, solv = eqx.filter_jit(lambda m, x: jax.vmap(m)(x))(per_sample, x)
    np.testing.assert_allclose(zv, z, rtol=0, atol=1e-12)
    assert solv.converged.shape == (x.shape[0], 1) and bool(jnp.all(solv.converged))  # one state each
    np.testing.assert_array_equal(solv.iterations[:, 0], sol.iterations)


def test_equinox_serialise_leaves_round_trip(tmp_path):
    import equinox as eqx
    import jax.numpy as jnp
    from jax_module_layers import build

    fn, params, x_np, _ = _tanh_problem(seed=9)
    model = eqx.nn.inference_mode(build("equinox", fn, params, **SOLVE))
    path = tmp_path / "deq.eqx"
    eqx.tree_serialise_leaves(path, model)
    other = build("equinox", fn, {k: np.zeros_like(v) for k, v in params.items()}, **SOLVE)
    restored = eqx.tree_deserialise_leaves(path, other)
    assert restored.inference
    for name in params:
        np.testing.assert_array_equal(restored.layer.params[name], params[name])
    x = jnp.asarray(x_np)
    np.testing.assert_array_equal(restored(x)[0], model(x)[0])


def test_flax_state_round_trip_through_serialization():
    import jax.numpy as jnp
    from flax import nnx, serialization
    from jax_module_layers import build

    fn, params, x_np, _ = _tanh_problem(seed=9)
    model = build("flax", fn, params, **SOLVE)
    data = serialization.to_bytes(nnx.to_pure_dict(nnx.state(model)))
    other = build("flax", fn, {k: np.zeros_like(v) for k, v in params.items()}, **SOLVE)
    state = nnx.state(other)
    nnx.replace_by_pure_dict(state, serialization.msgpack_restore(data))
    nnx.update(other, state)
    for name in params:
        np.testing.assert_array_equal(getattr(other.layer, name)[...], params[name])
    x = jnp.asarray(x_np)
    np.testing.assert_array_equal(other(x)[0], model(x)[0])
