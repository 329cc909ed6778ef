"""The custom-gradient hook (``Backend.attach_adjoint``) that gradient modes build on.

With the exact adjoint u = g (I - J)^-1 the gradients w.r.t. parameters that f closes over and
w.r.t. x must equal central finite differences of the fixed point; with u = g they must equal
one VJP of f at z* (JFB).
"""

from __future__ import annotations

import numpy as np
import pytest
from problems import tanh_deq, tanh_fixed_point

import deqcore

D, B = 6, 3


def exact_adjoint(g, vjp_z):
    u = g
    for _ in range(300):  # u = g + u J, contractive
        u = g + vjp_z(u)
    return u


def jfb_adjoint(g, vjp_z):
    return g


def loss_weights():
    return np.random.default_rng(41).standard_normal((B, D))


def reference_grads():
    W, U, b, x = tanh_deq(seed=40, d=D, batch=B, rho=0.7)
    c = loss_weights()

    def loss(W_, x_):
        return float(np.sum(c * tanh_fixed_point(W_, U, b, x_, iters=400)))

    eps = 1e-6
    gW = np.zeros_like(W)
    for i in range(D):
        for k in range(D):
            E = np.zeros_like(W)
            E[i, k] = eps
            gW[i, k] = (loss(W + E, x) - loss(W - E, x)) / (2 * eps)
    gx = np.zeros_like(x)
    for i in range(B):
        for k in range(D):
            E = np.zeros_like(x)
            E[i, k] = eps
            gx[i, k] = (loss(W, x + E) - loss(W, x - E)) / (2 * eps)
    return (W, U, b, x), gW, gx


@pytest.fixture(scope="module")
def fd():
    return reference_grads()


def grads(h, adjoint, weights, jit=False):
    W, U, b, x = weights
    c = loss_weights()
    if h.name == "torch":
        import torch

        Wt = torch.tensor(W, requires_grad=True)
        xt = torch.tensor(x, requires_grad=True)
        Ut, bt = torch.tensor(U), torch.tensor(b)

        def f(z, x):
            return torch.tanh(z @ Wt.T + x @ Ut.T + bt)

        sol = deqcore.solve(f, xt, tol=1e-13, max_iter=200, grad=None)
        assert not sol.z.requires_grad  # the forward solve records no graph
        z = h.backend.attach_adjoint(f, sol.z, xt, adjoint)
        np.testing.assert_array_equal(z.detach().numpy(), sol.z.numpy())
        (z * torch.tensor(c)).sum().backward()
        return Wt.grad.numpy(), xt.grad.numpy()
    import jax
    import jax.numpy as jnp

    def loss(W_, x_):
        def f(z, x):
            return jnp.tanh(z @ W_.T + x @ U.T + b)

        sol = deqcore.solve(f, x_, tol=1e-13, max_iter=200, grad=None)
        z = h.backend.attach_adjoint(f, sol.z, x_, adjoint)
        return jnp.sum(z * c)

    fn = jax.grad(loss, argnums=(0, 1))
    if jit:
        fn = jax.jit(fn)
    gW, gx = fn(jnp.asarray(W), jnp.asarray(x))
    return np.asarray(gW), np.asarray(gx)


def test_exact_adjoint_matches_finite_differences(h, fd):
    weights, gW_ref, gx_ref = fd
    gW, gx = grads(h, exact_adjoint, weights)
    assert np.linalg.norm(gW - gW_ref) / np.linalg.norm(gW_ref) < 1e-6
    assert np.linalg.norm(gx - gx_ref) / np.linalg.norm(gx_ref) < 1e-6


@pytest.mark.backend("jax")
def test_exact_adjoint_under_jax_jit(fd):
    from conftest import Harness

    weights, gW_ref, gx_ref = fd
    gW, gx = grads(Harness("jax"), exact_adjoint, weights, jit=True)
    assert np.linalg.norm(gW - gW_ref) / np.linalg.norm(gW_ref) < 1e-6
    assert np.linalg.norm(gx - gx_ref) / np.linalg.norm(gx_ref) < 1e-6


def test_identity_adjoint_is_one_vjp_of_f(h, fd):
    weights, gW_ref, _ = fd
    W, U, b, x = weights
    gW, gx = grads(h, jfb_adjoint, weights)
    z = tanh_fixed_point(W, U, b, x, iters=400)
    c = loss_weights()
    s = c * (1 - np.tanh(z @ W.T + x @ U.T + b) ** 2)  # g * tanh'
    np.testing.assert_allclose(gW, s.T @ z, atol=1e-10)
    np.testing.assert_allclose(gx, s @ U, atol=1e-10)
    assert np.linalg.norm(gW - gW_ref) > 1e-3  # JFB is an approximation, not the exact gradient


@pytest.mark.backend("jax")
def test_jax_adjoint_under_vmap():
    import jax
    import jax.numpy as jnp
    from conftest import Harness

    h = Harness("jax")
    W, U, b, x = tanh_deq(seed=42, d=D, batch=B, rho=0.7)

    def per_sample_loss(W_, xi):
        f = lambda z, x: jnp.tanh(z @ W_.T + x @ U.T + b)  # noqa: E731
        sol = deqcore.solve(f, xi, tol=1e-13, max_iter=200, batched=False, grad=None)
        return jnp.sum(h.backend.attach_adjoint(f, sol.z, xi, exact_adjoint))

    per_sample = jax.vmap(jax.grad(per_sample_loss), in_axes=(None, 0))(jnp.asarray(W), jnp.asarray(x))

    def batched_loss(W_):
        f = lambda z, x: jnp.tanh(z @ W_.T + x @ U.T + b)  # noqa: E731
        sol = deqcore.solve(f, jnp.asarray(x), tol=1e-13, max_iter=200, grad=None)
        return jnp.sum(h.backend.attach_adjoint(f, sol.z, jnp.asarray(x), exact_adjoint))

    expected = np.asarray(jax.grad(batched_loss)(jnp.asarray(W)))
    np.testing.assert_allclose(np.asarray(per_sample).sum(axis=0), expected, atol=1e-10)
