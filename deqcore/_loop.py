"""The solve loop shared by every solver: residuals, per-sample stopping and freezing, traces.

A solver supplies ``init`` (its state from ``z0`` and ``f(z0)``), ``step`` (propose and evaluate
the next iterate for the active samples) and ``commit`` (update its memory for the samples that
stay active). Everything else, which is the same for every solver, lives here: the stop
test and the outcome per sample (``terminate``), the divergence and non-finite checks, the
lowest-residual iterate, the traces, the intermediate states kept for a fixed-point correction,
and after the loop the diagnosis of residual norms that
overflowed the state's dtype.

Residuals are plain norms (one pass over the state per step). For half-precision states
(float16, bfloat16) they are computed in float32 (:func:`statistics_dtype`): float16's range
ends at 65504, which a norm of moderate entries already exceeds.
"""

from __future__ import annotations

import bisect
from typing import Any, NamedTuple

import array_api_compat
import numpy as np

from ._batched_linalg import statistics_dtype
from ._inputs import TRACE_STEPS
from ._results import Status
from .solvers._base import Problem, Solver, select_rows


class LoopState(NamedTuple):
    """The loop's carry. ``best`` and ``last`` stack the (abs, rel) residuals, shape (2, B):
    ``best`` of ``best_z``, ``last`` of each sample's latest iterate (its final one once it is
    frozen). ``trace`` is a (2, rows + 1, B) buffer whose last row takes the writes of steps past
    the recorded ones, or None when no trace is kept. ``states`` is likewise a (k + 1, B, n)
    buffer of the best iterates at the ``record`` steps of :func:`run` (None when none are).
    ``best_step`` (B,) is the step at which each sample's ``best_z`` was reached (0: ``z0``), which
    a gradient mode that reverses the iteration needs."""

    solver: Any
    it: Any
    nfe: Any
    active: Any
    iterations: Any
    best_z: Any
    best: Any
    last: Any
    trace: Any
    states: Any = None
    best_step: Any = None


def residuals(xp: Any, g: Any, fz: Any, dtype: Any = None) -> tuple[Any, Any]:
    """Per-sample (abs, rel) residuals from ``g = f(z) - z``: ||g|| and ||g|| / (||f(z)|| + 1e-9).

    ``dtype`` (None: the arrays' own) is the dtype they are computed in, see :func:`statistics_dtype`.
    """
    if dtype is not None:
        g, fz = xp.astype(g, dtype), xp.astype(fz, dtype)
    a = xp.linalg.vector_norm(g, axis=-1)
    return a, a / (xp.linalg.vector_norm(fz, axis=-1) + 1e-9)


def scaled_norm(xp: Any, v: Any) -> Any:
    """Per-row ``||v||`` of a (B, n) array without overflow in its sum of squares: finite whenever
    the norm itself is representable; NaN for a row holding NaN, inf for one holding inf."""
    s = xp.max(xp.abs(v), axis=-1)
    s = xp.where((s > 0) & xp.isfinite(s), s, xp.ones_like(s))
    return s * xp.linalg.vector_norm(v / s[:, None], axis=-1)


def terminate(xp: Any, abs_res: Any, rel_res: Any, limit: Any, *, tol: float,
              stop_mode: str) -> Any:
    """Per-sample :class:`Status` of an iterate with these residuals.

    ``limit`` is the divergence threshold on the abs residual (``inf`` when disabled). Comparisons
    with NaN are False, so a non-finite residual is neither converged nor below the limit.
    """
    stop = rel_res if stop_mode == "rel" else abs_res
    finite = xp.isfinite(abs_res) & xp.isfinite(rel_res)
    code = xp.where(abs_res > limit, int(Status.DIVERGED), int(Status.MAX_ITER))
    code = xp.where(stop <= tol, int(Status.CONVERGED), code)
    return xp.where(finite, code, int(Status.NONFINITE))


def diagnose_overflow(problem: Problem, solver: Solver, state: LoopState, *, stop_mode: str,
                      dtype: Any) -> tuple[LoopState, Any]:
    """After the loop: re-measure the samples whose plain residual norm may have overflowed.

    A sample is suspect when its final residual is not finite, or when its rel residual is 0
    with a nonzero abs one (``||f(z)||`` overflowed to inf). Its final iterate and f-value (from
    :meth:`Solver.iterate`) are measured again with :func:`scaled_norm`. Where both are finite,
    the norm overflowed, not ``f``: the re-measured values replace the mismeasured entries of the
    final residuals, and of the best ones where the final iterate is the best or lower (a best
    iterate before it keeps its abs residual and gets rel inf: its ``||f(z)||`` is not known).
    Returns the state and a (B,) mask of the samples whose stop test the overflow decided (they
    end ``OVERFLOW`` unless the re-measured residual reaches ``tol``), or None when no sample is
    suspect (read on eager backends) or the solver keeps no iterate. ``dtype`` is the statistics
    dtype (None: the state's). Runs once per solve; the loop's steps never pay for it.
    """
    xp = problem.backend.xp
    last = state.last
    pair = solver.iterate(problem, state.solver)
    if pair is None or problem.n == 0 or problem.batch == 0:
        return state, None
    # rel / abs = 1 / (||f(z)|| + 1e-9) is finite and positive for every well-measured sample (an
    # exact fixed point, 0 / 0, takes the full test): one cheap check on eager backends
    if problem.backend.is_concrete(last) and bool(xp.all(last[1] / last[0] > 0)):
        return state, None
    finite_abs, finite_rel = xp.isfinite(last[0]), xp.isfinite(last[1])
    zero_rel = (last[1] == 0) & (last[0] > 0)
    suspect = ~(finite_abs & finite_rel) | zero_rel
    z, fz = pair
    k = 1 if stop_mode == "rel" else 0
    values = xp.all(xp.isfinite(z), axis=-1) & xp.all(xp.isfinite(fz), axis=-1)
    zw, fzw = (z, fz) if dtype is None else (xp.astype(z, dtype), xp.astype(fz, dtype))
    a = scaled_norm(xp, fzw - zw)
    remeasure = suspect & values
    fixed = xp.stack([xp.where(remeasure & ~finite_abs, a, last[0]),
                      xp.where(remeasure & (~finite_rel | zero_rel), a / (scaled_norm(xp, fzw) + 1e-9),
                               last[1])])
    best = state.best
    take = remeasure & (xp.all(state.best_z == z, axis=-1) | ~(best[k] <= fixed[k]))
    best = xp.where(take, fixed, best)
    unknown = remeasure & ~take & (best[1] == 0) & (best[0] > 0)
    state = state._replace(
        last=fixed,
        best=xp.stack([best[0], xp.where(unknown, float("inf"), best[1])]),
        best_z=select_rows(xp, take, z, state.best_z),
        best_step=None if state.best_step is None else xp.where(take, state.iterations, state.best_step),
    )
    # in abs mode a rel residual of 0 over an overflowed ||f(z)|| did not decide the stop test
    return state, remeasure & (suspect if stop_mode == "rel" else ~(finite_abs & finite_rel))


def stage_ends(capacities: list[int], max_iter: int, check_every: int) -> list[int]:
    """The step at which each loop stage ends: capacities rounded down to a multiple of
    ``check_every`` (so every backend tests the stop condition at the same steps), the last
    stage at ``max_iter``. A stage may be empty (its end equals the previous one)."""
    ends = [min(c // check_every * check_every, max_iter) for c in capacities[:-1]]
    return ends + [max_iter]


def _capped(xp: Any, index: Any, cap: int) -> Any:
    return min(index, cap) if isinstance(index, int) else xp.where(index < cap, index, cap)


# The algorithms compute with inf and NaN on purpose (an overflowed norm, a diverged sample, the
# rel/abs ratio of an exact fixed point) and read the outcome from the values; NumPy arrays would
# warn at each such operation, which torch and JAX do not.
@np.errstate(all="ignore")
def run(problem: Problem, solver: Solver, z0: Any, *, tol: float, max_iter: int, stop_mode: str,
        divergence: float | None, differentiable: bool = False, trace: int = TRACE_STEPS,
        check_every: int = 1, fz0: Any = None, record: tuple[int, ...] = ()) -> tuple[LoopState, Any]:
    """Solve ``z = fn(z)`` from the flat ``z0``; return the final loop state and per-sample status.

    A sample stays active while its stop residual is above ``tol`` and its abs residual below
    the divergence limit (both tests are False for NaN, so a non-finite sample stops too); a
    frozen sample's iterate, best iterate, residuals and iteration count never change again. The
    status is derived once after the loop from each sample's final residuals. ``trace`` is the
    number of steps whose residuals are recorded (0: none); the loop's memory does not depend on
    ``max_iter``. The stop test is read every ``check_every`` steps (a host round-trip on eager
    backends); a sample still freezes at the step it stops, so the only difference from 1 is up
    to ``check_every - 1`` extra batched evaluations once all samples are frozen. ``fz0`` is
    ``fn(z0)`` when the caller evaluated it already (it counts in ``nfe`` all the same).

    ``record`` (increasing steps >= 1, at most ``max_iter``) asks for ``state.states``: (k, B, n),
    row i the ``best_z`` after step ``record[i]``, which is what a solve with
    ``max_iter=record[i]`` returns (a frozen sample's best iterate; a step the loop never reached,
    because every sample had stopped, and the step the loop ended at hold the final ``best_z``).
    One row is written per step, into a fixed-shape buffer, so memory is O(k) whatever
    ``max_iter`` is and the loop stays traceable.

    Residuals, their traces and the best/last records have the :func:`statistics_dtype` of the
    state. A sample whose residual norm overflowed that dtype while its iterate stayed finite
    ends ``OVERFLOW``, not ``NONFINITE`` (:func:`diagnose_overflow`).
    """
    if differentiable != problem.differentiable:
        problem = problem._replace(differentiable=differentiable)
    backend = problem.backend
    xp = backend.xp
    device = array_api_compat.device(z0)
    k = 1 if stop_mode == "rel" else 0
    wide = statistics_dtype(xp, z0.dtype)
    stats = None if wide == z0.dtype else wide
    if fz0 is None:
        fz0 = problem.fn(z0)
    res0 = xp.stack(residuals(xp, fz0 - z0, fz0, stats))
    inf = xp.full_like(res0, float("inf"))
    limit = None if divergence is None else res0[0] * divergence
    finite0 = xp.isfinite(res0[0]) & xp.isfinite(res0[1])
    best_z = xp.asarray(z0, copy=True)
    if differentiable:
        # a solve that takes no step (every sample stops at z0, or an empty batch) still ties z
        # to f's graph, so that a recorded backward gives zero gradients instead of failing
        best_z = best_z + xp.where(xp.isfinite(fz0), 0.0 * fz0, 0.0)
    rows = min(trace, max_iter) + 1 if trace else 0
    buffer = None
    if rows:
        buffer = xp.empty((2, rows + 1, problem.batch), dtype=res0.dtype, device=device)
        buffer = backend.set_index(buffer, 0, res0, axis=1)
    recorded_at = None
    states = None
    if record:
        recorded_at = xp.asarray(record, device=device)
        states = xp.zeros((len(record) + 1, problem.batch, problem.n), dtype=z0.dtype, device=device)
    iterations = xp.zeros(problem.batch, dtype=xp.int32, device=device)
    state = LoopState(
        solver=solver.init(problem, z0, fz0),
        it=0,
        nfe=1,
        active=res0[k] > tol,
        iterations=iterations,
        best_z=best_z,
        best=xp.where(finite0, res0, inf),
        last=res0,
        trace=buffer,
        states=states,
        best_step=xp.zeros_like(iterations),
    )

    def cond(s: LoopState) -> Any:
        return xp.any(s.active)

    def body(s: LoopState) -> LoopState:
        active = s.active
        z_new, fz_new, sstate, nfe = solver.step(problem, s.solver, active)
        g_new = fz_new - z_new
        res = xp.stack(residuals(xp, g_new, fz_new, stats))
        keep = active & (res[k] > tol)
        if limit is not None:
            keep = keep & (res[0] <= limit)
        sstate = solver.commit(problem, sstate, z_new, fz_new, g_new, active, keep)
        better = active & (res[k] < s.best[k])
        last = xp.where(active, res, s.last)
        it = s.it + 1
        iterations = s.iterations + active
        best_z = select_rows(xp, better, z_new, s.best_z)
        states = s.states
        if states is not None:
            # the row of the first recorded step >= it; steps past the last one write the spare row
            row = bisect.bisect_left(record, it) if isinstance(it, int) else xp.sum(recorded_at < it)
            states = backend.set_index(states, row, best_z)
        return LoopState(
            solver=sstate,
            it=it,
            nfe=s.nfe + nfe,
            active=keep,
            iterations=iterations,
            best_z=best_z,
            best=xp.where(better, res, s.best),
            last=last,
            trace=None if s.trace is None else backend.set_index(s.trace, _capped(xp, it, rows), last,
                                                                 axis=1),
            states=states,
            best_step=xp.where(better, iterations, s.best_step),
        )

    loop = backend.differentiable_loop if differentiable else backend.while_loop
    capacities = solver.capacities(backend)
    start = 0
    for stage, end in enumerate(stage_ends(capacities, max_iter, check_every)):
        if stage:
            if backend.is_concrete(state.active) and not bool(xp.any(state.active)):
                break  # every sample stopped: growing the memory for later stages is wasted work
            state = state._replace(solver=solver.grow(problem, state.solver, capacities[stage]))
        if end > start:
            state = loop(cond, body, state, end - start, check_every)
            start = end
    if state.trace is not None:
        # rows after the loop's last step were never written: they repeat the final residuals
        steps = xp.arange(rows, device=device)[:, None]
        state = state._replace(trace=xp.where(steps > state.it, state.last[:, None, :],
                                              state.trace[:, :rows]))
    state, overflow = diagnose_overflow(problem, solver, state, stop_mode=stop_mode, dtype=stats)
    status = terminate(xp, state.last[0], state.last[1], inf[0] if limit is None else limit, tol=tol,
                       stop_mode=stop_mode)
    if state.states is not None:
        # rows at or after the loop's last step hold the final best iterate (overflow re-measures
        # included); earlier rows were written at their step
        pending = xp.reshape(recorded_at >= state.it, (-1, 1, 1))
        state = state._replace(states=xp.where(pending, state.best_z[None], state.states[:-1]))
    if overflow is not None:
        status = xp.where(overflow & (status != int(Status.CONVERGED)), int(Status.OVERFLOW), status)
    return state._replace(solver=solver.final_state(problem, state.solver)), xp.astype(status, xp.int32)
