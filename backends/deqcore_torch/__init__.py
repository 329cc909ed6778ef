"""deqcore's PyTorch backend, registered as a plugin. Importing this package does not import torch."""

from __future__ import annotations

from typing import Any

from deqcore.extend import hookimpl

__all__ = ["apply_norm", "remove_norm", "reset_norm"]


def _make_backend() -> Any:
    from ._backend import TorchBackend
    from ._compiled import compiled_backend

    return TorchBackend(compiled_backend)


@hookimpl
def deqcore_register_backends(register: Any) -> None:
    register("torch", _make_backend, modules=("torch",), install="pip install 'torch==2.13.0'")


_NORMS = ("apply_norm", "reset_norm", "remove_norm")


def __getattr__(name: str) -> Any:
    # the layer normalisation utilities import torch, so they load on first use
    if name in _NORMS:
        from . import _norms

        return getattr(_norms, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
