"""Solve settings held by a framework's DEQ module: checked once, when the module is built, the way
``deqcore.solve`` checks them, then passed to every solve unchanged."""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

from . import _options as opt
from ._capabilities import check_gradient_mode
from ._inputs import COMMON_OPTIONS
from ._registry import registry
from ._solve import _bindable, _gradient_mode, solve

#: ``solve``'s arguments that a module supplies itself on every call.
_CALL_ARGUMENTS = ("f", "x", "z0", "backend")


def check_solve_settings(owner: str, backend: str, settings: Mapping[str, Any]) -> dict[str, Any]:
    """``settings`` (keyword arguments of :func:`deqcore.solve`) checked as ``solve`` would check
    them on ``backend``, without solving: the common options by their validators, the solver's
    own options by the solver (a name or an instance), the gradient mode and its options by the
    mode, which must also accept the solver. Unknown names and bad values raise the ``TypeError``
    / ``ValueError`` that ``solve`` raises, and naming an argument the module passes itself
    (``f``, ``x``, ``z0``, ``backend``) is a ``TypeError`` from ``owner``.

    Returns the settings as given (a new dict): defaults are left to ``solve``, where they are
    declared. Arguments of ``solve`` that are not checked here reach its own checks on the first
    call.
    """
    given = dict(settings)
    taken = [name for name in _CALL_ARGUMENTS if name in given]
    if taken:
        raise TypeError(f"{owner}: {', '.join(repr(n) for n in taken)} cannot be a setting: the module "
                        f"passes {'it' if len(taken) == 1 else 'them'} to deqcore.solve itself")
    parameters = {name: p for name, p in inspect.signature(solve).parameters.items()
                  if p.kind is not p.VAR_KEYWORD}
    reg = registry()
    opt.resolve(owner, COMMON_OPTIONS, {k: v for k, v in given.items() if k in COMMON_OPTIONS})
    solver = given.get("solver", parameters["solver"].default)
    solver_options = {k: v for k, v in given.items() if k not in parameters}
    name = _bindable(reg, solver, solver_options).name
    grad = given.get("grad", parameters["grad"].default)
    be = reg.backend(backend)
    if grad == "auto":
        grad = "implicit" if be.capabilities.autodiff else None
    check_gradient_mode(be, grad)
    _gradient_mode(reg, grad, given.get("grad_options"), name)
    return given
