"""Model-specific hypersolver pieces (HyperDEQ): initialisers and residual compressions.

MDEQ (multiscale images): the compression global-pools the lowest-resolution branch of a
residual (one value per channel); the initialiser is a small 3x3 convolution of the injection
with ReLU, average-pooled to each branch's resolution and mapped to the branch's channels by a
1x1 convolution. Both are written over the backend's ``xp`` (plus ``conv2d`` from the models'
framework glue), so one hypersolver runs on PyTorch and JAX.

DEQ-Transformer (sequences): the compression keeps the last position of a residual (the one
that attends to the whole segment); the initialiser is a causal kernel-3 convolution of the
injection with ReLU and a linear map to ``d_model`` (causal, so a first guess never carries a
later token into an earlier position). See ``docs/hypersolvers.md``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ._layers import relu
from ._ops import ops_for


class MDEQCompression:
    """A residual (one array per branch, (B, C_i, H_i, W_i)) -> the channel means of the last,
    lowest-resolution branch (B, C_last)."""

    def __init__(self, channels: Sequence[int]) -> None:
        self.channels = tuple(int(c) for c in channels)
        self.features = self.channels[-1]

    def config(self) -> dict[str, Any]:
        return {"kind": "mdeq", "channels": list(self.channels)}

    def __call__(self, backend: Any, g: Any) -> Any:
        return backend.xp.mean(g[-1], axis=(2, 3))


class MDEQInitialiser:
    """``h_phi(inj)``: ``relu(conv3x3(inj) + b)`` with ``hidden`` channels, average-pooled by
    ``2^i`` and mapped to branch ``i``'s channels by a 1x1 convolution (weights start at zero, so
    an untrained initialiser gives the classic zero start)."""

    def __init__(self, inj_channels: int, channels: Sequence[int], hidden: int = 8) -> None:
        self.inj_channels, self.hidden = int(inj_channels), int(hidden)
        self.channels = tuple(int(c) for c in channels)
        self._ops: dict[str, Any] = {}

    def config(self) -> dict[str, Any]:
        return {"kind": "mdeq", "inj_channels": self.inj_channels, "channels": list(self.channels),
                "hidden": self.hidden}

    def init_params(self, rng: np.random.Generator) -> dict[str, np.ndarray]:
        fan_in = 9 * self.inj_channels
        shape = (self.hidden, self.inj_channels, 3, 3)
        params = {"conv.weight": rng.normal(0.0, math.sqrt(2.0 / fan_in), shape),
                  "conv.bias": np.zeros(self.hidden)}
        for i, c in enumerate(self.channels):
            params[f"out{i}.weight"] = np.zeros((c, self.hidden))
            params[f"out{i}.bias"] = np.zeros(c)
        return params

    def __call__(self, backend: Any, params: Mapping[str, Any], inj: Any) -> tuple[Any, ...]:
        if backend.name not in self._ops:
            self._ops[backend.name] = ops_for(backend.name)
        ops, xp = self._ops[backend.name], backend.xp
        h = ops.conv2d(inj, params["conv.weight"], padding=1)
        h = relu(xp, h + xp.reshape(params["conv.bias"], (1, -1, 1, 1)))
        b, p, height, width = h.shape
        out = []
        for i in range(len(self.channels)):
            k = 2 ** i
            pooled = xp.mean(xp.reshape(h, (b, p, height // k, k, width // k, k)), axis=(3, 5))
            w = xp.matrix_transpose(params[f"out{i}.weight"])
            y = xp.matmul(xp.permute_dims(pooled, (0, 2, 3, 1)), w)
            out.append(xp.permute_dims(y + params[f"out{i}.bias"], (0, 3, 1, 2)))
        return tuple(out)


class TransformerCompression:
    """A residual (B, L, d_model) -> its last position (B, d_model)."""

    def __init__(self, d_model: int) -> None:
        self.features = int(d_model)

    def config(self) -> dict[str, Any]:
        return {"kind": "transformer", "d_model": self.features}

    def __call__(self, backend: Any, g: Any) -> Any:
        return g[:, -1, :]


class TransformerInitialiser:
    """``h_phi(u)`` for an injection ``u`` (B, L, F): ``relu(conv(u) + b) W + c`` where ``conv`` is
    causal with kernel 3 (position t sees t-2, t-1, t) into ``hidden`` channels, and ``W``
    (hidden, d_model) starts at zero, so an untrained initialiser gives the classic zero start."""

    def __init__(self, inj_features: int, d_model: int, hidden: int = 32) -> None:
        self.inj_features, self.d_model, self.hidden = int(inj_features), int(d_model), int(hidden)

    def config(self) -> dict[str, Any]:
        return {"kind": "transformer", "inj_features": self.inj_features, "d_model": self.d_model,
                "hidden": self.hidden}

    def init_params(self, rng: np.random.Generator) -> dict[str, np.ndarray]:
        fan_in = 3 * self.inj_features
        return {"conv.weight": rng.normal(0.0, math.sqrt(2.0 / fan_in), (3, self.inj_features, self.hidden)),
                "conv.bias": np.zeros(self.hidden),
                "out.weight": np.zeros((self.hidden, self.d_model)),
                "out.bias": np.zeros(self.d_model)}

    def __call__(self, backend: Any, params: Mapping[str, Any], u: Any) -> Any:
        xp = backend.xp
        w = params["conv.weight"]
        zero = xp.zeros_like(u[:, :1])
        back1 = xp.concat([zero, u[:, :-1]], axis=1)
        back2 = xp.concat([zero, back1[:, :-1]], axis=1)
        h = xp.matmul(back2, w[0]) + xp.matmul(back1, w[1]) + xp.matmul(u, w[2]) + params["conv.bias"]
        return xp.matmul(relu(xp, h), params["out.weight"]) + params["out.bias"]
