"""The entry point: ``[project.entry-points.deqcore] numpy = "deqcore_numpy._plugin"``."""

from __future__ import annotations

from typing import Any

import deqcore


def _make_backend() -> Any:
    from ._backend import NumpyBackend

    return NumpyBackend()


@deqcore.extend.hookimpl
def deqcore_register_backends(register: Any) -> None:
    register("numpy", _make_backend, modules=("numpy",), install="pip install deqcore-numpy")
