"""``deqcore.solve``: the public entry point for forward fixed-point solves."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np

from . import _options as opt
from ._gradients import AdjointMode, BackwardProblem, BackwardReport, higher_order_error
from ._loop import TRACE_STEPS, Problem, run, statistics_dtype
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
        z0: the initial state; default zeros with the structure of ``x`` (an error ``f`` raises
            on that default carries a note saying so, with the shape it had). Any floating dtype:
            half-precision states (float16, bfloat16) are iterated in their dtype while residuals
            and mixing systems are computed in float32. An empty batch (B = 0) returns an empty
            :class:`Solution` after one evaluation of ``f``.
        backend: ``"torch"``, ``"jax"`` or a plugin's backend; default inferred from the arrays.
            A backend that does not match the arrays' type is a ``TypeError`` naming both, and so
            are arrays of ``x`` and ``z0`` from different frameworks (NumPy included).
        solver: ``"anderson"`` (default), ``"broyden"``, ``"fixed_point"`` or a plugin's solver;
            or a trained hypersolver (:class:`deqcore.hypersolvers.HyperAnderson`), which then
            also supplies ``z0`` from its initialiser when ``z0`` is None. A hypersolver takes no
            solver options.
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
         "compile": compile},
    )
    be = resolve_backend(reg, backend, "deqcore.solve", {"z0": z0, "x": x})
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
    defaulted = z0 is None
    if defaulted:
        z0 = _zeros_like(be, x)
    structure = Structure.of(be, z0, common["batched"])
    ref = leaves(z0)[0]
    if hyper is not None:
        solver_obj = hyper.bind(be, structure, ref, max_iter=common["max_iter"])

    def fn(zf: Any) -> Any:
        out = f(structure.unflatten(be, zf), x)
        structure.check_output(be, out, ref, defaulted)
        return structure.flatten(be, out)

    unrolled = mode is not None and mode.unrolled
    with contextlib.nullcontext() if unrolled else be.no_grad():
        z0f = be.stop_gradient(structure.flatten(be, z0))
        fz0 = None
        if defaulted:
            with _note_default_z0(structure):
                out0 = f(structure.unflatten(be, z0f), x)
            structure.check_output(be, out0, ref, defaulted)
            fz0 = structure.flatten(be, out0)
        problem = Problem(loop_be, fn, structure.batch, structure.n, structure.dtype)
        trace_steps = TRACE_STEPS if common["trace"] is True else int(common["trace"])
        state, status = run(problem, solver_obj, z0f, tol=common["tol"], max_iter=common["max_iter"],
                            stop_mode=common["stop_mode"], divergence=common["divergence"],
                            differentiable=unrolled, trace=trace_steps,
                            check_every=common["check_every"], fz0=fz0)
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
        solver=solver,
        stop_mode=common["stop_mode"],
        tol=float(common["tol"]),
        grad=grad,
        backward=report,
    )
    if common["throw"]:
        be.host_check(~solution.converged, _convergence_error(solver, common, x, be, structure.dtype),
                      solution.status, solution.residual)
    return solution


@contextlib.contextmanager
def _note_default_z0(structure: Structure) -> Iterator[None]:
    """Add a note to an error ``f`` raises on the default z0, which the user never saw."""
    try:
        yield
    except Exception as error:
        add_note(error, f"deqcore.solve: z0 was not given, so it defaulted to zeros shaped like x, "
                        f"{structure.describe()}; if the state of f has another shape, pass z0= "
                        "(for example zeros of shape (batch, state size))")
        raise


def add_note(error: BaseException, note: str) -> None:
    """``error.add_note(note)`` (Python 3.11+); before 3.11 the note is appended to the message."""
    if sys.version_info >= (3, 11):
        error.add_note(note)
    else:
        append_note(error, note)


def append_note(error: BaseException, note: str) -> None:
    """Python 3.10's stand-in for ``add_note``: the note joins the message (its first argument
    when that is a string, else a new last argument) and ``__notes__``, as 3.11 would show it."""
    args = error.args
    if args and isinstance(args[0], str):
        error.args = (f"{args[0]}\n{note}",) + args[1:]
    else:
        error.args = args + (note,)
    error.__notes__ = [*getattr(error, "__notes__", []), note]  # type: ignore[attr-defined]


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


def resolve_backend(reg: Any, name: str | None, owner: str, arrays: Mapping[str, Any]) -> Any:
    """The backend of a call's arrays: ``name``'s, else inferred from the first array of
    ``arrays`` (argument name -> value, in the order to search).

    Every array of every argument (nested tuples, lists and dict values included) must belong to
    that backend: arrays of two frameworks, or a NumPy array beside framework arrays, are a
    ``TypeError`` naming the arguments that hold each, raised before anything runs.
    """
    found = [(path, leaf) for arg, value in arrays.items() for path, leaf in _paths(value, arg)
             if leaf is not None]
    kinds = {path: reg.backend_for(leaf) for path, leaf in found}
    if name is None:
        inferred = next((kind for kind in kinds.values() if kind is not None), None)
        if inferred is None:
            types = sorted({type(leaf).__name__ for _, leaf in found}) or ["nothing"]
            raise TypeError(
                f"{owner}: cannot infer the backend from {', '.join(types)}; pass backend= "
                f"(available: {', '.join(reg.names('backends'))})"
            )
        be = reg.backend(inferred)
    else:
        be = reg.backend(name)
        for path, leaf in found:
            other = kinds[path]
            if other is not None and other != be.name and not be.is_array(leaf):
                raise TypeError(
                    f"{owner}: backend {name!r} was requested but {path} is a {_type_name(leaf)} "
                    f"(backend {other!r}); convert the arrays or pass backend={other!r}"
                )
    home = next((path for path, leaf in found if be.is_array(leaf)), None)
    if home is None:
        if any(hasattr(leaf, "shape") for _, leaf in found):
            raise TypeError(
                f"{owner}: backend {be.name!r} cannot handle inputs of type "
                f"{', '.join(sorted({type(leaf).__name__ for _, leaf in found}))}"
            )
        return be
    for path, leaf in found:
        kind = kinds[path]
        if be.is_array(leaf) or not (isinstance(leaf, np.ndarray) or (kind is not None and kind != be.name)):
            continue
        framework = "NumPy" if kind is None else f"backend {kind!r}"
        raise TypeError(
            f"{owner}: the arrays mix frameworks: {home} holds {be.name} arrays (backend "
            f"{be.name!r}) but {path} is a {_type_name(leaf)} ({framework}); convert every array "
            f"of {' and '.join(arrays)} to {be.name} arrays (torch.as_tensor / jax.numpy.asarray)"
        )
    return be


def _paths(obj: Any, path: str) -> list[tuple[str, Any]]:
    """``(path, leaf)`` per leaf of ``obj`` in :func:`leaves`' order: ``x``, ``x[1]``, ``x['key']``."""
    if isinstance(obj, (tuple, list)):
        return [pair for i, item in enumerate(obj) for pair in _paths(item, f"{path}[{i}]")]
    if isinstance(obj, dict):
        return [pair for key, item in obj.items() for pair in _paths(item, f"{path}[{key!r}]")]
    return [(path, obj)]


def _type_name(obj: Any) -> str:
    return f"{type(obj).__module__}.{type(obj).__name__}"
