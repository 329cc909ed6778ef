"""deqcore's own solvers, gradient modes and hypersolvers, registered through the same hooks a
third-party plugin uses."""

from __future__ import annotations

from typing import Any

from ._hookspecs import hookimpl
from .gradients import GDEQ, JFB, NPG, UPG, GDEQRefined, Implicit, Reversible, Unroll
from .hypersolvers import HyperAnderson
from .solvers import Anderson, Broyden, FixedPoint
from .solvers import Reversible as ReversibleSolver


@hookimpl
def deqcore_register_solvers(register: Any) -> None:
    for cls in (FixedPoint, Anderson, Broyden, ReversibleSolver):
        register(cls.name, cls)


@hookimpl
def deqcore_register_gradients(register: Any) -> None:
    for cls in (Implicit, JFB, NPG, UPG, GDEQ, GDEQRefined, Unroll, Reversible):
        register(cls.name, cls)


@hookimpl
def deqcore_register_hypersolvers(register: Any) -> None:
    register(HyperAnderson.name, HyperAnderson)
