"""The torch backend with the solver loop's body compiled by ``torch.compile``.

The algorithms run in their fixed-shape mode (as on JAX): ring memories keep their full
capacity with masked slots, counters are tensors, and the loop body becomes one graph that
Inductor fuses (on the CPU into a few C++ kernels; on CUDA, ``mode="reduce-overhead"`` asks for
CUDA graphs). The loop itself stays in Python and reads the stop test back once per
``check_every`` steps.

Compiled bodies are cached per loop body, state structure, shapes, dtypes and devices (each key
gets its own copy of the body's code object, so torch's per-function cache limit counts the
variants of one key only); torch's own guards recompile within a key when a closed-over value
changes (a solver option, the tolerance, ``f``'s code). Where compilation fails (no C++ compiler,
an operation Inductor cannot lower), the loop runs the same fixed-shape body eagerly and warns
once per key with the reason.
"""

from __future__ import annotations

import types
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils import _pytree as pytree

from deqcore import CompileWarning
from deqcore.internal import UNROLLED_SPD_MAX, spd_solve_unrolled

from ._backend import TorchBackend

#: ``torch.compile`` modes accepted by ``deqcore.solve(..., compile=...)`` (True means "default").
MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


@dataclass
class CompileStats:
    """Process-wide counts: ``bodies`` distinct cache keys, ``graphs`` graphs torch compiled for
    them (more than one per body means graph breaks or recompilations), ``fallbacks`` keys that
    ran eagerly because compilation failed."""

    bodies: int = 0
    graphs: int = 0
    fallbacks: int = 0


STATS = CompileStats()
_CODES: dict[Any, Any] = {}
_FAILED: dict[Any, str] = {}


def _graphs() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def _tensorize(state: Any) -> Any:
    """Python ints of a loop state (counters) as 0-d int64 tensors, so that a compiled body
    does not specialise on their values."""
    leaves = [leaf for leaf in pytree.tree_leaves(state) if isinstance(leaf, torch.Tensor)]
    device = leaves[0].device if leaves else None

    def convert(leaf: Any) -> Any:
        if isinstance(leaf, int) and not isinstance(leaf, bool):
            return torch.tensor(leaf, dtype=torch.int64, device=device)
        return leaf

    return pytree.tree_map(convert, state)


def _key(body: Callable[..., Any], state: Any, mode: str) -> Any:
    leaves, spec = pytree.tree_flatten(state)
    avals = tuple((tuple(x.shape), x.dtype, x.device) if isinstance(x, torch.Tensor) else type(x)
                  for x in leaves)
    return body.__code__, str(spec), avals, mode


class CompiledTorchBackend(TorchBackend):
    """The torch backend in fixed-shape mode, loop bodies compiled by ``torch.compile``.

    Gradient modes run on the eager backend (``eager``): a backward solve differentiates ``f``
    with ``torch.autograd.grad``, which a compiled graph cannot contain.
    """

    static_shapes = True

    def __init__(self, eager: TorchBackend, mode: str) -> None:
        super().__init__(eager.make_compiled)
        self.eager = eager
        self.mode = mode

    def compiled(self, mode: str | None = None) -> TorchBackend:
        return self.eager.compiled(mode)

    def set_index(self, buffer, index, value, axis=0):
        if isinstance(index, int):
            return super().set_index(buffer, index, value, axis)
        index = index.reshape(1)
        if torch.is_grad_enabled() and (buffer.requires_grad or value.requires_grad):
            return buffer.index_copy(axis, index, value.unsqueeze(axis))
        return buffer.index_copy_(axis, index, value.unsqueeze(axis))

    def active_prefix(self, buffer, count, axis):
        return buffer

    def linear_solve(self, a, b, symmetric_positive_definite=False):
        if symmetric_positive_definite and a.shape[-1] <= UNROLLED_SPD_MAX:
            return spd_solve_unrolled(self.xp, a, b)
        return super().linear_solve(a, b, symmetric_positive_definite)

    def while_loop(self, cond, body, state, max_steps=None, check_every=1):
        state = _tensorize(state)
        return super().while_loop(cond, self._compile(body, state), state, max_steps, check_every)

    def differentiable_loop(self, cond, body, state, max_steps, check_every=1):
        # recorded for autograd (the unroll mode): eager, in the same fixed-shape mode
        return super().differentiable_loop(cond, body, _tensorize(state), max_steps, check_every)

    def _compile(self, body: Callable[[Any], Any], state: Any) -> Callable[[Any], Any]:
        if torch.compiler.is_compiling():  # a loop inside a compiled body (a line search)
            return body
        key = _key(body, state, self.mode)
        if key in _FAILED:
            return body
        code = _CODES.get(key)
        if code is None:
            code = _CODES[key] = body.__code__.replace()
            STATS.bodies += 1
        fn = types.FunctionType(code, body.__globals__, body.__name__, body.__defaults__, body.__closure__)
        compiled = torch.compile(fn, mode=None if self.mode == "default" else self.mode, dynamic=False)
        current: list[Callable[[Any], Any]] = []

        def first_step(s: Any) -> Any:
            before = _graphs()
            try:
                out = compiled(s)
            except Exception as exc:  # compilation failed: the same body runs eagerly
                reason = str(exc).splitlines()[0] if str(exc) else ""
                _FAILED[key] = f"{type(exc).__name__}: {reason}"
                STATS.fallbacks += 1
                warnings.warn(f"deqcore: torch.compile could not compile the solver loop "
                              f"({_FAILED[key]}); running it eagerly", CompileWarning, stacklevel=4)
                current[0] = body
                return body(s)
            STATS.graphs += _graphs() - before
            current[0] = compiled
            return out

        current.append(first_step)

        def step(s: Any) -> Any:
            return current[0](s)

        return step


def compiled_backend(eager: TorchBackend, mode: str | None) -> CompiledTorchBackend:
    """The compiled variant of ``eager`` for ``mode`` (None: "default"), one per mode."""
    mode = "default" if mode is None else mode
    if mode not in MODES:
        raise ValueError(f"deqcore: torch.compile mode must be one of {', '.join(map(repr, MODES))}, "
                         f"got {mode!r}")
    if mode not in eager.compiled_by_mode:
        eager.compiled_by_mode[mode] = CompiledTorchBackend(eager, mode)
    return eager.compiled_by_mode[mode]
