"""Problem generators shared by solver tests (NumPy, float64)."""

from __future__ import annotations

import numpy as np


def scaled_gaussian(rng: np.random.Generator, d: int, rho: float) -> np.ndarray:
    """A Gaussian matrix scaled to spectral norm ``rho``."""
    W = rng.standard_normal((d, d))
    return rho * W / np.linalg.norm(W, 2)


def symmetric_spread(rng: np.random.Generator, d: int, rho: float) -> np.ndarray:
    """A symmetric matrix with eigenvalues evenly spread over [-rho, rho]."""
    Q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    return (Q * np.linspace(-rho, rho, d)) @ Q.T


def tanh_deq(seed: int, d: int = 16, batch: int = 4, rho: float = 0.9, sym: bool = False):
    """Weights (W, U, b) and input x of f(z, x) = tanh(z W^T + x U^T + b) with ||W|| = rho."""
    rng = np.random.default_rng(seed)
    W = symmetric_spread(rng, d, rho) if sym else scaled_gaussian(rng, d, rho)
    U = rng.standard_normal((d, d)) / np.sqrt(d)
    b = 0.1 * rng.standard_normal(d)
    x = rng.standard_normal((batch, d))
    return W, U, b, x


def tanh_fixed_point(W, U, b, x, iters: int = 2000) -> np.ndarray:
    """Reference fixed point by plain iteration in float64 (W contractive)."""
    z = np.zeros_like(x)
    for _ in range(iters):
        z = np.tanh(z @ W.T + x @ U.T + b)
    return z
