"""What the Equinox and Flax DEQ modules share: their solve settings (checked when the module is
built, hashable so that they are static data under ``jit``) and the solve of the layer. Imports
neither Equinox nor Flax."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

import deqcore
from deqcore.internal import check_solve_settings


class SolveSettings(Mapping[str, Any]):
    """An immutable, hashable mapping of :func:`deqcore.solve` keyword arguments (nested mappings,
    such as ``grad_options``, are frozen too, lists become tuples): static data of a module."""

    __slots__ = ("_items",)

    def __init__(self, items: Mapping[str, Any]) -> None:
        self._items = {k: _freeze(v) for k, v in items.items()}

    def __getitem__(self, key: str) -> Any:
        return self._items[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __hash__(self) -> int:
        return hash(tuple(sorted(self._items.items(), key=lambda item: item[0])))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SolveSettings) and self._items == other._items

    def __repr__(self) -> str:
        return "SolveSettings(" + ", ".join(f"{k}={v!r}" for k, v in self._items.items()) + ")"

    def kwargs(self) -> dict[str, Any]:
        """The settings as keyword arguments of ``deqcore.solve`` (nested mappings as dicts)."""
        return {k: v.kwargs() if isinstance(v, SolveSettings) else v for k, v in self._items.items()}


def _freeze(value: Any) -> Any:
    if isinstance(value, Mapping):
        return SolveSettings(value)
    if isinstance(value, list):
        return tuple(value)
    return value


def module_parts(
    owner: str, layer: Any, flag: tuple[str, Any], settings: Mapping[str, Any],
    inference_settings: Mapping[str, Any] | None,
) -> tuple[Any, SolveSettings, SolveSettings, bool]:
    """A module's layer, training settings, inference settings (``inference_settings`` merged over
    ``settings``, each checked by :func:`deqcore.internal.check_solve_settings`) and inference flag
    (``flag``: its name and value, a bool), or the error that names what is wrong."""
    if not callable(layer):
        raise TypeError(f"{owner}: layer must be callable as layer(z, x), got {type(layer).__name__}")
    if inference_settings is not None and not isinstance(inference_settings, Mapping):
        raise TypeError(f"{owner}: inference_settings must be a dict of deqcore.solve arguments or None, "
                        f"got {type(inference_settings).__name__}")
    name, value = flag
    if not isinstance(value, bool):
        raise TypeError(f"{owner}: {name} must be True or False, got {value!r}")
    train = check_solve_settings(owner, "jax", settings)
    inference = check_solve_settings(f"{owner} (inference_settings)", "jax",
                                     {**train, **dict(inference_settings or {})})
    return layer, SolveSettings(train), SolveSettings(inference), value


def solve_layer(layer: Callable[[Any, Any], Any], x: Any, z0: Any,
                settings: SolveSettings) -> tuple[Any, deqcore.Solution]:
    """``(z*, solution)`` of ``layer(z, x)`` by ``deqcore.solve`` with ``settings``."""
    solution = deqcore.solve(layer, x, z0, backend="jax", **settings.kwargs())
    return solution.z, solution
