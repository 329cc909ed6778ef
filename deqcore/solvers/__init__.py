"""The built-in solvers, each written once over the backend protocol."""

from ._anderson import Anderson, AndersonState
from ._broyden import Broyden, BroydenState, SeededBroyden
from ._fixed_point import FixedPoint, FixedPointState
from ._reversible import Reversible, ReversibleState

__all__ = ["Anderson", "AndersonState", "Broyden", "BroydenState", "FixedPoint", "FixedPointState",
           "Reversible", "ReversibleState", "SeededBroyden"]
