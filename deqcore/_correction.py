"""Fixed-point correction: which intermediate states a solve returns, and their phantom gradient.

The loop records the states (``deqcore._loop.run``'s ``record``); this module turns the
``correction_states`` option into those steps and gives each recorded state the gradient of the
``upg`` mode (damped steps of ``f`` from the detached state), the recipe of DEQ-Flow.
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping, Sequence
from typing import Any

from .gradients._base import BackwardProblem, GradientMode, higher_order_error


def correction_steps(value: int | Sequence[int], max_iter: int) -> tuple[int, ...]:
    """The steps at which states are recorded for ``correction_states=value`` (already checked
    by its option): none for 0; for an int ``k``, ``max_iter - (k - i) * (max_iter // k)`` for
    i = 1 .. k (every ``max_iter // k`` steps, ending at ``max_iter``, as TorchDEQ's ``n_states``);
    a sequence as given. ``ValueError`` when a step lies past ``max_iter``."""
    if isinstance(value, numbers.Integral):
        k = int(value)
        if k > max_iter:
            raise ValueError(f"deqcore.solve: correction_states={k} asks for more states than "
                             f"max_iter={max_iter} steps; use at most max_iter states")
        return tuple(max_iter - (k - i) * (max_iter // k) for i in range(1, k + 1))
    assert not isinstance(value, int)
    steps = tuple(int(s) for s in value)
    if steps[-1] > max_iter:
        raise ValueError(f"deqcore.solve: correction_states step {steps[-1]} lies past max_iter={max_iter}; "
                         f"steps must be between 1 and max_iter")
    return steps


def correction_mode(reg: Any, options: Mapping[str, Any] | None) -> GradientMode:
    """The ``upg`` gradient mode with ``options`` (its ``k`` and ``lam``; None: its defaults)."""
    if options is not None and not isinstance(options, Mapping):
        raise TypeError(f"deqcore.solve: correction_grad_options must be a dict, got "
                        f"{type(options).__name__}")
    try:
        return reg.get("gradients", "upg").obj(**dict(options or {}))
    except (TypeError, ValueError) as error:
        raise type(error)(f"deqcore.solve: correction_grad_options: {error}") from None


def attach_correction(bp: BackwardProblem, mode: GradientMode | None, recorded: Any) -> list[Any]:
    """The flat recorded states, (k, B, n), each detached and, unless ``mode`` is None, carrying
    ``mode``'s gradient from its own value (first derivatives only). ``bp`` gives the backend and
    the flat layer; its ``z_star`` is replaced by each state in turn."""
    be = bp.backend
    states = []
    for i in range(recorded.shape[0]):
        z = be.stop_gradient(recorded[i])
        if mode is not None:
            z = mode.attach(bp._replace(z_star=z))
            z = be.first_order_only(z, higher_order_error(mode.name))
        states.append(z)
    return states
