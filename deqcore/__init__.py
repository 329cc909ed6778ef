"""deqcore: deep equilibrium models, with algorithms written once for PyTorch and JAX.

``deqcore.solve(f, x)`` finds the fixed point ``z* = f(z*, x)`` with Anderson acceleration,
Broyden's method, (damped) fixed-point iteration or a trained hypersolver (HyperDEQ), per
sample of a batch. The array framework is a plugin (``deqcore_torch``, ``deqcore_jax``);
importing deqcore imports neither.

This namespace is the user's: solving, its results, errors and warnings, the solver classes
(``solve(f, x, solver=deqcore.solvers.Anderson(memory=8))``), hypersolvers and the plugin
registry's listing. What plugin and backend authors build on (the solver and gradient-mode
bases, ``Option``, ``Backend``, ``hookimpl`` ...) is in :mod:`deqcore.extend`.
"""

from . import extend, gradients, hypersolvers, solvers
from ._capabilities import CapabilityError
from ._inputs import COMMON_OPTIONS
from ._registry import PluginError, PluginWarning, available, registry
from ._regularisers import jacobian_penalty
from ._results import CompileWarning, ConvergenceError, Solution, Status
from ._solve import solve
from ._warm_start import FixedPointCache
from .gradients._base import BackwardReport, BackwardWarning, HigherOrderError
from .hypersolvers import HyperAnderson, load_hypersolver, train_hypersolver

__version__ = "0.1.0"

__all__ = [
    "COMMON_OPTIONS",
    "BackwardReport",
    "BackwardWarning",
    "CompileWarning",
    "ConvergenceError",
    "FixedPointCache",
    "HigherOrderError",
    "HyperAnderson",
    "CapabilityError",
    "PluginError",
    "PluginWarning",
    "Solution",
    "Status",
    "__version__",
    "available",
    "extend",
    "gradients",
    "hypersolvers",
    "jacobian_penalty",
    "load_hypersolver",
    "registry",
    "solve",
    "solvers",
    "train_hypersolver",
]
