"""deqcore's PyTorch backend, registered as a plugin, and :class:`DEQ`, the equilibrium layer as an
``nn.Module``. Importing this package does not import torch; its public names import it when first
used."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from deqcore.extend import hookimpl

if TYPE_CHECKING:
    from ._module import DEQ
    from ._norms import apply_norm, remove_norm, reset_norm

__all__ = ["DEQ", "apply_norm", "remove_norm", "reset_norm"]


def _make_backend() -> Any:
    from ._backend import TorchBackend
    from ._compiled import compiled_backend

    return TorchBackend(compiled_backend)


@hookimpl
def deqcore_register_backends(register: Any) -> None:
    register("torch", _make_backend, modules=("torch",), install="pip install 'torch==2.13.0'")


_NORMS = ("apply_norm", "reset_norm", "remove_norm")


def __getattr__(name: str) -> Any:
    # the module and the normalisation utilities import torch, so they load on first use
    if name == "DEQ":
        from ._module import DEQ

        return DEQ
    if name in _NORMS:
        from . import _norms

        return getattr(_norms, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
