from __future__ import annotations

from typing import Any, NamedTuple

import array_api_compat

from .._batched_linalg import pair_combine, pair_dots, ring_combine, ring_dots, statistics_dtype
from .._options import Option, boolean, nonnegative_int, optional, positive_int
from ._base import Problem, Solver, select_rows


class BroydenState(NamedTuple):
    """Broyden's low-rank inverse-Jacobian estimate ``B = -I + sum_i U_i V_i^T``.

    ``B`` approximates the inverse Jacobian of ``g(z) = f(z) - z``. The pairs live in one ring
    ``UV`` (B, 2, m, n), ``U = UV[:, 0]`` and ``V = UV[:, 1]`` (B, m, n), multiplied by
    ``pair_dots``/``pair_combine`` (on XLA two products over the one buffer, on torch views of
    it) and updated in place with one write per step. ``Bg`` caches ``B g(z)`` for the current
    iterate (the next direction is ``-Bg``), so a step costs four low-rank products instead of
    six; ``g = f(z) - z`` is kept so it is computed once per step. ``count`` pairs have been
    written (slot ``count % m`` is next); ``breakdowns`` (B,) counts updates skipped because the
    secant denominator was zero or the update non-finite.
    """

    z: Any
    fz: Any
    g: Any
    Bg: Any
    UV: Any
    count: Any
    breakdowns: Any

    @property
    def U(self) -> Any:
        return self.UV[:, 0]

    @property
    def V(self) -> Any:
        return self.UV[:, 1]


def apply_inverse(xp: Any, U: Any, V: Any, y: Any) -> Any:
    """``B y = -y + sum_i U_i (V_i . y)`` per sample."""
    return ring_combine(xp, ring_dots(xp, V, y), U) - y


def apply_inverse_transpose(xp: Any, U: Any, V: Any, y: Any) -> Any:
    """``y^T B = -y + sum_i V_i (U_i . y)`` per sample (GDEQ's ``-B^T g`` is its negation)."""
    return ring_combine(xp, ring_dots(xp, U, y), V) - y


class Broyden(Solver):
    """"Good" Broyden with a low-rank inverse-Jacobian ring memory (locuslab style).

    Starts from ``B_0 = -I`` (so step 1 is ``z_1 = f(z_0)``), steps ``z <- z - s B g(z)``, and after
    each step that leaves a sample unconverged stores the rank-one update that makes
    ``B dg = dz`` (the secant condition, ``dz`` the step actually taken) in slot
    ``count % memory``, overwriting the oldest pair once the ring is full. The pair of the
    converging step is not stored. Optional per-sample backtracking Armijo line search on
    ``||g||^2`` with quadratic interpolation. The ring grows by need up to
    ``min(memory, max_iter)`` pairs (static shapes: 8, 16, 32, ...; dynamic: 64, 128, ...), so a
    solve that stops early never holds ``max_iter`` pairs. For half-precision states the update
    (secant denominator, ``u``, ``B g``) and the line search's ``||g||^2`` are computed in
    float32; the pairs are stored in the state's dtype, scaled to equal norms (``u v^T`` is
    unchanged), and a pair that still does not fit it is skipped as a breakdown.
    """

    name = "broyden"
    memory: Option[int | None] = Option(None, "stored rank-one pairs m; None keeps all (m = max_iter)",
                                        optional(nonnegative_int))
    line_search = Option(False, "backtracking Armijo line search on ||f(z) - z||^2", boolean)
    ls_max_trials = Option(3, "extra f-evaluations the line search may spend per step",
                           positive_int)

    @property
    def m(self) -> int:
        """The ring's size: at most ``max_iter`` pairs are ever stored (more would hold zeros)."""
        return self.budget if self.memory is None else min(self.memory, self.budget)

    def capacities(self, backend: Any) -> list[int]:
        return self._stages(backend, self.m)

    @staticmethod
    def _stages(backend: Any, m: int) -> list[int]:
        # Static shapes: a step multiplies the whole ring, so it starts at 8 pairs and doubles
        # between loop stages (a step costs about the filled slots). Dynamic shapes multiply a
        # prefix view whatever the capacity; there the stages only keep memory to the steps run.
        first = 8 if backend.static_shapes else 64
        if m <= 2 * first:
            return []
        caps = [first]
        while caps[-1] * 2 < m:
            caps.append(caps[-1] * 2)
        return caps + [m]

    def _ring(self, backend: Any, like: Any, capacity: int) -> Any:
        # Where shapes are dynamic the loop reads only the slots it has written (a prefix of
        # ``count`` slots, every one written for every sample when first used), so the ring
        # needs no zero fill; static shapes multiply unfilled slots, which must be zero.
        make = backend.xp.zeros if backend.static_shapes else backend.xp.empty
        return make((like.shape[0], 2, capacity, like.shape[1]), dtype=like.dtype,
                    device=array_api_compat.device(like))

    def init(self, problem: Problem, z0: Any, fz0: Any) -> BroydenState:
        backend = problem.backend
        xp = backend.xp
        if backend.static_shapes and 2 * self.m * z0.shape[0] * z0.shape[1] > 2**31:
            raise ValueError(
                f"deqcore.solve('broyden'): the ring of {self.m} rank-one pairs (memory="
                f"{self.memory!r}, max_iter={self.max_iter}) would hold {2 * self.m * z0.shape[0]} "
                f"x {z0.shape[1]} numbers; on backend {backend.name!r} shapes are static, so it "
                "is allocated in full. Pass memory= (for example memory=64)")
        caps = self.capacities(backend)
        wide = statistics_dtype(xp, z0.dtype)
        self._wide = None if wide == z0.dtype else wide  # None: sums in the state's dtype
        self._zero = xp.zeros((z0.shape[0], 2, z0.shape[1]), dtype=z0.dtype,
                              device=array_api_compat.device(z0))
        breakdowns = xp.zeros(z0.shape[0], dtype=xp.int32, device=array_api_compat.device(z0))
        g0 = fz0 - z0
        ring = self._ring(backend, z0, caps[0] if caps else self.m)
        return BroydenState(z0, fz0, g0, -g0, ring, 0, breakdowns)

    def grow(self, problem: Problem, state: BroydenState, capacity: int) -> BroydenState:
        pad = self._ring(problem.backend, state.z, capacity - state.UV.shape[2])
        return state._replace(UV=problem.backend.xp.concat([state.UV, pad], axis=2))

    def _wraps(self, backend: Any, state: BroydenState, count: Any) -> bool:
        # A stage below the full memory never wraps (it runs at most its capacity's steps), nor
        # does a ring of max_iter pairs. Where the count is traced, a slot that cannot hold an
        # older pair must not be read: XLA then copied the whole ring twice per step.
        if not backend.static_shapes:
            return count >= self.m
        return self.m < self.budget and state.UV.shape[2] == self.m

    def final_state(self, problem: Problem, state: BroydenState) -> BroydenState:
        used = problem.backend.active_prefix(state.UV, state.count, axis=2)
        if used.shape[2] < state.UV.shape[2]:
            # a prefix view would keep the whole ring's storage alive for as long as the solution
            # (and GDEQ's backward pass) holds it: keep the slots in use only
            used = problem.backend.xp.asarray(used, copy=True)
        return state._replace(UV=used)

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
        phi0 = self._dot(xp, g, g)

        def quadratic(phi, s):
            denom = 2.0 * (phi - phi0 + phi0 * s)
            return xp.where(denom > 0, phi0 * s * s / denom, xp.zeros_like(s))

        def armijo(phi, s):
            return phi <= phi0 * (1.0 - c1 * s)

        g1 = fz1 - z1
        phi1 = self._dot(xp, g1, g1)
        s = xp.ones_like(phi0)
        pending = active & ~armijo(phi1, s)
        s = quadratic(phi1, s)
        pending = pending & (s >= amin)

        def cond(ls):
            return xp.any(ls[3])

        def body(ls):
            z_out, fz_out, s, pending, trials = ls
            z_try = select_rows(xp, pending, state.z + self._narrow(xp, s)[:, None] * p, state.z)
            fz_try = problem.fn(z_try)
            g_try = fz_try - z_try
            phi = self._dot(xp, g_try, g_try)
            ok = pending & armijo(phi, s)
            z_out = select_rows(xp, ok, z_try, z_out)
            fz_out = select_rows(xp, ok, fz_try, fz_out)
            s_next = quadratic(phi, s)
            pending = pending & ~ok & (s_next >= amin)
            return z_out, fz_out, s_next, pending, trials + 1

        z_out, fz_out, _, _, trials = self.inner_loop(problem)(cond, body, (z1, fz1, s, pending, 0),
                                                              self.ls_max_trials)
        return z_out, fz_out, 1 + trials

    def _dot(self, xp: Any, a: Any, b: Any) -> Any:
        """Per-sample ``a . b``, summed in float32 for half-precision states."""
        if self._wide is not None:
            a, b = xp.astype(a, self._wide), xp.astype(b, self._wide)
        return xp.sum(a * b, axis=-1)

    def _narrow(self, xp: Any, a: Any) -> Any:
        """A float32 per-sample coefficient back in a half-precision state's dtype."""
        return a if self._wide is None else xp.astype(a, self._zero.dtype)

    def _balanced(self, xp: Any, u: Any, v: Any) -> tuple[Any, Any]:
        """The float32 pair ``(u s, v / s)`` with ``s = sqrt(||v|| / ||u||)`` in the half dtype:
        the same product ``u v^T``, with neither factor pushed out of float16's narrow range."""
        s = xp.sqrt(xp.linalg.vector_norm(v, axis=-1) / xp.linalg.vector_norm(u, axis=-1))
        s = xp.where(xp.isfinite(s) & (s > 0), s, 1.0)[:, None]
        return xp.astype(u * s, self._zero.dtype), xp.astype(v / s, self._zero.dtype)

    def commit(self, problem, state: BroydenState, z_new, fz_new, g_new, active, keep):
        if self.m == 0:
            return state._replace(z=z_new, fz=fz_new, g=g_new, Bg=-g_new)
        backend = problem.backend
        xp = backend.xp
        count = state.count
        UV = backend.active_prefix(state.UV, count, axis=2)
        # the step actually taken (not -B g): near convergence dz and dg are differences of
        # nearly equal iterates, and only the computed ones satisfy a consistent secant condition
        dz = z_new - state.z
        # B g_new = -g_new + U^T (V g_new) and v = B^T dz = -dz + V^T (U dz), both rings at once
        Udz, Vg = pair_dots(xp, UV, dz, g_new)
        UVg, VUdz = pair_combine(xp, UV, Vg, Udz)
        Bg_new = UVg - g_new
        v = VUdz - dz
        num = dz - Bg_new + state.Bg
        g_now, g_old = g_new, state.g
        if self._wide is not None:  # the update in float32; its pair is balanced into the half dtype
            wide = self._wide
            v, num, g_now, g_old, Bg_new = (xp.astype(a, wide) for a in (v, num, g_new, state.g, Bg_new))
        vg = xp.sum(v * g_now, axis=-1)
        den = vg - xp.sum(v * g_old, axis=-1)
        usable = xp.isfinite(den) & (den != 0.0)
        # an unusable denominator is replaced by 1 so that a recorded (unroll) backward never
        # meets 0 * inf; its pair is not stored
        den = xp.where(usable, den, 1.0)
        u = num / den[:, None]
        pair_u, pair_v = u, v
        if self._wide is not None:
            pair_u, pair_v = self._balanced(xp, u, v)
            usable = usable & xp.all(xp.isfinite(pair_u) & xp.isfinite(pair_v), axis=-1)
        write = keep & usable
        # B_new g_new = B g_new + u (v . g_new), less the overwritten pair's u_old (v_old . g_new)
        Bg_next = Bg_new + u * xp.where(write, vg, 0.0)[:, None]
        slot = count % self.m
        if self._wraps(backend, state, count):  # the slot may hold an older pair
            old = state.UV[:, :, slot]
            old_u, old_v = old[:, 0], old[:, 1]
            if self._wide is not None:
                old_u, old_v = xp.astype(old_u, self._wide), xp.astype(old_v, self._wide)
            coef = xp.where(write, xp.sum(old_v * g_now, axis=-1), 0.0)
            Bg_next = Bg_next - old_u * coef[:, None]
        else:
            old = self._zero
        if self._wide is not None:
            Bg_next = xp.astype(Bg_next, g_new.dtype)
        pair = select_rows(xp, write, xp.stack([pair_u, pair_v], axis=1), old)
        breakdowns = state.breakdowns + (keep & ~usable)
        return BroydenState(z_new, fz_new, g_new, Bg_next, backend.set_index(state.UV, slot, pair, axis=2),
                            count + 1, breakdowns)


class SeededBroyden(Broyden):
    """Broyden started from a given inverse-Jacobian estimate ``B_0 = -I + sum_i U_i V_i^T``.

    ``U`` and ``V`` are (B, k, n) seed pairs (for example the ring of an earlier Broyden solve,
    or its transpose ``(V, U)``); the first step is then ``z_1 = z_0 - B_0 g(z_0)`` instead of
    ``f(z_0)``. The ring holds the ``k`` seed pairs in front of up to ``memory`` new ones
    (``None``: ``max_iter``), ``k + min(memory, max_iter)`` slots: the seed is never dropped to
    make room while a solve runs its ``max_iter`` steps, and static shapes keep one bound. The
    new slots grow in loop stages as Broyden's do. With a bounded ``memory`` below ``max_iter``
    the oldest pairs, the seed first, are overwritten once the ring is full. Not registered:
    construct it with the seed and pass it as a bound solver (as ``gdeq_refined`` does for its
    backward solve).
    """

    name = "seeded_broyden"

    def __init__(self, U: Any, V: Any, *, max_iter: int | None = None, **options: Any) -> None:
        super().__init__(max_iter=max_iter, **options)
        if U.shape != V.shape or len(U.shape) != 3:
            raise ValueError(f"SeededBroyden: U and V must be (B, k, n) arrays of one shape, got "
                             f"{tuple(U.shape)} and {tuple(V.shape)}")
        self.seed_u, self.seed_v = U, V

    @property
    def seeded(self) -> int:
        """The number ``k`` of seed pairs."""
        return int(self.seed_u.shape[1])

    @property
    def m(self) -> int:
        return self.seeded + super().m

    def capacities(self, backend: Any) -> list[int]:
        # the stages count new pairs (a stage runs at most its capacity's steps); the ring holds
        # the seed in front of them (init, grow)
        return self._stages(backend, super().m)

    def grow(self, problem: Problem, state: BroydenState, capacity: int) -> BroydenState:
        return super().grow(problem, state, self.seeded + capacity)

    def _wraps(self, backend: Any, state: BroydenState, count: Any) -> bool:
        if not backend.static_shapes:
            return count >= self.m
        return super().m < self.budget and state.UV.shape[2] == self.m

    def init(self, problem: Problem, z0: Any, fz0: Any) -> BroydenState:
        xp = problem.backend.xp
        if tuple(self.seed_u.shape[::2]) != tuple(z0.shape):
            raise ValueError(f"SeededBroyden: seed pairs {tuple(self.seed_u.shape)} do not match the "
                             f"state {tuple(z0.shape)} (want (B, k, n))")
        state = super().init(problem, z0, fz0)  # new slots: the first stage's, or k + m
        if self.m == 0:
            return state
        caps = self.capacities(problem.backend)
        seed = xp.astype(xp.stack([self.seed_u, self.seed_v], axis=1), z0.dtype)
        UV = xp.concat([seed, state.UV[:, :, : caps[0] if caps else super().m]], axis=2)
        return state._replace(UV=UV, Bg=apply_inverse(xp, self.seed_u, self.seed_v, state.g),
                              count=self.seeded)
