"""``deqcore.solve``: the public entry point for forward fixed-point solves."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from . import _options as opt
from ._gradients import BackwardProblem, BackwardReport, higher_order_error
from ._loop import TRACE_STEPS, Problem, run
from ._registry import registry
from ._solution import ConvergenceError, Solution, Status
from ._structure import Structure, leaves
from .hypersolvers._hyperanderson import Hypersolver

COMMON_OPTIONS = {
    "tol": opt.Option(1e-4, "stop when the stop residual is <= tol", opt.positive_float),
    "max_iter": opt.Option(50, "maximum solver steps (f-evaluations: 1 + steps, more with a line search)",
                           opt.positive_int),
    "stop_mode": opt.Option("rel", "'rel': ||f(z)-z||/||f(z)||, 'abs': ||f(z)-z||", opt.one_of("rel", "abs")),
    "divergence": opt.Option(1e6, "flag a sample DIVERGED when its abs residual exceeds this factor times "
                             "the initial one; None disables", opt.optional(opt.positive_float)),
    "batched": opt.Option(True, "axis 0 of z is the batch axis (per-sample convergence); False: one state",
                          opt.boolean),
    "throw": opt.Option(False, "raise ConvergenceError unless every sample converged", opt.boolean),
    "trace": opt.Option(True, f"per-step residual traces: True records steps 0 .. min(max_iter, "
                        f"{TRACE_STEPS}), an int N steps 0 .. min(max_iter, N), False none",
                        opt.bool_or_nonnegative_int),
    "check_every": opt.Option(1, "read the stop test back to the host once per this many steps "
                              "(samples still freeze every step)", opt.positive_int),
    "compile": opt.Option(False, "compile the solver loop (torch: torch.compile, True or a mode name; "
                          "JAX: always compiled)", opt.bool_or_nonempty_str),
}


def solve(
    f: Callable[[Any, Any], Any],
    x: Any,
    z0: Any = None,
    *,
    backend: str | None = None,
    solver: str | Hypersolver = "anderson",
    tol: float = 1e-4,
    max_iter: int = 50,
    stop_mode: str = "rel",
    divergence: float | None = 1e6,
    batched: bool = True,
    throw: bool = False,
    trace: bool | int = True,
    check_every: int = 1,
    compile: bool | str = False,
    grad: str | None = "implicit",
    grad_options: Mapping[str, Any] | None = None,
    **options: Any,
) -> Solution:
    """Find ``z*`` with ``z* = f(z*, x)``, per sample of a batch.

    Args:
        f: the layer, called as ``f(z, x)``. ``z`` is an array or a tuple of arrays (several
            resolutions, as in MDEQ); ``f`` returns the same structure, shapes, dtype and device.
        x: the input injection, passed to ``f`` unchanged (an array, a tuple of arrays, or None).
        z0: the initial state; default zeros with the structure of ``x``.
        backend: ``"torch"``, ``"jax"`` or a plugin's backend; default inferred from the arrays.
            A backend that does not match the arrays' type is a ``TypeError`` naming both.
        solver: ``"anderson"`` (default), ``"broyden"``, ``"fixed_point"`` or a plugin's solver;
            or a trained hypersolver (:class:`deqcore.hypersolvers.HyperAnderson`), which then
            also supplies ``z0`` from its initialiser when ``z0`` is None. A hypersolver takes no
            solver options.
        tol, stop_mode: stop a sample when its ``rel`` (``||f(z)-z|| / ||f(z)||``) or ``abs``
            (``||f(z)-z||``) residual is ``<= tol``. Converged samples are frozen; the loop ends
            when all samples are frozen or after ``max_iter`` steps.
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
        grad: the gradient mode that makes ``solution.z`` differentiable: ``"implicit"``
            (default, exact up to its backward tolerance), ``"jfb"``, ``"npg"``, ``"upg"``,
            ``"gdeq"`` (needs ``solver="broyden"``), ``"unroll"``, or a plugin's mode; ``None``
            returns ``z`` with no gradient path. On torch nothing is attached (and no extra
            evaluation of ``f`` runs) when grad mode is off or nothing ``f`` uses requires grad.
        grad_options: the gradient mode's options, for example ``{"k": 5, "lam": 0.5}`` for
            ``npg``, or ``{"solver": "broyden", "tol": 1e-8}`` for ``implicit``. Unknown names are a
            ``TypeError`` listing the valid ones.
        **options: the solver's own options (``memory``, ``beta``, ``lam``, ``damping``,
            ``line_search`` ...). Unknown names are a ``TypeError`` listing the valid ones.

    Returns:
        A :class:`Solution`. Per sample, ``z`` is the iterate with the lowest stop residual seen;
        samples whose ``f`` produced NaN/Inf are flagged ``NONFINITE``, never silently returned
        as converged. The solve records no autograd graph.
    """
    reg = registry()
    common = opt.resolve(
        "deqcore.solve",
        COMMON_OPTIONS,
        {"tol": tol, "max_iter": max_iter, "stop_mode": stop_mode, "divergence": divergence,
         "batched": batched, "throw": throw, "trace": trace, "check_every": check_every,
         "compile": compile},
    )
    be = _resolve_backend(reg, backend, x, z0)
    loop_be = be
    if common["compile"] is not False:
        if not callable(getattr(be, "compiled", None)):
            raise TypeError(f"deqcore.solve: backend {be.name!r} has no compiled mode (compile="
                            f"{common['compile']!r}); solve with compile=False")
        loop_be = be.compiled(None if common["compile"] is True else common["compile"])
    hyper = solver if isinstance(solver, Hypersolver) else None
    if hyper is not None:
        if options:
            raise TypeError(f"deqcore.solve: a hypersolver takes no solver options, got "
                            f"{', '.join(sorted(options))}")
        solver = hyper.name
    elif not isinstance(solver, str):
        raise TypeError(f"deqcore.solve: solver must be a solver name or a hypersolver, got "
                        f"{type(solver).__name__}")
    else:
        solver_cls = reg.get("solvers", solver).obj
        solver_opts = opt.resolve(f"solver {solver!r}", solver_cls.options, options, COMMON_OPTIONS)
        solver_obj = solver_cls(max_iter=common["max_iter"], **solver_opts)
    mode = _gradient_mode(reg, grad, grad_options, solver)

    if z0 is None and hyper is not None:
        with be.no_grad():
            z0 = hyper.initial_state(be, x, first_floating(be, x, "deqcore.solve"))
    if z0 is None:
        z0 = _zeros_like(be, x)
    structure = Structure.of(be, z0, common["batched"])
    ref = leaves(z0)[0]
    if hyper is not None:
        solver_obj = hyper.bind(be, structure, ref, max_iter=common["max_iter"])

    def fn(zf: Any) -> Any:
        out = f(structure.unflatten(be, zf), x)
        structure.check_output(be, out, ref)
        return structure.flatten(be, out)

    unrolled = mode is not None and mode.unrolled
    with contextlib.nullcontext() if unrolled else be.no_grad():
        z0f = be.stop_gradient(structure.flatten(be, z0))
        problem = Problem(loop_be, fn, structure.batch, structure.n, structure.dtype)
        trace_steps = TRACE_STEPS if common["trace"] is True else int(common["trace"])
        state, status = run(problem, solver_obj, z0f, tol=common["tol"], max_iter=common["max_iter"],
                            stop_mode=common["stop_mode"], divergence=common["divergence"],
                            differentiable=unrolled, trace=trace_steps,
                            check_every=common["check_every"])
    xp = be.xp
    report = BackwardReport(mode.name) if mode is not None else None
    z_flat = state.best_z
    if not unrolled:
        z_flat = be.stop_gradient(z_flat)
    if mode is not None and not unrolled:

        def f_flat(zf: Any, x_: Any) -> Any:
            return structure.flatten(be, f(structure.unflatten(be, zf), x_))

        assert report is not None
        z_flat = mode.attach(BackwardProblem(be, f_flat, x, z_flat, state.solver, solver, report, problem))
    if mode is not None and not mode.exact_higher_order:
        z_flat = be.first_order_only(z_flat, higher_order_error(mode.name))
    solution = Solution(
        z=structure.unflatten(be, z_flat),
        abs_residual=state.best[0],
        rel_residual=state.best[1],
        converged=status == int(Status.CONVERGED),
        status=status,
        iterations=state.iterations,
        steps=xp.max(state.iterations),
        nfe=xp.asarray(state.nfe) if not be.is_array(state.nfe) else state.nfe,
        abs_trace=None if state.trace is None else state.trace[0],
        rel_trace=None if state.trace is None else state.trace[1],
        solver_state=state.solver,
        solver=solver,
        stop_mode=common["stop_mode"],
        tol=float(common["tol"]),
        grad=grad,
        backward=report,
    )
    if common["throw"]:
        be.host_check(~solution.converged, _convergence_error(solver, common, x, be),
                      solution.status, solution.residual)
    return solution


def _gradient_mode(reg: Any, grad: str | None, grad_options: Mapping[str, Any] | None,
                   solver: str) -> Any:
    if grad is None:
        if grad_options:
            raise TypeError("deqcore.solve: grad_options were given but grad=None")
        return None
    if grad_options is not None and not isinstance(grad_options, Mapping):
        raise TypeError(f"deqcore.solve: grad_options must be a dict, got {type(grad_options).__name__}")
    cls = reg.get("gradients", grad).obj
    mode = cls(**opt.resolve(f"gradient mode {grad!r}", cls.options, dict(grad_options or {})))
    mode.check(solver)
    return mode


def _convergence_error(solver: str, common: dict[str, Any], x: Any, be: Any) -> Callable[..., Exception]:
    def make(failed: np.ndarray, status: np.ndarray, residual: np.ndarray) -> Exception:
        bad = np.flatnonzero(failed)
        names = {int(s): Status(int(s)).name for s in np.unique(status[bad])}
        counts = ", ".join(f"{int((status[bad] == s).sum())} {n}" for s, n in names.items())
        msg = (f"deqcore.solve({solver!r}): {bad.size} of {failed.size} samples did not converge "
               f"({counts}); samples {bad[:10].tolist()}{' ...' if bad.size > 10 else ''}, worst "
               f"{common['stop_mode']} residual {np.nanmax(residual[bad]):.3e} > tol {common['tol']:g}")
        if int(Status.NONFINITE) in names:
            msg += ". f produced NaN/Inf"
            arrays = [a for a in leaves(x) if be.is_array(a)]
            if any(be.is_concrete(a) and not np.all(np.isfinite(be.to_numpy(a))) for a in arrays):
                msg += "; x itself contains NaN/Inf"
        elif int(Status.DIVERGED) in names:
            msg += ". The residual grew: is f a contraction? Try damping (fixed_point damping<1)"
        else:
            msg += f". Raise max_iter (now {common['max_iter']}) or loosen tol"
        return ConvergenceError(msg)

    return make


def first_floating(be: Any, x: Any, owner: str) -> Any:
    """The first floating-point array of ``x``: a hypersolver's weights take its dtype and device."""
    for a in leaves(x):
        if be.is_array(a) and be.xp.isdtype(a.dtype, "real floating"):
            return a
    raise TypeError(f"{owner}: a hypersolver's initialiser needs x to hold a floating-point array (its "
                    "dtype is the state's); pass z0 (solve) or start= (train_hypersolver) otherwise")


def _zeros_like(be: Any, x: Any) -> Any:
    if isinstance(x, (tuple, list)):
        return tuple(be.xp.zeros_like(item) for item in x)
    if not be.is_array(x):
        raise TypeError(
            f"deqcore.solve: cannot make a default z0 from x of type {type(x).__name__}; pass z0="
        )
    return be.xp.zeros_like(x)


def _resolve_backend(reg: Any, name: str | None, x: Any, z0: Any) -> Any:
    candidates = [leaf for leaf in leaves(z0) + leaves(x) if leaf is not None]
    inferred = None
    for leaf in candidates:
        inferred = reg.backend_for(leaf)
        if inferred is not None:
            break
    if name is None:
        if inferred is None:
            kinds = sorted({type(leaf).__name__ for leaf in candidates}) or ["nothing"]
            raise TypeError(
                f"deqcore.solve: cannot infer the backend from {', '.join(kinds)}; pass backend= "
                f"(available: {', '.join(reg.names('backends'))})"
            )
        return reg.backend(inferred)
    be = reg.backend(name)
    for leaf in candidates:
        if be.is_array(leaf):
            return be
        other = reg.backend_for(leaf)
        if other is not None:
            raise TypeError(
                f"deqcore.solve: backend {name!r} was requested but the input is a "
                f"{type(leaf).__module__}.{type(leaf).__name__} (backend {other!r}); convert the "
                f"arrays or pass backend={other!r}"
            )
    if not candidates or all(not hasattr(leaf, "shape") for leaf in candidates):
        return be
    raise TypeError(
        f"deqcore.solve: backend {name!r} cannot handle inputs of type "
        f"{', '.join(sorted({type(leaf).__name__ for leaf in candidates}))}"
    )
