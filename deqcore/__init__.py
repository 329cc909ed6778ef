"""deqcore: deep equilibrium models, with algorithms written once for PyTorch and JAX.

``deqcore.solve(f, x)`` finds the fixed point ``z* = f(z*, x)`` with Anderson acceleration,
Broyden's method, (damped) fixed-point iteration or a trained hypersolver (HyperDEQ), per
sample of a batch. The array framework
is a plugin (``deqcore_torch``, ``deqcore_jax``); importing deqcore imports neither.
"""

from . import hypersolvers, validators
from ._capabilities import CapabilityError
from ._gradients import (
    AdjointContext,
    AdjointMode,
    BackwardProblem,
    BackwardReport,
    BackwardWarning,
    GradientMode,
    HigherOrderError,
)
from ._hookspecs import hookimpl, hookspec
from ._loop import Problem, Solver, select_rows
from ._options import Option
from ._protocol import Backend
from ._registry import KINDS, Entry, PluginError, PluginWarning, Register, Registry, available, registry
from ._regularisers import jacobian_penalty
from ._solution import CompileWarning, ConvergenceError, Result, Solution, Status
from ._solve import COMMON_OPTIONS, solve
from .hypersolvers import HyperAnderson, Hypersolver, load_hypersolver, train_hypersolver

__version__ = "0.1.0"

__all__ = [
    "AdjointContext",
    "AdjointMode",
    "BackwardProblem",
    "BackwardReport",
    "BackwardWarning",
    "GradientMode",
    "HigherOrderError",
    "HyperAnderson",
    "Hypersolver",
    "COMMON_OPTIONS",
    "CapabilityError",
    "CompileWarning",
    "KINDS",
    "Backend",
    "ConvergenceError",
    "Entry",
    "Option",
    "PluginError",
    "PluginWarning",
    "Problem",
    "Register",
    "Registry",
    "Result",
    "Solution",
    "Solver",
    "Status",
    "__version__",
    "available",
    "hookimpl",
    "hookspec",
    "hypersolvers",
    "jacobian_penalty",
    "load_hypersolver",
    "registry",
    "select_rows",
    "solve",
    "train_hypersolver",
    "validators",
]
