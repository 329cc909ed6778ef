"""deqcore's own solvers and gradient modes, registered through the same hook a third-party plugin uses."""

from __future__ import annotations

from typing import Any

from ._hookspecs import hookimpl
from .gradients import GDEQ, JFB, NPG, UPG, Implicit, Unroll
from .solvers import Anderson, Broyden, FixedPoint


@hookimpl
def deqcore_register_solvers(register: Any) -> None:
    for cls in (FixedPoint, Anderson, Broyden):
        register(cls.name, cls)


@hookimpl
def deqcore_register_gradients(register: Any) -> None:
    for cls in (Implicit, JFB, NPG, UPG, GDEQ, Unroll):
        register(cls.name, cls)
