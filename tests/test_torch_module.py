"""``deqcore_torch.DEQ``, the equilibrium layer as an ``nn.Module``.

Guarantees: its forward pass and gradients are those of :func:`deqcore.solve` with the same
settings (float64, 1e-12) for several gradient modes and a tuple state, and those of the JAX
functional solve for the same weights (1e-10); ``.train()``/``.eval()`` pick their own settings;
bad settings fail when the module is built or reconfigured, never at the first forward, while a
keyword ``deqcore.solve`` gains later passes through without code in the module; the module
survives ``state_dict``, ``copy.deepcopy``, pickling and ``.to(dtype)``; a compiled model breaks
its graph once, at the solve, and computes what the eager one does; under DDP (2 gloo processes)
the gradients are those of one process on the whole batch (1e-10).
"""

from __future__ import annotations

import copy
import pickle

import numpy as np
import pytest
from process_group import run_ranks

import deqcore

pytestmark = pytest.mark.backend("torch")

SETTINGS = dict(tol=1e-12, max_iter=200)
#: (id, DEQ settings, tuple state)
CASES = [
    ("implicit-anderson", dict(SETTINGS, solver="anderson", grad="implicit"), False),
    ("implicit-broyden-tuple", dict(SETTINGS, solver="broyden", grad="implicit"), True),
    ("jfb-fixed_point", dict(SETTINGS, solver="fixed_point", grad="jfb"), False),
    ("npg-anderson-tuple", dict(SETTINGS, solver="anderson", memory=4, grad="npg",
                                grad_options={"k": 4}), True),
    ("gdeq-broyden", dict(SETTINGS, solver="broyden", grad="gdeq"), False),
    ("unroll-anderson", dict(SETTINGS, solver="anderson", max_iter=30, grad="unroll"), False),
]


@pytest.fixture(scope="module")
def nets():
    import torch_deq_nets

    return torch_deq_nets


def _tensor(a):
    import torch

    return torch.from_numpy(np.array(a, dtype=np.float64))


def _run(deq, layer, x, z0, weights, settings=None, outputs=lambda solution: solution.z):
    """(z, gradients of a fixed linear loss of z with respect to x and the layer's weights) by
    the module (``settings`` None) or by deqcore.solve with ``settings``; ``outputs`` picks
    another differentiable part of the solution than z."""
    import torch

    x = x.detach().clone().requires_grad_(True)
    solution = deq(x, z0)[1] if settings is None else deqcore.solve(layer, x, z0, **settings)
    z = outputs(solution)
    parts = z if isinstance(z, tuple) else (z,)
    loss = sum((p * w).sum() for p, w in zip(parts, weights, strict=True))
    grads = torch.autograd.grad(loss, [x, *layer.parameters()])
    return [p.detach().numpy() for p in parts], [g.numpy() for g in grads], solution


@pytest.mark.parametrize(("settings", "tuple_state"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_forward_and_gradients_equal_the_functional_solve(nets, settings, tuple_state):
    import deqcore_torch

    layer = nets.TanhLayer(tuple_state)
    deq = deqcore_torch.DEQ(layer, **settings)
    rng = np.random.default_rng(3)
    x = _tensor(rng.standard_normal((4, nets.D)))
    z0 = nets.zeros_state(x, tuple_state)
    weights = [_tensor(rng.standard_normal(p.shape)) for p in (z0 if tuple_state else (z0,))]
    z_mod, g_mod, sol_mod = _run(deq, layer, x, z0, weights)
    z_ref, g_ref, sol_ref = _run(None, layer, x, z0, weights, settings)
    assert sol_mod.grad == settings["grad"] and bool(sol_mod.converged.all())
    assert int(sol_mod.nfe) == int(sol_ref.nfe)
    for a, b in zip(z_mod + g_mod, z_ref + g_ref, strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-12)
    assert all(np.abs(g).max() > 1e-3 for g in g_mod)  # the gradients reach x and every weight


def test_correction_states_pass_through_with_the_functional_solves_gradients(nets):
    """``correction_states`` is no setting of the module: it reaches the solve unchanged, and
    each state carries the functional solve's phantom gradient."""
    import deqcore_torch

    layer = nets.TanhLayer(False)
    settings = dict(solver="anderson", tol=1e-12, max_iter=10, correction_states=2,
                    correction_grad_options={"k": 3, "lam": 0.7})
    deq = deqcore_torch.DEQ(layer, **settings)
    rng = np.random.default_rng(4)
    x = _tensor(rng.standard_normal((4, nets.D)))
    z0 = nets.zeros_state(x, False)
    weights = [_tensor(rng.standard_normal(z0.shape)) for _ in range(2)]
    def states(solution):
        return solution.correction_states

    states_mod, g_mod, _ = _run(deq, layer, x, z0, weights, outputs=states)
    states_ref, g_ref, _ = _run(None, layer, x, z0, weights, settings, outputs=states)
    assert len(states_mod) == 2 and np.abs(states_mod[0] - states_mod[1]).max() > 1e-6  # steps 5 and 10
    for a, b in zip(states_mod + g_mod, states_ref + g_ref, strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-12)
    assert all(np.abs(g).max() > 1e-3 for g in g_mod)


def test_train_and_eval_modes_solve_with_their_own_settings(nets):
    import deqcore_torch

    layer = nets.TanhLayer()
    deq = deqcore_torch.DEQ(layer, solver="anderson", tol=1e-12, max_iter=60,
                            train=dict(max_iter=3, grad="jfb"), eval=dict(solver="broyden"))
    x = _tensor(np.random.default_rng(4).standard_normal((3, nets.D)))
    assert deq.training and dict(deq.settings) == dict(solver="anderson", tol=1e-12, max_iter=3, grad="jfb")
    for training, expected in ((True, dict(solver="anderson", max_iter=3, grad="jfb")),
                               (False, dict(solver="broyden", max_iter=60))):
        deq.train(training)
        z, solution = deq(x)
        reference = deqcore.solve(layer, x, tol=1e-12, **expected)
        np.testing.assert_array_equal(z.detach().numpy(), reference.z.detach().numpy())
        assert (solution.solver, int(solution.steps)) == (reference.solver, int(reference.steps))
        assert solution.grad == expected.get("grad", "implicit")
    assert int(deq.settings_for(True)["max_iter"]) == 3 and deq.settings_for(False)["solver"] == "broyden"
    assert "train={'max_iter': 3, 'grad': 'jfb'}" in repr(deq)


@pytest.mark.parametrize(("settings", "error", "match"), [
    (dict(tol=-1.0), ValueError, "DEQ (training mode): deqcore.solve: option 'tol' must be a finite float"),
    (dict(max_iter=0), ValueError, "'max_iter' must be an int >= 1"),
    (dict(stop_mode="max"), ValueError, "'stop_mode' must be one of 'rel', 'abs'"),
    (dict(memroy=4), TypeError, "unknown option 'memroy'. Valid options: beta, lam, memory"),
    (dict(solver="fixed_point", memory=4), TypeError, "solver 'fixed_point': unknown option 'memory'"),
    (dict(solver="newton"), ValueError, "unknown solver 'newton'"),
    (dict(grad="gdeq"), ValueError, "needs solver='broyden'"),
    (dict(grad="implicit", grad_options={"kk": 1}), TypeError, "unknown option 'kk'"),
    (dict(grad=None, grad_options={"k": 1}), TypeError, "grad_options were given but grad=None"),
    (dict(train=dict(memory=0)), ValueError, "DEQ (training mode): solver 'anderson': option 'memory'"),
    (dict(eval=dict(tol="small")), ValueError, "DEQ (evaluation mode): deqcore.solve: option 'tol'"),
    (dict(train=[("tol", 1e-3)]), TypeError, "train= must be a dict of settings, got list"),
    (dict(backend="jax"), TypeError, "'backend' cannot be a setting"),
    (dict(eval=dict(z0=None)), TypeError, "'z0' cannot be a setting"),
])
def test_bad_settings_fail_when_the_module_is_built_or_reconfigured(nets, settings, error, match):
    import deqcore_torch

    with pytest.raises(error, match=match.replace("(", r"\(").replace(")", r"\)")):
        deqcore_torch.DEQ(nets.TanhLayer(), **settings)
    deq = deqcore_torch.DEQ(nets.TanhLayer(), tol=1e-6, eval=dict(max_iter=9))
    before = (dict(deq.settings_for(True)), dict(deq.settings_for(False)))
    with pytest.raises(error):
        deq.configure(**settings)
    assert (dict(deq.settings_for(True)), dict(deq.settings_for(False))) == before


def test_configure_updates_checked_settings_and_f_must_be_callable(nets):
    import deqcore_torch

    deq = deqcore_torch.DEQ(nets.TanhLayer(), solver="anderson", beta=0.9)
    with pytest.raises(TypeError, match="unknown option 'beta'"):
        deq.configure(solver="broyden")  # the shared beta=0.9 does not fit Broyden
    assert deq.configure(tol=1e-9, train=dict(max_iter=4)) is deq
    deq.configure(train=dict(grad="jfb"))
    assert dict(deq.settings) == dict(solver="anderson", beta=0.9, tol=1e-9, max_iter=4, grad="jfb")
    deq.configure(solver="broyden", eval=dict(tol=1e-7), replace=True)
    assert (dict(deq.settings_for(True)), dict(deq.settings_for(False))) == (
        dict(solver="broyden"), dict(solver="broyden", tol=1e-7))
    with pytest.raises(TypeError, match="read-only|does not support item assignment"):
        deq.settings["tol"] = 1.0
    with pytest.raises(TypeError, match="f must be a module or a callable f\\(z, x\\), got Tensor"):
        deqcore_torch.DEQ(_tensor([1.0]))


def test_a_keyword_the_solve_gains_later_passes_through_to_it(nets, monkeypatch):
    import inspect

    import deqcore_torch

    from deqcore import _solve_settings

    seen, real_solve = {}, deqcore.solve

    def solve(f, x, z0=None, *, extra_option=None, **settings):
        seen["extra_option"] = extra_option
        return real_solve(f, x, z0, **settings)

    parameters = [*inspect.signature(deqcore.solve).parameters.values(),
                  inspect.Parameter("extra_option", inspect.Parameter.KEYWORD_ONLY)]
    solve.__signature__ = inspect.Signature(sorted(parameters, key=lambda p: p.kind))  # **options last
    monkeypatch.setattr(_solve_settings, "solve", solve)
    monkeypatch.setattr(deqcore, "solve", solve)
    deq = deqcore_torch.DEQ(nets.TanhLayer(), tol=1e-8, eval=dict(extra_option=3))
    with pytest.raises(TypeError, match="unknown option 'extra_optoin'"):
        deq.configure(extra_optoin=3)
    deq.eval()(_tensor(np.zeros((2, nets.D))))
    assert seen == {"extra_option": 3}


def test_last_solution_is_kept_for_logging_without_a_graph(nets):
    import deqcore_torch
    import torch
    from torch.utils._pytree import tree_leaves

    from deqcore.extend import SOLUTION_DATA_FIELDS

    deq = deqcore_torch.DEQ(nets.TanhLayer(True), tol=1e-10)
    assert deq.last_solution is None
    x = _tensor(np.random.default_rng(5).standard_normal((2, nets.D))).requires_grad_(True)
    z, solution = deq(x, nets.zeros_state(x, True))
    kept = deq.last_solution
    assert all(t.grad_fn is not None for t in z)
    kept_tensors = [t for t in tree_leaves([getattr(kept, name) for name in SOLUTION_DATA_FIELDS])
                    if isinstance(t, torch.Tensor)]
    assert len(kept_tensors) > len(SOLUTION_DATA_FIELDS) and all(t.grad_fn is None for t in kept_tensors)
    for a, b in zip(kept.z, z, strict=True):
        np.testing.assert_array_equal(a.numpy(), b.detach().numpy())
    assert int(kept.nfe) == int(solution.nfe) and kept.backward is solution.backward
    sum(t.sum() for t in z).backward()
    assert kept.backward.calls == 1 and bool(kept.backward.converged.all())


def test_state_dict_deepcopy_pickle_and_dtype_moves_keep_the_model(nets):
    import torch

    settings = dict(solver="broyden", tol=1e-11, max_iter=100, train=dict(grad="npg"))
    model = nets.DEQNet(settings)
    data = nets.batch(4)
    features, target = _tensor(data["features"]), _tensor(data["target"])

    def outputs(m):
        m.zero_grad()
        loss = nets.mse(m, features, target)
        loss.backward()
        return [loss.detach().numpy()] + [p.grad.numpy().copy() for p in m.parameters()]

    expected = outputs(model)
    assert sorted(model.state_dict()) == ["deq.f.W", "encoder.bias", "encoder.weight", "head.bias",
                                          "head.weight"]
    other = nets.DEQNet(settings, seed=7)
    other.load_state_dict(model.state_dict())
    single = nets.DEQNet(settings).to(torch.float32)
    assert single(features.float()).dtype == single.deq.f.W.dtype == torch.float32
    moved = single.to(torch.float64)
    moved.load_state_dict(model.state_dict())
    for copied in (other, copy.deepcopy(model), pickle.loads(pickle.dumps(model)), moved):
        assert dict(copied.deq.settings) == dict(model.deq.settings)
        for a, b in zip(outputs(copied), expected, strict=True):
            np.testing.assert_allclose(a, b, rtol=0, atol=1e-12)
    clone = copy.deepcopy(model)
    with torch.no_grad():
        clone.deq.f.W.mul_(0.5)
    assert not torch.equal(clone.deq.f.W, model.deq.f.W)  # the copy's parameters are its own


def test_compiled_model_breaks_its_graph_only_at_the_solve(nets):
    import torch
    from torch import _dynamo

    model = nets.DEQNet(dict(solver="anderson", tol=1e-12, max_iter=100))
    data = nets.batch(5)
    features, target = _tensor(data["features"]), _tensor(data["target"])
    explained = _dynamo.explain(model)(features)
    assert explained.graph_break_count == 1, [r.reason for r in explained.break_reasons]
    reason = explained.break_reasons[0]
    assert "DEQ._solve" in reason.reason and "the fixed-point solve runs eagerly" in reason.reason
    assert explained.graph_count == 2  # the encoder before the solve, the head and loss after it
    compiled = torch.compile(model)
    results = []
    for m in (compiled, model):
        model.zero_grad()
        loss = nets.mse(m, features, target)
        loss.backward()
        results.append([loss.detach().numpy()] + [p.grad.numpy().copy() for p in model.parameters()])
    for a, b in zip(*results, strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-12)


def test_ddp_gradients_equal_one_process_on_the_whole_batch(nets):
    cases = [dict(settings=dict(solver="anderson", tol=1e-12, max_iter=200)),
             dict(settings=dict(solver="broyden", tol=1e-12, max_iter=200, train=dict(grad="jfb")),
                  tuple_state=True)]
    ranks = run_ranks(nets.gradients_worker, 2, cases, nets.batch(6))
    for i in range(len(cases)):
        ddp0, ddp1, reference = ranks[0][i]["ddp"], ranks[1][i]["ddp"], ranks[0][i]["reference"]
        assert set(ddp0) == set(reference) and any(name.startswith("deq.f.") for name in reference)
        for name, expected in reference.items():
            np.testing.assert_array_equal(ddp0[name], ddp1[name])
            np.testing.assert_allclose(ddp0[name], expected, rtol=0, atol=1e-10, err_msg=name)


@pytest.mark.equivalence
@pytest.mark.parametrize("grad", ["implicit", "jfb"])
def test_module_equals_the_jax_functional_solve_for_the_same_weights(nets, grad):
    import deqcore_torch
    import jax
    import jax.numpy as jnp

    layer = nets.TanhLayer(True)
    deq = deqcore_torch.DEQ(layer, solver="anderson", tol=1e-12, max_iter=200, grad=grad)
    rng = np.random.default_rng(6)
    x = rng.standard_normal((3, nets.D))
    weights = [rng.standard_normal((3, nets.D)), rng.standard_normal((3, nets.D2))]
    x_t = _tensor(x)
    z_t, g_t, _ = _run(deq, layer, x_t, nets.zeros_state(x_t, True), [_tensor(w) for w in weights])

    def f(z, x_, p):
        z1, z2 = z
        return jnp.tanh(z1 @ p["W"].T + x_), jnp.tanh(z2 @ p["A"].T + z1 @ p["C"].T)

    def loss(x_, p):
        z0 = (jnp.zeros_like(x_), jnp.zeros((x_.shape[0], nets.D2)))
        sol = deqcore.solve(lambda z, xx: f(z, xx, p), x_, z0, solver="anderson", tol=1e-12, max_iter=200,
                            grad=grad)
        return sum((a * w).sum() for a, w in zip(sol.z, weights, strict=True)), sol.z

    params = {k: jnp.asarray(v) for k, v in layer.weights().items()}
    (_, z_j), (gx, gp) = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(jnp.asarray(x), params)
    names = [n for n, _ in layer.named_parameters()]
    for a, b in zip(z_t + g_t, [*z_j, gx, *(gp[n] for n in names)], strict=True):
        np.testing.assert_allclose(a, np.asarray(b), rtol=0, atol=1e-10)
