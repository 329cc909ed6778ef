"""Bad input gives a clear error or a flagged Solution, never a silent garbage z*."""

from __future__ import annotations

import numpy as np
import pytest
from problems import tanh_deq, tanh_fixed_point

import deqcore
from deqcore import ConvergenceError, Status
from deqcore.solvers._anderson import mixing_weights

SOLVERS = ["fixed_point", "anderson", "broyden"]


@pytest.mark.parametrize("solver", SOLVERS)
def test_nan_in_x_flags_only_that_sample(h, solver):
    W, U, b, x = tanh_deq(seed=20, d=8, batch=4)
    x[2, 3] = np.nan
    f = h.tanh_layer(W, U, b)
    sol = h.solve(f, h.asarray(x), solver=solver, tol=1e-10, max_iter=100)
    status = h.numpy(sol.status)
    assert status[2] == Status.NONFINITE and not h.numpy(sol.converged)[2]
    assert (status[[0, 1, 3]] == Status.CONVERGED).all()
    assert sol.result is deqcore.Result.NONFINITE
    good = [0, 1, 3]
    np.testing.assert_allclose(h.numpy(sol.z)[good], tanh_fixed_point(W, U, b, x[good]), atol=1e-9)
    assert not np.isfinite(h.numpy(sol.residual)[2])
    with pytest.raises(ConvergenceError, match="x itself contains NaN"):
        h.solve(f, h.asarray(x), solver=solver, tol=1e-10, max_iter=100, throw=True)


@pytest.mark.parametrize("solver", SOLVERS)
def test_f_producing_nan_midway_is_flagged_and_keeps_last_finite_iterate(h, solver):
    xp = h.xp
    W, U, b, x = tanh_deq(seed=21, d=8, batch=3)
    f0 = h.tanh_layer(W, U, b)
    radius = 0.5 * float(np.linalg.norm(tanh_fixed_point(W, U, b, x)[1]))

    def f(z, x):  # sample 1 turns NaN once its state leaves a small ball
        out = f0(z, x)
        bad = xp.linalg.vector_norm(z, axis=-1) > radius
        poison = xp.where(bad & (xp.arange(3) == 1), float("nan"), 0.0)
        return out + poison[:, None]

    sol = h.solve(f, h.asarray(x), solver=solver, tol=1e-10, max_iter=100)
    status = h.numpy(sol.status)
    assert status[1] == Status.NONFINITE
    assert np.isfinite(h.numpy(sol.z)).all()  # the last finite iterate, not NaN
    assert (status[[0, 2]] == Status.CONVERGED).all()


def test_diverging_f_is_flagged(h):
    f = lambda z, x: 2.0 * z + x  # noqa: E731  repelling fixed point z* = -x
    x = h.asarray(np.ones((2, 3)))
    plain = h.solve(f, x, solver="fixed_point", tol=1e-8, max_iter=60)
    assert (h.numpy(plain.status) == Status.DIVERGED).all()
    assert int(h.numpy(plain.steps)) < 60  # frozen when the residual passed 1e6 x the initial one
    with pytest.raises(ConvergenceError, match="DIVERGED.*contraction"):
        h.solve(f, x, solver="fixed_point", tol=1e-8, max_iter=60, throw=True)


@pytest.mark.parametrize("solver", ["anderson", "broyden"])
def test_secant_solvers_find_repelling_fixed_point(h, solver):
    f = lambda z, x: 2.0 * z + x  # noqa: E731  linear: Anderson and Broyden solve it exactly
    x = h.asarray(np.ones((2, 3)))
    sol = h.solve(f, x, solver=solver, tol=1e-8, max_iter=60)
    assert h.numpy(sol.converged).all()
    np.testing.assert_allclose(h.numpy(sol.z), -1.0, atol=1e-7)


def test_divergence_test_can_be_disabled(h):
    f = lambda z, x: 2.0 * z + x  # noqa: E731
    sol = h.solve(f, h.asarray(np.ones((2, 3))), solver="fixed_point", max_iter=30, divergence=None)
    assert (h.numpy(sol.status) == Status.MAX_ITER).all()


def test_wrong_shape_dtype_structure(h):
    xp = h.xp
    x = h.asarray(np.ones((2, 3)))
    with pytest.raises(ValueError, match=r"shape \(2, 4\), z0 has \(2, 3\)"):
        deqcore.solve(lambda z, x: xp.concat([z, z[:, :1]], axis=1), x)
    with pytest.raises(TypeError, match="dtype"):
        deqcore.solve(lambda z, x: xp.astype(z * 0.5, xp.float32), x)
    with pytest.raises(TypeError, match="must return a single array"):
        deqcore.solve(lambda z, x: (z, z), x)
    with pytest.raises(TypeError, match="must return a tuple"):
        deqcore.solve(lambda z, x: z[0], x, (x, x))
    with pytest.raises(ValueError, match="returned 1 arrays, z0 has 2"):
        deqcore.solve(lambda z, x: (z[0],), x, (x, x))


@pytest.mark.backend("torch")
def test_wrong_device_torch():
    import torch

    x = torch.ones(2, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match="device meta"):
        deqcore.solve(lambda z, x: (0.5 * z).to("meta"), x)


def test_options_are_validated(h):
    x = h.asarray(np.ones((2, 3)))
    f = lambda z, x: 0.5 * z + x  # noqa: E731
    with pytest.raises(TypeError, match=r"unknown option 'mem'.*Valid options: beta, lam, memory"):
        deqcore.solve(f, x, solver="anderson", mem=3)
    with pytest.raises(TypeError, match="Valid options: damping"):
        deqcore.solve(f, x, solver="fixed_point", beta=0.5)
    with pytest.raises(ValueError, match="'memory' must be an int >= 1"):
        deqcore.solve(f, x, solver="anderson", memory=0)
    with pytest.raises(ValueError, match="'tol' must be a finite float > 0"):
        deqcore.solve(f, x, tol=-1.0)
    with pytest.raises(ValueError, match="'stop_mode' must be one of 'rel', 'abs'"):
        deqcore.solve(f, x, stop_mode="relative")
    with pytest.raises(ValueError, match="'damping' must be a float in"):
        deqcore.solve(f, x, solver="fixed_point", damping=1.5)
    with pytest.raises(ValueError, match="unknown solver 'newton'; available solvers: anderson, broyden"):
        deqcore.solve(f, x, solver="newton")


@pytest.mark.equivalence
def test_backend_mismatch_and_inference_errors(both):
    import jax.numpy as jnp
    import torch

    f = lambda z, x: 0.5 * z + x  # noqa: E731
    with pytest.raises(TypeError, match=r"backend 'torch' was requested.*\(backend 'jax'\)"):
        deqcore.solve(f, jnp.ones((2, 3)), backend="torch")
    with pytest.raises(TypeError, match=r"backend 'jax' was requested.*torch.Tensor \(backend 'torch'\)"):
        deqcore.solve(f, torch.ones(2, 3), backend="jax")
    with pytest.raises(TypeError, match="cannot infer the backend from ndarray"):
        deqcore.solve(f, np.ones((2, 3)))
    with pytest.raises(ValueError, match="unknown backend 'numpy'"):
        deqcore.solve(f, np.ones((2, 3)), backend="numpy")


def test_unbatched_vector_needs_batched_false(h):
    x = h.asarray(np.ones(3))
    with pytest.raises(ValueError, match="batched=False"):
        deqcore.solve(lambda z, x: 0.5 * z + x, x)
    sol = deqcore.solve(lambda z, x: 0.5 * z + x, x, batched=False, tol=1e-12, max_iter=100)
    np.testing.assert_allclose(h.numpy(sol.z), 2.0 * np.ones(3), atol=1e-10)


def test_anderson_singular_system(h):
    xp = h.xp
    rng = np.random.default_rng(22)
    G = rng.standard_normal((2, 4, 6))
    G[:, 2] = G[:, 1]  # duplicate residuals: G G^T is exactly singular
    valid = h.asarray(np.ones(4, dtype=bool), dtype=bool)
    alpha, singular = mixing_weights(h.backend, h.asarray(G @ G.transpose(0, 2, 1)), 0.0, valid)
    assert not h.numpy(singular).any()  # the eps floor keeps the weights bounded
    np.testing.assert_allclose(h.numpy(xp.sum(alpha, axis=-1)), 1.0, atol=1e-10)
    assert np.abs(h.numpy(alpha)).max() < 1e6
    zero = h.asarray(np.zeros((2, 4, 4)))
    _, singular = mixing_weights(h.backend, zero, 0.0, valid)
    assert h.numpy(singular).all()  # all-zero window: no finite weights, flagged


def test_anderson_without_regularisation_on_rank_deficient_history(h):
    rng = np.random.default_rng(23)
    d = 4
    A = 0.5 * np.linalg.qr(rng.standard_normal((d, d)))[0]
    c = rng.standard_normal(d)
    f = h.affine_layer(A, c)
    x = h.asarray(rng.standard_normal((3, d)))
    # memory > d: the residual window becomes linearly dependent before convergence
    sol = h.solve(f, x, solver="anderson", memory=8, lam=0.0, tol=1e-13, max_iter=60)
    exact = np.linalg.solve(np.eye(d) - A, (h.numpy(x) + c).T).T
    assert h.numpy(sol.converged).all()
    np.testing.assert_allclose(h.numpy(sol.z), exact, atol=1e-11)


def test_broyden_zero_denominator_is_skipped_and_counted(h):
    x = h.asarray(np.ones((2, 3)))
    f = lambda z, x: z + x  # noqa: E731  g = x is constant: every secant denominator is zero
    sol = h.solve(f, x, solver="broyden", tol=1e-8, max_iter=10)
    assert (h.numpy(sol.status) == Status.MAX_ITER).all()
    assert np.isfinite(h.numpy(sol.z)).all()
    assert (h.numpy(sol.solver_state.breakdowns) > 0).all()
    assert np.abs(h.numpy(sol.solver_state.U)).max() == 0.0  # nothing non-finite was stored


def test_throw_reports_max_iter(h):
    W, U, b, x = tanh_deq(seed=24)
    with pytest.raises(ConvergenceError, match=r"4 of 4 samples did not converge \(4 MAX_ITER\).*max_iter"):
        h.solve(h.tanh_layer(W, U, b), h.asarray(x), tol=1e-12, max_iter=2, throw=True)


@pytest.mark.backend("jax")
def test_throw_under_jax_jit():
    import jax
    from conftest import Harness

    h = Harness("jax")
    W, U, b, x = tanh_deq(seed=25)
    f = h.tanh_layer(W, U, b)
    run = jax.jit(lambda x, it: deqcore.solve(f, x, tol=1e-10, max_iter=3, throw=True).z)
    with pytest.raises(Exception, match="did not converge"):
        jax.block_until_ready(run(h.asarray(x), 0))
    ok = jax.jit(lambda x: deqcore.solve(f, x, tol=1e-10, max_iter=100, throw=True).z)(h.asarray(x))
    np.testing.assert_allclose(np.asarray(ok), tanh_fixed_point(W, U, b, x), atol=1e-9)
