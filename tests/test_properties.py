"""Property test: every solver finds the fixed point of random contractive maps."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

SOLVERS = ["fixed_point", "anderson", "broyden"]


@st.composite
def contractive_maps(draw):
    d = draw(st.integers(1, 10))
    batch = draw(st.integers(1, 4))
    rho = draw(st.floats(0.05, 0.9))
    seed = draw(st.integers(0, 2**31 - 1))
    affine = draw(st.booleans())
    rng = np.random.default_rng(seed)
    W = rng.standard_normal((d, d))
    W = rho * W / max(np.linalg.norm(W, 2), 1e-12)
    x = rng.standard_normal((batch, d)) * draw(st.floats(0.1, 10.0))
    return W, x, affine, rho


@pytest.mark.parametrize("solver", SOLVERS)
@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(problem=contractive_maps())
def test_solvers_find_fixed_points_of_contractions(h, solver, problem):
    W, x, affine, rho = problem
    Wb = h.asarray(W)
    xp = h.xp

    def f(z, x):
        y = z @ Wb.T + x
        return y if affine else xp.tanh(y)

    tol = 1e-9
    sol = h.solve(f, h.asarray(x), solver=solver, tol=tol, stop_mode="abs", max_iter=400)
    z = h.numpy(sol.z)
    fz = z @ W.T + x if affine else np.tanh(z @ W.T + x)
    residual = np.linalg.norm(fz - z, axis=1)
    assert h.numpy(sol.converged).all()
    assert (residual <= tol * (1 + 1e-6)).all()
    scale = 1.0 + np.abs(z).max()
    np.testing.assert_allclose(h.numpy(sol.abs_residual), residual, rtol=1e-6, atol=1e-13 * scale)
    # contraction: ||z - z*|| <= ||f(z) - z|| / (1 - rho)
    if affine:
        exact = np.linalg.solve(np.eye(len(W)) - W, x.T).T
        assert (np.linalg.norm(z - exact, axis=1) <= residual / (1 - rho) + 1e-12).all()
