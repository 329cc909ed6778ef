"""The solve loop shared by every solver: residuals, per-sample stopping and freezing, traces.

A solver supplies ``init`` (its state from ``z0`` and ``f(z0)``), ``step`` (propose and evaluate
the next iterate for the active samples) and ``commit`` (update its memory for the samples that
stay active). Everything else, which is the same for every solver, lives here: the stop test
(``terminate``), the divergence and non-finite checks, the lowest-residual iterate, the traces.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, ClassVar, NamedTuple

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

    def commit(self, problem: Problem, state: Any, z_new: Any, fz_new: Any, active: Any,
               keep: Any) -> Any:
        raise NotImplementedError


class LoopState(NamedTuple):
    solver: Any
    it: Any
    nfe: Any
    active: Any
    status: Any
    iterations: Any
    best_z: Any
    best_abs: Any
    best_rel: Any
    abs0: Any
    abs_trace: Any
    rel_trace: Any


def residuals(xp: Any, z: Any, fz: Any) -> tuple[Any, Any]:
    """Per-sample (abs, rel) residuals: ||f(z) - z|| and ||f(z) - z|| / (||f(z)|| + 1e-9)."""
    a = xp.linalg.vector_norm(fz - z, axis=-1)
    return a, a / (xp.linalg.vector_norm(fz, axis=-1) + 1e-9)


def terminate(xp: Any, abs_res: Any, rel_res: Any, abs0: Any, *, tol: float, stop_mode: str,
              divergence: float | None) -> tuple[Any, Any, Any]:
    """Per-sample stop test: (converged, diverged, finite) masks for one iterate."""
    finite = xp.isfinite(abs_res) & xp.isfinite(rel_res)
    stop = rel_res if stop_mode == "rel" else abs_res
    converged = finite & (stop <= tol)
    if divergence is None:
        diverged = xp.zeros_like(converged)
    else:
        diverged = finite & ~converged & (abs_res > divergence * abs0)
    return converged, diverged, finite


def run(problem: Problem, solver: Solver, z0: Any, *, tol: float, max_iter: int, stop_mode: str,
        divergence: float | None) -> tuple[LoopState, Any]:
    """Solve ``z = fn(z)`` from the flat ``z0``; return the final loop state and ``fn(z0)``."""
    backend = problem.backend
    xp = backend.xp
    fz0 = problem.fn(z0)
    abs0, rel0 = residuals(xp, z0, fz0)
    converged, _, finite = terminate(xp, abs0, rel0, abs0, tol=tol, stop_mode=stop_mode,
                                     divergence=None)
    zero_int = xp.astype(xp.zeros_like(abs0), xp.int32)
    status = xp.where(finite, zero_int + int(Status.MAX_ITER), zero_int + int(Status.NONFINITE))
    status = xp.where(converged, zero_int + int(Status.CONVERGED), status)
    inf = xp.full_like(abs0, float("inf"))
    trace = xp.tile(xp.zeros_like(abs0)[None, :], (max_iter + 1, 1))
    state = LoopState(
        solver=solver.init(problem, z0, fz0),
        it=0,
        nfe=1,
        active=finite & ~converged,
        status=status,
        iterations=zero_int,
        best_z=xp.asarray(z0, copy=True),
        best_abs=xp.where(finite, abs0, inf),
        best_rel=xp.where(finite, rel0, inf),
        abs0=abs0,
        abs_trace=backend.set_index(trace, 0, abs0),
        rel_trace=backend.set_index(xp.zeros_like(trace), 0, rel0),
    )

    def cond(s: LoopState) -> Any:
        return (s.it < max_iter) & xp.any(s.active)

    def body(s: LoopState) -> LoopState:
        active = s.active
        z_new, fz_new, sstate, nfe = solver.step(problem, s.solver, active)
        abs_res, rel_res = residuals(xp, z_new, fz_new)
        conv, div, finite = terminate(xp, abs_res, rel_res, s.abs0, tol=tol, stop_mode=stop_mode,
                                      divergence=divergence)
        keep = active & finite & ~conv & ~div
        sstate = solver.commit(problem, sstate, z_new, fz_new, active, keep)
        status = xp.where(active & conv, int(Status.CONVERGED), s.status)
        status = xp.where(active & div, int(Status.DIVERGED), status)
        status = xp.where(active & ~finite, int(Status.NONFINITE), status)
        best_stop = s.best_rel if stop_mode == "rel" else s.best_abs
        new_stop = rel_res if stop_mode == "rel" else abs_res
        better = active & finite & (new_stop < best_stop)
        prev_abs = s.abs_trace[s.it]
        prev_rel = s.rel_trace[s.it]
        return LoopState(
            solver=sstate,
            it=s.it + 1,
            nfe=s.nfe + nfe,
            active=keep,
            status=status,
            iterations=s.iterations + xp.astype(active, xp.int32),
            best_z=xp.where(better[:, None], z_new, s.best_z),
            best_abs=xp.where(better, abs_res, s.best_abs),
            best_rel=xp.where(better, rel_res, s.best_rel),
            abs0=s.abs0,
            abs_trace=backend.set_index(s.abs_trace, s.it + 1, xp.where(active, abs_res, prev_abs)),
            rel_trace=backend.set_index(s.rel_trace, s.it + 1, xp.where(active, rel_res, prev_rel)),
        )

    state = backend.while_loop(cond, body, state)
    rows = xp.cumsum(xp.ones_like(state.abs_trace[:, :1]), axis=0) - 1
    after = rows > state.it
    state = state._replace(
        abs_trace=xp.where(after, state.abs_trace[state.it], state.abs_trace),
        rel_trace=xp.where(after, state.rel_trace[state.it], state.rel_trace),
    )
    return state, fz0


def select_rows(xp: Any, mask: Any, new: Any, old: Any) -> Any:
    """``new`` for samples where ``mask`` (B,) holds, ``old`` elsewhere; any trailing shape."""
    shape = (mask.shape[0],) + (1,) * (new.ndim - 1)
    return xp.where(xp.reshape(mask, shape), new, old)
