"""Fixed-point correction: ``solve(..., correction_states=...)`` returns the states a solve stopped
at those steps would return, per sample, under jit and vmap, equal on torch and JAX, each with
the phantom gradient of damped steps from its detached value; bad settings are clear errors."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import Harness
from problems import tanh_deq

import deqcore
from deqcore.internal import correction_steps

SOLVERS = ["fixed_point", "anderson", "broyden"]
PROBLEM = {"seed": 61, "d": 12, "batch": 5, "sym": True, "rho": 0.95}


def _layer(h, W, U, b):
    """The tanh layer with ``W`` given as a framework array (so gradients can flow to it)."""
    Ub, bb = h.asarray(U), h.asarray(b)
    return lambda z, x: h.xp.tanh(z @ W.T + x @ Ub.T + bb)


def _solve(h, **kw):
    W, U, b, x = tanh_deq(**PROBLEM)
    return h.solve(h.tanh_layer(W, U, b), h.asarray(x), **kw)


def _fixed_point_reference(steps, tol, max_iter):
    """Plain iteration in NumPy with the loop's per-sample freezing (rel residual <= tol) and its
    lowest-residual iterate: the best iterate of each sample after each of ``steps``."""
    W, U, b, x = tanh_deq(**PROBLEM)
    f = lambda z: np.tanh(z @ W.T + x @ U.T + b)  # noqa: E731
    z = np.zeros_like(x)
    fz = f(z)
    rel = np.linalg.norm(fz - z, axis=1) / (np.linalg.norm(fz, axis=1) + 1e-9)
    best, best_rel, active = z.copy(), rel.copy(), rel > tol
    out = []
    for t in range(1, max_iter + 1):
        z = np.where(active[:, None], fz, z)
        fz = f(z)
        rel_new = np.linalg.norm(fz - z, axis=1) / (np.linalg.norm(fz, axis=1) + 1e-9)
        better = active & (rel_new < best_rel)
        best = np.where(better[:, None], z, best)
        best_rel = np.where(better, rel_new, best_rel)
        active = active & (rel_new > tol)
        if t in steps:
            out.append(best.copy())
    return out


def test_int_states_are_spaced_as_torchdeq_n_states():
    assert correction_steps(0, 10) == ()
    assert correction_steps(3, 10) == (4, 7, 10)  # every 10 // 3 steps, the last at max_iter
    assert correction_steps(4, 8) == (2, 4, 6, 8)
    assert correction_steps(1, 18) == (18,)
    assert correction_steps(5, 5) == (1, 2, 3, 4, 5)
    assert correction_steps([2, 9], 9) == (2, 9)


def test_fixed_point_states_equal_a_hand_rolled_iteration(h):
    # tol 1e-6: samples freeze at different steps between the recorded ones
    steps = (1, 4, 9, 20, 40)
    sol = _solve(h, solver="fixed_point", tol=1e-6, max_iter=40, correction_states=steps)
    iterations = h.numpy(sol.iterations)
    assert len(set(iterations.tolist())) > 1 and iterations.min() < 40
    assert len(sol.correction_states) == len(steps)
    for state, ref in zip(sol.correction_states, _fixed_point_reference(steps, 1e-6, 40), strict=True):
        np.testing.assert_allclose(h.numpy(state), ref, rtol=0, atol=1e-13)
    np.testing.assert_array_equal(h.numpy(sol.correction_states[-1]), h.numpy(sol.z))


# JAX runs these through the equivalence test below (torch == JAX for every solver)
@pytest.mark.backend("torch")
@pytest.mark.parametrize("solver", SOLVERS)
def test_states_are_what_solves_stopped_at_those_steps_return(solver):
    h = Harness("torch")
    sol = _solve(h, solver=solver, tol=1e-9, max_iter=12, correction_states=2)  # steps 6 and 12
    short = _solve(h, solver=solver, tol=1e-9, max_iter=6)
    np.testing.assert_allclose(h.numpy(sol.correction_states[0]), h.numpy(short.z), rtol=0, atol=1e-12)
    plain = _solve(h, solver=solver, tol=1e-9, max_iter=12)
    np.testing.assert_array_equal(h.numpy(sol.correction_states[1]), h.numpy(plain.z))
    # recording changes nothing else and costs no evaluation of f
    assert plain.correction_states == ()
    np.testing.assert_array_equal(h.numpy(plain.z), h.numpy(sol.z))
    assert int(h.numpy(plain.nfe)) == int(h.numpy(sol.nfe))


@pytest.mark.backend("torch")
def test_steps_after_every_sample_stopped_repeat_the_answer():
    h = Harness("torch")
    sol = _solve(h, solver="anderson", tol=1e-6, max_iter=200, correction_states=(2, 150, 200))
    assert int(h.numpy(sol.steps)) < 150
    early = _solve(h, solver="anderson", tol=1e-6, max_iter=2)
    np.testing.assert_array_equal(h.numpy(sol.correction_states[0]), h.numpy(early.z))
    for state in sol.correction_states[1:]:
        np.testing.assert_array_equal(h.numpy(state), h.numpy(sol.z))


@pytest.mark.backend("torch")
def test_states_keep_the_structure_of_z():
    h = Harness("torch")
    W, U, b, x = tanh_deq(**PROBLEM)
    layer = h.tanh_layer(W, U, b)

    def f(z, x):
        return layer(z[0], x), 0.5 * z[1] + 0.25 * x[:, :3]

    xb = h.asarray(x)
    z0 = (h.xp.zeros_like(xb), h.xp.zeros_like(xb[:, :3]))
    sol = h.solve(f, xb, z0, solver="anderson", tol=1e-10, max_iter=30, correction_states=2)
    assert all(isinstance(s, tuple) and len(s) == 2 for s in sol.correction_states)
    assert tuple(sol.correction_states[0][1].shape) == (5, 3)
    for a, b_ in zip(sol.correction_states[-1], sol.z, strict=True):
        np.testing.assert_array_equal(h.numpy(a), h.numpy(b_))


def _gradient(h, loss, W):
    """d loss / d W for a framework array W."""
    if h.name == "torch":
        import torch

        Wt = W.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(loss(Wt), Wt)
        return g.numpy()
    import jax

    return np.asarray(jax.grad(loss)(W))


def test_gradient_of_the_states_is_the_phantom_gradient(h):
    grad_options = {"k": 2, "lam": 0.7}
    W, U, b, x = tanh_deq(**PROBLEM)
    xb, Wb = h.asarray(x), h.asarray(W)
    rng = np.random.default_rng(0)
    weights = [h.asarray(rng.standard_normal(x.shape)) for _ in range(3)]
    steps = (3, 7, 12)
    kw = dict(solver="fixed_point", tol=1e-10, max_iter=12, correction_states=steps,
              correction_grad_options=grad_options)

    def correction_loss(W_):
        sol = deqcore.solve(_layer(h, W_, U, b), xb, **kw)
        return sum(h.xp.sum(c * s) for c, s in zip(weights, sol.correction_states, strict=True))

    values = [h.asarray(h.numpy(s)) for s in deqcore.solve(_layer(h, Wb, U, b), xb, **kw).correction_states]
    k, lam = grad_options["k"], grad_options["lam"]

    def phantom_reference(W_):
        f = _layer(h, W_, U, b)
        total = 0.0
        for c, z in zip(weights, values, strict=True):
            for _ in range(k):
                z = z + lam * (f(z, xb) - z)
            total = total + h.xp.sum(c * z)
        return total

    got, want = _gradient(h, correction_loss, Wb), _gradient(h, phantom_reference, Wb)
    assert np.abs(want).max() > 1e-3
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.backend("torch")  # the choice is made in deqcore.solve, the same for every backend
def test_z_keeps_its_own_gradient_mode():
    h = Harness("torch")
    W, U, b, x = tanh_deq(**PROBLEM)
    xb, Wb = h.asarray(x), h.asarray(W)

    def z_loss(W_, **extra):
        sol = deqcore.solve(_layer(h, W_, U, b), xb, solver="anderson", tol=1e-11, max_iter=60,
                            grad_options={"tol": 1e-11, "max_iter": 200}, **extra)
        return h.xp.sum(sol.z ** 2)

    np.testing.assert_allclose(_gradient(h, lambda W_: z_loss(W_, correction_states=3), Wb),
                               _gradient(h, z_loss, Wb), rtol=1e-12, atol=1e-14)


@pytest.mark.backend("torch")
def test_without_a_gradient_mode_the_states_carry_none():
    import torch

    W, U, b, x = tanh_deq(**PROBLEM)
    Wt = torch.from_numpy(W).requires_grad_(True)
    f = lambda z, x_: torch.tanh(z @ Wt.T + x_ @ torch.from_numpy(U).T + torch.from_numpy(b))  # noqa: E731
    sol = deqcore.solve(f, torch.from_numpy(x), grad=None, correction_states=2)
    assert not any(s.requires_grad for s in sol.correction_states)
    assert deqcore.solve(f, torch.from_numpy(x), correction_states=2).correction_states[0].requires_grad


@pytest.mark.backend("torch")
def test_compiled_torch_loop_records_the_same_states():
    import torch

    W, U, b, x = tanh_deq(**PROBLEM)
    f = lambda z, x_: torch.tanh(z @ torch.from_numpy(W).T + x_ @ torch.from_numpy(U).T  # noqa: E731
                                 + torch.from_numpy(b))
    kw = dict(solver="fixed_point", tol=1e-6, max_iter=30, correction_states=(3, 10, 30), grad=None)
    eager = deqcore.solve(f, torch.from_numpy(x), **kw)
    compiled = deqcore.solve(f, torch.from_numpy(x), compile=True, **kw)
    for a, b_ in zip(compiled.correction_states, eager.correction_states, strict=True):
        np.testing.assert_allclose(a.numpy(), b_.numpy(), rtol=0, atol=1e-14)


@pytest.mark.backend("jax")
def test_jit_and_vmap_record_the_same_states():
    import jax

    h = Harness("jax")
    kw = dict(solver="fixed_point", tol=1e-6, max_iter=20, correction_states=(2, 6, 20))
    eager = _solve(h, **kw)
    jitted = _solve(h, jit=True, **kw)
    for a, b_ in zip(jitted.correction_states, eager.correction_states, strict=True):
        np.testing.assert_allclose(h.numpy(a), h.numpy(b_), rtol=0, atol=1e-13)
    W, U, b, x = tanh_deq(**PROBLEM)
    layer = h.tanh_layer(W, U, b)
    per_sample = jax.vmap(lambda xi: deqcore.solve(layer, xi[None], batched=False, **kw).correction_states)
    mapped = per_sample(h.asarray(x))
    for a, b_ in zip(mapped, eager.correction_states, strict=True):
        np.testing.assert_allclose(h.numpy(a)[:, 0], h.numpy(b_), rtol=0, atol=1e-12)
    # the per-shard solve returns no states: asking for them is an error, not a silent drop
    from deqcore_jax import solve_per_shard

    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("batch",))
    with pytest.raises(ValueError, match="solve_per_shard does not return correction states"):
        solve_per_shard(layer, h.asarray(x), mesh=mesh, correction_states=2)


@pytest.mark.equivalence
@pytest.mark.parametrize("solver", SOLVERS)
def test_torch_and_jax_record_the_same_states(both, solver):
    states = [[hh.numpy(s) for s in _solve(hh, solver=solver, tol=1e-9, max_iter=14,
                                            correction_states=3).correction_states] for hh in both]
    for a, b_ in zip(*states, strict=True):
        np.testing.assert_allclose(a, b_, rtol=0, atol=1e-12)


@pytest.mark.parametrize("value,error,match", [
    (-1, ValueError, "correction_states' must be an int >= 0 or a non-empty sequence"),
    (True, ValueError, "correction_states' must be"),
    ((), ValueError, "correction_states' must be"),
    ((3, 2), ValueError, "correction_states' must be"),
    ((0, 4), ValueError, "correction_states' must be"),
    ("2", ValueError, "correction_states' must be"),
    (11, ValueError, "correction_states=11 asks for more states than max_iter=10"),
    ((4, 12), ValueError, "step 12 lies past max_iter=10"),
])
def test_bad_correction_states_are_clear_errors(h, value, error, match):
    with pytest.raises(error, match=match):
        _solve(h, max_iter=10, correction_states=value)


def test_bad_correction_gradient_options_are_clear_errors(h):
    with pytest.raises(TypeError, match="correction_grad_options were given but correction_states=0"):
        _solve(h, correction_grad_options={"k": 2})
    with pytest.raises(TypeError, match="correction_grad_options.*unknown option 'bogus'"):
        _solve(h, correction_states=2, correction_grad_options={"bogus": 1})
    with pytest.raises(ValueError, match="correction_grad_options.*'lam' must be a float in"):
        _solve(h, correction_states=2, correction_grad_options={"lam": 2.0})
    with pytest.raises(TypeError, match="correction_grad_options must be a dict"):
        _solve(h, correction_states=2, correction_grad_options=[("k", 2)])
