"""The ``implicit_gmres`` gradient mode, reached only through ``deqcore.solve(..., grad="implicit_gmres")``.

L = sum(c * z*) for f(z, x) = tanh(z W^T + x U^T + b); W is closed over by f (a torch leaf with
requires_grad, a jax.grad argument), x is the solve's input.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from krylov_testing import dense_gradients, rel, tanh_deq

import deqcore

WEIGHTS = tanh_deq(seed=1, d=16, batch=4, rho=0.9)
C = np.random.default_rng(7).standard_normal(WEIGHTS[3].shape)


@pytest.fixture(scope="module")
def reference(h):
    """deqcore's own implicit mode, tight, and the dense (I - J^T)^-1 gradients at its z*."""
    gW, gx, sol = h.gradients(WEIGHTS, C, grad="implicit", grad_options={"tol": 1e-12, "max_iter": 200},
                              tol=1e-12, max_iter=100)
    return (gW, gx), dense_gradients(WEIGHTS, C, h.numpy(sol.z))


def test_matches_implicit_and_the_dense_adjoint(h, reference):
    (gW_imp, gx_imp), (gW_ref, gx_ref) = reference
    gW, gx, sol = h.gradients(WEIGHTS, C, grad="implicit_gmres", grad_options={"tol": 1e-12},
                              tol=1e-12, max_iter=100)
    assert rel(gW, gW_ref) <= 1e-6 and rel(gx, gx_ref) <= 1e-6
    assert rel(gW, gW_imp) <= 1e-9 and rel(gx, gx_imp) <= 1e-9
    report = sol.backward
    assert report.mode == "implicit_gmres" and report.calls == 1 and report.converged.all()
    assert report.residual.max() <= 1e-12
    # GMRES needs at most n = 16 Krylov iterations per sample; + 1 VJP for the true residual
    assert (report.iterations <= 16).all() and 2 <= report.vjps <= 17


def test_default_options_are_accurate(h, reference):
    _, (gW_ref, gx_ref) = reference
    gW, gx, sol = h.gradients(WEIGHTS, C, grad="implicit_gmres", tol=1e-12, max_iter=100)
    assert rel(gW, gW_ref) <= 1e-5 and rel(gx, gx_ref) <= 1e-5
    assert sol.backward.converged.all() and sol.backward.residual.max() <= 1e-6


def test_non_contractive_layer(h):
    """f(z, x) = z A^T + x with spectral radius of A 1.5: plain iteration (and its adjoint
    fixed-point iteration) diverge, but I - A is regular: newton_krylov finds z* and implicit_gmres
    the exact gradient, u = c (I - A)^-1."""
    rng = np.random.default_rng(5)
    d = 6
    Q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    A = (Q * np.array([1.5, -1.2, 0.8, 0.5, -0.3, 0.1])) @ Q.T
    x = rng.standard_normal((3, d))
    c = rng.standard_normal((3, d))
    z_ref = np.linalg.solve(np.eye(d) - A, x.T).T
    if h.name == "torch":
        import torch

        At, xt = torch.tensor(A), torch.tensor(x, requires_grad=True)
        sol = deqcore.solve(lambda z, x: z @ At.T + x, xt, solver="newton_krylov", tol=1e-12,
                            max_iter=10, grad="implicit_gmres", grad_options={"tol": 1e-12})
        (gx,) = torch.autograd.grad((sol.z * torch.tensor(c)).sum(), (xt,))
    else:
        import jax
        import jax.numpy as jnp

        def loss(x_):
            sol = deqcore.solve(lambda z, x: z @ A.T + x, x_, solver="newton_krylov", tol=1e-12,
                                max_iter=10, grad="implicit_gmres", grad_options={"tol": 1e-12})
            return jnp.sum(sol.z * c), sol

        gx, sol = jax.grad(loss, has_aux=True)(jnp.asarray(x))
    assert h.numpy(sol.converged).all()
    np.testing.assert_allclose(h.numpy(sol.z), z_ref, rtol=0, atol=1e-9)
    assert rel(h.numpy(gx), np.linalg.solve((np.eye(d) - A).T, c.T).T) <= 1e-9
    assert sol.backward.converged.all()


def test_a_backward_that_does_not_converge_is_flagged(h):
    weights = tanh_deq(seed=2, d=8, batch=3)
    c = np.ones(weights[3].shape)
    kw = {"tol": 1e-11, "max_iter": 100, "jit": False}
    with pytest.warns(deqcore.BackwardWarning, match="implicit_gmres backward: 3 of 3 samples did not reach "
                      "rel tol 1e-14 in 2 Krylov iterations"):
        _, _, sol = h.gradients(weights, c, grad="implicit_gmres", grad_options={"tol": 1e-14, "max_iter": 2},
                                **kw)
    report = sol.backward
    assert not report.converged.any() and (report.iterations == 2).all() and report.vjps == 3
    if h.name == "torch":  # on_fail="raise" (JAX raises it too, wrapped, from its host callback)
        with pytest.raises(deqcore.ConvergenceError, match="did not reach rel tol 1e-14"):
            h.gradients(weights, c, grad="implicit_gmres",
                        grad_options={"tol": 1e-14, "max_iter": 2, "on_fail": "raise"}, **kw)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            h.gradients(weights, c, grad="implicit_gmres",
                        grad_options={"tol": 1e-14, "max_iter": 2, "on_fail": "ignore"}, **kw)


def test_options_are_validated(h):
    W, U, b, x = tanh_deq(seed=3, d=4, batch=2)
    f, xa = h.tanh_layer(W, U, b), h.asarray(x)
    with pytest.raises(TypeError, match="unknown option 'solver'.*Valid options: max_iter, on_fail, "
                       "restart, tol"):
        deqcore.solve(f, xa, grad="implicit_gmres", grad_options={"solver": "anderson"})
    with pytest.raises(ValueError, match="option 'restart' must be an int >= 1"):
        deqcore.solve(f, xa, grad="implicit_gmres", grad_options={"restart": 0})
    with pytest.raises(ValueError, match="option 'on_fail' must be one of"):
        deqcore.solve(f, xa, grad="implicit_gmres", grad_options={"on_fail": "panic"})
