"""``deqcore.solve``: the public entry point for forward fixed-point solves."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from . import _inputs
from . import _options as opt
from ._batched_linalg import statistics_dtype
from ._capabilities import check_gradient_mode
from ._correction import attach_correction, correction_mode, correction_steps
from ._inputs import COMMON_OPTIONS, default, first_floating, note_default_z0, resolve_backend, zeros_like
from ._layer_precision import LayerPrecision
from ._loop import run
from ._registry import registry
from ._results import ConvergenceError, Solution, Status
from ._structure import Structure, leaves
from .gradients._base import AdjointMode, BackwardProblem, BackwardReport, higher_order_error
from .solvers._base import BindableSolver, Problem


def solve(
    f: Callable[[Any, Any], Any],
    x: Any,
    z0: Any = None,
    *,
    backend: str | None = None,
    solver: str | BindableSolver = "anderson",
    tol: float = default("tol"),
    max_iter: int = default("max_iter"),
    stop_mode: str = default("stop_mode"),
    divergence: float | None = default("divergence"),
    batched: bool = default("batched"),
    throw: bool = default("throw"),
    trace: bool | int = default("trace"),
    check_every: int = default("check_every"),
    compile: bool | str = default("compile"),
    correction_states: int | Sequence[int] = default("correction_states"),
    grad: str | None = "auto",
    grad_options: Mapping[str, Any] | None = None,
    correction_grad_options: Mapping[str, Any] | None = None,
    f_dtype: Any = None,
    **options: Any,
) -> Solution:
    """Find ``z*`` with ``z* = f(z*, x)``, per sample of a batch.

    Args:
        f: the layer, called as ``f(z, x)``. ``z`` is an array or a tuple of arrays (several
            resolutions, as in MDEQ); ``f`` returns the same structure, shapes, dtype and device
            (with ``f_dtype``: that dtype or the state's).
        x: the input injection, passed to ``f`` unchanged (an array, a tuple of arrays, or None).
        z0: the initial state; default zeros with the structure of ``x`` (an error ``f`` raises
            on that default carries a note saying so, with the shape it had). Any floating dtype:
            half-precision states (float16, bfloat16) are iterated in their dtype while residuals
            and mixing systems are computed in float32. An empty batch (B = 0) returns an empty
            :class:`Solution` after one evaluation of ``f``.
        backend: ``"torch"``, ``"jax"`` or a plugin's backend; default inferred from the arrays.
            A backend that does not match the arrays' type is a ``TypeError`` naming both, and so
            are arrays of ``x`` and ``z0`` from different frameworks (NumPy included).
        solver: ``"anderson"`` (default), ``"broyden"``, ``"fixed_point"`` or a plugin's solver,
            configured by ``**options``; or a solver instance, configured when built
            (``deqcore.solvers.Anderson(memory=8)``; ``max_iter`` is this call's), or a trained
            hypersolver (:class:`deqcore.hypersolvers.HyperAnderson`), which then also supplies
            ``z0`` from its initialiser when ``z0`` is None: any
            :class:`deqcore.extend.BindableSolver`. An instance takes no ``**options``.
        tol: stop a sample when its ``stop_mode`` residual is ``<= tol``. Converged samples are
            frozen; the loop ends when all samples are frozen or after ``max_iter`` steps.
        stop_mode: the residual ``tol`` applies to: ``"rel"`` (``||f(z)-z|| / ||f(z)||``) or
            ``"abs"`` (``||f(z)-z||``).
        divergence: a sample whose abs residual exceeds ``divergence`` times its initial one is
            flagged ``DIVERGED`` and frozen; ``None`` disables the test.
        batched: axis 0 of every array of ``z`` is the batch axis (default). ``False`` treats the
            whole state as one sample (use it inside ``jax.vmap``).
        throw: raise :class:`ConvergenceError` when any sample did not converge (under
            ``jax.jit`` the error surfaces when the computation runs).
        trace: the per-step residual traces ``solution.abs_trace``/``rel_trace``: ``True``
            (default) records steps 0 to ``min(max_iter, 1000)``, an int ``N`` steps 0 to
            ``min(max_iter, N)``, ``False`` (or 0) none (the traces are then None). Memory is
            ``2 (rows) B`` numbers whatever ``max_iter`` is.
        check_every: how often the stop test (is any sample still active?) is read back to the
            host: every step by default, once per ``check_every`` steps otherwise, which saves
            host synchronisations on accelerators. Samples still freeze at the step they stop
            (``z``, ``iterations``, residuals and status are those of ``check_every=1``); up to
            ``check_every - 1`` extra batched evaluations of ``f`` run once all are frozen, and
            ``nfe`` counts them.
        compile: run the solver loop compiled. torch: ``True`` (``torch.compile``'s default
            mode) or a mode name (``"reduce-overhead"`` for CUDA graphs, ``"max-autotune"``,
            ...). The algorithms then run in their fixed-shape mode, as on JAX, with the loop
            body (``f`` included) compiled once per shape, dtype, solver and options and cached
            for later solves; the first solve pays the compilation (seconds). Results equal the
            eager ones to rounding. Gradients run eagerly. Where compilation fails the loop runs
            eagerly with a :class:`deqcore.CompileWarning`. JAX: no effect (its loops are
            always compiled).
        correction_states: intermediate states to return with a cheap gradient, for a loss on
            several iterates (fixed-point correction, as in DEQ-Flow): 0 (default) none, at no
            cost; an int ``k`` the states after steps ``max_iter - (k - i) * (max_iter // k)``,
            i = 1 .. k (evenly spaced, the last at ``max_iter``, so it equals ``z`` in value);
            or a sequence of increasing steps in 1 .. ``max_iter``. The state of step ``s`` is,
            per sample, what a solve with ``max_iter=s`` returns: the lowest-residual iterate up
            to step ``s``, so a sample frozen earlier contributes the iterate it froze with (a
            step after the loop ended, all samples frozen, repeats ``z``). Returned as
            ``solution.correction_states``, each with ``z``'s structure and the ``upg`` (phantom)
            gradient from the detached state (``correction_grad_options``), whatever ``grad``
            is; none when ``grad`` is None. Memory: ``k`` states, whatever ``max_iter`` is.
        grad: the gradient mode that makes ``solution.z`` differentiable: ``"implicit"``
            (exact up to its backward tolerance, to every order: Hessian-vector products,
            ``create_graph=True``, ``jax.hessian``), ``"jfb"``, ``"npg"``, ``"upg"``, ``"gdeq"``
            (needs ``solver="broyden"``), ``"unroll"`` (also exact to every order), or a plugin's
            mode (the approximate ones raise :class:`deqcore.HigherOrderError` on a second
            derivative); ``None`` returns ``z``
            with no gradient path. The default ``"auto"`` is ``"implicit"`` on backends with
            autodiff (torch, JAX) and ``None`` on others (NumPy); naming a mode on a backend
            without autodiff is a :class:`deqcore.CapabilityError`. On torch nothing is attached (and no extra
            evaluation of ``f`` runs) when grad mode is off or nothing ``f`` uses requires grad.
        grad_options: the gradient mode's options, for example ``{"k": 5, "lam": 0.5}`` for
            ``npg``, or ``{"solver": "broyden", "tol": 1e-8}`` for ``implicit``. Unknown names are a
            ``TypeError`` listing the valid ones.
        correction_grad_options: the options of the correction states' ``upg`` gradient: ``k``
            damped steps ``z <- z + lam (f(z) - z)`` from each detached state (default
            ``{"k": 5, "lam": 0.5}``; ``{"k": 1, "lam": 1.0}`` is TorchDEQ's default). Unknown names
            are a ``TypeError``.
        f_dtype: mixed precision: a half dtype (``torch.bfloat16``, ``torch.float16``,
            ``jnp.bfloat16`` ...) narrower than the state's, usually float32. Every evaluation of
            ``f`` then gets the state cast to ``f_dtype`` and may return ``f_dtype`` or the state's
            dtype (``torch.autocast`` decides per operation), cast up to the state's dtype. The
            state, residuals, stop test, the solvers' updates (Anderson's mixing solve, Broyden's
            rank-one updates) and the implicit adjoint solve stay in the state's dtype; the VJPs
            of ``f`` run in the dtypes its forward ran in. Residuals then level off at the half
            dtype's rounding (about 4e-3 relative for bfloat16): use a ``tol`` above it. Default
            None: ``f`` gets and must return the state's dtype; nothing is cast.
        **options: the solver's own options (``memory``, ``beta``, ``lam``, ``damping``,
            ``line_search`` ...). Unknown names are a ``TypeError`` listing the valid ones.

    Returns:
        A :class:`Solution`. Per sample, ``z`` is the iterate with the lowest stop residual seen;
        samples whose ``f`` produced NaN/Inf are flagged ``NONFINITE``, those whose residual norm
        overflowed the dtype's range ``OVERFLOW``, never silently returned as converged. The
        solve records no autograd graph.
    """
    reg = registry()
    common = opt.resolve(
        "deqcore.solve",
        COMMON_OPTIONS,
        {"tol": tol, "max_iter": max_iter, "stop_mode": stop_mode, "divergence": divergence,
         "batched": batched, "throw": throw, "trace": trace, "check_every": check_every,
         "compile": compile, "correction_states": correction_states},
    )
    record = correction_steps(common["correction_states"], common["max_iter"])
    be = resolve_backend(reg, backend, "deqcore.solve", {"z0": z0, "x": x})
    loop_be = be
    if common["compile"] is not False:
        if not callable(getattr(be, "compiled", None)):
            raise TypeError(f"deqcore.solve: backend {be.name!r} has no compiled mode (compile="
                            f"{common['compile']!r}); solve with compile=False")
        loop_be = be.compiled(None if common["compile"] is True else common["compile"])
    bindable = _bindable(reg, solver, options)
    if grad == "auto":
        grad = "implicit" if be.capabilities.autodiff else None
        if grad is None and grad_options:
            raise TypeError(f"deqcore.solve: grad_options were given but backend {be.name!r} has no "
                            "autodiff, so no gradient mode applies (grad='auto' is None there)")
    check_gradient_mode(be, grad)
    mode = _gradient_mode(reg, grad, grad_options, bindable.name)
    if correction_grad_options is not None and not record:
        raise TypeError("deqcore.solve: correction_grad_options were given but correction_states=0")
    correcting = correction_mode(reg, correction_grad_options) if record and mode is not None else None

    if z0 is None:
        with be.no_grad():
            z0 = _learned_z0(be, bindable, x)
    defaulted = z0 is None
    if defaulted:
        z0 = zeros_like(be, x)
    structure = Structure.of(be, z0, common["batched"])
    precision = LayerPrecision.of(be, f_dtype, structure)
    ref = leaves(z0)[0]
    solver_obj = bindable.bind(be, structure, ref, max_iter=common["max_iter"])
    solver_name = bindable.name

    def fn(zf: Any) -> Any:
        return precision.evaluate(be, structure, f, zf, x, ref, defaulted)

    unrolled = mode is not None and mode.unrolled
    with contextlib.nullcontext() if unrolled else be.no_grad():
        z0f = be.stop_gradient(structure.flatten(be, z0))
        fz0 = None
        if defaulted:
            with note_default_z0(structure):
                out0 = f(structure.unflatten(be, precision.inward(be, z0f)), x)
            structure.check_output(be, out0, ref, defaulted, precision.output_dtypes())
            fz0 = structure.flatten(be, precision.outward(be, out0))
        problem = Problem(loop_be, fn, structure.batch, structure.n, structure.dtype)
        trace_steps = _inputs.TRACE_STEPS if common["trace"] is True else int(common["trace"])
        state, status = run(problem, solver_obj, z0f, tol=common["tol"], max_iter=common["max_iter"],
                            stop_mode=common["stop_mode"], divergence=common["divergence"],
                            differentiable=unrolled, trace=trace_steps,
                            check_every=common["check_every"], fz0=fz0, record=record)
    xp = be.xp
    report = BackwardReport(mode.name) if mode is not None else None
    z_flat = state.best_z
    if not unrolled:
        z_flat = be.stop_gradient(z_flat)

    def f_flat(zf: Any, x_: Any) -> Any:
        return precision.evaluate(be, structure, f, zf, x_)

    corrections: tuple[Any, ...] = ()
    if record:
        flat = attach_correction(BackwardProblem(be, f_flat, x, z_flat, state.solver, solver_name,
                                                 BackwardReport("upg"), problem), correcting, state.states)
        corrections = tuple(structure.unflatten(be, s) for s in flat)
    if mode is not None and not unrolled:
        assert report is not None
        z_flat = mode.attach(BackwardProblem(be, f_flat, x, z_flat, state.solver, solver_name, report,
                                             problem, state.iterations, state.best_step))
    if mode is not None and not mode.exact_higher_order and not isinstance(mode, AdjointMode):
        # an adjoint mode's attach_adjoint already guards its backward
        z_flat = be.first_order_only(z_flat, higher_order_error(mode.name))
    its = state.iterations  # an empty batch's steps: a sum of nothing, as a max has no identity
    solution = Solution(
        z=structure.unflatten(be, z_flat),
        abs_residual=state.best[0],
        rel_residual=state.best[1],
        converged=status == int(Status.CONVERGED),
        status=status,
        iterations=its,
        steps=xp.max(its) if structure.batch else xp.sum(its, dtype=its.dtype),
        nfe=xp.asarray(state.nfe) if not be.is_array(state.nfe) else state.nfe,
        abs_trace=None if state.trace is None else state.trace[0],
        rel_trace=None if state.trace is None else state.trace[1],
        solver_state=state.solver,
        correction_states=corrections,
        solver=solver_name,
        stop_mode=common["stop_mode"],
        tol=float(common["tol"]),
        grad=grad,
        backward=report,
    )
    if common["throw"]:
        be.host_check(~solution.converged, _convergence_error(solver_name, common, x, be, structure.dtype),
                      solution.status, solution.residual)
    return solution


def _bindable(reg: Any, solver: Any, options: Mapping[str, Any]) -> BindableSolver:
    """The solver of a call: a registered name configured by ``options``, or an instance."""
    if isinstance(solver, str):
        return reg.get("solvers", solver).obj(**options)
    if isinstance(solver, type):
        raise TypeError(f"deqcore.solve: solver={solver.__name__} is a class; pass an instance "
                        f"({solver.__name__}(...)) or a registered name")
    if not callable(getattr(solver, "bind", None)) or not isinstance(getattr(solver, "name", None), str):
        raise TypeError(f"deqcore.solve: solver must be a solver name or a solver instance (an object "
                        f"with a name and bind(), such as deqcore.solvers.Anderson(memory=8) or a "
                        f"hypersolver), got {type(solver).__name__}")
    if options:
        raise TypeError(f"deqcore.solve: solver options {', '.join(sorted(options))} were given beside "
                        f"a solver instance ({solver.name!r}); pass them when building it")
    return solver


def _learned_z0(be: Any, bindable: Any, x: Any) -> Any:
    """The bindable's first guess for ``x`` (a hypersolver's initialiser), or None."""
    initial_state = getattr(bindable, "initial_state", None)
    inherited = getattr(type(bindable), "initial_state", None) is BindableSolver.initial_state
    if initial_state is None or inherited:
        return None
    return initial_state(be, x, first_floating(be, x, "deqcore.solve"))


def _gradient_mode(reg: Any, grad: str | None, grad_options: Mapping[str, Any] | None,
                   solver: str) -> Any:
    if grad is None:
        if grad_options:
            raise TypeError("deqcore.solve: grad_options were given but grad=None")
        return None
    if grad_options is not None and not isinstance(grad_options, Mapping):
        raise TypeError(f"deqcore.solve: grad_options must be a dict, got {type(grad_options).__name__}")
    mode = reg.get("gradients", grad).obj(**dict(grad_options or {}))
    mode.check(solver)
    return mode


def _convergence_error(solver: str, common: dict[str, Any], x: Any, be: Any,
                       dtype: Any) -> Callable[..., Exception]:
    def make(failed: np.ndarray, status: np.ndarray, residual: np.ndarray) -> Exception:
        bad = np.flatnonzero(failed)
        names = {int(s): Status(int(s)).name for s in np.unique(status[bad])}
        counts = ", ".join(f"{int((status[bad] == s).sum())} {n}" for s, n in names.items())
        measured = residual[bad][~np.isnan(residual[bad])]
        worst = float(measured.max()) if measured.size else float("nan")
        msg = (f"deqcore.solve({solver!r}): {bad.size} of {failed.size} samples did not converge "
               f"({counts}); samples {bad[:10].tolist()}{' ...' if bad.size > 10 else ''}, worst "
               f"{common['stop_mode']} residual {worst:.3e} > tol {common['tol']:g}")
        hints = []
        if int(Status.NONFINITE) in names:
            hint = "NONFINITE: f produced NaN/Inf"
            arrays = [a for a in leaves(x) if be.is_array(a)]
            if any(be.is_concrete(a) and not bool(be.xp.all(be.xp.isfinite(a))) for a in arrays):
                hint += "; x itself contains NaN/Inf"
            hints.append(hint)
        if int(Status.OVERFLOW) in names:
            wide = statistics_dtype(be.xp, dtype)
            where = _dtype_name(wide)
            if wide != dtype:
                where += f" (where the residuals of {_dtype_name(dtype)} states are computed)"
            hints.append(f"OVERFLOW: the iterate and f(z) are finite but the residual norm overflowed "
                         f"{where}, whose norms fail for entries above about "
                         f"{np.sqrt(float(be.xp.finfo(wide).max)):.1e}; rescale the state, solve in a "
                         "wider dtype, or check that f is a contraction")
        if not hints and int(Status.DIVERGED) in names:
            hints.append("The residual grew: is f a contraction? Try damping (fixed_point damping<1)")
        if not hints:
            hints.append(f"Raise max_iter (now {common['max_iter']}) or loosen tol")
        return ConvergenceError(msg + ". " + ". ".join(hints))

    return make


def _dtype_name(dtype: Any) -> str:
    return str(dtype).removeprefix("torch.")
