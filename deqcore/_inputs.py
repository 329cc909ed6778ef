"""What every entry point does with its inputs before solving: the options common to every
solver, the backend of the arrays, the default initial state, and notes on errors ``f`` raises."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

from . import _options as opt
from ._structure import Structure, leaves

#: Steps a residual trace records by default (``trace=True``): rows for steps 0 .. min(max_iter, 1000).
TRACE_STEPS = 1000

COMMON_OPTIONS: dict[str, opt.Option[Any]] = {
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
    "correction_states": opt.Option(0, "intermediate states returned with a phantom gradient: 0 none, k "
                                    "states evenly spaced over max_iter, or a sequence of steps",
                                    opt.count_or_increasing_steps),
}

#: The parameters of ``deqcore.solve`` besides ``**options``: a solver option of one of these
#: names could never reach the solver (the registry rejects it). A test keeps it equal to the
#: signature.
SOLVE_PARAMETERS = ("f", "x", "z0", "backend", "solver", *COMMON_OPTIONS, "grad", "grad_options",
                    "correction_grad_options", "f_dtype")


def default(name: str) -> Any:
    """The default of the common option ``name`` (for signatures: declared once, here)."""
    return COMMON_OPTIONS[name].default


def first_floating(be: Any, x: Any, owner: str) -> Any:
    """The first floating-point array of ``x``: a hypersolver's weights take its dtype and device."""
    for a in leaves(x):
        if be.is_array(a) and be.xp.isdtype(a.dtype, "real floating"):
            return a
    raise TypeError(f"{owner}: a hypersolver's initialiser needs x to hold a floating-point array (its "
                    "dtype is the state's); pass z0 (solve) or start= (train_hypersolver) otherwise")


def zeros_like(be: Any, x: Any, owner: str = "deqcore.solve") -> Any:
    """The default initial state: zeros with the structure of ``x`` (an array or a tuple)."""
    if isinstance(x, (tuple, list)):
        return tuple(be.xp.zeros_like(item) for item in x)
    if not be.is_array(x):
        raise TypeError(f"{owner}: cannot make a default z0 from x of type {type(x).__name__}; pass z0=")
    return be.xp.zeros_like(x)


@contextlib.contextmanager
def note_default_z0(structure: Structure) -> Iterator[None]:
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
