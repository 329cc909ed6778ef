"""deqcore's JAX backend, registered as a plugin, and solves over device meshes
(:func:`solve_per_shard`). Importing this package does not import jax; its public names import
it when first used. The DEQ modules of Equinox and Flax NNX are its submodules
:mod:`deqcore_jax.equinox` and :mod:`deqcore_jax.flax`, each importing its framework."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from deqcore.extend import hookimpl

if TYPE_CHECKING:
    from ._sharding import ShardedSolution, solve_per_shard

__all__ = ["ShardedSolution", "solve_per_shard"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from . import _sharding

        return getattr(_sharding, name)
    raise AttributeError(f"module 'deqcore_jax' has no attribute {name!r}")


def _make_backend() -> Any:
    from ._backend import JaxBackend

    return JaxBackend()


@hookimpl
def deqcore_register_backends(register: Any) -> None:
    register("jax", _make_backend, modules=("jax", "jaxlib"), install="pip install 'deqcore[jax]'")
