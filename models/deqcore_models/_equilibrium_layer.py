"""How a model runs its equilibrium layer: the solve settings shared by every model."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import deqcore
from deqcore.internal import correction_steps

_COLLECTORS: list[list[deqcore.BackwardReport]] = []
_SOLVES: list[list[deqcore.Solution]] = []
_STARTS: list[Any] = []


@contextlib.contextmanager
def _collecting(stack: list[list[Any]]) -> Iterator[list[Any]]:
    items: list[Any] = []
    stack.append(items)
    try:
        yield items
    finally:
        stack.remove(items)


def collect_backward_reports() -> contextlib.AbstractContextManager[list[deqcore.BackwardReport]]:
    """The :class:`deqcore.BackwardReport` of every equilibrium solve :func:`run_layer` runs in
    the block (under ``jax.jit``: while tracing; the reports fill in when the compiled step
    runs its backward pass)."""
    return _collecting(_COLLECTORS)


def collect_forward_solves() -> contextlib.AbstractContextManager[list[deqcore.Solution]]:
    """The :class:`deqcore.Solution` of every equilibrium solve :func:`run_layer` runs in the
    block, also in blocks nested in it (eager frameworks: under ``jax.jit`` they hold tracers)."""
    return _collecting(_SOLVES)


@contextlib.contextmanager
def starting_from(z0: Any) -> Iterator[None]:
    """Equilibrium solves :func:`run_layer` runs in the block start from ``z0`` (a warm start,
    with the structure of the layer's state; None: the model's own start). Unrolled runs keep
    their start."""
    _STARTS.append(z0)
    try:
        yield
    finally:
        _STARTS.pop()


def fixed_points(solves: list[deqcore.Solution], stop_gradient: Callable[[Any], Any]) -> deqcore.Solution:
    """The one solve of ``solves`` cut to what a :class:`deqcore.FixedPointCache` keeps: ``z``
    (without a gradient path) and the per-sample results, without the solver's state and the
    traces (under ``jax.jit``: fewer outputs of the compiled step). A step of several solves is a
    ``ValueError``: its samples have no one fixed point to keep."""
    if len(solves) != 1:
        raise ValueError(f"a warm-started step needs exactly one equilibrium solve, this one ran "
                         f"{len(solves)}")
    sol = solves[0]
    z = tuple(stop_gradient(a) for a in sol.z) if isinstance(sol.z, tuple) else stop_gradient(sol.z)
    return dataclasses.replace(sol, z=z, solver_state=None, abs_trace=None, rel_trace=None, backward=None)


def unconverged_samples(solves: list[deqcore.Solution]) -> int:
    """How many samples of ``solves`` (eager arrays) did not reach their tolerance."""
    return sum(int((~s.converged).sum()) for s in solves)


def mean_iterations(solves: list[deqcore.Solution]) -> float:
    """The mean of the solver steps each sample of ``solves`` (eager arrays) took before it
    stopped (NaN when none solved): what a warm start shortens even while one slow sample holds
    the batch's solve, and its NFE, at the budget."""
    samples = sum(int(s.iterations.shape[0]) for s in solves)
    return sum(float(s.iterations.sum()) for s in solves) / samples if samples else float("nan")


def worst_backward_residual(reports: list[deqcore.BackwardReport]) -> float:
    """The largest residual any backward solve of ``reports`` reached (NaN when none solved)."""
    values = [float(r.residual.max()) for r in reports if r.residual is not None and r.residual.size]
    return max(values) if values else float("nan")


#: The precisions a model can compute in (``DEQSettings.precision``).
PRECISIONS = ("float32", "bfloat16", "float16")


@dataclass(frozen=True)
class DEQSettings:
    """Forward solver, gradient mode and pre-training switch of an equilibrium layer.

    ``unrolled`` > 0 runs the layer as ``unrolled`` weight-tied steps from ``z = 0`` with ordinary
    backpropagation (the papers' pre-training); 0 solves for the fixed point with ``solver`` and
    differentiates with ``grad``. ``solver_options`` and ``grad_options`` go to
    :func:`deqcore.solve` (unknown names are errors there). ``jac_weight`` multiplies the Jacobian
    penalty (:func:`deqcore.jacobian_penalty`) in the training loss of a step that is given a
    Hutchinson probe. ``correction_states`` = k > 1 (solves only) asks the solve for the states
    after the first k - 1 of the k steps :func:`deqcore.internal.correction_steps` spaces over
    ``max_iter``, for a loss on them besides the one on ``z*`` (the k-th state): fixed-point
    correction; 0 and 1 train on ``z*`` alone. ``precision``: ``"float32"``, or a half dtype (``"bfloat16"``,
    ``"float16"``) the engine runs the model's convolutions and matrix products in
    (:meth:`deqcore_models._ops.Ops.precision`) while the equilibrium state stays float32: the
    solve gets ``f_dtype`` (:func:`deqcore.solve`).
    """

    solver: str = "broyden"
    tol: float = 1e-3
    max_iter: int = 18
    stop_mode: str = "rel"
    solver_options: Mapping[str, Any] = field(default_factory=dict)
    grad: str | None = "implicit"
    grad_options: Mapping[str, Any] = field(default_factory=dict)
    unrolled: int = 0
    jac_weight: float = 0.0
    correction_states: int = 0
    precision: str = "float32"

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.unrolled < 0:
            raise ValueError(f"unrolled must be >= 0, got {self.unrolled}")
        if not self.jac_weight >= 0:
            raise ValueError(f"jac_weight must be >= 0, got {self.jac_weight}")
        if self.correction_states < 0:
            raise ValueError(f"correction_states must be >= 0, got {self.correction_states}")

    def correction_steps(self) -> tuple[int, ...]:
        """The steps whose states the solve returns for a correction loss (empty: none)."""
        if self.unrolled or self.correction_states < 2:
            return ()
        return correction_steps(self.correction_states, self.max_iter)[:-1]


@dataclass
class LayerStats:
    """What one equilibrium-layer evaluation did: f-evaluations, the worst relative residual
    (arrays of the framework; NaN for unrolled runs, which have no residual), the solution
    (None for unrolled runs), the Jacobian penalty at the output (None without a probe) and the
    model's outputs at the solution's correction states, in step order (set by the model)."""

    nfe: Any
    rel_residual: Any
    solution: deqcore.Solution | None
    jac_penalty: Any = None
    correction_outputs: tuple[Any, ...] = ()

    @property
    def correction_states(self) -> tuple[Any, ...]:
        """The solution's correction states (empty for unrolled runs and without correction)."""
        return () if self.solution is None else tuple(self.solution.correction_states)


def run_layer(backend: str, f: Callable[[Any, Any], Any], inj: Any, z0: Any,
              settings: DEQSettings, xp: Any, probe: Any = None) -> tuple[Any, LayerStats]:
    """``z*`` of ``f(., inj)`` from ``z0`` by ``settings``, with the statistics of the run.

    ``probe`` (a sequence of noise arrays, one per array of ``z0`` in order, or None) asks for the
    Hutchinson Jacobian penalty at the layer's output (the fixed point, or the last unrolled step)
    in the stats."""
    mixed: dict[str, Any] = {}
    if settings.unrolled:
        z = z0
        for _ in range(settings.unrolled):
            z = f(z, inj)
        stats = LayerStats(settings.unrolled, xp.asarray(float("nan")), None)
    else:
        if _STARTS and _STARTS[-1] is not None:
            z0 = _STARTS[-1]
        if settings.precision != "float32":  # the state stays float32, f runs in the half dtype
            multi = isinstance(z0, (tuple, list))
            z0 = tuple(xp.astype(a, xp.float32) for a in z0) if multi else xp.astype(z0, xp.float32)
            mixed["f_dtype"] = getattr(xp, settings.precision)
        sol = deqcore.solve(f, inj, z0, backend=backend, solver=settings.solver, tol=settings.tol,
                            max_iter=settings.max_iter, stop_mode=settings.stop_mode, grad=settings.grad,
                            grad_options=dict(settings.grad_options),
                            correction_states=settings.correction_steps() or 0, **mixed,
                            **dict(settings.solver_options))
        z, stats = sol.z, LayerStats(sol.nfe, xp.max(sol.rel_residual), sol)
        if _COLLECTORS and sol.backward is not None:
            _COLLECTORS[-1].append(sol.backward)
        for solves in _SOLVES:
            solves.append(sol)
    if probe is not None:
        multi = isinstance(z, (tuple, list))
        noise = tuple(xp.astype(p, a.dtype) for p, a in zip(probe, z if multi else (z,), strict=True))
        stats.jac_penalty = deqcore.jacobian_penalty(f, z, inj, noise if multi else noise[0], backend=backend,
                                                     **mixed)
    return z, stats
