"""Helpers for the plugin's tests: one :class:`Harness` per backend, a tanh DEQ with dense
float64 references. The tests reach the plugin only through ``deqcore.solve`` (solver and gradient
mode by name), so they pass only when the installed distribution's entry point works."""

from __future__ import annotations

import importlib.util
import os

import numpy as np
import pytest

import deqcore

ALL_BACKENDS = ("torch", "jax")


def _selected() -> tuple[str, ...]:
    raw = os.environ.get("DEQCORE_TEST_BACKENDS", "").strip()
    if raw:
        names = tuple(n.strip() for n in raw.split(",") if n.strip())
        missing = [n for n in names if importlib.util.find_spec(n) is None]
        if missing:
            raise pytest.UsageError(f"DEQCORE_TEST_BACKENDS selects {missing} but they are not installed")
        return names
    return tuple(n for n in ALL_BACKENDS if importlib.util.find_spec(n) is not None)


SELECTED = _selected()


def tanh_deq(seed: int, d: int = 16, batch: int = 4, rho: float = 0.9):
    """Weights (W, U, b) and input x of f(z, x) = tanh(z W^T + x U^T + b); W has spectral norm rho."""
    rng = np.random.default_rng(seed)
    W = rng.standard_normal((d, d))
    W = rho * W / np.linalg.norm(W, 2)
    U = rng.standard_normal((d, d)) / np.sqrt(d)
    b = 0.1 * rng.standard_normal(d)
    x = rng.standard_normal((batch, d))
    return W, U, b, x


def dense_gradients(weights, c, z):
    """dL/dW and dL/dx of L = sum(c * z*) from the dense adjoint u_b = (I - J_b^T)^-1 c_b.

    J_b = diag(s_b) W with s = 1 - tanh(.)^2 at the fixed point ``z`` (numpy, float64).
    """
    W, U, b, x = weights
    d = W.shape[0]
    s = 1.0 - np.tanh(z @ W.T + x @ U.T + b) ** 2
    u = np.stack([np.linalg.solve(np.eye(d) - (s[i][:, None] * W).T, c[i]) for i in range(x.shape[0])])
    return (u * s).T @ z, (u * s) @ U


def rel(a, b) -> float:
    return float(np.linalg.norm(np.asarray(a) - np.asarray(b)) / np.linalg.norm(np.asarray(b)))


class Harness:
    """Array conversion, layers and gradients for one backend, so tests read the same on all."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.backend = deqcore.registry().backend(name)

    def asarray(self, a):
        a = np.asarray(a, dtype="float64")
        if self.name == "torch":
            import torch

            return torch.from_numpy(a.copy())
        import jax.numpy as jnp

        return jnp.asarray(a)

    def numpy(self, a) -> np.ndarray:
        return np.asarray(self.backend.to_numpy(a))

    def tanh_layer(self, W, U, b):
        Wb, Ub, bb = (self.asarray(a) for a in (W, U, b))
        if self.name == "torch":
            import torch

            return lambda z, x: torch.tanh(z @ Wb.T + x @ Ub.T + bb)
        import jax.numpy as jnp

        return lambda z, x: jnp.tanh(z @ Wb.T + x @ Ub.T + bb)

    def atan_layer(self):
        """f(z, x) = z - atan(z - x): fixed point x; plain Newton from 0 diverges where |x| > 1.39."""
        if self.name == "torch":
            import torch

            return lambda z, x: z - torch.atan(z - x)
        import jax.numpy as jnp

        return lambda z, x: z - jnp.arctan(z - x)

    def gradients(self, weights, c, *, grad, grad_options=None, solver="anderson", z0=None, jit=True,
                  **kw):
        """(dL/dW, dL/dx, solution) for L = sum(c * z*), W closed over by f, through deqcore.solve.

        JAX: ``jax.grad`` (under ``jax.jit`` unless ``jit=False``), the solution's arrays returned
        as concrete aux values. torch: ``torch.autograd.grad``.
        """
        W, U, b, x = weights
        z0 = None if z0 is None else self.asarray(z0)
        if self.name == "torch":
            import torch

            Wt = torch.tensor(W, requires_grad=True)
            xt = torch.tensor(x, requires_grad=True)
            Ut, bt = torch.tensor(U), torch.tensor(b)
            sol = deqcore.solve(lambda z, x: torch.tanh(z @ Wt.T + x @ Ut.T + bt), xt, z0, solver=solver,
                                grad=grad, grad_options=grad_options, **kw)
            gW, gx = torch.autograd.grad((sol.z * torch.tensor(c)).sum(), (Wt, xt))
            return gW.numpy(), gx.numpy(), sol
        import jax
        import jax.numpy as jnp

        def loss(W_, x_, z0_):
            sol = deqcore.solve(lambda z, x: jnp.tanh(z @ W_.T + x @ U.T + b), x_, z0_, solver=solver,
                                grad=grad, grad_options=grad_options, **kw)
            return jnp.sum(sol.z * c), sol

        # the solution comes back as concrete aux values; its backward report (a static field, the
        # same object as inside the trace) is filled when the computation runs
        fn = jax.grad(loss, argnums=(0, 1), has_aux=True)
        (gW, gx), sol = (jax.jit(fn) if jit else fn)(jnp.asarray(W), jnp.asarray(x), z0)
        return np.asarray(gW), np.asarray(gx), sol
