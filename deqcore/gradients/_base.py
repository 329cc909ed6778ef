"""The gradient-mode abstraction: how ``deqcore.solve`` makes ``z*`` differentiable.

The forward solve records no graph. A gradient mode then attaches a gradient path to ``z*``:
most modes turn the incoming cotangent ``g`` into an adjoint ``u ~ g (I - J)^-1`` (J = df/dz at
``z*``) and let one VJP of ``f`` at ``z*`` carry ``u`` to the parameters and to ``x``
(:class:`AdjointMode`, built on :meth:`Backend.attach_adjoint`); others differentiate through a
few extra evaluations of ``f`` (UPG). Every mode works on the flat (B, n) state, per sample.

Higher-order derivatives: only modes that declare :attr:`GradientMode.exact_higher_order`
(``unroll``, ``implicit``) may be differentiated twice. ``implicit`` hands the backend a linear
solver (:meth:`AdjointMode.linear_solver`) with which :meth:`Backend.attach_adjoint` solves the
further linear fixed-point problems a derivative of its gradient needs. Every other mode gives
its first derivative as usual, and a derivative of that gradient raises :class:`HigherOrderError`
(the backend's :meth:`Backend.first_order_only` and :meth:`Backend.attach_adjoint` put the check
on the gradient path, so it fires only when a second derivative is actually taken).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar, NamedTuple

import numpy as np

from .._options import Configurable
from .._protocol import Backend
from ..solvers._base import Problem


class HigherOrderError(NotImplementedError):
    """A gradient mode whose first derivative is approximate was differentiated twice.

    Raised when a derivative of a gradient reaches a mode that does not declare
    :attr:`GradientMode.exact_higher_order`: on torch, a second ``backward`` or
    ``torch.autograd.grad`` of a gradient taken with ``create_graph=True``; on JAX, ``jax.grad`` of
    ``jax.grad``, ``jax.hessian``, ``jax.jacfwd`` of ``jax.grad`` (at trace time, also under
    ``jax.jit``). On torch also forward-mode differentiation through a mode that is not built on
    :meth:`Backend.attach_adjoint` (``torch.func.jvp``, ``torch.func.hessian`` through ``upg``).
    Taking the first derivative with ``create_graph=True`` alone does not raise.
    """


def higher_order_error(mode: str | None, backend: str | None = None,
                       why: str | None = None) -> Callable[[], HigherOrderError]:
    """The error for a second derivative through gradient mode ``mode`` (None: a mode built on
    :meth:`Backend.attach_adjoint` directly), as a factory for the backends' checks. With
    ``backend``: the mode is exact to every order but that backend's ``attach_adjoint`` cannot
    differentiate its adjoint again. ``why`` replaces the default reason (an approximate first
    derivative) for a mode whose first derivative is exact but not differentiable again."""
    what = "a gradient built on Backend.attach_adjoint" if mode is None else f"gradient mode {mode!r}"
    how = ("(a second backward through a gradient taken with create_graph=True; jax.grad of "
           "jax.grad, jax.hessian, jax.jacfwd of jax.grad) or in forward mode")

    def make() -> HigherOrderError:
        return HigherOrderError(message())

    def message() -> str:
        if backend is not None:
            return (f"deqcore: {what} is exact to every order, but backend {backend!r} gives first "
                    f"derivatives of it only (its attach_adjoint does not differentiate the adjoint "
                    f"solve again), and it was differentiated twice {how}. Solve on a backend that "
                    f"does (torch, jax), or with grad='unroll'")
        reason = why or ("Its first derivative is approximate (its backward pass holds z* constant, or "
                         "stands in for the exact adjoint), so a derivative of it would miss how z* "
                         "moves with the parameters and be wrong")
        return (f"deqcore: {what} gives first derivatives only, and was differentiated twice {how}. "
                f"{reason}. The modes exact to every order are "
                f"{', '.join(repr(m) for m in exact_modes())}: solve with grad='implicit' (a tight "
                f"grad_options tol) or grad='unroll' (it differentiates the forward iterations; "
                f"memory grows with them), or take finite differences of first-order gradients")

    return make


def exact_modes() -> list[str]:
    """The names of the gradient mode classes defined so far (built-in and plugin modes, which
    are imported when they register) that declare :attr:`GradientMode.exact_higher_order`."""
    found, stack = set(), [GradientMode]
    while stack:
        cls = stack.pop()
        stack.extend(cls.__subclasses__())
        if cls.exact_higher_order and isinstance(getattr(cls, "name", None), str):
            found.add(cls.name)
    return sorted(found)


class BackwardReport:
    """What the backward passes of one solution did, filled in when a backward pass runs.

    Modes that solve for the adjoint (``implicit``) record, for the latest backward pass: the
    per-sample ``converged`` flags, the stop ``residual`` reached, the per-sample
    ``iterations`` and the ``vjps`` (batched VJPs with respect to ``z``). ``calls`` counts the
    backward passes. Before any backward pass ran, the arrays are None. Under ``jax.jit`` the
    report is filled when the compiled computation runs.
    """

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.calls = 0
        self.converged: np.ndarray | None = None
        self.residual: np.ndarray | None = None
        self.iterations: np.ndarray | None = None
        self.vjps: int | None = None

    def record(self, converged: Any, residual: Any, iterations: Any, vjps: Any) -> None:
        self.calls += 1
        self.converged = np.asarray(converged, dtype=bool)
        self.residual = np.asarray(residual)
        self.iterations = np.asarray(iterations)
        self.vjps = int(np.max(vjps))

    def summary(self) -> str:
        if self.converged is None or self.residual is None:
            return f"{self.mode} backward: no backward-solve statistics (not an iterative mode)"
        return (f"{self.mode} backward: {int(self.converged.sum())}/{self.converged.size} converged, "
                f"max residual {float(np.max(self.residual, initial=0.0)):.3e}, vjps {self.vjps}, "
                f"passes {self.calls}")

    def __repr__(self) -> str:
        return f"BackwardReport({self.summary()})"


class BackwardProblem(NamedTuple):
    """What a gradient mode gets: the flat layer and the forward solve's outcome.

    ``f(zf, x)`` maps the flat (B, n) state to the flat next state; ``z_star`` is the flat fixed
    point (no gradient attached); ``solver_state`` is the forward solver's final state and
    ``solver`` its name; ``report`` is where backward statistics go. ``iterations`` (B,) are the
    steps each sample took and ``best_step`` (B,) the step whose iterate ``z_star`` is, per sample
    (it may precede the last one: the loop returns the lowest-residual iterate); None where a
    caller does not supply them.
    """

    backend: Backend
    f: Callable[[Any, Any], Any]
    x: Any
    z_star: Any
    solver_state: Any
    solver: str
    report: BackwardReport
    problem: Problem
    iterations: Any = None
    best_step: Any = None


class GradientMode(Configurable):
    """Base of gradient modes. Subclasses set ``name``, declare their options as
    :class:`deqcore.extend.Option` class attributes and implement :meth:`attach`.

    The constructor takes the options as keywords and validates them. :meth:`check` rejects forward
    solvers the mode cannot work with, before anything is solved.

    ``exact_higher_order`` declares whether the gradient path this mode attaches can itself be
    differentiated exactly (second derivatives, Hessian-vector products). ``unroll`` can: it
    differentiates the forward iterations, which depend on the parameters. ``implicit`` can: its
    adjoint solves the exact linear system, and the derivatives of that system are further linear
    fixed-point problems (an :class:`AdjointMode` that declares it supplies their solver,
    :meth:`AdjointMode.linear_solver`). ``jfb``, ``npg``, ``upg`` and ``gdeq`` cannot: their
    adjoint stands in for the exact one (or their steps start from ``stop_gradient(z*)``), so a
    derivative of their gradient would be a derivative of an approximation; for those
    (False, the default) :meth:`Backend.attach_adjoint` checks its own backward (every
    :class:`AdjointMode`), and ``deqcore.solve`` passes the result of any other mode's
    :meth:`attach` through :meth:`Backend.first_order_only`:
    the first derivative is unchanged, a second one raises :class:`HigherOrderError`.
    """

    name: ClassVar[str]
    kind = "gradient mode"
    #: True for modes that differentiate through the forward solve itself (``unroll``): the
    #: forward then runs with gradient recording and :meth:`attach` is not called.
    unrolled: ClassVar[bool] = False
    #: True for modes whose gradient is exact to every order (``unroll``, ``implicit``); False:
    #: first derivatives only, a second derivative raises :class:`HigherOrderError`.
    exact_higher_order: ClassVar[bool] = False

    def check(self, solver: str) -> None:
        """Raise ``ValueError`` if this mode cannot follow a forward solve by ``solver``."""

    def attach(self, bp: BackwardProblem) -> Any:
        """Return the flat ``z*`` with this mode's gradient path attached (same value)."""
        raise NotImplementedError


class AdjointMode(GradientMode):
    """A mode defined by its adjoint ``u = adjoint(g)`` and one VJP of ``f`` at ``z*``.

    :meth:`saved` names the arrays of the forward solve the adjoint needs (they are kept for the
    backward pass and counted as such); :meth:`adjoint` gets them back, with the backend and the
    report, and must not use any other array of the forward pass. The adjoint is computed without
    recording a graph. A mode that does not declare ``exact_higher_order`` gives first derivatives
    only: :meth:`Backend.attach_adjoint` raises :class:`HigherOrderError`, naming the mode, when
    its gradient is differentiated again. A mode that declares it (its adjoint is the exact
    ``g (I - J)^-1``, however it is computed) implements :meth:`linear_solver`, which the backend
    uses for the linear systems of higher derivatives.
    """

    def saved(self, bp: BackwardProblem) -> tuple[Any, ...]:
        return ()

    def adjoint(self, ctx: AdjointContext, g: Any, vjp_z: Callable[[Any], Any],
                saved: tuple[Any, ...]) -> Any:
        raise NotImplementedError

    def linear_solver(self, ctx: AdjointContext) -> Callable[[Any, Any], Any]:
        """``linear_solve(b, op)``: the ``u`` with ``u = b + op(u)`` per sample, for a linear
        ``op`` on (B, n) arrays (``v -> v J`` or ``v -> J v`` at ``z*``). Modes that declare
        ``exact_higher_order`` implement it; the backend calls it for every linear system of a
        higher derivative, never for the first derivative."""
        raise NotImplementedError(f"gradient mode {self.name!r} declares exact_higher_order but does "
                                  f"not implement AdjointMode.linear_solver")

    def attach(self, bp: BackwardProblem) -> Any:
        ctx = AdjointContext(bp.backend, bp.report, bp.problem.batch, bp.problem.n, bp.problem.dtype)

        def adjoint(g: Any, vjp_z: Callable[[Any], Any], *saved: Any) -> Any:
            return self.adjoint(ctx, g, vjp_z, saved)

        # linear_solve only where it applies: a backend written before it existed still runs the
        # first-order modes
        exact = {"linear_solve": self.linear_solver(ctx)} if self.exact_higher_order else {}
        return bp.backend.attach_adjoint(
            bp.f, bp.z_star, bp.x, adjoint, saved=self.saved(bp),
            higher_order_error=higher_order_error(self.name, bp.backend.name if exact else None), **exact)


class AdjointContext(NamedTuple):
    """The static facts an adjoint may use: the backend, the report, and the problem's shape."""

    backend: Backend
    report: BackwardReport
    batch: int
    n: int
    dtype: Any


class BackwardWarning(UserWarning):
    """A backward solve did not converge; the gradient is approximate."""
