from __future__ import annotations

from typing import Any, NamedTuple

import array_api_compat

from .._loop import Problem, Solver, select_rows
from .._options import Option, boolean, nonnegative_int, optional, positive_int


class BroydenState(NamedTuple):
    """Broyden's low-rank inverse-Jacobian estimate ``B = -I + sum_i U_i V_i^T`` (U, V: (B, m, n)).

    ``B`` approximates the inverse Jacobian of ``g(z) = f(z) - z``. ``Bg`` caches ``B g(z)`` for
    the current iterate (the next direction is ``-Bg``), so a step costs four low-rank products
    instead of six; ``g = f(z) - z`` is kept so it is computed once per step. ``count`` pairs have
    been written (slot ``count % m`` is next); ``breakdowns`` (B,) counts updates skipped because
    the secant denominator was zero or the update non-finite.
    """

    z: Any
    fz: Any
    g: Any
    Bg: Any
    U: Any
    V: Any
    count: Any
    breakdowns: Any


def apply_inverse(xp: Any, U: Any, V: Any, y: Any) -> Any:
    """``B y = -y + sum_i U_i (V_i . y)`` per sample."""
    coeff = xp.matmul(y[:, None, :], xp.matrix_transpose(V))
    return xp.matmul(coeff, U)[:, 0] - y


def apply_inverse_transpose(xp: Any, U: Any, V: Any, y: Any) -> Any:
    """``y^T B = -y + sum_i V_i (U_i . y)`` per sample (GDEQ's ``-B^T g`` is its negation)."""
    coeff = xp.matmul(y[:, None, :], xp.matrix_transpose(U))
    return xp.matmul(coeff, V)[:, 0] - y


class Broyden(Solver):
    """"Good" Broyden with a low-rank inverse-Jacobian ring memory (locuslab style).

    Starts from ``B_0 = -I`` (so step 1 is ``z_1 = f(z_0)``), steps ``z <- z - s B g(z)``, and after
    each step that leaves a sample unconverged stores the rank-one update that makes
    ``B dg = dz`` (the secant condition) in slot ``count % memory``, overwriting the oldest pair
    once the ring is full. The pair of the converging step is not stored. Optional per-sample
    backtracking Armijo line search on ``||g||^2`` with quadratic interpolation.
    """

    name = "broyden"
    options = {
        "memory": Option(None, "stored rank-one pairs m; None keeps all (m = max_iter)",
                         optional(nonnegative_int)),
        "line_search": Option(False, "backtracking Armijo line search on ||f(z) - z||^2", boolean),
        "ls_max_trials": Option(3, "extra f-evaluations the line search may spend per step",
                                positive_int),
    }
    memory: int | None
    line_search: bool
    ls_max_trials: int

    def __init__(self, *, max_iter: int, **options: Any) -> None:
        super().__init__(max_iter=max_iter, **options)
        self.m = max_iter if self.memory is None else self.memory

    def capacities(self, backend: Any) -> list[int]:
        # JAX multiplies the whole fixed-shape ring every step; while it fills, run in stages of
        # doubling capacity so a step costs about the filled slots, not m (torch skips empty
        # slots through active_prefix and needs one stage).
        if not backend.static_shapes or self.m <= 16 or self.max_iter <= 16:
            return []
        caps = [8]
        while caps[-1] * 2 < min(self.m, self.max_iter):
            caps.append(caps[-1] * 2)
        return caps + [self.m]

    def _ring(self, xp: Any, like: Any, capacity: int) -> Any:
        return xp.zeros((like.shape[0], capacity, like.shape[1]), dtype=like.dtype,
                        device=array_api_compat.device(like))

    def init(self, problem: Problem, z0: Any, fz0: Any) -> BroydenState:
        xp = problem.backend.xp
        caps = self.capacities(problem.backend)
        ring = self._ring(xp, z0, caps[0] if caps else self.m)
        breakdowns = xp.astype(xp.zeros_like(z0[:, 0]), xp.int32)
        g0 = fz0 - z0
        return BroydenState(z0, fz0, g0, -g0, ring, xp.zeros_like(ring), 0, breakdowns)

    def grow(self, problem: Problem, state: BroydenState, capacity: int) -> BroydenState:
        xp = problem.backend.xp
        extra = capacity - state.U.shape[1]
        pad = self._ring(xp, state.z, extra)
        return state._replace(U=xp.concat([state.U, pad], axis=1), V=xp.concat([state.V, pad], axis=1))

    def step(self, problem: Problem, state: BroydenState, active: Any):
        xp = problem.backend.xp
        z = select_rows(xp, active, state.z - state.Bg, state.z)
        fz = problem.fn(z)
        if not self.line_search:
            return z, fz, state, 1
        z, fz, nfe = self._line_search(problem, state, -state.Bg, state.g, z, fz, active)
        return z, fz, state, nfe

    def _line_search(self, problem, state, p, g, z1, fz1, active):
        backend = problem.backend
        xp = backend.xp
        c1, amin = 1e-4, 1e-2
        phi0 = xp.sum(g * g, axis=-1)

        def quadratic(phi, s):
            denom = 2.0 * (phi - phi0 + phi0 * s)
            return xp.where(denom > 0, phi0 * s * s / denom, xp.zeros_like(s))

        def armijo(phi, s):
            return phi <= phi0 * (1.0 - c1 * s)

        phi1 = xp.sum((fz1 - z1) ** 2, axis=-1)
        s = xp.ones_like(phi0)
        pending = active & ~armijo(phi1, s)
        s = quadratic(phi1, s)
        pending = pending & (s >= amin)

        def cond(ls):
            return (ls[4] < self.ls_max_trials) & xp.any(ls[3])

        def body(ls):
            z_out, fz_out, s, pending, trials = ls
            z_try = select_rows(xp, pending, state.z + s[:, None] * p, state.z)
            fz_try = problem.fn(z_try)
            phi = xp.sum((fz_try - z_try) ** 2, axis=-1)
            ok = pending & armijo(phi, s)
            z_out = select_rows(xp, ok, z_try, z_out)
            fz_out = select_rows(xp, ok, fz_try, fz_out)
            s_next = quadratic(phi, s)
            pending = pending & ~ok & (s_next >= amin)
            return z_out, fz_out, s_next, pending, trials + 1

        z_out, fz_out, _, _, trials = backend.while_loop(cond, body, (z1, fz1, s, pending, 0))
        return z_out, fz_out, 1 + trials

    def commit(self, problem, state: BroydenState, z_new, fz_new, g_new, active, keep):
        if self.m == 0:
            return state._replace(z=z_new, fz=fz_new, g=g_new, Bg=-g_new)
        backend = problem.backend
        xp = backend.xp
        U = backend.active_prefix(state.U, state.count, axis=1)
        V = backend.active_prefix(state.V, state.count, axis=1)
        dz = z_new - state.z
        dg = g_new - state.g
        Bg_new = apply_inverse(xp, U, V, g_new)
        v = apply_inverse_transpose(xp, U, V, dz)
        # A non-finite v makes the denominator NaN, so one scalar test per sample suffices
        # (r * 0 == 0 holds exactly for finite r). The division sees 1 where the update is skipped,
        # so that a recorded (unroll) backward never meets 0 * inf.
        den = xp.sum(v * dg, axis=-1, keepdims=True)
        usable = (1.0 / den) * 0.0 == 0.0
        u = (dz - Bg_new + state.Bg) / xp.where(usable, den, xp.ones_like(den))
        write = keep & usable[:, 0]
        slot = state.count % self.m
        u_old, v_old = state.U[:, slot], state.V[:, slot]
        # B_new g_new = B g_new + u (v . g_new) - u_old (v_old . g_new) for the overwritten pair
        change = u * xp.sum(v * g_new, axis=-1, keepdims=True) - u_old * xp.sum(
            v_old * g_new, axis=-1, keepdims=True)
        Bg_next = select_rows(xp, write, Bg_new + change, Bg_new)
        U_all = backend.set_index(state.U, slot, select_rows(xp, write, u, u_old), axis=1)
        V_all = backend.set_index(state.V, slot, select_rows(xp, write, v, v_old), axis=1)
        breakdowns = state.breakdowns + (keep & ~usable[:, 0])
        return BroydenState(z_new, fz_new, g_new, Bg_next, U_all, V_all, state.count + 1, breakdowns)
