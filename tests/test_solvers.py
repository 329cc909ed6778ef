"""Solver behaviour on both backends: exact float64 checks against the algorithms' math."""

from __future__ import annotations

import numpy as np
import pytest
from problems import scaled_gaussian, tanh_deq, tanh_fixed_point

import deqcore
from deqcore.extend import Problem
from deqcore.solvers import Broyden
from deqcore.solvers._anderson import mixing_weights
from deqcore.solvers._broyden import apply_inverse, apply_inverse_transpose

SOLVERS = ["fixed_point", "anderson", "broyden"]


def affine_problem(h, d, batch=2, seed=0, rho=0.9):
    rng = np.random.default_rng(seed)
    A = scaled_gaussian(rng, d, rho)
    c = rng.standard_normal(d)
    x = rng.standard_normal((batch, d))
    exact = np.linalg.solve(np.eye(d) - A, (x + c).T).T
    return h.affine_layer(A, c), h.asarray(x), exact


@pytest.mark.parametrize("solver", SOLVERS)
def test_tanh_deq_reaches_reference_fixed_point(h, solver):
    W, U, b, x = tanh_deq(seed=1)
    f = h.tanh_layer(W, U, b)
    sol = h.solve(f, h.asarray(x), solver=solver, tol=1e-11, max_iter=300, jit=True)
    ref = tanh_fixed_point(W, U, b, x)
    assert h.numpy(sol.converged).all()
    assert sol.result is deqcore.Status.CONVERGED
    np.testing.assert_allclose(h.numpy(sol.z), ref, atol=1e-9)
    # the reported residual is the residual of the returned z
    z = h.numpy(sol.z)
    fz = np.tanh(z @ W.T + x @ U.T + b)
    np.testing.assert_allclose(h.numpy(sol.abs_residual), np.linalg.norm(fz - z, axis=1), rtol=1e-6,
                               atol=1e-15)


@pytest.mark.parametrize("d", [4, 8, 16])
def test_broyden_affine_contraction_within_2d_steps(h, d):
    f, x, exact = affine_problem(h, d, seed=d)
    sol = h.solve(f, x, solver="broyden", tol=1e-10, max_iter=4 * d)
    assert h.numpy(sol.converged).all()
    assert int(h.numpy(sol.steps)) <= 2 * d
    np.testing.assert_allclose(h.numpy(sol.z), exact, atol=1e-8)


@pytest.mark.parametrize("d", [4, 8])
def test_anderson_affine_contraction_gmres_bound(h, d):
    f, x, exact = affine_problem(h, d, seed=10 + d)
    sol = h.solve(f, x, solver="anderson", tol=1e-8, max_iter=50, memory=d + 3, lam=1e-12)
    assert h.numpy(sol.converged).all()
    assert int(h.numpy(sol.nfe)) <= d + 2
    np.testing.assert_allclose(h.numpy(sol.z), exact, atol=1e-7)


def _flat_problem(h, f, x):
    return Problem(h.backend, lambda z: f(z, x), x.shape[0], x.shape[1], x.dtype)


def test_broyden_secant_condition_and_dense_products(h):
    W, U, b, x_np = tanh_deq(seed=3, d=8, batch=3)
    f, x = h.tanh_layer(W, U, b), h.asarray(x_np)
    problem = _flat_problem(h, f, x)
    solver = Broyden(max_iter=30, memory=4, line_search=False, ls_max_trials=3)
    xp = h.xp
    z0 = xp.zeros_like(x)
    fz0 = problem.fn(z0)
    state = solver.init(problem, z0, fz0)
    active = xp.ones(x.shape[0], dtype=xp.bool)
    z_new, fz_new, state, nfe = solver.step(problem, state, active)
    np.testing.assert_array_equal(h.numpy(z_new), h.numpy(fz0))  # step 1 is z1 = f(z0)
    m = 4

    def pairs(state):  # the stored pairs: slots past count are unused (and not zeroed on torch)
        used = min(int(h.numpy(h.xp.asarray(state.count))), m)
        return np.array(h.numpy(state.U))[:, :used], np.array(h.numpy(state.V))[:, :used]

    for t in range(1, 11):
        prev_z, prev_g = np.array(h.numpy(state.z)), np.array(h.numpy(state.fz - state.z))
        U_before, V_before = pairs(state)
        state = solver.commit(problem, state, z_new, fz_new, fz_new - z_new, active, active)
        dz = np.array(h.numpy(z_new)) - prev_z
        dg = np.array(h.numpy(fz_new - z_new)) - prev_g
        U_, V_ = pairs(state)
        slot = (t - 1) % m  # pair t lives in slot (t - 1) % m; the other slots are untouched
        others = [i for i in range(U_before.shape[1]) if i != slot]
        np.testing.assert_array_equal(U_[:, others], U_before[:, others])
        np.testing.assert_array_equal(V_[:, others], V_before[:, others])
        # the new pair is the rank-one update that makes (B_before + u v^T) dg = dz
        dense_before = -np.eye(8) + np.einsum("bmi,bmj->bij", U_before, V_before)
        updated = dense_before + np.einsum("bi,bj->bij", U_[:, slot], V_[:, slot])
        np.testing.assert_allclose(np.einsum("bij,bj->bi", updated, dg), dz, atol=1e-10)
        dense = -np.eye(8) + np.einsum("bmi,bmj->bij", U_, V_)
        if t <= m:  # before the ring wraps, the stored B itself satisfies the secant condition
            np.testing.assert_allclose(np.einsum("bij,bj->bi", dense, dg), dz, atol=1e-10)
        y = np.random.default_rng(t).standard_normal((3, 8))
        Ub, Vb = h.asarray(U_), h.asarray(V_)
        np.testing.assert_allclose(h.numpy(apply_inverse(xp, Ub, Vb, h.asarray(y))),
                                   np.einsum("bij,bj->bi", dense, y), atol=1e-12)
        np.testing.assert_allclose(h.numpy(apply_inverse_transpose(xp, Ub, Vb, h.asarray(y))),
                                   np.einsum("bi,bij->bj", y, dense), atol=1e-12)
        z_new, fz_new, state, nfe = solver.step(problem, state, active)


def test_broyden_ring_memory_semantics(h):
    W, U, b, x = tanh_deq(seed=4, d=12, batch=2, sym=True)
    f, xa = h.tanh_layer(W, U, b), h.asarray(x)
    kw = dict(solver="broyden", tol=1e-13, max_iter=20)
    full = h.solve(f, xa, **kw)
    same = h.solve(f, xa, memory=20, **kw)
    bigger = h.solve(f, xa, memory=40, **kw)
    small = h.solve(f, xa, memory=3, **kw)
    np.testing.assert_array_equal(h.numpy(full.z), h.numpy(same.z))
    np.testing.assert_allclose(h.numpy(full.z), h.numpy(bigger.z), atol=1e-14)
    assert np.abs(h.numpy(full.z) - h.numpy(small.z)).max() > 1e-12
    assert h.numpy(small.solver_state.U).shape == (2, 3, 12)


def test_broyden_memory_zero_is_fixed_point_iteration(h):
    W, U, b, x = tanh_deq(seed=5)
    f, xa = h.tanh_layer(W, U, b), h.asarray(x)
    a = h.solve(f, xa, solver="broyden", memory=0, tol=1e-8, max_iter=40)
    p = h.solve(f, xa, solver="fixed_point", tol=1e-8, max_iter=40)
    np.testing.assert_allclose(h.numpy(a.z), h.numpy(p.z), atol=1e-14)
    assert int(h.numpy(a.nfe)) == int(h.numpy(p.nfe))


def test_broyden_line_search_converges_and_counts_evaluations(h):
    W, U, b, x = tanh_deq(seed=6, d=16, batch=4, rho=0.95, sym=True)
    f, xa = h.tanh_layer(W, U, b), h.asarray(x)
    sol = h.solve(f, xa, solver="broyden", line_search=True, tol=1e-10, max_iter=60, jit=True)
    assert h.numpy(sol.converged).all()
    assert int(h.numpy(sol.nfe)) >= int(h.numpy(sol.steps)) + 1
    np.testing.assert_allclose(h.numpy(sol.z), tanh_fixed_point(W, U, b, x, 4000), atol=1e-8)


def test_anderson_weights_match_bordered_system(h):
    rng = np.random.default_rng(7)
    G = rng.standard_normal((3, 4, 10))
    valid = np.array([True, True, True, False])
    G[:, 3] = 0.0
    lam = 1e-3
    alpha, singular = mixing_weights(h.backend, h.asarray(G @ G.transpose(0, 2, 1)), lam,
                                     h.asarray(valid, dtype=bool))
    alpha = h.numpy(alpha)
    assert not h.numpy(singular).any()
    for b in range(3):
        Gv = G[b, :3]
        s = np.mean(np.sum(Gv * Gv, axis=1))
        k = 3
        M = np.zeros((k + 1, k + 1))
        M[0, 1:] = M[1:, 0] = 1.0
        M[1:, 1:] = Gv @ Gv.T + lam * s * np.eye(k)
        nu_alpha = np.linalg.solve(M, np.r_[1.0, np.zeros(k)])
        np.testing.assert_allclose(alpha[b, :3], nu_alpha[1:], atol=1e-12)
        assert alpha[b, 3] == 0.0
    np.testing.assert_allclose(alpha.sum(axis=1), 1.0, atol=1e-12)


@pytest.mark.parametrize("solver", SOLVERS)
def test_lowest_residual_iterate_is_returned_and_traces_padded(h, solver):
    W, U, b, x = tanh_deq(seed=8, d=16, batch=5, sym=True, rho=0.95)
    f, xa = h.tanh_layer(W, U, b), h.asarray(x)
    sol = h.solve(f, xa, solver=solver, tol=1e-6, max_iter=12)
    rel_trace = h.numpy(sol.rel_trace)
    assert rel_trace.shape == (13, 5)
    np.testing.assert_allclose(h.numpy(sol.rel_residual), rel_trace.min(axis=0), rtol=1e-12)
    its = h.numpy(sol.iterations)
    for s in range(5):  # after a sample stops, its trace repeats its final value
        assert (rel_trace[its[s]:, s] == rel_trace[its[s], s]).all()


@pytest.mark.parametrize("solver", SOLVERS)
def test_batch_solve_equals_per_sample_solves(h, solver):
    W, U, b, x = tanh_deq(seed=9, d=16, batch=4, sym=True)
    f = h.tanh_layer(W, U, b)
    batch = h.solve(f, h.asarray(x), solver=solver, tol=1e-9, max_iter=80)
    for i in range(4):
        single = h.solve(f, h.asarray(x[i:i + 1]), solver=solver, tol=1e-9, max_iter=80)
        np.testing.assert_allclose(h.numpy(batch.z)[i], h.numpy(single.z)[0], atol=1e-8)
        assert int(h.numpy(batch.iterations)[i]) == int(h.numpy(single.iterations)[0])


@pytest.mark.parametrize("solver", SOLVERS)
def test_converged_samples_stop_changing(h, solver):
    W, U, b, x = tanh_deq(seed=10, d=16, batch=4, sym=True)
    f, xa = h.tanh_layer(W, U, b), h.asarray(x)
    long = h.solve(f, xa, solver=solver, tol=1e-8, max_iter=80)
    its = h.numpy(long.iterations)
    first = int(np.argmin(its))
    assert its[first] < its.max()  # samples converge at different steps
    short = h.solve(f, xa, solver=solver, tol=1e-8, max_iter=int(its[first]))
    # the early sample is frozen: the longer run returns it bit for bit unchanged
    np.testing.assert_array_equal(h.numpy(long.z)[first], h.numpy(short.z)[first])
    assert h.numpy(short.converged)[first] and not h.numpy(short.converged).all()


def test_fixed_point_damping(h):
    f, x, exact = affine_problem(h, 6, seed=11)
    plain = h.solve(f, x, solver="fixed_point", tol=1e-10, max_iter=500)
    damped = h.solve(f, x, solver="fixed_point", damping=0.5, tol=1e-10, max_iter=500)
    np.testing.assert_allclose(h.numpy(damped.z), exact, atol=1e-8)
    np.testing.assert_allclose(h.numpy(plain.z), exact, atol=1e-8)
    # a damped first step moves halfway to f(z0)
    one = h.solve(f, x, solver="fixed_point", damping=0.5, tol=1e-14, max_iter=1)
    fz0 = h.numpy(f(h.xp.zeros_like(x), x))
    np.testing.assert_allclose(h.numpy(one.z), 0.5 * fz0, atol=1e-15)


@pytest.mark.parametrize("solver", SOLVERS)
def test_tuple_state_equals_flat_state(h, solver):
    W, U, b, x = tanh_deq(seed=12, d=10, batch=3)
    f = h.tanh_layer(W, U, b)
    xa = h.asarray(x)
    xp = h.xp

    def f_tuple(z, x):
        a, c = z
        flat = xp.concat([a, xp.reshape(c, (c.shape[0], -1))], axis=1)
        out = f(flat, x)
        return out[:, :4], xp.reshape(out[:, 4:], (out.shape[0], 2, 3))

    z0 = (xp.zeros_like(xa[:, :4]), xp.reshape(xp.zeros_like(xa[:, 4:]), (3, 2, 3)))
    flat = h.solve(f, xa, solver=solver, tol=1e-10, max_iter=100)
    tup = h.solve(f_tuple, xa, z0, solver=solver, tol=1e-10, max_iter=100)
    assert isinstance(tup.z, tuple) and tuple(tup.z[1].shape) == (3, 2, 3)
    joined = np.concatenate([h.numpy(tup.z[0]), h.numpy(tup.z[1]).reshape(3, -1)], axis=1)
    np.testing.assert_allclose(joined, h.numpy(flat.z), atol=1e-13)


@pytest.mark.parametrize("solver", SOLVERS)
def test_float32_smoke(h, solver):
    W, U, b, x = tanh_deq(seed=13, d=64, batch=8)
    W, U, b, x = (a.astype(np.float32) for a in (W, U, b, x))
    f = h.tanh_layer(W, U, b)
    sol = h.solve(f, h.asarray(x, dtype="float32"), solver=solver, tol=1e-4, jit=True)
    assert str(h.numpy(sol.z).dtype) == "float32"
    assert h.numpy(sol.converged).all()
    ref = tanh_fixed_point(*(a.astype(np.float64) for a in (W, U, b, x)))
    np.testing.assert_allclose(h.numpy(sol.z), ref, atol=1e-3)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.backend("torch")
def test_half_precision_torch(solver, dtype):
    import torch

    W, U, b, x = tanh_deq(seed=14, d=32, batch=4, rho=0.5)
    ref = tanh_fixed_point(W, U, b, x)
    tdtype = getattr(torch, dtype)
    Wt, Ut, bt, xt = (torch.tensor(a, dtype=tdtype) for a in (W, U, b, x))
    sol = deqcore.solve(lambda z, x: torch.tanh(z @ Wt.T + x @ Ut.T + bt), xt, solver=solver, tol=2e-2)
    assert sol.z.dtype == tdtype
    assert sol.converged.all()
    np.testing.assert_allclose(sol.z.float().numpy(), ref, atol=0.1)


@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.backend("jax")
def test_jax_jit_and_vmap(solver):
    import jax
    from conftest import Harness

    h = Harness("jax")
    W, U, b, x = tanh_deq(seed=15, d=12, batch=5)
    f = h.tanh_layer(W, U, b)
    xa = h.asarray(x)
    kw = dict(solver=solver, tol=1e-10, max_iter=100)
    batched = jax.jit(lambda x: deqcore.solve(f, x, **kw))(xa)
    single = jax.jit(jax.vmap(lambda xi: deqcore.solve(f, xi, batched=False, **kw)))(xa)
    assert single.z.shape == xa.shape
    np.testing.assert_allclose(np.asarray(single.z), np.asarray(batched.z), atol=1e-9)
    assert np.asarray(single.converged).shape == (5, 1) and np.asarray(single.converged).all()


@pytest.mark.backend("jax")
def test_eager_jax_solves_do_not_accumulate_compiled_code():
    """Every eager solve traces a new loop body. JAX's cache of eagerly run loop primitives kept
    one executable per body for the life of the process, about 170 memory mappings per solve on
    this problem, until the process crashed inside the compiler at the kernel's limit of 65530
    mappings. Solves with new closures and with the same one (each the common eager pattern)
    must leave the count of mappings where it was, and give the jitted answer."""
    import jax
    from conftest import Harness

    h = Harness("jax")
    W, U, b, x = tanh_deq(seed=16, d=8, batch=3)
    xa = h.asarray(x)
    kw = dict(solver="anderson", tol=1e-10, max_iter=60)

    def mappings() -> int:
        with open("/proc/self/maps") as fh:
            return sum(1 for _ in fh)

    f = h.tanh_layer(W, U, b)
    for grad in (None, "implicit", "unroll"):
        deqcore.solve(f, xa, grad=grad, **kw)
    before = mappings()
    for i in range(12):
        g = h.tanh_layer(W, U, b) if i % 2 else f
        sol = deqcore.solve(g, xa, grad=(None, "implicit", "unroll")[i % 3], **kw)
    grown = mappings() - before
    assert grown < 12 * 20, f"{grown} new memory mappings after 12 eager solves"
    jitted = jax.jit(lambda x: deqcore.solve(f, x, **kw))(xa)
    np.testing.assert_allclose(np.asarray(sol.z), np.asarray(jitted.z), atol=1e-12)


def test_solution_summary_and_result(h):
    W, U, b, x = tanh_deq(seed=16)
    sol = h.solve(h.tanh_layer(W, U, b), h.asarray(x), solver="anderson", tol=1e-12, max_iter=3)
    assert sol.result is deqcore.Status.MAX_ITER
    assert (h.numpy(sol.status) == int(deqcore.Status.MAX_ITER)).all()
    text = sol.summary()
    assert "anderson" in text and "MAX_ITER" in text and "0/4 converged" in text


@pytest.mark.parametrize("name, cls, options", [
    ("anderson", deqcore.solvers.Anderson, {"memory": 3, "beta": 0.8}),
    ("broyden", deqcore.solvers.Broyden, {"memory": 4}),
    ("fixed_point", deqcore.solvers.FixedPoint, {"damping": 0.7}),
])
def test_a_solver_instance_solves_exactly_as_its_name_and_options(h, name, cls, options):
    f, x, exact = affine_problem(h, 12, batch=3, seed=4)
    instance = cls(**options)
    by_name = h.solve(f, x, solver=name, tol=1e-10, max_iter=80, **options)
    for max_iter in (80, 7):  # one instance, many solves: each gets its own budget
        sol = h.solve(f, x, solver=instance, tol=1e-10, max_iter=max_iter, jit=True)
        assert sol.solver == name and int(h.numpy(sol.steps)) <= max_iter
    assert instance.max_iter is None  # solve configured a copy
    sol = h.solve(f, x, solver=instance, tol=1e-10, max_iter=80)
    np.testing.assert_array_equal(h.numpy(sol.z), h.numpy(by_name.z))
    np.testing.assert_allclose(h.numpy(sol.z), exact, atol=1e-8)
    assert int(h.numpy(sol.nfe)) == int(h.numpy(by_name.nfe))


def test_solver_options_are_declared_once_and_checked_when_the_solver_is_built():
    from deqcore.extend import Option

    assert list(deqcore.solvers.Anderson.options) == ["memory", "beta", "lam"]
    assert isinstance(deqcore.solvers.Anderson.memory, Option)  # on the class: the declaration
    assert deqcore.solvers.Anderson().memory == 5 and deqcore.solvers.Anderson(memory=8).memory == 8
    assert list(deqcore.gradients.NPG.options) == list(deqcore.gradients.UPG.options) == ["k", "lam"]
    with pytest.raises(ValueError, match=r"^solver 'anderson': option 'memory' must be an int >= 1, got 0$"):
        deqcore.solvers.Anderson(memory=0)
    with pytest.raises(TypeError, match=r"^solver 'broyden': unknown option 'tol'\. Valid options: "
                                        r"line_search, ls_max_trials, memory; and for every solver: "
                                        r"batched, .* tol, trace$"):
        deqcore.solvers.Broyden(tol=1e-3)
    with pytest.raises(ValueError, match=r"^gradient mode 'npg': option 'lam' must be a float in \(0, 1\]"):
        deqcore.gradients.NPG(lam=2.0)


def test_a_solver_instance_with_solver_options_or_a_non_solver_is_a_type_error(h):
    f, x, _ = affine_problem(h, 4)
    with pytest.raises(TypeError, match=r"solver options memory were given beside a solver instance "
                                        r"\('anderson'\); pass them when building it"):
        h.solve(f, x, solver=deqcore.solvers.Anderson(), memory=3)
    with pytest.raises(TypeError, match=r"solver=Anderson is a class; pass an instance "
                                        r"\(Anderson\(\.\.\.\)\)"):
        h.solve(f, x, solver=deqcore.solvers.Anderson)
    with pytest.raises(TypeError, match=r"got int$"):
        h.solve(f, x, solver=3)


def test_any_bindable_object_is_a_solver(h):
    """The protocol, not the base class: an object with a name and bind() that returns a Solver."""
    f, x, exact = affine_problem(h, 6, seed=2)
    calls = []

    class Relaxed:
        name = "relaxed"

        def bind(self, backend, structure, like, *, max_iter):
            calls.append((backend.name, structure.n, str(like.dtype), max_iter))
            return deqcore.solvers.FixedPoint(damping=0.9).bind(backend, structure, like, max_iter=max_iter)

    sol = h.solve(f, x, solver=Relaxed(), tol=1e-10, max_iter=400)
    assert sol.solver == "relaxed" and h.numpy(sol.converged).all()
    np.testing.assert_allclose(h.numpy(sol.z), exact, atol=1e-8)
    assert calls == [(h.name, 6, str(x.dtype), 400)]


def test_solve_parameters_list_the_signature_of_solve():
    import inspect

    from deqcore._inputs import COMMON_OPTIONS, SOLVE_PARAMETERS

    params = inspect.signature(deqcore.solve).parameters
    assert SOLVE_PARAMETERS == tuple(n for n, p in params.items() if p.kind is not p.VAR_KEYWORD)
    # the defaults of the signature are the declared ones
    assert {n: params[n].default for n in COMMON_OPTIONS} == {n: o.default for n, o in COMMON_OPTIONS.items()}
