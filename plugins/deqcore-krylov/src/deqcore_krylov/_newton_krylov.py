"""``newton_krylov``: inexact Newton on ``g(z) = f(z) - z`` with a matrix-free GMRES inner solve."""

from __future__ import annotations

from typing import Any, NamedTuple

from deqcore.extend import Option, Problem, Solver, select_rows, validators

from ._gmres import gmres


class NewtonKrylovState(NamedTuple):
    """The solver's state (``solution.solver_state``), per sample.

    ``z``, ``fz``: the current iterate and ``f(z)``. ``krylov_iterations`` (B,) counts the inner
    GMRES iterations each sample used over all Newton steps (each one is one f-evaluation);
    ``linear_residual`` (B,) is the relative residual ``||g - (I - J) p|| / ||g||`` of its latest
    inner solve (the GMRES estimate, with ``J`` the finite-difference Jacobian);
    ``backtracks`` (B,) counts its line-search trials.
    """

    z: Any
    fz: Any
    krylov_iterations: Any
    linear_residual: Any
    backtracks: Any


def _safe(xp: Any, d: Any) -> Any:
    return xp.where(d > 0, d, xp.ones_like(d))


class NewtonKrylov(Solver):
    """Inexact Newton-Krylov on ``g(z) = f(z) - z``, per sample.

    A step solves the Newton system ``(I - J) p = g`` (``J = df/dz`` at ``z``) by GMRES(``restart``)
    from ``p = 0`` until ``||g - (I - J) p|| <= forcing * ||g||`` or ``inner_max_iter`` iterations,
    and moves to ``z + p``. ``J v`` is never formed: it is the forward difference
    ``(f(z + h v) - f(z)) / h`` with ``h = fd_eps * (1 + ||z||)`` for the unit Krylov vector ``v``
    (``fd_eps`` defaults to the square root of the dtype's machine epsilon). Each sample has its own
    Krylov basis. A step costs one f-evaluation per Krylov iteration plus one at the new point
    (plus the line-search trials), all counted in ``nfe``; ``max_iter`` counts Newton steps.

    With ``line_search`` a sample whose full step does not decrease ``||g||`` enough
    (``||g(z + s p)|| <= (1 - 1e-4 s (1 - forcing)) ||g(z)||``) backtracks: ``s`` is the minimiser of a
    quadratic model of ``||g||^2`` kept in ``[0.1 s, 0.5 s]``, for at most ``ls_max_trials`` extra
    f-evaluations; the trial with the smallest ``||g||`` is taken.
    """

    name = "newton_krylov"
    restart = Option(10, "Krylov basis size r of the inner GMRES(r)", validators.positive_int)
    inner_max_iter = Option(20, "inner GMRES iterations (f-evaluations) per Newton step, "
                            "over restarts", validators.positive_int)
    forcing = Option(1e-3, "relative tolerance eta of the inner solve: ||g - (I-J)p|| <= "
                     "eta ||g||", validators.open_unit_interval)
    fd_eps: Option[float | None] = Option(None, "finite-difference step factor; None: sqrt(machine epsilon)",
                                          validators.optional(validators.positive_float))
    line_search = Option(False, "backtrack on ||f(z) - z|| when a step does not decrease it",
                         validators.boolean)
    ls_max_trials = Option(3, "extra f-evaluations the line search may spend per step",
                           validators.positive_int)

    def init(self, problem: Problem, z0: Any, fz0: Any) -> NewtonKrylovState:
        xp = problem.backend.xp
        count = xp.astype(xp.zeros_like(z0[:, 0]), xp.int32)
        return NewtonKrylovState(z0, fz0, count, xp.zeros_like(z0[:, 0]), count)

    def step(self, problem: Problem, state: NewtonKrylovState, active: Any):
        backend = problem.backend
        xp = backend.xp
        z, fz = state.z, state.fz
        g = fz - z
        eps = self.fd_eps if self.fd_eps is not None else float(xp.finfo(z.dtype).eps) ** 0.5
        h = (eps * (1.0 + xp.linalg.vector_norm(z, axis=-1)))[:, None]

        def matvec(v: Any) -> Any:  # (I - J) v, J v by a forward difference of f
            return v - (problem.fn(z + h * v) - fz) / h

        inner = gmres(backend, matvec, g, restart=self.restart, max_iter=self.inner_max_iter,
                      rtol=self.forcing, active=active)
        z1 = select_rows(xp, active, z + inner.x, z)
        fz1 = problem.fn(z1)
        nfe = inner.matvecs + 1
        backtracks = state.backtracks
        if self.line_search:
            z1, fz1, trials, count = self._backtrack(problem, z, inner.x, g, z1, fz1, active)
            nfe = nfe + trials
            backtracks = backtracks + count
        gnorm = xp.linalg.vector_norm(g, axis=-1)
        state = state._replace(
            krylov_iterations=state.krylov_iterations + inner.iterations,
            linear_residual=xp.where(active, inner.residual / _safe(xp, gnorm), state.linear_residual),
            backtracks=backtracks,
        )
        return z1, fz1, state, nfe

    def _backtrack(self, problem: Problem, z: Any, p: Any, g: Any, z1: Any, fz1: Any,
                   active: Any) -> tuple[Any, Any, Any, Any]:
        backend = problem.backend
        xp = backend.xp
        slope = 1e-4 * (1.0 - self.forcing)
        phi0 = xp.linalg.vector_norm(g, axis=-1)
        phi1 = xp.linalg.vector_norm(fz1 - z1, axis=-1)
        inf = xp.full_like(phi1, float("inf"))
        pending = active & ~(phi1 <= (1.0 - slope) * phi0)
        ones = xp.ones_like(phi0)
        count = xp.astype(xp.zeros_like(phi0), xp.int32)

        def cond(ls: tuple[Any, ...]) -> Any:
            return xp.any(ls[5]) & (ls[6] < self.ls_max_trials)

        def body(ls: tuple[Any, ...]) -> tuple[Any, ...]:
            z_best, fz_best, phi_best, s, phi_s, pending, trials, count = ls
            # minimiser of the quadratic through ||g(0)||^2 (slope -2 ||g(0)||^2 along a Newton
            # direction) and ||g(s)||^2, kept in [0.1 s, 0.5 s]
            q0 = phi0 * phi0
            denom = phi_s * phi_s - q0 + 2.0 * q0 * s
            s_q = xp.where(denom > 0, q0 * s * s / _safe(xp, denom), 0.5 * s)
            s_new = xp.minimum(xp.maximum(s_q, 0.1 * s), 0.5 * s)
            z_try = select_rows(xp, pending, z + s_new[:, None] * p, z)
            fz_try = problem.fn(z_try)
            phi = xp.linalg.vector_norm(fz_try - z_try, axis=-1)
            better = pending & (phi < phi_best)
            z_best = select_rows(xp, better, z_try, z_best)
            fz_best = select_rows(xp, better, fz_try, fz_best)
            phi_best = xp.where(better, phi, phi_best)
            ok = phi <= (1.0 - slope * s_new) * phi0
            s = xp.where(pending, s_new, s)
            phi_s = xp.where(pending, phi, phi_s)
            count = count + xp.astype(pending, xp.int32)
            return z_best, fz_best, phi_best, s, phi_s, pending & ~ok, trials + 1, count

        start = (z1, fz1, xp.where(xp.isfinite(phi1), phi1, inf), ones, phi1, pending, 0, count)
        z_out, fz_out, _, _, _, _, trials, count = backend.while_loop(cond, body, start)
        return z_out, fz_out, trials, count

    def commit(self, problem: Problem, state: NewtonKrylovState, z_new: Any, fz_new: Any,
               g_new: Any, active: Any, keep: Any) -> NewtonKrylovState:
        # step left the inactive samples where they were, so z_new is the iterate of every sample
        return state._replace(z=z_new, fz=fz_new)
