"""deqcore's PyTorch backend, registered as a plugin. Importing this package does not import torch."""

from __future__ import annotations

from typing import Any

from deqcore.extend import hookimpl


def _make_backend() -> Any:
    from ._backend import TorchBackend
    from ._compiled import compiled_backend

    return TorchBackend(compiled_backend)


@hookimpl
def deqcore_register_backends(register: Any) -> None:
    register("torch", _make_backend, modules=("torch",), install="pip install 'torch==2.13.0'")
