"""Independent references: deqcore's algorithms against float64 NumPy re-implementations.

Every solver, the solve loop, the gradient modes and the hypersolver pieces are written once
over the backend protocol, so a torch-versus-JAX comparison cannot see a mistake both backends
share. Here each backend is checked on its own against a reference written from the algorithms'
definitions (NumPy, dense linear algebra, exact fixed points of affine maps, finite
differences): Anderson's mixing with damping and regularisation step by step, Broyden's dense
"good" inverse-Jacobian update and its line search, the loop's stop, freeze, divergence and
trace rules at exact thresholds, every gradient mode's adjoint (signs included), a non-finite
sample under autograd, and HyperAnderson's mixer, iteration, losses and optimiser.
"""

from __future__ import annotations

import numpy as np
import pytest
from problems import symmetric_spread, tanh_deq, tanh_fixed_point

import deqcore
from deqcore import Status
from deqcore.extend import Problem
from deqcore.solvers import Anderson, Broyden

EPS = np.finfo(np.float64).eps


def tanh_np(W, U, b, x):
    """The NumPy twin of ``Harness.tanh_layer``: f(z) = tanh(z W^T + x U^T + b) for a fixed x."""
    return lambda z: np.tanh(z @ W.T + x @ U.T + b)


def residuals_np(z, fz):
    """(abs, rel) residuals as documented: ||f(z) - z|| and ||f(z) - z|| / (||f(z)|| + 1e-9)."""
    a = np.linalg.norm(fz - z, axis=-1)
    return a, a / (np.linalg.norm(fz, axis=-1) + 1e-9)


def flat_problem(h, f, x):
    return Problem(h.backend, lambda z: f(z, x), x.shape[0], x.shape[1], x.dtype)


def all_active(h, batch):
    return h.xp.ones(batch, dtype=h.xp.bool)


# --------------------------------------------------------------------------------- Anderson


def anderson_weights_np(Gw, lam):
    """Anderson's weights for one sample's window ``Gw`` (k, n) from the bordered (KKT) system of
    min ||Gw^T a||^2 + lam s ||a||^2 subject to sum(a) = 1, s the mean squared residual norm."""
    k = Gw.shape[0]
    lam = max(lam, 64.0 * EPS)
    s = np.mean(np.sum(Gw * Gw, axis=1))
    M = np.zeros((k + 1, k + 1))
    M[0, 1:] = M[1:, 0] = 1.0
    M[1:, 1:] = Gw @ Gw.T + lam * s * np.eye(k)
    return np.linalg.solve(M, np.r_[1.0, np.zeros(k)])[1:]


def anderson_np(fn, z0, steps, memory, beta, lam, tol=None):
    """Type-II Anderson from ``z0``: ``z <- sum_i a_i (X_i + beta G_i)`` over the last ``memory``
    iterates. Returns the iterates (steps + 1, B, n); with ``tol`` it stops early at the first
    iterate whose rel residual is <= tol for every sample."""
    X, G = [z0], [fn(z0) - z0]
    for _ in range(steps):
        if tol is not None and (residuals_np(X[-1], X[-1] + G[-1])[1] <= tol).all():
            break
        Xw, Gw = np.stack(X[-memory:], 1), np.stack(G[-memory:], 1)
        alpha = np.stack([anderson_weights_np(Gw[b], lam) for b in range(z0.shape[0])])
        z = np.einsum("bk,bkn->bn", alpha, Xw + beta * Gw)
        X.append(z)
        G.append(fn(z) - z)
    return np.stack(X)


ANDERSON_CASES = [  # (memory, beta, lam): ring wrap, damping, a regularisation that matters
    (3, 1.0, 1e-4),
    (3, 0.5, 1e-4),
    (4, 0.7, 0.05),
    (2, 1.3, 1e-8),
    (5, 1.0, 0.0),
]


@pytest.mark.parametrize(("memory", "beta", "lam"), ANDERSON_CASES)
def test_anderson_iterates_match_numpy_step_by_step(h, memory, beta, lam):
    """Through the solver's init/step/commit: every iterate of 9 steps (the ring wraps for
    memory < 9) equals the NumPy reference's, for each damping beta and regularisation lam."""
    W, U, b, x = tanh_deq(seed=300, d=6, batch=3, rho=0.9)
    fn = tanh_np(W, U, b, x)
    steps = 9
    ref = anderson_np(fn, np.zeros_like(x), steps, memory, beta, lam)
    f, xa = h.tanh_layer(W, U, b), h.asarray(x)
    problem = flat_problem(h, f, xa)
    solver = Anderson(max_iter=steps, memory=memory, beta=beta, lam=lam)
    z0 = h.xp.zeros_like(xa)
    state = solver.init(problem, z0, problem.fn(z0))
    active = all_active(h, 3)
    for t in range(1, steps + 1):
        z, fz, state, nfe = solver.step(problem, state, active)
        assert nfe == 1
        np.testing.assert_allclose(h.numpy(z), ref[t], rtol=1e-10, atol=1e-12, err_msg=f"step {t}")
        state = solver.commit(problem, state, z, fz, fz - z, active, active)
    assert not h.numpy(state.breakdowns).any()


@pytest.mark.parametrize(("memory", "beta", "lam"), ANDERSON_CASES[:3])
def test_anderson_solves_follow_numpy_iterates_and_residuals(h, memory, beta, lam):
    """Through ``deqcore.solve`` (compiled on JAX): the last iterate after max_iter = 1, 2, 3 and
    12 steps, and the residual trace of every step, equal the NumPy reference's."""
    W, U, b, x = tanh_deq(seed=301, d=6, batch=3, rho=0.9)
    fn = tanh_np(W, U, b, x)
    ref = anderson_np(fn, np.zeros_like(x), 12, memory, beta, lam)
    f, xa = h.tanh_layer(W, U, b), h.asarray(x)
    kw = dict(solver="anderson", memory=memory, beta=beta, lam=lam, tol=1e-300, jit=True)
    for k in (1, 2, 3):
        sol = h.solve(f, xa, max_iter=k, **kw)
        np.testing.assert_allclose(h.numpy(sol.solver_state.z), ref[k], rtol=1e-11, atol=1e-13)
    sol = h.solve(f, xa, max_iter=12, **kw)
    abs_ref, rel_ref = residuals_np(ref, np.stack([fn(z) for z in ref]))
    np.testing.assert_allclose(h.numpy(sol.abs_trace), abs_ref, rtol=1e-8, atol=1e-15)
    np.testing.assert_allclose(h.numpy(sol.rel_trace), rel_ref, rtol=1e-8, atol=1e-15)
    best = np.argmin(rel_ref, axis=0)
    np.testing.assert_allclose(h.numpy(sol.z), ref[best, np.arange(3)], rtol=1e-8, atol=1e-12)


def test_anderson_affine_iterates_are_gmres_like(h):
    """On an affine map with memory > steps and lam at its floor, Anderson's iterate k+1 minimises
    the residual over the affine span of the first k+1 iterates' images: the NumPy reference's
    iterates (and deqcore's) reach the exact fixed point in d + 1 steps."""
    rng = np.random.default_rng(302)
    d = 5
    A = symmetric_spread(rng, d, 0.8)
    c = rng.standard_normal(d)
    x = rng.standard_normal((2, d))
    exact = np.linalg.solve(np.eye(d) - A, (x + c).T).T
    ref = anderson_np(lambda z: z @ A.T + x + c, np.zeros_like(x), d + 1, d + 2, 1.0, 0.0)
    np.testing.assert_allclose(ref[-1], exact, atol=1e-9)
    sol = h.solve(h.affine_layer(A, c), h.asarray(x), solver="anderson", memory=d + 2, lam=0.0,
                  tol=1e-300, max_iter=d + 1)
    np.testing.assert_allclose(h.numpy(sol.solver_state.z), ref[-1], atol=1e-10)


def test_anderson_mixing_weights_follow_the_kkt_system(h):
    """``mixing_weights`` on Gram matrices of residuals of very different sizes equals the KKT
    weights, also for large lam (where a dropped or mis-scaled lam shows)."""
    from deqcore.solvers._anderson import mixing_weights

    rng = np.random.default_rng(303)
    for lam in (0.0, 1e-6, 0.3, 5.0):
        G = rng.standard_normal((4, 3, 7)) * np.array([1.0, 1e-3, 10.0])[None, :, None]
        alpha, singular = mixing_weights(h.backend, h.asarray(G @ G.transpose(0, 2, 1)), lam)
        ref = np.stack([anderson_weights_np(G[b], lam) for b in range(4)])
        np.testing.assert_allclose(h.numpy(alpha), ref, rtol=1e-9, atol=1e-12)
        assert not h.numpy(singular).any()


def anderson_breakdown_step(backend, asarray, to_numpy):
    """Two Anderson steps (memory 3, beta 0.5) on a tanh DEQ, then a step from a state whose Gram
    matrix is non-finite for samples 1 and 2 (sample 2 frozen): returns the step's z, the state
    before it (z, f(z)) as NumPy, and the breakdown counts after it."""
    W, U, b, x = tanh_deq(seed=314, d=4, batch=3, rho=0.9)
    Wb, Ub, bb, xb = (asarray(a) for a in (W, U, b, x))
    xp = backend.xp
    problem = Problem(backend, lambda z: xp.tanh(z @ Wb.T + xb @ Ub.T + bb), 3, 4, xb.dtype)
    solver = Anderson(max_iter=5, memory=3, beta=0.5, lam=1e-4)
    z0 = xp.zeros_like(xb)
    state = solver.init(problem, z0, problem.fn(z0))
    active = xp.ones(3, dtype=xp.bool)
    for _ in range(2):
        z, fz, state, _ = solver.step(problem, state, active)
        state = solver.commit(problem, state, z, fz, fz - z, active, active)
    gram = np.array(to_numpy(state.gram))
    gram[1:] = np.inf
    state = state._replace(gram=asarray(gram))
    z, _, after, _ = solver.step(problem, state, asarray(np.array([True, True, False]), dtype=bool))
    ref = anderson_np(tanh_np(W, U, b, x), np.zeros_like(x), 3, 3, 0.5, 1e-4)
    return to_numpy(z), to_numpy(state.z), to_numpy(state.fz), to_numpy(after.breakdowns), ref[3]


def _check_breakdown_step(z, z_prev, fz_prev, breakdowns, ref):
    np.testing.assert_allclose(z[0], ref[0], rtol=1e-10, atol=1e-12)  # a usable system: Anderson
    np.testing.assert_allclose(z[1], z_prev[1] + 0.5 * (fz_prev[1] - z_prev[1]), rtol=1e-13, atol=1e-15)
    np.testing.assert_array_equal(z[2], z_prev[2])  # frozen: not moved, not counted
    np.testing.assert_array_equal(breakdowns, [0, 1, 0])


def test_anderson_breakdown_takes_the_damped_newest_step_and_is_counted(h):
    """A mixing system with no finite solution (here a non-finite Gram matrix): that sample takes a
    plain damped step from the newest iterate, z + beta (f(z) - z), and the step is counted in
    ``breakdowns``; a sample with a usable system mixes as the NumPy reference does, and a frozen
    sample neither moves nor counts."""
    _check_breakdown_step(*anderson_breakdown_step(h.backend, h.asarray, h.numpy))


# ---------------------------------------------------------------------------------- Broyden


def broyden_np(fn, z0, steps, memory, tol=None):
    """"Good" Broyden on the inverse Jacobian of g(z) = f(z) - z with dense matrices.

    B_0 = -I, z <- z - B g, and after each step B <- B + (dz - B dg) (B^T dz)^T / (dz^T B dg),
    i.e. the pair u = (dz - B dg) / den, v = B^T dz. Only the last ``memory`` pairs are kept
    (B = -I + sum u v^T over them). Returns iterates, the pairs written (u, v) per step and the
    dense B after each step; ``tol`` stops early as in :func:`anderson_np`."""
    B_, n = z0.shape
    z, g = z0, fn(z0) - z0
    pairs = []
    iterates, written, dense = [z0], [], []
    for _ in range(steps):
        if tol is not None and (residuals_np(z, z + g)[1] <= tol).all():
            break
        Bm = -np.eye(n)[None] + sum((np.einsum("bi,bj->bij", u, v) for u, v in pairs),
                                    np.zeros((B_, n, n)))
        z_new = z - np.einsum("bij,bj->bi", Bm, g)
        g_new = fn(z_new) - z_new
        dz, dg = z_new - z, g_new - g
        v = np.einsum("bji,bj->bi", Bm, dz)  # B^T dz
        den = np.sum(v * dg, axis=1)
        u = (dz - np.einsum("bij,bj->bi", Bm, dg)) / den[:, None]
        if memory:
            pairs = (pairs + [(u, v)])[-memory:]
        written.append((u, v))
        dense.append(-np.eye(n)[None] + sum((np.einsum("bi,bj->bij", a, c) for a, c in pairs),
                                            np.zeros((B_, n, n))))
        z, g = z_new, g_new
        iterates.append(z)
    return np.stack(iterates), written, dense


def _affine(seed, d, batch, rho=0.9):
    rng = np.random.default_rng(seed)
    A = rng.standard_normal((d, d))
    A = rho * A / np.linalg.norm(A, 2)
    c = rng.standard_normal(d)
    x = rng.standard_normal((batch, d))
    return A, c, x


def _dense_B(h, state):
    U, V = h.numpy(state.U), h.numpy(state.V)
    used = int(h.numpy(h.xp.asarray(state.count)))
    U, V = U[:, :used], V[:, :used]
    return -np.eye(U.shape[-1]) + np.einsum("bmi,bmj->bij", U, V)


@pytest.mark.parametrize("memory", [None, 3])
def test_broyden_estimate_equals_dense_good_broyden_on_affine_map(h, memory):
    """After each of k steps on f(z) = A z + c + x the low-rank estimate is the dense good
    Broyden matrix B_k, each stored pair is (u, v) with v = B^T dz (the update direction pinned,
    not just the secant condition, which any v satisfies), and B applied to vectors matches."""
    d, batch, steps = 5, 2, 4
    A, c, x = _affine(304, d, batch)
    fn = lambda z: z @ A.T + x + c  # noqa: E731
    ref, written, dense = broyden_np(fn, np.zeros_like(x), steps, memory or steps)
    f, xa = h.affine_layer(A, c), h.asarray(x)
    problem = flat_problem(h, f, xa)
    solver = Broyden(max_iter=20, memory=memory, line_search=False, ls_max_trials=3)
    z0 = h.xp.zeros_like(xa)
    state = solver.init(problem, z0, problem.fn(z0))
    active = all_active(h, batch)
    m = memory or 20
    for t in range(1, steps + 1):
        z, fz, state, _ = solver.step(problem, state, active)
        np.testing.assert_allclose(h.numpy(z), ref[t], rtol=1e-11, atol=1e-12, err_msg=f"step {t}")
        state = solver.commit(problem, state, z, fz, fz - z, active, active)
        slot = (t - 1) % m
        u, v = written[t - 1]
        np.testing.assert_allclose(h.numpy(state.U)[:, slot], u, rtol=1e-9, atol=1e-11)
        np.testing.assert_allclose(h.numpy(state.V)[:, slot], v, rtol=1e-9, atol=1e-11)
        np.testing.assert_allclose(_dense_B(h, state), dense[t - 1], rtol=1e-9, atol=1e-11)
        # the cached B g(z) is the estimate applied to the current residual
        g = h.numpy(fz) - h.numpy(z)
        np.testing.assert_allclose(h.numpy(state.Bg), np.einsum("bij,bj->bi", dense[t - 1], g),
                                   rtol=1e-9, atol=1e-11)


def test_broyden_solve_follows_numpy_iterates_with_a_wrapping_ring(h):
    """``deqcore.solve`` with memory 3 over 8 steps of a tanh DEQ (compiled on JAX): the last
    iterate after 1..8 steps and every residual equal the dense NumPy reference's."""
    W, U, b, x = tanh_deq(seed=305, d=6, batch=3, rho=0.9)
    fn = tanh_np(W, U, b, x)
    ref, _, _ = broyden_np(fn, np.zeros_like(x), 8, 3)
    f, xa = h.tanh_layer(W, U, b), h.asarray(x)
    kw = dict(solver="broyden", memory=3, tol=1e-300, jit=True)
    for k in (1, 2, 5, 8):
        sol = h.solve(f, xa, max_iter=k, **kw)
        np.testing.assert_allclose(h.numpy(sol.solver_state.z), ref[k], rtol=1e-9, atol=1e-11,
                                   err_msg=f"max_iter={k}")
    abs_ref, rel_ref = residuals_np(ref, np.stack([fn(z) for z in ref]))
    np.testing.assert_allclose(h.numpy(sol.abs_trace), abs_ref, rtol=1e-7, atol=1e-15)
    np.testing.assert_allclose(h.numpy(sol.rel_trace), rel_ref, rtol=1e-7, atol=1e-15)


def test_broyden_static_stages_follow_numpy_iterates(h):
    """More than 16 steps: on static-shape backends the ring grows between loop stages (8, 16,
    ...), and with memory < max_iter the full ring wraps; the iterates still equal the dense
    reference's (an affine map keeps the secant updates well conditioned)."""
    d, batch = 24, 2
    rng = np.random.default_rng(306)
    A = symmetric_spread(rng, d, 0.95)
    c = rng.standard_normal(d)
    x = rng.standard_normal((batch, d))
    fn = lambda z: z @ A.T + x + c  # noqa: E731
    for memory, steps in ((None, 20), (10, 19)):
        ref, _, _ = broyden_np(fn, np.zeros_like(x), steps, memory or steps)
        sol = h.solve(h.affine_layer(A, c), h.asarray(x), solver="broyden", memory=memory, tol=1e-300,
                      max_iter=steps, jit=True)
        scale = np.abs(ref[-1]).max()
        np.testing.assert_allclose(h.numpy(sol.solver_state.z), ref[-1], rtol=0, atol=1e-9 * scale)


def test_broyden_skipped_update_leaves_the_estimate_and_its_direction_unchanged(h):
    """f(z) = z + x has the constant residual g = x: every secant denominator v.dg is 0, so no pair
    is stored, each step counts a breakdown, B stays -I, and the cached direction with it: the
    steps are exactly z_t = t x."""
    x = np.array([[1.0, -2.0, 0.5], [3.0, 0.25, -1.0]])
    sol = h.solve(lambda z, x_: z + x_, h.asarray(x), solver="broyden", tol=1e-12, max_iter=4,
                  divergence=None)
    np.testing.assert_array_equal(h.numpy(sol.solver_state.z), 4.0 * x)
    np.testing.assert_array_equal(h.numpy(sol.solver_state.Bg), -x)
    np.testing.assert_array_equal(h.numpy(sol.solver_state.breakdowns), [4, 4])
    np.testing.assert_array_equal(_dense_B(h, sol.solver_state), np.tile(-np.eye(3), (2, 1, 1)))


def broyden_line_search_np(fn, z0, steps, max_trials):
    """Dense good Broyden with the documented backtracking Armijo line search on phi = ||g||^2:
    accept s when phi(s) <= phi(0) (1 - 1e-4 s); otherwise s <- phi0 s^2 / (2 (phi(s) - phi0 +
    phi0 s)) (0 if that denominator is not positive) while s >= 1e-2, at most ``max_trials``
    extra evaluations; the full step is kept when no trial is accepted. Per sample; returns the
    iterates and the batched f-evaluations a solve counts (the longest search per step)."""
    B_, n = z0.shape
    Bm = np.tile(-np.eye(n), (B_, 1, 1))
    z, g = z0, fn(z0) - z0
    iterates, nfe, backtracked = [z0], 1, 0
    for _ in range(steps):
        p = -np.einsum("bij,bj->bi", Bm, g)
        z_new = np.empty_like(z)
        trials_used = 0
        for s_ in range(B_):
            one = lambda zz, s_=s_: fn(np.tile(zz, (B_, 1)))[s_]  # noqa: E731
            phi0 = g[s_] @ g[s_]
            s = 1.0
            zt = z[s_] + p[s_]
            r = one(zt) - zt
            phi = r @ r
            best = zt
            trials = 0
            if not phi <= phi0 * (1 - 1e-4 * s):
                while True:
                    den = 2.0 * (phi - phi0 + phi0 * s)
                    s = phi0 * s * s / den if den > 0 else 0.0
                    if s < 1e-2 or trials == max_trials:
                        break
                    trials += 1
                    zt = z[s_] + s * p[s_]
                    r = one(zt) - zt
                    phi = r @ r
                    if phi <= phi0 * (1 - 1e-4 * s):
                        best = zt
                        backtracked += 1
                        break
            z_new[s_] = best
            trials_used = max(trials_used, trials)
        nfe += 1 + trials_used
        g_new = fn(z_new) - z_new
        dz, dg = z_new - z, g_new - g
        v = np.einsum("bji,bj->bi", Bm, dz)
        u = (dz - np.einsum("bij,bj->bi", Bm, dg)) / np.sum(v * dg, axis=1)[:, None]
        Bm = Bm + np.einsum("bi,bj->bij", u, v)
        z, g = z_new, g_new
        iterates.append(z)
    return np.stack(iterates), nfe, backtracked


def test_broyden_line_search_matches_numpy(h):
    """A layer where full Broyden steps overshoot: the line search backtracks (checked in the
    reference), and deqcore's iterates and f-evaluation count equal the reference's."""
    d, batch = 6, 3
    rng = np.random.default_rng(313)
    W = 2.5 * symmetric_spread(rng, d, 1.0)
    U = rng.standard_normal((d, d))
    b = 0.3 * rng.standard_normal(d)
    x = 2.0 * rng.standard_normal((batch, d))
    fn = tanh_np(W, U, b, x)
    steps = 6
    ref, nfe, backtracked = broyden_line_search_np(fn, np.zeros_like(x), steps, 3)
    assert backtracked >= 5  # the search did something in the reference
    f, xa = h.tanh_layer(W, U, b), h.asarray(x)
    sol = h.solve(f, xa, solver="broyden", line_search=True, tol=1e-300, max_iter=steps)
    np.testing.assert_allclose(h.numpy(sol.solver_state.z), ref[-1], rtol=1e-8, atol=1e-10)
    assert int(h.numpy(sol.nfe)) == nfe


def test_broyden_line_search_exact_cases(h):
    """Two affine maps where the search's arithmetic is exact. f(z) = x - z: the full first step
    z1 = x leaves ||g||^2 unchanged (Armijo fails), the quadratic model gives s = 1/2, and
    z = x / 2 is the exact fixed point (3 evaluations). f(z) = x - 100 z: the full step raises
    ||g||^2 10^4-fold, the model's s = 5e-5 is below the 1e-2 floor, so no trial runs and the
    full step z1 = x is kept (2 evaluations)."""
    x = np.array([[1.0, -2.0], [0.5, 4.0]])
    sol = h.solve(lambda z, x_: x_ - z, h.asarray(x), solver="broyden", line_search=True, tol=1e-12,
                  max_iter=5)
    np.testing.assert_array_equal(h.numpy(sol.z), x / 2)
    np.testing.assert_array_equal(h.numpy(sol.iterations), [1, 1])
    assert int(h.numpy(sol.nfe)) == 3
    sol = h.solve(lambda z, x_: x_ - 100.0 * z, h.asarray(x), solver="broyden", line_search=True, tol=1e-12,
                  max_iter=1)
    np.testing.assert_array_equal(h.numpy(sol.solver_state.z), x)
    assert int(h.numpy(sol.nfe)) == 2
    ref, nfe, _ = broyden_line_search_np(lambda z: x - 100.0 * z, np.zeros_like(x), 3, 3)
    sol = h.solve(lambda z, x_: x_ - 100.0 * z, h.asarray(x), solver="broyden", line_search=True, tol=1e-300,
                  max_iter=3)
    np.testing.assert_allclose(h.numpy(sol.solver_state.z), ref[-1], rtol=1e-9)
    assert int(h.numpy(sol.nfe)) == nfe


# ------------------------------------------------- the fixed-shape mode, eagerly on torch
#
# JAX and compiled torch run the algorithms in their fixed-shape mode (full rings with masked
# slots, one-hot rows, Broyden's loop stages). The same mode runs eagerly on torch through the
# compiled backend with its loop left uncompiled, so the mode's own branches are checked against
# the NumPy references in seconds.


def fixed_shape_torch():
    from deqcore_torch._backend import TorchBackend
    from deqcore_torch._compiled import CompiledTorchBackend

    class EagerFixedShape(CompiledTorchBackend):
        def while_loop(self, cond, body, state, max_steps=None, check_every=1):
            return TorchBackend.while_loop(self, cond, body, state, max_steps, check_every)

    return EagerFixedShape(deqcore.registry().backend("torch"), "default")


def run_fixed_shape(fn, x, solver, **kw):
    """``deqcore._loop.run`` of ``solver`` on the eager fixed-shape torch backend from zeros."""
    import torch

    from deqcore._loop import run

    be = fixed_shape_torch()
    xt = torch.from_numpy(np.asarray(x).copy())
    problem = Problem(be, lambda z: fn(z, xt), xt.shape[0], xt.shape[1], xt.dtype)
    opts = {"tol": 1e-300, "stop_mode": "rel", "divergence": None, **kw}
    with torch.no_grad():
        return run(problem, solver, torch.zeros_like(xt), **opts)


@pytest.mark.backend("torch")
@pytest.mark.parametrize(("memory", "beta", "lam"), ANDERSON_CASES)
def test_fixed_shape_anderson_matches_numpy(memory, beta, lam):
    import torch

    W, U, b, x = tanh_deq(seed=311, d=6, batch=3, rho=0.9)
    ref = anderson_np(tanh_np(W, U, b, x), np.zeros_like(x), 9, memory, beta, lam)
    Wt, Ut, bt = (torch.from_numpy(a) for a in (W, U, b))
    for k in (1, 2, 9):
        state, _ = run_fixed_shape(lambda z, x_: torch.tanh(z @ Wt.T + x_ @ Ut.T + bt), x,
                                   Anderson(max_iter=k, memory=memory, beta=beta, lam=lam), max_iter=k)
        np.testing.assert_allclose(state.solver.z.numpy(), ref[k], rtol=1e-10, atol=1e-12, err_msg=f"{k}")


@pytest.mark.backend("torch")
@pytest.mark.parametrize(("memory", "steps"), [(None, 20), (10, 19)])
def test_fixed_shape_broyden_stages_match_numpy(memory, steps):
    """Broyden's ring in stages of 8 and 16 pairs (and a full ring that wraps) follows the dense
    reference."""
    import torch

    d = 24
    rng = np.random.default_rng(306)
    A = symmetric_spread(rng, d, 0.95)
    c = rng.standard_normal(d)
    x = rng.standard_normal((2, d))
    ref, _, _ = broyden_np(lambda z: z @ A.T + x + c, np.zeros_like(x), steps, memory or steps)
    At, ct = torch.from_numpy(A), torch.from_numpy(c)
    state, _ = run_fixed_shape(lambda z, x_: z @ At.T + x_ + ct, x, Broyden(max_iter=steps, memory=memory,
                               line_search=False, ls_max_trials=3), max_iter=steps)
    np.testing.assert_allclose(state.solver.z.numpy(), ref[-1], rtol=0, atol=1e-9 * np.abs(ref[-1]).max())


@pytest.mark.backend("torch")
def test_fixed_shape_check_every_across_broyden_stages():
    """The fixed-shape twin of the check_every test: converging at step 22 with check_every=5
    costs 1 + 25 evaluations across the stages ending at 5, 15 and 30."""
    import torch

    d = 30
    rng = np.random.default_rng(309)
    A = symmetric_spread(rng, d, 0.97)
    At, ct = torch.from_numpy(A), torch.from_numpy(rng.standard_normal(d))
    x = rng.standard_normal((2, d))
    f = lambda z, x_: z @ At.T + x_ + ct  # noqa: E731
    runs = [run_fixed_shape(f, x, Broyden(max_iter=60, memory=None, line_search=False, ls_max_trials=3),
                            max_iter=60, tol=1e-3, check_every=k)[0] for k in (1, 5)]
    steps = int(runs[0].iterations.max())
    assert steps == 22
    assert int(runs[1].nfe) == 1 + 25
    np.testing.assert_array_equal(runs[1].iterations.numpy(), runs[0].iterations.numpy())


@pytest.mark.backend("torch")
def test_fixed_shape_anderson_breakdown_step():
    """The fixed-shape twin of the breakdown test (the newest iterate is a one-hot row there)."""
    import torch

    def asarray(a, dtype="float64"):
        return torch.from_numpy(np.asarray(a, dtype=dtype).copy())

    _check_breakdown_step(*anderson_breakdown_step(fixed_shape_torch(), asarray, lambda t: t.numpy()))


# ------------------------------------------------------------------------------ the loop


def fixed_point_np(fn, z0, max_iter, tol, stop_mode, damping=1.0):
    """The loop's contract for damped fixed-point iteration, per sample: stop (freeze) at the
    first iterate whose stop residual is <= tol; return each sample's trace (frozen rows repeat
    the final value), its steps, its lowest-residual iterate (the first one on ties), and status."""
    z = z0
    zs, fzs = [z0], [fn(z0)]
    for _ in range(max_iter):
        z = z + damping * (fzs[-1] - z)
        zs.append(z)
        fzs.append(fn(z))
    zs, fzs = np.stack(zs), np.stack(fzs)
    a, r = residuals_np(zs, fzs)
    stop = r if stop_mode == "rel" else a
    B_ = z0.shape[0]
    its = np.array([next((t for t in range(max_iter + 1) if stop[t, s] <= tol), max_iter) for s in range(B_)])
    trace_a, trace_r = a.copy(), r.copy()
    for s in range(B_):
        trace_a[its[s]:, s] = a[its[s], s]
        trace_r[its[s]:, s] = r[its[s], s]
    best = np.array([int(np.argmin(stop[: its[s] + 1, s])) for s in range(B_)])
    converged = stop[its, np.arange(B_)] <= tol
    return dict(its=its, abs_trace=trace_a, rel_trace=trace_r, z=zs[best, np.arange(B_)],
                best=best, converged=converged)


@pytest.mark.parametrize("stop_mode", ["rel", "abs"])
@pytest.mark.parametrize("damping", [1.0, 0.6])
def test_loop_freezing_traces_and_best_iterate_match_numpy(h, stop_mode, damping):
    """Per-sample stop steps, traces, returned iterates, residuals, statuses and nfe of a solve
    equal the loop's contract computed in NumPy (samples stop at different steps, one runs out
    of steps)."""
    W, U, b, x = tanh_deq(seed=308, d=6, batch=4, rho=0.9)
    fn = tanh_np(W, U, b, x)
    tol = 1e-4 if stop_mode == "rel" else 3e-4
    # one step fewer than the slowest sample needs: it ends MAX_ITER
    max_iter = int(fixed_point_np(fn, np.zeros_like(x), 100, tol, stop_mode, damping)["its"].max()) - 1
    ref = fixed_point_np(fn, np.zeros_like(x), max_iter, tol, stop_mode, damping)
    assert len(set(ref["its"].tolist())) >= 2 and not ref["converged"].all() and ref["converged"].sum() >= 2
    sol = h.solve(h.tanh_layer(W, U, b), h.asarray(x), solver="fixed_point", damping=damping, tol=tol,
                  stop_mode=stop_mode, max_iter=max_iter, jit=True)
    np.testing.assert_array_equal(h.numpy(sol.iterations), ref["its"])
    assert int(h.numpy(sol.steps)) == ref["its"].max()
    assert int(h.numpy(sol.nfe)) == 1 + ref["its"].max()
    np.testing.assert_allclose(h.numpy(sol.abs_trace), ref["abs_trace"], rtol=1e-9, atol=1e-15)
    np.testing.assert_allclose(h.numpy(sol.rel_trace), ref["rel_trace"], rtol=1e-9, atol=1e-15)
    np.testing.assert_allclose(h.numpy(sol.z), ref["z"], rtol=1e-12, atol=1e-15)
    cols = np.arange(4)
    np.testing.assert_allclose(h.numpy(sol.abs_residual), ref["abs_trace"][ref["best"], cols], rtol=1e-9)
    np.testing.assert_allclose(h.numpy(sol.rel_residual), ref["rel_trace"][ref["best"], cols], rtol=1e-9)
    np.testing.assert_array_equal(h.numpy(sol.converged), ref["converged"])
    expected = np.where(ref["converged"], int(Status.CONVERGED), int(Status.MAX_ITER))
    np.testing.assert_array_equal(h.numpy(sol.status), expected)
    # the solver's own state holds each sample's last iterate, frozen where it stopped
    zs = []
    z = np.zeros_like(x)
    for _ in range(max_iter):
        z = z + damping * (fn(z) - z)
        zs.append(z)
    last = np.stack([zs[ref["its"][s] - 1][s] for s in range(4)])
    np.testing.assert_allclose(h.numpy(sol.solver_state.z), last, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("solver", ["anderson", "broyden"])
def test_secant_solvers_freeze_each_sample_at_its_own_reference_iterate(h, solver):
    """Samples of a batch are independent: each stops at the first iterate of its own NumPy
    reference run whose rel residual is <= tol, its returned z is that iterate, and the solver
    state keeps it there (a frozen sample never moves) while the others go on."""
    W, U, b, x = tanh_deq(seed=310, d=6, batch=4, rho=0.9)
    tol = 1e-7
    its, final, estimates = [], [], []
    for s in range(4):
        fn = tanh_np(W, U, b, x[s:s + 1])
        if solver == "anderson":
            ref = anderson_np(fn, np.zeros((1, 6)), 40, 5, 1.0, 1e-4, tol=tol)
        else:
            ref, _, dense = broyden_np(fn, np.zeros((1, 6)), 40, 40, tol=tol)
            # the pair of the converging step is not stored: B after the steps before it
            estimates.append(dense[-2][0] if len(dense) > 1 else -np.eye(6))
        _, rel = residuals_np(ref, np.stack([fn(z) for z in ref]))
        t = int(np.argmax(rel[:, 0] <= tol))
        assert rel[t, 0] <= tol
        its.append(t)
        final.append(ref[t, 0])
    assert len(set(its)) >= 2
    sol = h.solve(h.tanh_layer(W, U, b), h.asarray(x), solver=solver, tol=tol, max_iter=40, jit=True)
    np.testing.assert_array_equal(h.numpy(sol.iterations), its)
    np.testing.assert_allclose(h.numpy(sol.z), np.stack(final), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(h.numpy(sol.solver_state.z), np.stack(final), rtol=1e-9, atol=1e-12)
    if solver == "broyden":
        B = _dense_B(h, sol.solver_state)
        for s in range(4):
            np.testing.assert_allclose(B[s], estimates[s], rtol=1e-6, atol=1e-6 * np.abs(estimates[s]).max())
    np.testing.assert_array_equal(h.numpy(sol.solver_state.breakdowns), 0)


def _exact_residual_problem(h):
    """f(z, x) = x: from z0 = x - d the residual is exactly ||d|| (d = (3, 4): 5) in abs mode,
    and the first step lands on the fixed point."""
    x = np.array([[1.0, 2.0], [0.5, -1.0]])
    z0 = x - np.array([[3.0, 4.0], [6.0, 8.0]])  # residuals 5 and 10
    return (lambda z, x_: x_ + 0.0 * z), h.asarray(x), h.asarray(z0)


def test_stop_test_is_residual_at_most_tol(h):
    """``tol`` is inclusive ("stop when the stop residual is <= tol"): a sample whose initial
    residual equals tol exactly takes no step; the other one takes one."""
    f, x, z0 = _exact_residual_problem(h)
    sol = h.solve(f, x, z0, solver="fixed_point", tol=5.0, stop_mode="abs", max_iter=10)
    np.testing.assert_array_equal(h.numpy(sol.iterations), [0, 1])
    np.testing.assert_array_equal(h.numpy(sol.converged), [True, True])
    np.testing.assert_array_equal(h.numpy(sol.z)[0], h.numpy(z0)[0])
    np.testing.assert_array_equal(h.numpy(sol.abs_residual), [5.0, 0.0])
    np.testing.assert_array_equal(h.numpy(sol.rel_trace)[0], [5.0 / (np.sqrt(5.0) + 1e-9),
                                                              10.0 / (np.sqrt(1.25) + 1e-9)])
    # where f(z) = 0 the relative residual is ||z|| / 1e-9, not a division by zero
    zero = h.solve(lambda z, x_: 0.0 * z, x, z0, solver="fixed_point", tol=1.0, max_iter=1)
    np.testing.assert_array_equal(h.numpy(zero.rel_trace)[0], np.linalg.norm(h.numpy(z0), axis=1) / 1e-9)
    # the same threshold reached after a step: frozen at that step, not one later
    sol = h.solve(f, x, z0, solver="fixed_point", tol=4.999, stop_mode="abs", max_iter=10)
    np.testing.assert_array_equal(h.numpy(sol.iterations), [1, 1])
    assert int(h.numpy(sol.nfe)) == 2
    # half steps halve the residuals exactly (5, 2.5 and 10, 5, 2.5): tol 2.5 is met at steps 1, 2
    sol = h.solve(f, x, z0, solver="fixed_point", damping=0.5, tol=2.5, stop_mode="abs", max_iter=10)
    np.testing.assert_array_equal(h.numpy(sol.iterations), [1, 2])
    np.testing.assert_array_equal(h.numpy(sol.abs_residual), [2.5, 2.5])
    np.testing.assert_array_equal(h.numpy(sol.status), [int(Status.CONVERGED)] * 2)


def test_divergence_limit_is_inclusive_and_on_the_abs_residual(h):
    """f(z) = 2 z + x from z0 = 0: fixed-point iteration doubles the residual every step, exactly
    (3, 6, 12, ...). With divergence = 32 a sample stays active while its abs residual is <= 32
    times the initial one (steps 1..5) and is frozen DIVERGED at step 6, whatever stop_mode."""
    x = h.asarray(np.array([[3.0], [-3.0]]))
    for stop_mode in ("rel", "abs"):
        sol = h.solve(lambda z, x_: 2.0 * z + x_, x, solver="fixed_point", tol=1e-12, max_iter=40,
                      divergence=32.0, stop_mode=stop_mode)
        np.testing.assert_array_equal(h.numpy(sol.iterations), [6, 6])
        np.testing.assert_array_equal(h.numpy(sol.status), [int(Status.DIVERGED)] * 2)
        trace = h.numpy(sol.abs_trace)[:8, 0]
        np.testing.assert_array_equal(trace, [3.0, 6.0, 12.0, 24.0, 48.0, 96.0, 192.0, 192.0])
        # the returned z is the lowest stop-residual iterate: z0 in abs mode; in rel mode the
        # last one (its rel residual 192 / 381 is below z0's 3 / 3)
        z_best = [[0.0], [0.0]] if stop_mode == "abs" else [[189.0], [-189.0]]
        np.testing.assert_array_equal(h.numpy(sol.z), z_best)
        np.testing.assert_array_equal(h.numpy(sol.abs_residual), [3.0, 3.0] if stop_mode == "abs" else
                                      [192.0, 192.0])
    # at max_iter 5 the residual is at the limit, not beyond it: MAX_ITER, not DIVERGED
    sol = h.solve(lambda z, x_: 2.0 * z + x_, x, solver="fixed_point", tol=1e-12, max_iter=5, divergence=32.0)
    np.testing.assert_array_equal(h.numpy(sol.status), [int(Status.MAX_ITER)] * 2)


def test_check_every_tests_at_multiples_of_k_across_broyden_stages(h):
    """With ``check_every=5`` the stop test runs at steps 0, 5, 10, ... of the whole solve, also
    where a static-shape backend splits Broyden's loop into stages (8, 16, 32, ... pairs): a
    solve that converges at step s costs exactly 1 + 5 ceil(s / 5) evaluations of f."""
    d = 30
    rng = np.random.default_rng(309)
    A = symmetric_spread(rng, d, 0.97)
    c = rng.standard_normal(d)
    x = rng.standard_normal((2, d))
    kw = dict(solver="broyden", tol=1e-3, max_iter=60)
    ref = h.solve(h.affine_layer(A, c), h.asarray(x), **kw)
    steps = int(h.numpy(ref.steps))
    assert 8 < steps < 60 and steps % 5 not in (0, 1) and h.numpy(ref.converged).all()
    sol = h.solve(h.affine_layer(A, c), h.asarray(x), check_every=5, **kw)
    assert int(h.numpy(sol.nfe)) == 1 + 5 * -(-steps // 5)
    np.testing.assert_array_equal(h.numpy(sol.iterations), h.numpy(ref.iterations))


@pytest.mark.parametrize("shape", [(1, 2), (2, 2048)], ids=["small", "large"])
def test_ties_keep_the_earliest_lowest_residual_iterate(h, shape):
    """f(z) = x - z oscillates between 0 and x with equal abs residuals: the returned iterate is
    the first of the tied lowest ones (z0), and its residual is the tie value. The large batch
    (4096 numbers) takes the torch namespace's shortcut for uniform masks (all rows active, no
    row improving)."""
    x_np = np.random.default_rng(312).integers(-4, 5, size=shape).astype(np.float64)
    x = h.asarray(x_np)
    zero = np.zeros(shape)
    sol = h.solve(lambda z, x_: x_ - z, x, solver="fixed_point", tol=1e-12, max_iter=4, stop_mode="abs",
                  divergence=None)
    norm = np.linalg.norm(x_np, axis=1)
    np.testing.assert_array_equal(h.numpy(sol.abs_trace), np.tile(norm, (5, 1)))
    np.testing.assert_array_equal(h.numpy(sol.z), zero)
    np.testing.assert_array_equal(h.numpy(sol.solver_state.z), zero)  # 4 steps: back at 0
    sol = h.solve(lambda z, x_: x_ - z, x, solver="fixed_point", tol=1e-12, max_iter=3, stop_mode="abs",
                  divergence=None)
    np.testing.assert_array_equal(h.numpy(sol.solver_state.z), x_np)
    np.testing.assert_array_equal(h.numpy(sol.z), zero)


# ---------------------------------------------------------------------------- gradient modes
#
# The layer is f(z, x) = tanh(z W^T + x U^T + b), the loss sum(c * z*). Per sample b the
# Jacobian at z is J_b = diag(s_b) W with s = 1 - f(z)^2, and an adjoint u (row vector) reaches the
# parameters through one VJP of f: dL/dW = sum_b (u_b * s_b) z_b^T, dL/dx = (u * s) U.


def mode_grads(h, weights, c, grad, grad_options=None, mask=False, jit=True, **kw):
    """(dL/dW, dL/dx, solution) for L = sum(c * z*) (times ``converged`` with ``mask``), on ``h``;
    compiled on JAX (once per mode, options and shapes) unless ``jit=False``."""
    W, U, b, x = weights
    if h.name == "torch":
        import torch

        Wt, xt = torch.tensor(W, requires_grad=True), torch.tensor(x, requires_grad=True)
        Ut, bt = torch.tensor(U), torch.tensor(b)
        sol = deqcore.solve(lambda z, x_: torch.tanh(z @ Wt.T + x_ @ Ut.T + bt), xt, grad=grad,
                            grad_options=grad_options, **kw)
        weight = torch.tensor(c) * (sol.converged[:, None].double() if mask else 1.0)
        gW, gx = torch.autograd.grad((sol.z * weight).sum(), (Wt, xt))
        return gW.numpy(), gx.numpy(), sol
    import dataclasses

    import jax
    import jax.numpy as jnp

    key = (grad, repr(grad_options), mask, repr(sorted(kw.items())), jit)
    if key not in _JAX_GRADS:
        box = {}

        def loss(W_, x_, U_, b_, c_):
            sol = deqcore.solve(lambda z, x__: jnp.tanh(z @ W_.T + x__ @ U_.T + b_), x_, grad=grad,
                                grad_options=grad_options, **kw)
            box["sol"] = sol
            weight = c_ * (sol.converged[:, None] if mask else 1.0)
            return jnp.sum(sol.z * weight), (sol.z, sol.status, sol.converged, sol.solver_state)

        fn = jax.grad(loss, argnums=(0, 1), has_aux=True)
        _JAX_GRADS[key] = (jax.jit(fn) if jit else fn), box
    fn, box = _JAX_GRADS[key]
    (gW, gx), (z, status, converged, state) = fn(*(jnp.asarray(a) for a in (W, x, U, b, c)))
    sol = dataclasses.replace(box["sol"], z=z, status=status, converged=converged, solver_state=state)
    return np.asarray(gW), np.asarray(gx), sol


_JAX_GRADS: dict = {}


def vjp_grads(weights, z, u):
    """dL/dW and dL/dx from per-sample adjoints ``u`` (B, n) with f's VJP at ``z``."""
    W, U, b, x = weights
    s = 1.0 - np.tanh(z @ W.T + x @ U.T + b) ** 2
    return (u * s).T @ z, (u * s) @ U


def adjoints_np(weights, z, c, mode, k=5, lam=0.5):
    """Each mode's documented adjoint per sample at z (J_b = diag(s_b) W, u a row vector)."""
    W, U, b, x = weights
    d = W.shape[0]
    s = 1.0 - np.tanh(z @ W.T + x @ U.T + b) ** 2
    out = []
    for i in range(x.shape[0]):
        J = s[i][:, None] * W
        if mode == "implicit":
            out.append(np.linalg.solve((np.eye(d) - J).T, c[i]))
        elif mode == "jfb":
            out.append(c[i])
        elif mode in ("npg", "upg"):  # lam sum_{t<k} g M^t, M = lam J + (1 - lam) I
            M = lam * J + (1.0 - lam) * np.eye(d)
            term, total = c[i], c[i].copy()
            for _ in range(k - 1):
                term = term @ M
                total = total + term
            out.append(lam * total)
    return np.stack(out)


@pytest.fixture(scope="module")
def tanh6():
    weights = tanh_deq(seed=320, d=6, batch=3, rho=0.8)
    c = np.random.default_rng(321).standard_normal(weights[3].shape)
    return weights, c, tanh_fixed_point(*weights, iters=3000)


@pytest.mark.parametrize(("grad", "options"), [
    ("implicit", {"tol": 1e-13, "max_iter": 200}),
    ("jfb", {}),
    ("npg", {"k": 4, "lam": 0.7}),
    ("npg", {"k": 1, "lam": 0.3}),
    ("upg", {"k": 3, "lam": 0.6}),
    ("upg", {"k": 1, "lam": 1.0}),
])
def test_adjoint_modes_match_their_dense_formulas(h, tanh6, grad, options):
    """Each mode's gradient equals its documented adjoint computed with dense NumPy Jacobians at
    z* (UPG's k damped steps from an exact fixed point differentiate to NPG's series), so a
    flipped sign, a dropped damping term or a wrong power fails here."""
    weights, c, z_star = tanh6
    gW, gx, _ = mode_grads(h, weights, c, grad, options, tol=1e-13, max_iter=200)
    u = adjoints_np(weights, z_star, c, grad, **options if grad in ("npg", "upg") else {})
    rW, rx = vjp_grads(weights, z_star, u)
    np.testing.assert_allclose(gW, rW, rtol=1e-9, atol=1e-11)
    np.testing.assert_allclose(gx, rx, rtol=1e-9, atol=1e-11)


def central_difference(loss, arrays, eps=1e-6):
    """Central differences of ``loss(*arrays)`` with respect to each array."""
    out = []
    for i, a in enumerate(arrays):
        g = np.zeros_like(a)
        for idx in np.ndindex(a.shape):
            hi = [v.copy() for v in arrays]
            lo = [v.copy() for v in arrays]
            hi[i][idx] += eps
            lo[i][idx] -= eps
            g[idx] = (loss(*hi) - loss(*lo)) / (2 * eps)
        out.append(g)
    return out


def test_implicit_gradient_equals_finite_differences_of_the_fixed_point(h, tanh6):
    weights, c, _ = tanh6
    W, U, b, x = weights
    fd = central_difference(lambda W_, x_: float(np.sum(c * tanh_fixed_point(W_, U, b, x_, iters=600))),
                            [W, x])
    gW, gx, _ = mode_grads(h, weights, c, "implicit", {"tol": 1e-13, "max_iter": 200}, tol=1e-13,
                           max_iter=200)
    np.testing.assert_allclose(gW, fd[0], rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(gx, fd[1], rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("stop_mode", ["rel", "abs"])
def test_implicit_backward_solve_follows_numpy_anderson(h, tanh6, stop_mode):
    """A backward solve cut short (3 Anderson steps on u = g + u J from u0 = g): the gradient is
    that of the lowest-residual u of the NumPy reference's iterates, and the report gives its
    residual in the chosen stop mode, the steps and the VJPs."""
    weights, c, z_star = tanh6
    W, U, b, x = weights
    s = 1.0 - np.tanh(z_star @ W.T + x @ U.T + b) ** 2
    us = anderson_np(lambda u: c + (u * s) @ W, c, 3, 5, 1.0, 1e-4)
    fus = np.stack([c + (u * s) @ W for u in us])
    a, r = residuals_np(us, fus)
    stop = r if stop_mode == "rel" else a
    best = np.argmin(stop, axis=0)
    assert (best == 3).all() and not (a[1:] == a[:1]).any()  # the report's numbers are not z0's
    u_best = us[best, np.arange(3)]
    opts = {"tol": 1e-14, "max_iter": 3, "stop_mode": stop_mode, "on_fail": "ignore"}
    gW, gx, sol = mode_grads(h, weights, c, "implicit", opts, tol=1e-13, max_iter=200)
    rW, rx = vjp_grads(weights, z_star, u_best)
    np.testing.assert_allclose(gW, rW, rtol=1e-8, atol=1e-11)
    np.testing.assert_allclose(gx, rx, rtol=1e-8, atol=1e-11)
    report = sol.backward
    np.testing.assert_allclose(report.residual, stop[best, np.arange(3)], rtol=1e-7)
    np.testing.assert_array_equal(report.iterations, [3, 3, 3])
    assert not report.converged.any() and report.vjps == 4 and report.calls == 1


def test_implicit_returns_the_lowest_residual_adjoint(h):
    """A non-normal W (spectral radius 0.2, norm 1.6) makes the backward fixed-point iteration's
    abs residual grow before it shrinks: after one step sample 0's best adjoint is still u0 = g
    while sample 1's is u1 = g + g J. The gradient uses each sample's best, not the last."""
    W = np.array([[0.2, 1.5, 0.0], [0.0, 0.2, 1.5], [0.0, 0.0, 0.2]])
    U, b = np.eye(3), np.zeros(3)
    x = np.array([[0.3, -0.2, 0.1], [0.1, 0.2, -0.3]])
    c = np.array([[1.0, 0.0, 0.0], [0.5, -1.0, 0.2]])
    weights = (W, U, b, x)
    z = hyper_target(W, U, b, x)
    s = 1.0 - np.tanh(z @ W.T + x @ U.T + b) ** 2
    us = [c, c + (c * s) @ W]
    res = [np.linalg.norm(c + (u * s) @ W - u, axis=1) for u in us]
    best = np.argmin(np.stack(res), axis=0)
    np.testing.assert_array_equal(best, [0, 1])
    opts = {"solver": "fixed_point", "max_iter": 1, "stop_mode": "abs", "tol": 1e-14, "on_fail": "ignore"}
    gW, gx, sol = mode_grads(h, weights, c, "implicit", opts, tol=1e-13, max_iter=200)
    rW, rx = vjp_grads(weights, z, np.stack([us[best[i]][i] for i in range(2)]))
    np.testing.assert_allclose(gW, rW, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(gx, rx, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(sol.backward.residual, [res[0][0], res[1][1]], rtol=1e-9)


def test_gdeq_uses_the_dense_broyden_estimate(h, tanh6):
    """GDEQ after exactly 6 Broyden steps: u = -B^T g with B the dense good Broyden matrix of the
    NumPy reference (not B g, not +B^T g), the VJP taken at the returned iterate."""
    weights, c, _ = tanh6
    W, U, b, x = weights
    fn = tanh_np(W, U, b, x)
    its, _, dense = broyden_np(fn, np.zeros_like(x), 6, 6)
    _, rel = residuals_np(its, np.stack([fn(z) for z in its]))
    assert (np.argmin(rel, axis=0) == 6).all()
    z = its[-1]
    u = -np.einsum("bji,bj->bi", dense[-1], c)
    rW, rx = vjp_grads(weights, z, u)
    gW, gx, sol = mode_grads(h, weights, c, "gdeq", solver="broyden", tol=1e-300, max_iter=6)
    np.testing.assert_allclose(h.numpy(sol.z), z, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(gW, rW, rtol=1e-7, atol=1e-10)
    np.testing.assert_allclose(gx, rx, rtol=1e-7, atol=1e-10)


def unrolled_loss_np(solver, steps, c, U, b):
    """L(W, x) = sum(c * z_best) where z_best is the lowest-rel-residual iterate of ``steps``
    NumPy solver steps from zeros (the function the unroll mode differentiates)."""
    def loss(W_, x_):
        fn = tanh_np(W_, U, b, x_)
        z0 = np.zeros_like(x_)
        if solver == "fixed_point":
            its = [z0]
            for _ in range(steps):
                its.append(fn(its[-1]))
            its = np.stack(its)
        elif solver == "anderson":
            its = anderson_np(fn, z0, steps, 5, 1.0, 1e-4)
        else:
            its, _, _ = broyden_np(fn, z0, steps, steps)
        _, rel = residuals_np(its, np.stack([fn(z) for z in its]))
        return float(np.sum(c * its[np.argmin(rel, axis=0), np.arange(x_.shape[0])]))

    return loss


@pytest.mark.parametrize(("solver", "steps"), [("fixed_point", 5), ("anderson", 4), ("broyden", 4)])
def test_unroll_equals_finite_differences_through_the_numpy_solver(h, tanh6, solver, steps):
    """The unroll mode's gradient is the derivative of the truncated solve itself: central
    differences through the NumPy solver's ``steps`` iterations (not the implicit gradient)."""
    weights, c, _ = tanh6
    W, U, b, x = weights
    loss = unrolled_loss_np(solver, steps, c, U, b)
    fd = central_difference(loss, [W, x])
    gW, gx, _ = mode_grads(h, weights, c, "unroll", solver=solver, tol=1e-300, max_iter=steps)
    np.testing.assert_allclose(gW, fd[0], rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(gx, fd[1], rtol=1e-6, atol=1e-8)
    exact, _ = vjp_grads(weights, tanh_fixed_point(*weights, iters=3000),
                         adjoints_np(weights, tanh_fixed_point(*weights, iters=3000), c, "implicit"))
    assert np.abs(gW - exact).max() > 1e-4  # truncated: not the implicit gradient


@pytest.mark.parametrize(("grad", "options", "solver"), [
    ("implicit", {}, "anderson"), ("jfb", {}, "anderson"), ("npg", {"k": 3, "lam": 0.5}, "anderson"),
    ("upg", {"k": 3, "lam": 0.5}, "anderson"), ("gdeq", {}, "broyden"), ("unroll", {}, "fixed_point"),
])
def test_gradient_steps_reduce_the_exact_loss_by_the_predicted_amount(h, grad, options, solver):
    """Training with every mode, sign-sensitive: three plain gradient steps on W (the only
    parameter, so no head can make the loss go down on its own) each lower the exact loss (NumPy
    fixed point) by the first-order amount lr <g_ref, g_exact> > 0 that the mode's documented
    gradient g_ref (dense NumPy) predicts, and deqcore's gradient is g_ref. A flipped sign raises
    the loss; a flipped Jacobian term (g (I + J)^-1 for implicit), which still lowers it, misses
    the predicted amount."""
    W, U, b, x = tanh_deq(seed=322, d=6, batch=4, rho=0.8)
    target = np.random.default_rng(323).standard_normal(x.shape) * 0.3

    def exact_loss(W_):
        z = tanh_fixed_point(W_, U, b, x, iters=2000)
        return 0.5 * float(np.sum((z - target) ** 2))

    lr = 0.05
    losses = [exact_loss(W)]
    for _ in range(3):
        weights = (W, U, b, x)
        z = tanh_fixed_point(W, U, b, x, iters=2000)
        c = z - target  # dL/dz*
        g_exact = vjp_grads(weights, z, adjoints_np(weights, z, c, "implicit"))[0]
        if grad in ("implicit", "unroll"):  # unroll through a converged solve: the exact gradient
            g_ref = g_exact
        elif grad == "gdeq":
            its, _, dense = broyden_np(tanh_np(W, U, b, x), np.zeros_like(x), 100, 100, tol=1e-10)
            g_ref = vjp_grads(weights, its[-1], -np.einsum("bji,bj->bi", dense[-1], c))[0]
        else:
            g_ref = vjp_grads(weights, z, adjoints_np(weights, z, c, grad, **options))[0]
        g, _, _ = mode_grads(h, weights, c, grad, options, solver=solver, tol=1e-10, max_iter=100)
        # (Broyden's estimate near convergence is ill-conditioned: its rounding shows at 1e-2)
        assert np.linalg.norm(g - g_ref) <= (5e-2 if grad == "gdeq" else 1e-5) * np.linalg.norm(g_ref)
        predicted = lr * float(np.sum(g_ref * g_exact))
        assert predicted > 0
        W = W - lr * g
        losses.append(exact_loss(W))
        assert abs((losses[-2] - losses[-1]) - predicted) <= 0.1 * predicted, (losses, predicted)
    assert losses[-1] < 0.9 * losses[0], losses


# ------------------------------------------------------------ a non-finite sample under autograd


@pytest.mark.parametrize(("grad", "options", "solver"), [
    ("implicit", {"tol": 1e-12, "max_iter": 200}, "anderson"), ("jfb", {}, "anderson"),
    ("npg", {"k": 3, "lam": 0.5}, "anderson"), ("upg", {"k": 3, "lam": 0.5}, "anderson"),
    ("gdeq", {}, "broyden"), ("unroll", {}, "anderson"),
])
def test_nan_sample_with_parameters_requiring_grad(h, grad, options, solver):
    """A NaN in one sample's x while the layer's parameters require grad: that sample is flagged
    NONFINITE and its returned z stays finite, bit for bit the z of a solve without gradients
    (no NaN leaks into the value through the gradient path). The loss masked by ``converged``
    gives every other sample its exact input gradient; the flagged sample's own gradient, and a
    shared parameter's, is never finite garbage: non-finite, or (W) the other samples' exact one.
    The implicit backward solve flags that sample as not converged and warns."""
    import warnings

    W, U, b, x = tanh_deq(seed=324, d=6, batch=4, rho=0.8)
    x[2, 1] = np.nan
    weights = (W, U, b, x)
    c = np.random.default_rng(325).standard_normal(x.shape)
    kw = dict(solver=solver, tol=1e-12, max_iter=60)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # a warning from a compiled JAX backward needs jit=False
        gW, gx, sol = mode_grads(h, weights, c, grad, options, mask=True, jit=grad != "implicit", **kw)
    plain = h.solve(h.tanh_layer(W, U, b), h.asarray(x), grad=None, **kw)
    np.testing.assert_array_equal(h.numpy(sol.status), [0, 0, int(Status.NONFINITE), 0])
    z = h.numpy(sol.z)
    assert np.isfinite(z).all()
    if grad == "unroll":  # the recorded forward loop: the same steps, another float order on JAX
        np.testing.assert_allclose(z, h.numpy(plain.z), rtol=1e-13, atol=1e-15)
    else:
        np.testing.assert_array_equal(z, h.numpy(plain.z))
    good = [0, 1, 3]
    ref_weights = (W, U, b, x[good])
    z_good = tanh_fixed_point(*ref_weights, iters=3000)
    if grad == "unroll":
        ref_W, ref_x = mode_grads(h, ref_weights, c[good], grad, options, **kw)[:2]
    elif grad == "gdeq":
        ref_W, ref_x = mode_grads(h, ref_weights, c[good], grad, options, **kw)[:2]
    else:
        u = adjoints_np(ref_weights, z_good, c[good], grad, **options if grad in ("npg", "upg") else {})
        ref_W, ref_x = vjp_grads(ref_weights, z_good, u)
    np.testing.assert_allclose(gx[good], ref_x, rtol=1e-7, atol=1e-10)
    assert not np.isfinite(gx[2]).all() or not gx[2].any()
    assert not np.isfinite(gW).all() or np.allclose(gW, ref_W, rtol=1e-7, atol=1e-10)
    if grad == "implicit":
        np.testing.assert_array_equal(sol.backward.converged, [True, True, False, True])
        assert any(issubclass(w.category, deqcore.BackwardWarning) and "1 of 4 samples" in str(w.message)
                   for w in caught)


# -------------------------------------------------------------------------------- HyperAnderson

HD, HX = 5, 3  # state and input sizes of the hypersolver problems


def gelu_np(a):
    return 0.5 * a * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (a + 0.044715 * a ** 3)))


def conv3_np(a, w, bias):
    """'same' kernel-3 convolution over axis 1 (zero padding): out[t] = a[t-1] w0 + a[t] w1 + a[t+1] w2."""
    p = np.pad(a, ((0, 0), (1, 1), (0, 0)))
    return p[:, :-2] @ w[0] + p[:, 1:-1] @ w[1] + p[:, 2:] @ w[2] + bias


def window_weights_np(feats, valid, lam):
    """Anderson's KKT weights over the valid window positions, zero elsewhere."""
    out = np.zeros(feats.shape[:2])
    for b in range(feats.shape[0]):
        out[b, valid] = anderson_weights_np(feats[b, valid], lam)
    return out


def temporal_mixer_np(p, feats, valid, beta_max, prior, lam=1e-4):
    """HyperDEQ's s_xi as documented: per position the residual over the window's RMS norm, its
    log relative norm, a newest flag and the prior's weights; conv3, GELU (tanh form), conv3;
    channel 0 + prior is alpha_hat, channel 1 averaged over valid positions is beta's logit."""
    vf = valid.astype(float)
    norms = np.linalg.norm(feats, axis=-1)
    scale = np.sqrt(np.sum(norms ** 2, axis=-1, keepdims=True) / vf.sum())
    tiny = np.sqrt(np.finfo(np.float64).tiny)
    unit = feats / (scale[:, :, None] + tiny)
    lognorm = np.log(norms / (scale + tiny) + 1e-8) * vf
    newest = np.zeros_like(norms)
    newest[:, -1] = 1.0
    base = window_weights_np(unit, valid, lam) if prior == "anderson" else newest
    a = np.concatenate([unit, np.stack([lognorm, newest, base], axis=-1)], axis=-1)
    a = gelu_np(conv3_np(a, p["mixer.w1"], p["mixer.b1"])) * vf[None, :, None]
    out = conv3_np(a, p["mixer.w2"], p["mixer.b2"])
    logit = np.sum(out[..., 1] * vf, axis=-1) / vf.sum()
    return out[..., 0] + base, beta_max / (1.0 + np.exp(-logit))


def project_np(a_hat, valid, how):
    out = np.zeros_like(a_hat)
    if how == "shift":
        out[:, valid] = a_hat[:, valid] + (1.0 - a_hat[:, valid].sum(axis=1, keepdims=True)) / valid.sum()
    elif how == "softmax":
        e = np.exp(a_hat[:, valid] - a_hat[:, valid].max(axis=1, keepdims=True))
        out[:, valid] = e / e.sum(axis=1, keepdims=True)
    else:
        out[:, valid] = a_hat[:, valid]
    return out


def hyper_np(fn, z0, steps, window, mixer, how, update):
    """HyperAnderson: the last ``window`` iterates right-aligned (oldest first), weights
    alpha = project(alpha_hat), z = sum_i a_i z_i + beta sum_i a_i g_i ("weighted") or
    sum_i a_i z_i + beta sum_i g_i ("sum"). Returns iterates and each step's mixed residual G^T alpha."""
    Z, G = [z0], [fn(z0) - z0]
    mixed = []
    for _ in range(steps):
        k = min(len(Z), window)
        valid = np.arange(window) >= window - k
        Zw, Gw = np.zeros((z0.shape[0], window, z0.shape[1])), np.zeros((z0.shape[0], window, z0.shape[1]))
        Zw[:, valid], Gw[:, valid] = np.stack(Z[-k:], 1), np.stack(G[-k:], 1)
        a_hat, beta = mixer(Gw, valid)
        alpha = project_np(a_hat, valid, how)
        mix_g = np.einsum("bw,bwn->bn", alpha, Gw)
        step = mix_g if update == "weighted" else Gw.sum(axis=1)
        z = np.einsum("bw,bwn->bn", alpha, Zw) + beta[:, None] * step
        Z.append(z)
        G.append(fn(z) - z)
        mixed.append(mix_g)
    return np.stack(Z), mixed


def dense_initialiser_np(p, x):
    return np.maximum(x @ p["init.w1"] + p["init.b1"], 0.0) @ p["init.w2"] + p["init.b2"]


def _hyper_layer(seed=330):
    rng = np.random.default_rng(seed)
    W = symmetric_spread(rng, HD, 0.9)
    U = 0.5 * rng.standard_normal((HD, HX))
    b = 0.1 * rng.standard_normal(HD)
    return W, U, b


def hyper_target(W, U, b, x):
    """The exact fixed point of the (contractive) hypersolver layer, by plain iteration."""
    fn, z = tanh_np(W, U, b, x), np.zeros((x.shape[0], W.shape[0]))
    for _ in range(3000):
        z = fn(z)
    return z


def _random_hyper(seed=331, **kw):
    from deqcore.hypersolvers import DenseInitialiser, HyperAnderson, IdentityCompression

    hs = HyperAnderson(IdentityCompression(HD), DenseInitialiser(HX, HD, hidden=4), width=4, seed=seed, **kw)
    rng = np.random.default_rng(seed + 1)  # every weight non-zero, as after training
    return hs.with_params({k: v + 0.3 * rng.standard_normal(v.shape) for k, v in hs.params.items()})


@pytest.mark.parametrize("kw", [
    {}, {"prior": "newest"}, {"normalisation": "softmax"}, {"normalisation": "none", "update": "sum"},
    {"memory": 1, "beta_max": 2.0, "beta_init": 0.5},
])
def test_hyperanderson_iterates_match_numpy(h, kw):
    """Iterates of a solve with a (random, non-trivial) HyperAnderson equal the NumPy
    re-implementation of the mixer, the projection and the iteration, step by step through the
    window's filling and its wrap; the initialiser gives z0."""
    W, U, b = _hyper_layer()
    x = np.random.default_rng(332).standard_normal((3, HX))
    hs = _random_hyper(**kw)
    p = hs.params
    mixer = hs.mixer
    fn = tanh_np(W, U, b, x)
    z0 = dense_initialiser_np(p, x)
    ref, _ = hyper_np(fn, z0, 7, hs.memory + 1,
                      lambda G, v: temporal_mixer_np(p, G, v, mixer.beta_max, mixer.prior),
                      hs.normalisation, hs.update)
    f = h.tanh_layer(W, U, b)
    for k in (1, 2, 3, 7):
        sol = h.solve(f, h.asarray(x), solver=hs, max_iter=k, tol=1e-300, jit=True)
        np.testing.assert_allclose(h.numpy(sol.solver_state.z), ref[k], rtol=1e-10, atol=1e-12,
                                   err_msg=f"max_iter={k}")
    np.testing.assert_allclose(h.numpy(hs.initial_state(h.backend, h.asarray(x), h.asarray(x))), z0,
                               rtol=1e-12, atol=1e-14)


def test_anderson_mixer_hypersolver_is_numpy_anderson_with_its_beta(h):
    """With the least-squares mixer (beta 0.6, lam 1e-3) and an identity compression, the
    HyperAnderson iteration with window m + 1 is the NumPy Anderson reference with memory m + 1,
    damping 0.6 and that lam, from zeros (no initialiser)."""
    from deqcore.hypersolvers import AndersonMixer, HyperAnderson, IdentityCompression

    W, U, b = _hyper_layer(340)
    x = np.random.default_rng(341).standard_normal((3, HX))
    hs = HyperAnderson(IdentityCompression(HD), None, AndersonMixer(lam=1e-3, beta=0.6), memory=2)
    ref = anderson_np(tanh_np(W, U, b, x), np.zeros((3, HD)), 6, 3, 0.6, 1e-3)
    sol = h.solve(h.tanh_layer(W, U, b), h.asarray(x), h.asarray(np.zeros((3, HD))), solver=hs, max_iter=6,
                  tol=1e-300)
    np.testing.assert_allclose(h.numpy(sol.solver_state.z), ref[-1], rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(h.numpy(sol.solver_state.beta), 0.6, rtol=1e-15)


def test_temporal_mixer_matches_numpy_on_a_partial_window(h):
    """The mixer alone on a window with two of four positions filled: alpha_hat and beta equal the
    NumPy reference's (zero padding and masked hidden units make it a shorter sequence)."""
    from deqcore.hypersolvers import TemporalConvMixer

    rng = np.random.default_rng(333)
    mixer = TemporalConvMixer(HD, width=4, beta_max=1.5, beta_init=0.6)
    p = {f"mixer.{k}": v + 0.3 * rng.standard_normal(v.shape) for k, v in mixer.init_params(rng).items()}
    valid = np.array([False, False, True, True])
    feats = rng.standard_normal((3, 4, HD)) * valid[None, :, None]
    a_hat, beta = mixer(h.backend, {k[6:]: h.asarray(v) for k, v in p.items()}, h.asarray(feats),
                        h.asarray(valid, dtype=bool))
    ref_a, ref_b = temporal_mixer_np(p, feats, valid, 1.5, "anderson")
    np.testing.assert_allclose(h.numpy(a_hat)[:, valid], ref_a[:, valid], rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(h.numpy(beta), ref_b, rtol=1e-12)


def hyper_losses_np(p, mixer, x, z_star, fn, unroll, window, how, update, conv_loss):
    """L_conv, L_init, L_alpha as documented, from the NumPy iteration."""
    z0 = dense_initialiser_np(p, x)
    its, mixed = hyper_np(fn, z0, unroll, window,
                          lambda G, v: temporal_mixer_np(p, G, v, mixer.beta_max, mixer.prior), how, update)
    floor = 1e-10 * np.linalg.norm(z_star, axis=-1)
    l_conv = 0.0
    for k in range(1, unroll + 1):
        err = np.linalg.norm(its[k] - z_star, axis=-1)
        err = np.log(err + floor) if conv_loss == "log" else err
        l_conv += k * 2.0 / (unroll * (unroll + 1)) * np.mean(err)
    l_init = np.mean(np.linalg.norm(z0 - z_star, axis=-1))
    l_alpha = sum(np.mean(np.linalg.norm(g, axis=-1)) for g in mixed[:unroll])
    return l_conv, l_init, l_alpha


def _backend_objective(h, hs, f, x, z_star, weights, conv_loss, unroll):
    """The training objective's value and gradient with respect to every weight, on ``h``."""
    from deqcore.hypersolvers import hypersolver_losses

    be = h.backend
    names = sorted(hs.params)
    w1, w2, w3 = weights

    def objective(*leaves):
        losses = hypersolver_losses(hs, f, x, z_star, dict(zip(names, leaves, strict=True)), backend=be,
                                    conv_loss=conv_loss, unroll=unroll)
        return be.xp.stack([w1 * losses[0] + w2 * losses[1] + w3 * losses[2], *losses])

    values, pullback = be.vjp(objective, *[h.asarray(hs.params[k]) for k in names])
    grads = pullback(h.asarray(np.eye(4)[0]))
    return h.numpy(values), {k: h.numpy(g) for k, g in zip(names, grads, strict=True)}


@pytest.mark.parametrize(("conv_loss", "unroll"), [("log", None), ("norm", 4)])
def test_hypersolver_losses_and_their_gradient_match_numpy(h, conv_loss, unroll):
    """L_conv (log or norm, weights k / sum(1..K') over K' = 2K or ``unroll`` iterations), L_init
    and L_alpha equal the NumPy reference's, and their weighted sum's gradient equals central
    differences of the NumPy objective for every weight."""
    W, U, b = _hyper_layer(334)
    x = np.random.default_rng(335).standard_normal((3, HX))
    hs = _random_hyper(336, iterations=3, memory=2)
    z_star = hyper_target(W, U, b, x)
    fn = tanh_np(W, U, b, x)
    K = unroll or 2 * hs.iterations
    weights = (0.1, 0.05, 1e-2)
    values, grads = _backend_objective(h, hs, h.tanh_layer(W, U, b), h.asarray(x), h.asarray(z_star),
                                       weights, conv_loss, unroll)
    ref = hyper_losses_np(hs.params, hs.mixer, x, z_star, fn, K, hs.memory + 1, hs.normalisation, hs.update,
                          conv_loss)
    np.testing.assert_allclose(values[1:], ref, rtol=1e-10)
    names = sorted(hs.params)

    def objective(*arrays):
        p = dict(zip(names, arrays, strict=True))
        lc, li, la = hyper_losses_np(p, hs.mixer, x, z_star, fn, K, hs.memory + 1, hs.normalisation,
                                     hs.update, conv_loss)
        return weights[0] * lc + weights[1] * li + weights[2] * la

    fd = central_difference(objective, [hs.params[k] for k in names])
    for k, g in zip(names, fd, strict=True):
        np.testing.assert_allclose(grads[k], g, rtol=1e-5, atol=1e-8, err_msg=k)


def test_train_hypersolver_is_adam_on_the_objective_with_the_decayed_alpha_weight(h):
    """Three training steps equal NumPy Adam (b1 0.9, b2 0.999, eps 1e-8, bias-corrected) applied to
    the objective's gradient with lambda_3 decaying linearly from alpha_weight (step 1) to
    alpha_final (after alpha_decay_steps), and the history records each step's losses."""
    from deqcore.hypersolvers import train_hypersolver

    W, U, b = _hyper_layer(337)
    rng = np.random.default_rng(338)
    batches = [rng.standard_normal((3, HX)) for _ in range(3)]
    hs = _random_hyper(339, iterations=2, memory=2)
    opts = dict(lr=0.01, conv_weight=0.2, init_weight=0.1, alpha_weight=0.05, alpha_final=0.01,
                alpha_decay_steps=2, target_tol=1e-13, target_max_iter=200)
    f = h.tanh_layer(W, U, b)
    trained, history = train_hypersolver(hs, f, [h.asarray(x) for x in batches], steps=3, **opts)
    lam3 = [0.05, 0.03, 0.01]
    np.testing.assert_allclose([r["alpha_weight"] for r in history], lam3, rtol=1e-12)
    current = hs
    p = {k: v.copy() for k, v in hs.params.items()}
    m = {k: np.zeros_like(v) for k, v in p.items()}
    v = {k: np.zeros_like(v) for k, v in p.items()}
    for t, (x, w3, record) in enumerate(zip(batches, lam3, history, strict=True), start=1):
        z_star = hyper_target(W, U, b, x)
        values, grads = _backend_objective(h, current, f, h.asarray(x), h.asarray(z_star), (0.2, 0.1, w3),
                                           "log", None)
        np.testing.assert_allclose([record["loss"], record["conv"], record["init"], record["alpha"]], values,
                                   rtol=1e-8)
        assert record["step"] == t and record["target_unconverged"] == 0
        for k in p:
            m[k] = 0.9 * m[k] + 0.1 * grads[k]
            v[k] = 0.999 * v[k] + 0.001 * grads[k] ** 2
            p[k] = p[k] - 0.01 * (m[k] / (1 - 0.9 ** t)) / (np.sqrt(v[k] / (1 - 0.999 ** t)) + 1e-8)
        current = hs.with_params(p)
    for k in p:
        np.testing.assert_allclose(trained.params[k], p[k], rtol=1e-9, atol=1e-11, err_msg=k)
