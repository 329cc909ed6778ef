from __future__ import annotations

import warnings
from typing import Any

from .. import _options as opt
from .._options import Option
from .._results import ConvergenceError
from ..solvers._base import select_rows
from ..solvers._reversible import ReversibleState, checkpoint_row
from ._base import BackwardProblem, BackwardWarning, GradientMode, higher_order_error


class Reversible(GradientMode):
    """Exact backpropagation through the reversible solver's iterations in constant memory.

    The backward pass starts from the final pair ``(y_N, z_N)`` and inverts the forward steps
    one by one, ``z_n = (z_{n+1} - beta f(y_{n+1})) / (1 - beta)``, then
    ``y_n = (y_{n+1} - beta f(z_n)) / (1 - beta)``, carrying the adjoints of both states through
    the two VJPs of ``f`` a step (one at ``y_{n+1}``, one at ``z_n``, each also giving the
    f-value the inversion needs). The cotangent enters at the step of the returned iterate,
    per sample (the lowest-residual one, which may precede the last); each sample reverses
    exactly its own steps. The gradient is that of the finite iteration (``grad="unroll"`` of the
    same solve) up to the rounding that the reversal amplifies by about ``1/|1 - beta|`` a step
    (the solver's ``checkpoints`` bound it). Memory: the final pair, ``z0`` and the checkpoints,
    whatever the number of steps; ``z0`` gets no gradient. Needs ``solver="reversible"``.
    ``solution.backward`` reports per sample the reconstruction drift as ``residual``: the
    relative distance of the reconstructed initial pair from the exact one and, with
    checkpoints, of each segment's reconstructed pair from the exact pair kept where the segment
    ends, the worst of them. ``iterations`` gives the steps reversed, ``vjps`` the VJPs of ``f``. A
    drift above ``drift_tol`` means the reconstructed states are no longer the forward's and the
    gradient may be wrong: ``on_fail`` then warns (:class:`deqcore.BackwardWarning`), raises
    (:class:`deqcore.ConvergenceError`) or ignores it.
    """

    name = "reversible"
    drift_tol = Option(0.1, "reconstruction drift (relative) above which on_fail applies", opt.positive_float)
    on_fail = Option("warn", "when a sample's drift exceeds drift_tol: 'warn', 'raise', 'ignore'",
                     opt.one_of("warn", "raise", "ignore"))

    def check(self, solver: str) -> None:
        if solver != "reversible":
            raise ValueError(f"gradient mode 'reversible' inverts the reversible solver's steps and "
                             f"needs solver='reversible', got solver={solver!r}")

    def attach(self, bp: BackwardProblem) -> Any:
        st = bp.solver_state
        if not isinstance(st, ReversibleState) or bp.iterations is None or bp.best_step is None:
            raise TypeError("gradient mode 'reversible' needs the reversible solver's final state and "
                            "the per-sample iterations and best steps of the solve")
        be, report, batch = bp.backend, bp.report, bp.problem.batch
        marks = () if st.marks is None else (st.marks, st.mark_steps)

        def backward(g: Any, pullback: Any, acc: Any, *saved: Any) -> Any:
            acc, drift, iterations, vjps = _reverse(be, batch, g, pullback, acc, *saved)
            be.host_callback(self._report(report), drift, iterations, vjps)
            if self.on_fail == "raise":
                be.host_check(~(drift <= self.drift_tol), self._error, drift)
            return acc

        saved = (st.y, st.z, st.start, st.beta, bp.iterations, bp.best_step, *marks)
        return be.attach_reverse(bp.f, bp.z_star, bp.x, backward, saved=saved,
                                 higher_order_error=higher_order_error(self.name, why=_UNRECORDED))

    def _report(self, report: Any) -> Any:
        def record(drift: Any, iterations: Any, vjps: Any) -> None:
            ok = drift <= self.drift_tol
            report.record(ok, drift, iterations, vjps)
            if self.on_fail == "warn" and not ok.all():
                warnings.warn(f"{self._summary(~ok, drift)}; the gradient may be wrong. {_HINT}",
                              BackwardWarning, stacklevel=2)

        return record

    def _error(self, failed: Any, drift: Any) -> Exception:
        return ConvergenceError(f"{self._summary(failed, drift)}. {_HINT}")

    def _summary(self, failed: Any, drift: Any) -> str:
        return (f"reversible backward: the reconstruction of {int(failed.sum())} of {failed.size} samples "
                f"drifted beyond drift_tol {self.drift_tol:g} (worst {float(drift.max()):.3e})")


_UNRECORDED = ("Its first derivative is exact (that of the iteration), but the reversal that computes "
               "it runs unrecorded, so it cannot be differentiated again")
_HINT = ("Keep exact pairs with the solver's checkpoints=, or take fewer steps, a beta nearer 0 "
         "or a float64 state")


def _reverse(be: Any, batch: int, g: Any, pullback: Any, acc: Any, y: Any, z: Any, start: Any,
             beta: Any, iterations: Any, best_step: Any, marks: Any = None,
             mark_steps: Any = None) -> tuple[Any, Any, Any, Any]:
    """The reversal: from the final pair back to step 0, the adjoints ``(ybar, zbar)`` of the
    state after each step carried back through its two VJPs. Returns the accumulator, the
    per-sample drift, the iterations and the VJPs taken. The drift is the worst segment's: the
    reconstructed initial pair against ``start`` and, with checkpoints, each segment's
    reconstructed pair against the exact one kept at the checkpoint where it ends."""
    xp = be.xp
    a = 1.0 - beta
    zeros = xp.zeros_like(g)
    scale = xp.maximum(xp.linalg.vector_norm(start, axis=-1), xp.linalg.vector_norm(z, axis=-1))
    scale = xp.where(scale > 0, scale, 1.0)

    def distance(y1: Any, z1: Any, y2: Any, z2: Any) -> Any:
        norm = xp.linalg.vector_norm
        return xp.maximum(norm(y1 - y2, axis=-1), norm(z1 - z2, axis=-1)) / scale

    last = xp.max(iterations) if batch else xp.sum(iterations)
    zbar = select_rows(xp, best_step == last, g, zeros)

    def cond(s: tuple[Any, ...]) -> Any:
        return s[0] > 0

    def body(s: tuple[Any, ...]) -> tuple[Any, ...]:
        t, y, z, ybar, zbar, acc, worst = s
        t = t - 1
        active = t < iterations
        # z_{t+1} = a z_t + beta f(y_{t+1}): its adjoint reaches y_{t+1} through f
        fy, vy, acc = pullback(y, select_rows(xp, active, beta * zbar, zeros), acc)
        yhat = ybar + vy
        z_prev = select_rows(xp, active, (z - beta * fy) / a, z)
        # y_{t+1} = a y_t + beta f(z_t): its adjoint reaches z_t through f
        fz, vz, acc = pullback(z_prev, select_rows(xp, active, beta * yhat, zeros), acc)
        y_prev = select_rows(xp, active, (y - beta * fz) / a, y)
        ybar = select_rows(xp, active, a * yhat, ybar)
        zbar = select_rows(xp, active, a * zbar + vz, zbar)
        zbar = zbar + select_rows(xp, best_step == t, g, zeros)
        if marks is not None:
            # at a checkpoint step every sample's pair is exact there (a sample that stopped
            # earlier kept its final pair, which is what it still holds)
            row, reset = checkpoint_row(xp, mark_steps, t)
            worst = xp.where(reset, xp.maximum(worst, distance(y_prev, z_prev, marks[row, 0], marks[row, 1])),
                             worst)
            y = xp.where(reset, marks[row, 0], y_prev)
            z = xp.where(reset, marks[row, 1], z_prev)
        else:
            y, z = y_prev, z_prev
        return t, y, z, ybar, zbar, acc, worst

    state = (last, y, z, zeros, zbar, acc, xp.zeros_like(scale))
    _, y0, z0, _, _, acc, worst = be.while_loop(cond, body, state)
    drift = xp.maximum(worst, distance(y0, z0, start, start))
    return acc, drift, iterations, 2 * last
