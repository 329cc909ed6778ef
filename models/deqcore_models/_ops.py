"""What the models need from a framework beyond deqcore's array namespace: convolution, array
conversion and gradients of a loss. Everything else in the models is written once over ``xp``.

:func:`ops_for` returns the :class:`Ops` of a backend; the framework is imported only then.
"""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np


class Ops(Protocol):
    """The framework glue of deqcore_models. ``name`` is the deqcore backend name."""

    name: str
    xp: Any

    def conv2d(self, x: Any, w: Any, stride: int = 1, padding: int = 0) -> Any:
        """2-D cross-correlation, NCHW input, OIHW weight, symmetric zero padding, no bias."""
        ...

    def asarray(self, a: np.ndarray, dtype: str | None = None) -> Any:
        """A framework array (on the default device) from a NumPy array."""
        ...

    def to_numpy(self, a: Any) -> np.ndarray:
        """A NumPy copy of a framework array (detached from any graph)."""
        ...


class TorchOps:
    name = "torch"

    def __init__(self) -> None:
        import torch
        import torch.nn.functional as F

        import deqcore

        self._torch, self._F = torch, F
        self.xp = deqcore.registry().backend("torch").xp

    def conv2d(self, x, w, stride=1, padding=0):
        return self._F.conv2d(x, w, stride=stride, padding=padding)

    def asarray(self, a, dtype=None):
        arr = np.ascontiguousarray(a if dtype is None else np.asarray(a, dtype=dtype))
        return self._torch.from_numpy(arr.copy())

    def to_numpy(self, a):
        return a.detach().cpu().numpy()


class JaxOps:
    name = "jax"

    def __init__(self) -> None:
        import jax
        import jax.numpy as jnp

        self._lax, self._jnp = jax.lax, jnp
        self.xp = jnp

    def conv2d(self, x, w, stride=1, padding=0):
        return self._lax.conv_general_dilated(
            x, w, window_strides=(stride, stride), padding=((padding, padding), (padding, padding)),
            dimension_numbers=("NCHW", "OIHW", "NCHW"))

    def asarray(self, a, dtype=None):
        return self._jnp.asarray(a if dtype is None else np.asarray(a, dtype=dtype))

    def to_numpy(self, a):
        return np.asarray(a)


_OPS: dict[str, Any] = {"torch": TorchOps, "jax": JaxOps}


def ops_for(backend: str) -> Ops:
    """The :class:`Ops` of ``"torch"`` or ``"jax"``; an unknown name is a ``ValueError``."""
    if backend not in _OPS:
        raise ValueError(f"unknown model backend {backend!r}; deqcore_models supports {sorted(_OPS)}")
    ops: Ops = _OPS[backend]()
    return ops
