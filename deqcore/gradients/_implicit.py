from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

from .. import _options as opt
from .._loop import run
from .._options import Option
from .._results import ConvergenceError, Status
from ..solvers._base import Problem
from ._base import AdjointContext, AdjointMode, BackwardWarning


def _mapping(v: Any) -> str | None:
    return None if isinstance(v, Mapping) else "a dict of the backward solver's options"


class Implicit(AdjointMode):
    """Implicit differentiation: solve ``u = g + u J`` for the exact adjoint ``u = g (I - J)^-1``.

    The adjoint equation is a fixed-point problem in ``u`` (one VJP with respect to ``z`` per
    evaluation), solved per sample from ``u_0 = g`` by any registered forward solver with its own
    ``tol``/``max_iter`` and a relative stop test by default. The lowest-residual ``u`` is used.
    Memory: nothing beyond ``f``'s graph at ``z*``. When a sample's backward solve does not
    converge, ``on_fail`` decides: ``"warn"`` (a :class:`deqcore.BackwardWarning`), ``"raise"``
    (:class:`deqcore.ConvergenceError`) or ``"ignore"``. Statistics of the latest backward pass
    are in ``solution.backward``.

    Exact to every order: a derivative of its gradient (Hessian-vector products, ``jax.hessian``,
    ``create_graph=True``) is the implicit function theorem applied again; each further linear
    system (the tangent of ``z*``, ``(I - J) dz = df``, and that of the adjoint) is solved by
    :meth:`solve_linear` with the same options, and its statistics replace the report's.
    """

    name = "implicit"
    exact_higher_order = True
    solver = Option("anderson", "backward solver (any registered solver)", lambda v: None
                    if isinstance(v, str) else "a solver name")
    tol = Option(1e-6, "stop tolerance of the backward solve", opt.positive_float)
    max_iter = Option(100, "maximum backward solver steps", opt.positive_int)
    stop_mode = Option("rel", "'rel' (||r|| / ||g + uJ||) or 'abs' residual",
                       opt.one_of("rel", "abs"))
    solver_options: Option[Mapping[str, Any]] = Option({}, "options of the backward solver (memory, "
                                                       "beta, ...)", _mapping)
    on_fail = Option("warn", "when the backward solve does not converge: 'warn', 'raise', "
                     "'ignore'", opt.one_of("warn", "raise", "ignore"))

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        from .._registry import registry  # the registry imports the gradient modes' base

        cls = registry().get("solvers", self.solver).obj
        try:
            self._solver = cls(max_iter=self.max_iter, **self.solver_options)
        except (TypeError, ValueError) as error:
            raise type(error)(f"implicit backward {error}") from None

    def adjoint(self, ctx: AdjointContext, g: Any, vjp_z: Any, saved: tuple[Any, ...]) -> Any:
        return self.solve_linear(ctx, g, vjp_z)

    def linear_solver(self, ctx: AdjointContext) -> Any:
        return lambda b, op: self.solve_linear(ctx, b, op)

    def solve_linear(self, ctx: AdjointContext, b: Any, op: Any, *, u0: Any = None,
                     solver: Any = None) -> Any:
        """Solve ``u = b + op(u)`` per sample for a linear ``op`` on (B, n) arrays.

        From ``u0`` (default ``b``) with this mode's ``tol``, ``max_iter`` and ``stop_mode``, by its
        backward solver or by ``solver`` (a bound :class:`deqcore.extend.Solver`). The backward
        report is filled and ``on_fail`` applied; the lowest-residual ``u`` is returned.
        """
        be = ctx.backend
        problem = Problem(be, lambda u: b + op(u), ctx.batch, ctx.n, ctx.dtype)
        with be.no_grad():
            state, status = run(problem, self._solver if solver is None else solver,
                                b if u0 is None else u0, tol=self.tol, max_iter=self.max_iter,
                                stop_mode=self.stop_mode, divergence=None, trace=0)
        converged = status == int(Status.CONVERGED)
        residual = state.best[1] if self.stop_mode == "rel" else state.best[0]
        nfe = be.xp.asarray(state.nfe) if not be.is_array(state.nfe) else state.nfe
        be.host_callback(self._report(ctx), converged, residual, state.iterations, nfe)
        if self.on_fail == "raise":
            be.host_check(~converged, self._error, residual)
        return state.best_z

    def _report(self, ctx: AdjointContext) -> Any:
        def report(converged: Any, residual: Any, iterations: Any, vjps: Any) -> None:
            ctx.report.record(converged, residual, iterations, vjps)
            if self.on_fail == "warn" and not converged.all():
                warnings.warn(
                    f"implicit backward ({self.solver}): {int((~converged).sum())} of "
                    f"{converged.size} samples did not reach {self.stop_mode} tol {self.tol:g} in "
                    f"{self.max_iter} steps (worst residual {float(residual.max()):.3e}); the "
                    f"gradient is approximate. Raise grad_options max_iter or loosen tol",
                    BackwardWarning, stacklevel=2)

        return report

    def _error(self, failed: Any, residual: Any) -> Exception:
        return ConvergenceError(
            f"implicit backward ({self.solver}): {int(failed.sum())} of {failed.size} samples did "
            f"not reach {self.stop_mode} tol {self.tol:g} in {self.max_iter} steps (worst residual "
            f"{float(residual[failed].max()):.3e})")
