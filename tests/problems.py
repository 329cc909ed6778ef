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


def two_scale_deq(seed: int, d: int = 8, m: int = 5, batch: int = 3):
    """Weights and input of :func:`two_scale_layer`, a layer with a tuple state ``(z1, z2)``."""
    rng = np.random.default_rng(seed)
    params = {"W1": scaled_gaussian(rng, d, 0.8), "U": rng.standard_normal((d, d)) / np.sqrt(d),
              "b": 0.1 * rng.standard_normal(d), "W2": scaled_gaussian(rng, m, 0.6),
              "C": rng.standard_normal((m, d)) / np.sqrt(d)}
    x = rng.standard_normal((batch, d))
    z0 = (np.zeros((batch, d)), np.zeros((batch, m)))
    return params, x, z0


def tanh_layer(tanh, p, z, x):
    """``tanh(z W^T + x U^T + b)`` with the weights ``p`` (W, U, b); ``tanh`` is the framework's."""
    return tanh(z @ p["W"].T + x @ p["U"].T + p["b"])


def two_scale_layer(tanh, p, z, x):
    """``(tanh(z1 W1^T + x U^T + b), tanh(z2 W2^T + z1 C^T))``: two coupled resolutions."""
    z1, z2 = z
    return tanh(z1 @ p["W1"].T + x @ p["U"].T + p["b"]), tanh(z2 @ p["W2"].T + z1 @ p["C"].T)
