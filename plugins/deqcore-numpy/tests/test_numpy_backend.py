"""The NumPy backend: deqcore's conformance kit with torch (float64) as the reference, solves
without RuntimeWarnings where the algorithms compute with inf and NaN, and gradient requests
refused. pyproject's pytest settings turn every RuntimeWarning into an error.

The backend is reached through deqcore's registry only, as a user reaches it: this module imports
nothing from the plugin, so it also shows that the entry point registers it.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import deqcore
import deqcore.testing

SOLVERS = ("anderson", "broyden", "fixed_point")


def test_the_backend_passes_the_conformance_kit_and_equals_torch():
    checks = deqcore.testing.check_backend("numpy", reference="torch")
    assert "grad-refused" in checks and "anderson-tuple-equals-torch" in checks


def test_the_entry_point_registers_the_backend_for_numpy_arrays():
    entry = deqcore.registry().get("backends", "numpy")
    assert entry.plugin == "numpy" and entry.info["modules"] == ("numpy",)
    assert deqcore.registry().backend_for(np.zeros(2)) == "numpy"
    caps = deqcore.registry().backend("numpy").capabilities
    assert caps == deqcore.extend.Capabilities(autodiff=False, jit=False, vmap=False, devices=("cpu",))


def _layer(rho, n=6, m=4, seed=0):
    rng = np.random.default_rng(seed)
    W = rng.standard_normal((n, n))
    W *= rho / np.linalg.norm(W, 2)
    U = rng.standard_normal((n, m))
    return W, U, rng.standard_normal((5, m))


def test_a_solve_is_inferred_from_numpy_arrays_and_has_no_gradient_mode():
    W, U, x = _layer(0.5)
    f = lambda z, x: np.tanh(z @ W.T + x @ U.T)  # noqa: E731
    z0 = np.zeros((len(x), len(W)))
    with pytest.raises(deqcore.CapabilityError, match=r"grad='implicit'.*backend 'numpy'.*grad=None"):
        deqcore.solve(f, x, z0, grad="implicit")
    with pytest.raises(TypeError, match=r"grad_options were given but backend 'numpy' has no autodiff"):
        deqcore.solve(f, x, z0, grad_options={"tol": 1e-8})
    sol = deqcore.solve(f, x, z0, tol=1e-12)  # the default gradient mode, "auto", is None here
    assert sol.grad is None
    assert isinstance(sol.z, np.ndarray) and sol.z.dtype == np.float64 and bool(np.all(sol.converged))
    np.testing.assert_allclose(sol.z, f(sol.z, x), atol=1e-11)


# Problems where the shared algorithms meet inf and NaN: an exact fixed point (rel/abs is 0/0),
# a diverging map, a map producing NaN, one whose residual norm overflows float64, and one that
# jumps to inf after a few steps. NumPy would warn at each; none of it may surface.
HARD = {
    "exact": lambda xp, z, x: 0.0 * z,
    "diverging": lambda xp, z, x: 3.0 * z + x,
    "nan": lambda xp, z, x: z * float("nan"),
    "overflowing": lambda xp, z, x: 1e200 * (z + 1.0),
    "inf_later": lambda xp, z, x: xp.where(xp.abs(z) > 1.0, float("inf"), 2.0 * z + x),
}


def _hard(problem, backend):
    xp = deqcore.registry().backend(backend).xp
    return lambda z, x: HARD[problem](xp, z, x)


@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("problem", sorted(HARD))
def test_no_runtime_warning_where_the_algorithms_meet_inf_and_nan(problem, solver):
    x = np.random.default_rng(1).standard_normal((4, 6))
    sol, ref = (deqcore.solve(_hard(problem, name), x_, solver=solver, grad=None, tol=1e-12, max_iter=30,
                              check_every=3)
                for name, x_ in (("numpy", x), ("torch", torch.from_numpy(x))))
    # the same outcome per sample as on torch (the step at which an ill-conditioned mixing system
    # stops a sample may differ by rounding)
    np.testing.assert_array_equal(sol.status, ref.status.numpy())


@pytest.mark.parametrize(("solver", "options"), [
    ("anderson", {"memory": 2, "beta": 0.8}),
    ("broyden", {"line_search": True}),
    ("fixed_point", {"damping": 0.7}),
])
def test_solver_options_equal_torch(solver, options):
    W, U, x = _layer(0.8, seed=2)
    z0 = np.zeros((len(x), len(W)))
    got = deqcore.solve(lambda z, x: np.tanh(z @ W.T + x @ U.T), x, z0, solver=solver, grad=None, tol=1e-12,
                        max_iter=200, **options)
    Wt, Ut = torch.from_numpy(W), torch.from_numpy(U)
    ref = deqcore.solve(lambda z, x: torch.tanh(z @ Wt.T + x @ Ut.T), torch.from_numpy(x),
                        torch.from_numpy(z0), solver=solver, grad=None, tol=1e-12, max_iter=200, **options)
    np.testing.assert_allclose(got.z, ref.z.numpy(), rtol=0, atol=1e-12)
    np.testing.assert_array_equal(got.iterations, ref.iterations.numpy())


def test_a_singular_mixing_system_is_nan_for_that_system_only():
    be = deqcore.registry().backend("numpy")
    a = np.stack([np.eye(3) * 2.0, np.zeros((3, 3)), np.eye(3)])
    b = np.ones((3, 3))
    out = be.linear_solve(a, b)
    np.testing.assert_array_equal(out[0], 0.5)
    assert np.all(np.isnan(out[1]))
    np.testing.assert_array_equal(out[2], 1.0)


def test_throw_raises_the_convergence_error():
    x = np.ones((2, 3))
    with pytest.raises(deqcore.ConvergenceError, match=r"2 of 2 samples did not converge \(2 DIVERGED\)"):
        deqcore.solve(lambda z, x: 3.0 * z + x, x, grad=None, solver="fixed_point", throw=True)
