from __future__ import annotations

from typing import Any, NamedTuple

import array_api_compat

from .._options import Option, nonnegative_int
from ._base import Problem, Solver, select_rows


def _relaxation(v: Any) -> str | None:
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v < 2 and v != 1
    return None if ok else "a float in (0, 2) other than 1 (at 1 a step cannot be inverted)"


class ReversibleState(NamedTuple):
    """The coupled pair ``(y, z)`` and ``fz = f(z)``, (B, n) each, and what the reversal needs:
    ``start`` (``z0``, to measure the reconstruction's drift), ``beta`` (a 0-d array of the
    state's dtype) and ``step`` (the loop's steps so far). With checkpoints, ``marks``
    (k + 1, 2, B, n) holds the exact pair after each step of ``mark_steps`` (k,) (row k takes the
    writes of the other steps); both None without."""

    y: Any
    z: Any
    fz: Any
    start: Any
    beta: Any
    step: Any
    marks: Any
    mark_steps: Any


def checkpoint_steps(count: int, max_iter: int) -> tuple[int, ...]:
    """The steps after which :class:`Reversible` keeps an exact pair: ``count`` steps evenly
    spaced in 1 .. ``max_iter - 1`` (fewer when ``max_iter`` is small; none for 0)."""
    return tuple(sorted({max(1, round(i * max_iter / (count + 1))) for i in range(1, count + 1)}
                        - {max_iter}))


def checkpoint_row(xp: Any, mark_steps: Any, step: Any) -> tuple[Any, Any]:
    """The row of the checkpoint buffer (``ReversibleState.marks``) for the pair after ``step``:
    the index of ``step`` in ``mark_steps``, or the spare last row when ``step`` is no checkpoint;
    and whether it is one (0-d arrays, traceable)."""
    k = mark_steps.shape[0]
    hit = mark_steps == step
    index = xp.sum(xp.where(hit, xp.arange(k, dtype=mark_steps.dtype,
                                           device=array_api_compat.device(mark_steps)), 0))
    found = xp.any(hit)
    return xp.where(found, index, k), found


class Reversible(Solver):
    """The reversible relaxed iteration of RevDEQ (McCallum, Arora & Foster, 2025).

    From ``y_0 = z_0``: ``y' = (1 - beta) y + beta f(z)``, ``z' = (1 - beta) z + beta f(y')``; two
    f-evaluations a step (``f(z)`` is carried over). Each step can be inverted algebraically,
    ``z = (z' - beta f(y')) / (1 - beta)``, ``y = (y' - beta f(z)) / (1 - beta)``, which
    ``grad="reversible"`` uses to backpropagate through the iteration exactly in memory constant
    in the steps. The loop's residual is that of ``z``. A stopped sample keeps its pair
    bit-for-bit. ``checkpoints=k`` keeps the exact pair after ``k`` evenly spaced steps of
    ``max_iter`` for the reversal to restart from (memory ``2 k`` states).
    """

    name = "reversible"
    beta = Option(0.5, "relaxation in (0, 2), not 1; rounding grows by about 1/|1 - beta| per "
                  "reversed step", _relaxation)
    checkpoints = Option(0, "exact pairs kept for the reversal (grad='reversible'), evenly spaced in "
                         "max_iter", nonnegative_int)

    def steps_kept(self) -> tuple[int, ...]:
        """The checkpoint steps of this solve (see :func:`checkpoint_steps`)."""
        return checkpoint_steps(self.checkpoints, self.budget)

    def init(self, problem: Problem, z0: Any, fz0: Any) -> ReversibleState:
        xp = problem.backend.xp
        device = array_api_compat.device(z0)
        marks = mark_steps = None
        kept = self.steps_kept()
        if kept:
            marks = xp.zeros((len(kept) + 1, 2) + tuple(z0.shape), dtype=z0.dtype, device=device)
            mark_steps = xp.asarray(kept, dtype=xp.int32, device=device)
        return ReversibleState(z0, z0, fz0, z0, xp.asarray(self.beta, dtype=z0.dtype, device=device),
                               xp.asarray(0, dtype=xp.int32, device=device), marks, mark_steps)

    def step(self, problem: Problem, state: ReversibleState, active: Any):
        xp = problem.backend.xp
        a, b = 1.0 - self.beta, self.beta
        y = select_rows(xp, active, a * state.y + b * state.fz, state.y)
        z = select_rows(xp, active, a * state.z + b * problem.fn(y), state.z)
        fz = problem.fn(z)
        step = state.step + 1
        marks = state.marks
        if marks is not None:
            row, _ = checkpoint_row(xp, state.mark_steps, step)
            marks = problem.backend.set_index(marks, row, xp.stack([y, z]))
        return z, fz, state._replace(y=y, z=z, fz=fz, step=step, marks=marks), 2

    def commit(self, problem, state, z_new, fz_new, g_new, active, keep):
        return state
