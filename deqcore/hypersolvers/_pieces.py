"""Model-independent initialisers and compressions for hypersolvers on flat states.

An **initialiser** ``h_phi`` maps the input injection ``x`` to a first guess of the fixed point;
a **compression** maps a residual (with the state's structure) to a few features per sample for
the mixer. Models bring their own (``deqcore_models``: MDEQ pools its lowest-resolution branch,
the DEQ-Transformer takes the last token); the ones here suit states that are one (B, n) array.

Both follow small duck-typed contracts, written over the backend's ``xp``:

- initialiser: ``config() -> dict`` (JSON, saved with the weights), ``init_params(rng) ->
  {name: ndarray}``, ``__call__(backend, params, x) -> z0`` with the structure of ``f``'s state;
- compression: ``features`` (int), ``config() -> dict``, ``__call__(backend, g) -> (B, features)``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np


class DenseInitialiser:
    """``z0 = relu(x W1 + b1) W2 + b2`` on flattened ``x`` (B, in_features) -> (B, out_features).

    The flat-state analogue of HyperDEQ's sequence initialiser (a ReLU layer then a linear map).
    ``W2`` starts at zero, so an untrained initialiser returns zeros, the classic start.
    """

    def __init__(self, in_features: int, out_features: int, hidden: int = 100) -> None:
        self.in_features, self.out_features, self.hidden = int(in_features), int(out_features), int(hidden)

    def config(self) -> dict[str, Any]:
        return {"kind": "dense", "in_features": self.in_features, "out_features": self.out_features,
                "hidden": self.hidden}

    def init_params(self, rng: np.random.Generator) -> dict[str, np.ndarray]:
        return {"w1": rng.normal(0.0, math.sqrt(2.0 / self.in_features), (self.in_features, self.hidden)),
                "b1": np.zeros(self.hidden),
                "w2": np.zeros((self.hidden, self.out_features)),
                "b2": np.zeros(self.out_features)}

    def __call__(self, backend: Any, params: Mapping[str, Any], x: Any) -> Any:
        xp = backend.xp
        flat = xp.reshape(x, (x.shape[0], math.prod(x.shape[1:])))  # -1 is ambiguous for B = 0
        if flat.shape[1] != self.in_features:
            raise ValueError(f"DenseInitialiser: x has {flat.shape[1]} features per sample, "
                             f"the initialiser was built for {self.in_features}")
        h = xp.maximum(xp.matmul(flat, params["w1"]) + params["b1"], 0.0)
        return xp.matmul(h, params["w2"]) + params["b2"]


class IdentityCompression:
    """The whole residual as the mixer's features: a (B, n) state's ``g`` unchanged (tuples are
    flattened and concatenated). For small states, and for the Anderson reference mixer."""

    def __init__(self, features: int) -> None:
        self.features = int(features)

    def config(self) -> dict[str, Any]:
        return {"kind": "identity", "features": self.features}

    def __call__(self, backend: Any, g: Any) -> Any:
        xp = backend.xp
        items = list(g) if isinstance(g, (tuple, list)) else [g]
        flat = xp.concat([xp.reshape(a, (a.shape[0], math.prod(a.shape[1:]))) for a in items], axis=1)
        if flat.shape[1] != self.features:
            raise ValueError(f"IdentityCompression: the state has {flat.shape[1]} entries per sample, "
                             f"the compression was built for {self.features}")
        return flat
