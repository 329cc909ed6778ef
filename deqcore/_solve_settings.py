"""Keyword settings of :func:`deqcore.solve`, checked before any solve: what a module that holds
solve settings (``deqcore_torch.DEQ`` ...) validates when it is built or reconfigured."""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

from . import _options as opt
from ._capabilities import check_gradient_mode
from ._inputs import COMMON_OPTIONS
from ._registry import registry
from ._solve import _bindable, _gradient_mode, solve

#: Arguments of :func:`deqcore.solve` that are a call's data, not settings a module holds.
CALL_ARGUMENTS = ("f", "x", "z0")


def check_solve_settings(owner: str, settings: Mapping[str, Any], backend: str) -> None:
    """Raise the error :func:`deqcore.solve` on ``backend`` would raise for the keyword
    ``settings`` (unknown names a ``TypeError``, bad values a ``ValueError``), without solving.

    Checked: the common options, the solver (a registered name with its options, or an instance),
    the gradient mode with its options and its fit to the solver. A keyword parameter of
    :func:`deqcore.solve` beyond those is accepted by name and checked when the solve runs, so
    options added to the solve later pass through without code here. ``backend`` and the call's
    data (``f``, ``x``, ``z0``) are not settings and are refused.
    """
    given = dict(settings)
    refused = sorted(set(given) & {*CALL_ARGUMENTS, "backend"})
    if refused:
        raise TypeError(f"{owner}: {', '.join(map(repr, refused))} cannot be a setting: the backend is "
                        f"{backend!r} and f, x, z0 are the call's")
    parameters = inspect.signature(solve).parameters
    keywords = {name for name, p in parameters.items() if p.kind is inspect.Parameter.KEYWORD_ONLY}
    opt.resolve(owner, COMMON_OPTIONS, {k: given.pop(k) for k in COMMON_OPTIONS if k in given})
    solver, grad, grad_options = (given.pop(k, parameters[k].default)
                                  for k in ("solver", "grad", "grad_options"))
    for name in keywords & set(given):  # checked by the solve itself
        del given[name]
    reg = registry()
    bindable = _bindable(reg, solver, given)  # what is left are the solver's own options
    be = reg.backend(backend)
    if grad == "auto":
        grad = "implicit" if be.capabilities.autodiff else None
    check_gradient_mode(be, grad)
    _gradient_mode(reg, grad, grad_options, bindable.name)
