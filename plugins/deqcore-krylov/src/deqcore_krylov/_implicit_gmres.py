"""``implicit_gmres``: the exact adjoint ``u = g (I - J)^-1`` by batched GMRES on VJPs."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import deqcore
from deqcore.extend import AdjointContext, AdjointMode, Option, validators

from ._gmres import gmres


class ImplicitGMRES(AdjointMode):
    """Implicit differentiation with the adjoint equation solved by GMRES.

    The adjoint ``u`` solves ``u (I - J) = g`` (``J = df/dz`` at ``z*``), that is
    ``u - vjp_z(u) = g`` in row form: a linear system whose operator costs one VJP with respect
    to ``z`` per Krylov vector. Every sample has its own Krylov basis (GMRES(``restart``) from
    ``u = 0``, at most ``max_iter`` Krylov iterations in all). A sample converges when its true
    relative residual ``||g - u (I - J)|| / ||g||`` is at most ``tol``; the residual is recomputed
    after each restart cycle (one more VJP), and the cycle restarts from it.

    Unlike a fixed-point iteration on ``u = g + u J`` (deqcore's ``implicit`` with a plain
    backward solver), GMRES does not need ``J``'s spectral radius below 1: it converges whenever
    ``I - J`` is regular, in at most ``n`` iterations in exact arithmetic, and typically in far
    fewer when the spectrum of ``J`` is clustered.

    Statistics of the latest backward pass go to ``solution.backward``; a sample that does not
    converge gives a :class:`deqcore.BackwardWarning` (``on_fail="warn"``), a
    :class:`deqcore.ConvergenceError` (``"raise"``) or nothing (``"ignore"``).
    """

    name = "implicit_gmres"
    tol = Option(1e-6, "relative residual ||g - u(I - J)|| / ||g|| to reach",
                 validators.positive_float)
    restart = Option(20, "Krylov basis size r of GMRES(r)", validators.positive_int)
    max_iter = Option(100, "maximum Krylov iterations (VJPs) over all restarts",
                      validators.positive_int)
    on_fail = Option("warn", "when a sample does not converge: 'warn', 'raise', 'ignore'",
                     validators.one_of("warn", "raise", "ignore"))

    def adjoint(self, ctx: AdjointContext, g: Any, vjp_z: Callable[[Any], Any],
                saved: tuple[Any, ...]) -> Any:
        be = ctx.backend
        xp = be.xp

        def matvec(v: Any) -> Any:  # the row form of v (I - J)
            return v - vjp_z(v)

        with be.no_grad():
            sol = gmres(be, matvec, g, restart=self.restart, max_iter=self.max_iter, rtol=self.tol,
                        true_residual=True)
            gnorm = xp.linalg.vector_norm(g, axis=-1)
            residual = sol.residual / xp.where(gnorm > 0, gnorm, xp.ones_like(gnorm))
        converged = residual <= self.tol
        vjps = sol.matvecs if be.is_array(sol.matvecs) else xp.asarray(sol.matvecs)
        be.host_callback(self._report(ctx), converged, residual, sol.iterations, vjps)
        if self.on_fail == "raise":
            be.host_check(~converged, self._error, residual)
        return sol.x

    def _report(self, ctx: AdjointContext) -> Callable[..., None]:
        def report(converged: Any, residual: Any, iterations: Any, vjps: Any) -> None:
            ctx.report.record(converged, residual, iterations, vjps)
            if self.on_fail == "warn" and not converged.all():
                warnings.warn(
                    f"implicit_gmres backward: {int((~converged).sum())} of {converged.size} samples did "
                    f"not reach rel tol {self.tol:g} in {self.max_iter} Krylov iterations (worst "
                    f"residual {float(residual.max()):.3e}); the gradient is approximate. Raise "
                    f"grad_options max_iter or restart, or loosen tol",
                    deqcore.BackwardWarning, stacklevel=2)

        return report

    def _error(self, failed: Any, residual: Any) -> Exception:
        return deqcore.ConvergenceError(
            f"implicit_gmres backward: {int(failed.sum())} of {failed.size} samples did not reach rel "
            f"tol {self.tol:g} in {self.max_iter} Krylov iterations (worst residual "
            f"{float(residual[failed].max()):.3e})")
