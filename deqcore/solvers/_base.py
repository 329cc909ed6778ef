"""What a solver is: the flattened :class:`Problem` it iterates on, the :class:`Solver` base of
one algorithm's steps, and the bindable-solver protocol ``deqcore.solve`` accepts as ``solver=``
(:class:`BindableSolver`; :class:`Hypersolver` adds trainable weights)."""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from typing import Any, ClassVar, NamedTuple

import numpy as np

from .._inputs import COMMON_OPTIONS
from .._options import Configurable
from .._protocol import Backend
from .._structure import Structure


class Problem(NamedTuple):
    """A flattened fixed-point problem: ``fn`` maps (B, n) to (B, n).

    ``differentiable`` is True while the loop is recorded for a gradient (``grad="unroll"``); a
    solver's own inner loops must then be differentiable too (:meth:`Solver.inner_loop`).
    """

    backend: Backend
    fn: Callable[[Any], Any]
    batch: int
    n: int
    dtype: Any
    differentiable: bool = False


class BindableSolver:
    """What ``deqcore.solve(f, x, solver=...)`` accepts besides a registered name.

    An object with a ``name`` (reported as ``Solution.solver``) and :meth:`bind`, which returns
    the :class:`Solver` that runs one solve, given the backend, the structure of the state and a
    flat array whose dtype and device the solver's arrays take. :meth:`initial_state` may supply
    ``z0`` when the caller gives none (None: zeros). Every :class:`Solver` instance is bindable
    (``solve(f, x, solver=Anderson(memory=8))``), and so is every :class:`Hypersolver`.
    """

    name: ClassVar[str]

    def bind(self, backend: Any, structure: Structure, like: Any, *, max_iter: int) -> Solver:
        """The solver for one solve of at most ``max_iter`` steps."""
        raise NotImplementedError

    def initial_state(self, backend: Any, x: Any, like: Any) -> Any:
        """The first guess for ``x`` with the state's structure, or None for zeros."""
        return None


class Solver(Configurable, BindableSolver):
    """Base of the solvers. Subclasses are final and set ``name`` and their options.

    Options are :class:`deqcore.extend.Option` class attributes (``memory = Option(5, "...", check)``):
    the constructor validates them (``Anderson(memory=8)``; unknown names are a ``TypeError``,
    bad values a ``ValueError``). ``max_iter`` is the step budget; ``deqcore.solve`` sets it on a
    copy (:meth:`bind`), so an instance can be passed to many solves.

    The loop calls ``init`` once, then ``step`` and ``commit`` once per iteration. ``step``
    must leave inactive samples where they are (``z_new == z`` for them); ``commit`` updates the
    memory of the samples in ``keep`` and may write the others' too (Anderson does), since a
    stopped sample's iterate never moves again.
    """

    kind = "solver"
    also_valid = COMMON_OPTIONS

    def __init__(self, *, max_iter: int | None = None, **options: Any) -> None:
        super().__init__(**options)
        self.max_iter = max_iter

    def bind(self, backend: Any, structure: Structure, like: Any, *, max_iter: int) -> Solver:
        bound = copy.copy(self)
        bound.max_iter = max_iter
        return bound

    @property
    def budget(self) -> int:
        """``max_iter``, which sizing decisions need (``ValueError`` while it is unset)."""
        if self.max_iter is None:
            raise ValueError(f"solver {getattr(self, 'name', type(self).__name__)!r}: max_iter is not set; "
                             "pass the solver to "
                             "deqcore.solve, or construct it with max_iter=")
        return self.max_iter

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
        at most ``c1`` steps with memory ``c1``, then calls :meth:`grow` and runs on up to step
        ``c2``, and so on; the last stage runs to ``max_iter``. ``init`` allocates ``c1``. A stage
        never runs more steps than its capacity, so a solver writing one slot per step never
        wraps early.
        """
        return []

    def grow(self, problem: Problem, state: Any, capacity: int) -> Any:
        """Enlarge the solver's memory to ``capacity`` between loop stages."""
        return state

    @staticmethod
    def inner_loop(problem: Problem) -> Callable[..., Any]:
        """The loop for a solver's inner iterations (a line search): ``backend.while_loop``, or
        ``backend.differentiable_loop`` while the solve is recorded for a gradient (a
        ``while_loop`` would cut the gradient on torch and cannot be reverse-differentiated on
        JAX). Both take ``(cond, body, state, max_steps)``."""
        backend = problem.backend
        return backend.differentiable_loop if problem.differentiable else backend.while_loop

    def iterate(self, problem: Problem, state: Any) -> tuple[Any, Any] | None:
        """The latest iterate and its f-value, (B, n) each (a frozen sample's final ones), or None.

        Read once after the loop to tell a residual norm that overflowed the dtype from an ``f``
        that produced NaN/Inf. The default returns ``state.z`` and ``state.fz`` when the state
        has them; a solver without them returns None and such samples stay ``NONFINITE``.
        """
        z, fz = getattr(state, "z", None), getattr(state, "fz", None)
        return None if z is None or fz is None else (z, fz)

    def final_state(self, problem: Problem, state: Any) -> Any:
        """The state reported as ``Solution.solver_state`` (for example memory trimmed to the
        slots in use where shapes are dynamic); the default is the loop's final state."""
        return state


class Hypersolver(BindableSolver):
    """Base of learned solvers: pass an instance as ``deqcore.solve(f, x, solver=hs)``.

    A hypersolver holds its trained weights (NumPy, framework-neutral) and turns them into a
    :class:`Solver` for one solve with :meth:`bind`; ``deqcore.solve`` then runs it in the
    same loop as the classic solvers, so the :class:`deqcore.Solution`, the stop tests and every
    gradient mode but GDEQ (which needs Broyden's inverse-Jacobian estimate) work unchanged.
    ``params`` (framework arrays, for training) replace the stored weights in :meth:`bind` and
    :meth:`initial_state`. Subclasses register through the ``deqcore_register_hypersolvers`` hook.
    """

    params: dict[str, np.ndarray]

    def bind(self, backend: Any, structure: Structure, like: Any, *, max_iter: int,
             params: Mapping[str, Any] | None = None) -> Solver:
        raise NotImplementedError

    def initial_state(self, backend: Any, x: Any, like: Any, params: Mapping[str, Any] | None = None) -> Any:
        raise NotImplementedError


def select_rows(xp: Any, mask: Any, new: Any, old: Any) -> Any:
    """``new`` for samples where ``mask`` (B,) holds, ``old`` elsewhere; any trailing shape.

    A namespace may provide its own ``select_rows(mask, new, old)`` (deqcore's torch namespace
    does: on the CPU it returns ``new`` or ``old`` itself when the mask is uniform, instead of a
    select over the whole array), so the result may alias an input: never write to it in place.
    """
    fast = getattr(xp, "select_rows", None)
    if fast is not None:
        return fast(mask, new, old)
    shape = (mask.shape[0],) + (1,) * (new.ndim - 1)
    return xp.where(xp.reshape(mask, shape), new, old)
