"""The ``newton_krylov`` solver, reached only through ``deqcore.solve(..., solver="newton_krylov")``."""

from __future__ import annotations

import numpy as np
import pytest
from krylov_testing import ALL_BACKENDS, SELECTED, Harness, dense_gradients, rel, tanh_deq

import deqcore

WEIGHTS = tanh_deq(seed=0, d=16, batch=4, rho=0.9)


@pytest.fixture(scope="module")
def solved(h):
    """newton_krylov and a tight anderson reference on the tanh DEQ (d=16, batch 4, ||W|| = 0.9)."""
    W, U, b, x = WEIGHTS
    f, xa = h.tanh_layer(W, U, b), h.asarray(x)
    nk = deqcore.solve(f, xa, solver="newton_krylov", tol=1e-10, max_iter=30, grad=None)
    ref = deqcore.solve(f, xa, solver="anderson", tol=1e-13, max_iter=200, grad=None)
    return nk, ref


_RESULTS: dict[str, deqcore.Solution] = {}


def test_converges_to_the_anderson_fixed_point(h, solved):
    nk, ref = solved
    assert h.numpy(nk.converged).all() and h.numpy(ref.converged).all()
    assert h.numpy(nk.rel_residual).max() <= 1e-10
    np.testing.assert_allclose(h.numpy(nk.z), h.numpy(ref.z), rtol=0, atol=1e-8)
    # Newton converges in a handful of outer steps, each paying its Krylov f-evaluations in nfe
    state = nk.solver_state
    krylov = h.numpy(state.krylov_iterations)
    steps = int(h.numpy(nk.steps))
    assert steps <= 8 and (krylov >= h.numpy(nk.iterations)).all()
    assert int(h.numpy(nk.nfe)) >= 1 + steps + krylov.max()
    assert (h.numpy(state.linear_residual) <= 1e-3).all()  # the forcing term was met
    _RESULTS[h.name] = nk


@pytest.mark.equivalence
def test_torch_and_jax_agree():
    if set(ALL_BACKENDS) - set(SELECTED):
        pytest.skip("needs both torch and jax selected")
    missing = [name for name in ALL_BACKENDS if name not in _RESULTS]
    if missing:  # run on its own: solve here
        W, U, b, x = WEIGHTS
        for name in missing:
            hh = Harness(name)
            _RESULTS[name] = deqcore.solve(hh.tanh_layer(W, U, b), hh.asarray(x), solver="newton_krylov",
                                           tol=1e-10, max_iter=30, grad=None)
    zt, zj = (np.asarray(Harness(n).numpy(_RESULTS[n].z)) for n in ALL_BACKENDS)
    np.testing.assert_allclose(zt, zj, rtol=0, atol=1e-8)
    nfe = [int(Harness(n).numpy(_RESULTS[n].nfe)) for n in ALL_BACKENDS]
    assert abs(nfe[0] - nfe[1]) <= 2


def fixed_point(W, U, b, x, iters=3000):
    z = np.zeros_like(x)
    for _ in range(iters):
        z = np.tanh(z @ W.T + x @ U.T + b)
    return z


@pytest.mark.skipif("jax" not in SELECTED, reason="jax not selected")
def test_under_jax_jit_with_gradients_and_a_frozen_sample():
    """jax.jit(jax.grad(...)) through newton_krylov and implicit_gmres; sample 0 starts at z*."""
    hj = Harness("jax")
    W, U, b, x = WEIGHTS
    z_ref = fixed_point(W, U, b, x)
    z0 = np.zeros_like(x)
    z0[0] = z_ref[0]
    c = np.random.default_rng(1).standard_normal(x.shape)
    gW, gx, sol = hj.gradients(WEIGHTS, c, grad="implicit_gmres", grad_options={"tol": 1e-10},
                               solver="newton_krylov", z0=z0, tol=1e-10, max_iter=30, jit=True)
    assert hj.numpy(sol.converged).all()
    iterations = hj.numpy(sol.iterations)
    assert iterations[0] == 0 and (iterations[1:] > 0).all()
    np.testing.assert_array_equal(hj.numpy(sol.z)[0], z0[0])  # a frozen sample is left untouched
    np.testing.assert_allclose(hj.numpy(sol.z), z_ref, rtol=0, atol=1e-8)
    gW_ref, gx_ref = dense_gradients(WEIGHTS, c, z_ref)
    assert rel(gW, gW_ref) <= 1e-6 and rel(gx, gx_ref) <= 1e-6
    assert sol.backward.calls == 1 and sol.backward.converged.all()


def test_line_search_rescues_newton_far_from_the_root(h):
    """f(z, x) = z - atan(z - x): full Newton steps overshoot where |z0 - x| > 1.39 and never
    converge; backtracking on ||f(z) - z|| converges every sample. Sample 0 (|x| < 1.39) converges
    without it. The stop test is on the abs residual: plain Newton flings z so far out that the
    rel residual ||f(z) - z|| / ||f(z)|| is tiny while ||f(z) - z|| stays near pi/2 per entry."""
    x = np.array([[0.5], [3.0], [-4.0], [10.0]]) + np.linspace(0.0, 0.2, 3)
    f, xa = h.atan_layer(), h.asarray(x)
    plain = deqcore.solve(f, xa, solver="newton_krylov", tol=1e-10, max_iter=25, grad=None,
                          stop_mode="abs", divergence=None)
    converged = h.numpy(plain.converged)
    assert converged[0] and not converged[1:].any()
    searched = deqcore.solve(f, xa, solver="newton_krylov", tol=1e-10, max_iter=25, grad=None,
                             stop_mode="abs", line_search=True)
    assert h.numpy(searched.converged).all()
    np.testing.assert_allclose(h.numpy(searched.z), x, rtol=0, atol=1e-8)
    backtracks = h.numpy(searched.solver_state.backtracks)
    assert backtracks[0] == 0 and (backtracks[1:] > 0).all()


def test_options_are_validated(h):
    W, U, b, x = tanh_deq(seed=3, d=4, batch=2)
    f, xa = h.tanh_layer(W, U, b), h.asarray(x)
    with pytest.raises(TypeError, match="unknown option 'memory'.*Valid options: .*forcing.*restart"):
        deqcore.solve(f, xa, solver="newton_krylov", memory=3)
    with pytest.raises(ValueError, match="option 'restart' must be an int >= 1"):
        deqcore.solve(f, xa, solver="newton_krylov", restart=0)
    with pytest.raises(ValueError, match="option 'forcing' must be a float in"):
        deqcore.solve(f, xa, solver="newton_krylov", forcing=1.0)
