"""What plugin and backend authors build on, in one namespace.

A solver subclasses :class:`Solver` (its options are :class:`Option` class attributes checked by
:mod:`validators`); a gradient mode subclasses :class:`GradientMode`, or :class:`AdjointMode`
when it is an adjoint; a learned solver subclasses :class:`Hypersolver`; anything with a ``name``
and ``bind`` (a :class:`BindableSolver`) can be passed to ``deqcore.solve(..., solver=...)``. A
backend implements :class:`Backend` (:class:`EagerBackend` gives eager defaults) and declares
its :class:`Capabilities`; ``deqcore.testing.check_backend`` proves it. Each registers through
a :data:`hookimpl` of the hooks in ``deqcore._hookspecs`` (see the plugin-author guide). The
loop hands solvers a :class:`Problem`; :func:`select_rows` is the per-sample select they use;
:class:`Structure` flattens states. A backend that registers :class:`deqcore.Solution` with its
framework (as a pytree) finds the array and static fields in ``SOLUTION_DATA_FIELDS`` /
``SOLUTION_META_FIELDS``, and gives :meth:`Backend.first_order_only` the error of
:func:`higher_order_error`.
"""

from . import validators
from ._capabilities import Capabilities
from ._eager_backend import EagerBackend
from ._hookspecs import hookimpl, hookspec
from ._options import Option
from ._protocol import Backend
from ._registry import KINDS, Entry, Register, Registry
from ._results import SOLUTION_DATA_FIELDS, SOLUTION_META_FIELDS
from ._structure import Structure
from .gradients._base import (
    AdjointContext,
    AdjointMode,
    BackwardProblem,
    GradientMode,
    higher_order_error,
)
from .solvers._base import BindableSolver, Hypersolver, Problem, Solver, select_rows

__all__ = [
    "KINDS",
    "SOLUTION_DATA_FIELDS",
    "SOLUTION_META_FIELDS",
    "AdjointContext",
    "AdjointMode",
    "Backend",
    "BackwardProblem",
    "BindableSolver",
    "Capabilities",
    "EagerBackend",
    "Entry",
    "GradientMode",
    "Hypersolver",
    "Option",
    "Problem",
    "Register",
    "Registry",
    "Solver",
    "Structure",
    "higher_order_error",
    "hookimpl",
    "hookspec",
    "select_rows",
    "validators",
]
