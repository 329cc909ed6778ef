"""deqcore's JAX backend, registered as a plugin. Importing this package does not import jax."""

from __future__ import annotations

from typing import Any

from deqcore.extend import hookimpl


def _make_backend() -> Any:
    from ._backend import JaxBackend

    return JaxBackend()


@hookimpl
def deqcore_register_backends(register: Any) -> None:
    register("jax", _make_backend, modules=("jax", "jaxlib"), install="pip install 'deqcore[jax]'")
