"""The solve loop shared by every solver: residuals, per-sample stopping and freezing, traces.

A solver supplies ``init`` (its state from ``z0`` and ``f(z0)``), ``step`` (propose and evaluate
the next iterate for the active samples) and ``commit`` (update its memory for the samples that
stay active). Everything else, which is the same for every solver, lives here: the stop
test and the outcome per sample (``terminate``), the divergence and non-finite checks, the
lowest-residual iterate, the traces.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, ClassVar, NamedTuple

import array_api_compat

from ._options import Option
from ._protocol import Backend
from ._solution import Status


class Problem(NamedTuple):
    """A flattened fixed-point problem: ``fn`` maps (B, n) to (B, n)."""

    backend: Backend
    fn: Callable[[Any], Any]
    batch: int
    n: int
    dtype: Any


class Solver:
    """Base of the built-in solvers. Subclasses are final and set ``name`` and ``options``.

    The loop calls ``init`` once, then ``step`` and ``commit`` once per iteration. ``step``
    must leave inactive samples where they are (``z_new == z`` for them); ``commit`` writes
    solver memory only for the samples in ``keep``.
    """

    name: ClassVar[str]
    options: ClassVar[Mapping[str, Option]]

    def __init__(self, *, max_iter: int, **options: Any) -> None:
        self.max_iter = max_iter
        for key, value in options.items():
            setattr(self, key, value)

    def init(self, problem: Problem, z0: Any, fz0: Any) -> Any:
        raise NotImplementedError

    def step(self, problem: Problem, state: Any, active: Any) -> tuple[Any, Any, Any, Any]:
        """Return ``(z_new, fz_new, state, nfe)``; ``state`` may already hold ``z_new``."""
        raise NotImplementedError

    def commit(self, problem: Problem, state: Any, z_new: Any, fz_new: Any, g_new: Any,
               active: Any, keep: Any) -> Any:
        """Update the memory after a step; ``g_new = fz_new - z_new`` is passed in (computed once)."""
        raise NotImplementedError

    def capacities(self, backend: Backend) -> list[int]:
        """Memory capacities for successive loop stages; empty for one stage (the default).

        On backends with static shapes a memory that fills one slot per step would otherwise be
        multiplied in full from the first step. With capacities ``[c1, c2, ..., m]`` the loop runs
        steps ``[0, c1)`` with memory ``c1``, then calls :meth:`grow` and runs ``[c1, c2)``, and so
        on; the last stage runs to ``max_iter``. ``init`` allocates ``c1``.
        """
        return []

    def grow(self, problem: Problem, state: Any, capacity: int) -> Any:
        """Enlarge the solver's memory to ``capacity`` between loop stages."""
        return state


class LoopState(NamedTuple):
    solver: Any
    it: Any
    nfe: Any
    active: Any
    iterations: Any
    best_z: Any
    best_abs: Any
    best_rel: Any
    abs_trace: Any
    rel_trace: Any


def residuals(xp: Any, g: Any, fz: Any) -> tuple[Any, Any]:
    """Per-sample (abs, rel) residuals from ``g = f(z) - z``: ||g|| and ||g|| / (||f(z)|| + 1e-9)."""
    a = xp.linalg.vector_norm(g, axis=-1)
    return a, a / (xp.linalg.vector_norm(fz, axis=-1) + 1e-9)


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


def run(problem: Problem, solver: Solver, z0: Any, *, tol: float, max_iter: int, stop_mode: str,
        divergence: float | None, differentiable: bool = False) -> tuple[LoopState, Any]:
    """Solve ``z = fn(z)`` from the flat ``z0``; return the final loop state and per-sample status.

    A sample stays active while its stop residual is above ``tol`` and its abs residual below
    the divergence limit (both tests are False for NaN, so a non-finite sample stops too). The
    status is read off each sample's trace row at the step it stopped, after the loop: nothing
    status-related runs inside an iteration. Trace rows past a sample's stop are filled with its
    final residuals after the loop too, so an iteration writes each trace row with one copy.
    """
    backend = problem.backend
    xp = backend.xp
    fz0 = problem.fn(z0)
    abs0, rel0 = residuals(xp, fz0 - z0, fz0)
    stop0 = rel0 if stop_mode == "rel" else abs0
    inf = xp.full_like(abs0, float("inf"))
    limit = None if divergence is None else abs0 * divergence
    finite0 = xp.isfinite(abs0) & xp.isfinite(rel0)
    trace = xp.tile(xp.zeros_like(abs0)[None, :], (max_iter + 1, 1))
    capacities = solver.capacities(backend)
    state = LoopState(
        solver=solver.init(problem, z0, fz0),
        it=0,
        nfe=1,
        active=stop0 > tol,
        iterations=xp.astype(xp.zeros_like(abs0), xp.int32),
        best_z=xp.asarray(z0, copy=True),
        best_abs=xp.where(finite0, abs0, inf),
        best_rel=xp.where(finite0, rel0, inf),
        abs_trace=backend.set_index(trace, 0, abs0),
        rel_trace=backend.set_index(xp.zeros_like(trace), 0, rel0),
    )

    def until(end: int) -> Callable[[LoopState], Any]:
        def cond(s: LoopState) -> Any:
            return xp.any(s.active) & (s.it < end)

        return cond

    def body(s: LoopState) -> LoopState:
        active = s.active
        z_new, fz_new, sstate, nfe = solver.step(problem, s.solver, active)
        g_new = fz_new - z_new
        abs_res, rel_res = residuals(xp, g_new, fz_new)
        new_stop = rel_res if stop_mode == "rel" else abs_res
        keep = active & (new_stop > tol)
        if limit is not None:
            keep = keep & (abs_res <= limit)
        sstate = solver.commit(problem, sstate, z_new, fz_new, g_new, active, keep)
        better = new_stop < (s.best_rel if stop_mode == "rel" else s.best_abs)
        return LoopState(
            solver=sstate,
            it=s.it + 1,
            nfe=s.nfe + nfe,
            active=keep,
            iterations=s.iterations + active,
            best_z=select_rows(xp, better, z_new, s.best_z),
            best_abs=xp.where(better, abs_res, s.best_abs),
            best_rel=xp.where(better, rel_res, s.best_rel),
            abs_trace=backend.set_index(s.abs_trace, s.it + 1, abs_res),
            rel_trace=backend.set_index(s.rel_trace, s.it + 1, rel_res),
        )

    ends = [min(c, max_iter) for c in capacities[:-1]] + [max_iter]
    for stage, end in enumerate(ends):
        if stage:
            state = state._replace(solver=solver.grow(problem, state.solver, capacities[stage]))
        if differentiable:
            steps = end - (ends[stage - 1] if stage else 0)
            state = backend.differentiable_loop(until(end), body, state, steps)
        else:
            state = backend.while_loop(until(end), body, state)
    # Row ``iterations[b]`` holds sample b's residuals at the step it stopped; later rows were
    # written while it was frozen (or not at all) and take that final value.
    stopped = state.iterations[None, :]
    rows = xp.arange(state.abs_trace.shape[0], dtype=stopped.dtype, device=array_api_compat.device(z0))
    at_stop = rows[:, None] == stopped
    zero = xp.zeros_like(state.abs_trace)
    last_abs = xp.sum(xp.where(at_stop, state.abs_trace, zero), axis=0, keepdims=True)
    last_rel = xp.sum(xp.where(at_stop, state.rel_trace, zero), axis=0, keepdims=True)
    after = rows[:, None] > stopped
    status = terminate(xp, last_abs[0], last_rel[0], inf if limit is None else limit, tol=tol,
                       stop_mode=stop_mode)
    state = state._replace(
        abs_trace=xp.where(after, last_abs, state.abs_trace),
        rel_trace=xp.where(after, last_rel, state.rel_trace),
    )
    return state, xp.astype(status, xp.int32)


def select_rows(xp: Any, mask: Any, new: Any, old: Any) -> Any:
    """``new`` for samples where ``mask`` (B,) holds, ``old`` elsewhere; any trailing shape."""
    shape = (mask.shape[0],) + (1,) * (new.ndim - 1)
    return xp.where(xp.reshape(mask, shape), new, old)
