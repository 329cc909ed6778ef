"""Mixers: what predicts HyperAnderson's mixing weights and step size from a window of residuals.

A mixer is called as ``mixer(backend, params, feats, valid)`` once per iteration with the
compressed residuals of the window, oldest first
and right-aligned (``feats``: (B, W, C); the newest residual is at position W-1), and a (W,)
boolean ``valid`` marking the positions already filled (the window grows from 1 to W entries
during the first W iterations). It returns ``(alpha_hat, beta)``: raw weights (B, W), which
:func:`project_weights` turns into weights summing to one, and a (B,) step size. Entries at
invalid positions are ignored. Everything is written over the backend's array namespace ``xp``,
so a mixer runs and trains on every backend.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from ..solvers._anderson import mixing_weights

NORMALISATIONS = ("shift", "softmax", "none")
PRIORS = ("newest", "anderson")


def project_weights(xp: Any, alpha_hat: Any, valid: Any, how: str = "shift") -> Any:
    """Mixing weights (B, W) from raw ones, zero at invalid positions.

    ``"shift"`` (default, HyperDEQ's): ``a = a_hat + (1 - sum(a_hat)) / k`` over the ``k`` valid
    positions, the Euclidean projection onto the hyperplane ``sum(a) = 1``; negative weights
    stay allowed, and applying it twice changes nothing. ``"softmax"``: positive weights
    ``exp(a_hat)`` normalised (an ablation). ``"none"``: ``a_hat`` as it is (an ablation; the
    weights then need not sum to one).
    """
    validf = xp.astype(valid, alpha_hat.dtype)
    if how == "shift":
        k = xp.sum(validf)
        shift = (1.0 - xp.sum(alpha_hat * validf, axis=-1, keepdims=True)) / k
        return (alpha_hat + shift) * validf
    if how == "softmax":
        masked = xp.where(valid, alpha_hat, xp.full_like(alpha_hat, -math.inf))
        e = xp.exp(masked - xp.max(masked, axis=-1, keepdims=True))
        return e / xp.sum(e, axis=-1, keepdims=True)
    if how == "none":
        return alpha_hat * validf
    raise ValueError(f"unknown weight normalisation {how!r}; choose one of {', '.join(NORMALISATIONS)}")


def safe_norm(xp: Any, a: Any) -> Any:
    """``||a||`` over the last axis whose gradient at ``a = 0`` is 0, not NaN (JAX's is NaN)."""
    sq = xp.sum(a * a, axis=-1)
    positive = sq > 0
    return xp.where(positive, xp.sqrt(xp.where(positive, sq, xp.ones_like(sq))), xp.zeros_like(sq))


def _gelu(xp: Any, h: Any) -> Any:
    # tanh form: the Array API has tanh but not erf
    return 0.5 * h * (1.0 + xp.tanh(0.7978845608028654 * (h + 0.044715 * h * h * h)))


def _conv3(xp: Any, h: Any, w: Any, b: Any) -> Any:
    """Kernel-3 'same' convolution along axis 1 of ``h`` (B, T, Cin) with ``w`` (3, Cin, Cout)."""
    zero = xp.zeros_like(h[:, :1])
    before = xp.concat([zero, h[:, :-1]], axis=1)
    after = xp.concat([h[:, 1:], zero], axis=1)
    return xp.matmul(before, w[0]) + xp.matmul(h, w[1]) + xp.matmul(after, w[2]) + b


class TemporalConvMixer:
    """HyperDEQ's s_xi: two kernel-3 convolutions over the window, GELU between them.

    Input per window position: the compressed residual divided by the window's root-mean-square
    residual norm (so the mixer, like Anderson's least squares, is blind to the residuals' overall
    scale, which falls by orders of magnitude during a solve), its log relative norm, a flag
    for the newest position and the prior's weights. Output channel 0 is ``alpha_hat`` plus the
    prior, channel 1 averaged over the valid positions is the logit of ``beta / beta_max``. The
    prior is ``"anderson"`` (default: the least-squares weights of the scaled, compressed window,
    regularised by ``lam``; it keeps the iteration converging past the trained budget, see
    docs/hypersolvers.md) or ``"newest"`` (weight one on the newest iterate). The output layer
    starts small, so an untrained mixer takes damped steps from the prior's mix with ``beta =
    beta_init``. Zero padding and zeroed hidden units at invalid positions make a
    partly filled window behave exactly like a shorter sequence.

    Parameters (``mixer.`` prefix in a hypersolver): ``w1`` (3, C+2, width), ``b1`` (width,),
    ``w2`` (3, width, 2), ``b2`` (2,).
    """

    def __init__(self, features: int, width: int = 64, beta_max: float = 1.0, beta_init: float = 0.9,
                 prior: str = "anderson", lam: float = 1e-4) -> None:
        if not 0.0 < beta_init < beta_max:
            raise ValueError(f"TemporalConvMixer: need 0 < beta_init < beta_max, got {beta_init}, {beta_max}")
        if prior not in PRIORS:
            raise ValueError(f"TemporalConvMixer: prior must be one of {', '.join(PRIORS)}, got {prior!r}")
        self.features, self.width = int(features), int(width)
        self.beta_max, self.beta_init = float(beta_max), float(beta_init)
        self.prior, self.lam = prior, float(lam)

    def config(self) -> dict[str, Any]:
        return {"kind": "temporal_conv", "features": self.features, "width": self.width,
                "beta_max": self.beta_max, "beta_init": self.beta_init, "prior": self.prior,
                "lam": self.lam}

    def init_params(self, rng: np.random.Generator) -> dict[str, np.ndarray]:
        cin, width = self.features + 3, self.width
        p = self.beta_init / self.beta_max
        return {
            "w1": rng.normal(0.0, 1.0 / math.sqrt(3 * cin), (3, cin, width)),
            "b1": np.zeros(width),
            "w2": rng.normal(0.0, 0.1 / math.sqrt(3 * width), (3, width, 2)),
            "b2": np.array([0.0, math.log(p / (1.0 - p))]),
        }

    def __call__(self, backend: Any, params: Mapping[str, Any], feats: Any, valid: Any) -> tuple[Any, Any]:
        xp = backend.xp
        validf = xp.astype(valid, feats.dtype)
        count = xp.sum(validf)
        norms = safe_norm(xp, feats)  # (B, W); zero at invalid positions
        scale = xp.sqrt(xp.sum(norms * norms, axis=-1, keepdims=True) / count)
        tiny = float(xp.finfo(feats.dtype).tiny) ** 0.5
        unit = feats / (scale[:, :, None] + tiny)
        lognorm = xp.log(norms / (scale + tiny) + 1e-8) * validf
        newest = xp.zeros_like(validf)
        newest = xp.concat([newest[:-1], xp.ones_like(newest[-1:])])
        newest = xp.broadcast_to(newest, lognorm.shape)
        if self.prior == "anderson":
            gram = xp.matmul(unit, xp.matrix_transpose(unit))
            base, singular = mixing_weights(backend, gram, self.lam, valid)
            base = xp.where(singular[:, None], newest, base)
        else:
            base = newest
        h = xp.concat([unit, xp.stack([lognorm, newest, base], axis=-1)], axis=-1)
        h = _gelu(xp, _conv3(xp, h, params["w1"], params["b1"])) * validf[:, None]
        out = _conv3(xp, h, params["w2"], params["b2"])
        alpha_hat = out[..., 0] + base
        logit = xp.sum(out[..., 1] * validf, axis=-1) / count
        beta = self.beta_max / (1.0 + xp.exp(-logit))
        return alpha_hat, beta


class AndersonMixer:
    """Anderson's own weights as a mixer: least squares on the (uncompressed) residuals, ``beta``.

    With an identity compression, a HyperAnderson iteration with this mixer is exactly Anderson
    acceleration with memory W (a reference for tests and ablations). No parameters.
    """

    def __init__(self, lam: float = 1e-4, beta: float = 1.0) -> None:
        self.lam, self.beta = float(lam), float(beta)

    def config(self) -> dict[str, Any]:
        return {"kind": "anderson", "lam": self.lam, "beta": self.beta}

    def init_params(self, rng: np.random.Generator) -> dict[str, np.ndarray]:
        return {}

    def __call__(self, backend: Any, params: Mapping[str, Any], feats: Any, valid: Any) -> tuple[Any, Any]:
        xp = backend.xp
        gram = xp.matmul(feats, xp.matrix_transpose(feats))
        alpha, _ = mixing_weights(backend, gram, self.lam, valid)
        return alpha, xp.full_like(alpha[:, 0], self.beta)
