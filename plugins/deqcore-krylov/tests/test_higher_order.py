"""``implicit_gmres`` gives first derivatives only: deqcore's check on ``AdjointMode`` covers it.

L = sum(c * z*) (linear in z*) for f(z, x) = tanh(z W^T + x U^T + b). The first derivative is the
same with ``create_graph=True``; differentiating it again raises ``deqcore.HigherOrderError``
naming the mode, on torch (a second ``autograd.grad``, with respect to W or to x) and on JAX
(``jax.hessian``, ``jax.grad`` of ``jax.grad`` under ``jax.jit``).
"""

from __future__ import annotations

import numpy as np
import pytest
from krylov_testing import tanh_deq

import deqcore

W0, U0, B0, X0 = tanh_deq(seed=11, d=8, batch=3, rho=0.8)
C0 = np.random.default_rng(12).standard_normal(X0.shape)
V0 = np.random.default_rng(13).standard_normal(W0.shape)
MATCH = r"gradient mode 'implicit_gmres' gives first derivatives only(.|\n)*grad='unroll'"


def solve_kw():
    return {"solver": "newton_krylov", "tol": 1e-12, "max_iter": 20, "grad": "implicit_gmres",
            "grad_options": {"tol": 1e-12}}


def test_second_derivative_raises(h):
    if h.name == "torch":
        import torch

        W, x = torch.tensor(W0, requires_grad=True), torch.tensor(X0, requires_grad=True)
        U, b, c, V = (torch.tensor(a) for a in (U0, B0, C0, V0))

        def first(create_graph):
            sol = deqcore.solve(lambda z, x_: torch.tanh(z @ W.T + x_ @ U.T + b), x, **solve_kw())
            return torch.autograd.grad((sol.z * c).sum(), W, create_graph=create_graph)[0]

        gW = first(True)
        np.testing.assert_array_equal(gW.detach().numpy(), first(False).numpy())
        for wrt in (W, x):
            with pytest.raises(deqcore.HigherOrderError, match=MATCH):
                torch.autograd.grad((gW * V).sum(), wrt, retain_graph=True)
        return
    import jax
    import jax.numpy as jnp

    U, b, c, V = (jnp.asarray(a) for a in (U0, B0, C0, V0))

    def loss(W, x):
        sol = deqcore.solve(lambda z, x_: jnp.tanh(z @ W.T + x_ @ U.T + b), x, **solve_kw())
        return jnp.sum(sol.z * c)

    W, x = jnp.asarray(W0), jnp.asarray(X0)
    assert np.linalg.norm(np.asarray(jax.jit(jax.grad(loss))(W, x))) > 1e-2
    with pytest.raises(deqcore.HigherOrderError, match=MATCH):
        jax.hessian(loss)(W, x)
    with pytest.raises(deqcore.HigherOrderError, match=MATCH):
        jax.jit(jax.grad(lambda W_: jnp.sum(jax.grad(loss)(W_, x) * V)))(W)
