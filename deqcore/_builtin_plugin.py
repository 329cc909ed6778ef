"""deqcore's own solvers, registered through the same hook a third-party plugin uses."""

from __future__ import annotations

from typing import Any

from ._hookspecs import hookimpl
from .solvers import Anderson, Broyden, FixedPoint


@hookimpl
def deqcore_register_solvers(register: Any) -> None:
    for cls in (FixedPoint, Anderson, Broyden):
        register(cls.name, cls)
