from __future__ import annotations

from typing import Any, NamedTuple

import array_api_compat

from .._batched_linalg import ring_combine, ring_dots, statistics_dtype
from .._options import Option, nonnegative_float, positive_float, positive_int
from ._base import Problem, Solver, select_rows


class AndersonState(NamedTuple):
    """Anderson's ring memory of the last ``m`` iterates ``X_i``.

    ``G`` (B, m, n) holds the residuals ``f(X_i) - X_i``, ``Y`` (B, m, n) the mixing targets
    ``X_i + beta * G_i`` (so a step is one product ``alpha @ Y``), and ``gram`` (B, m, m) the Gram
    matrix ``G G^T``, updated one row and column per step. ``count`` iterates have been stored;
    ``breakdowns`` (B,) counts steps whose mixing system had no finite solution. For
    half-precision states ``G`` and ``gram`` are float32 (the mixing weights are solved there);
    ``Y`` has the state's dtype.
    """

    z: Any
    fz: Any
    G: Any
    Y: Any
    gram: Any
    count: Any
    breakdowns: Any


def mixing_weights(backend: Any, gram: Any, lam: float, valid: Any = None,
                   eye: Any = None) -> tuple[Any, Any]:
    """Anderson's mixing weights from the Gram matrix ``gram = G G^T`` (B, k, k) of the residuals.

    Returns ``(alpha, singular)``: alpha (B, k) minimises ``||G^T a||^2 + lam*s*||a||^2`` subject to
    ``sum(a) = 1``, where ``s`` is the mean squared norm of the valid residuals, so ``lam`` is
    relative to the residuals' size (an absolute lam swamps the Gram matrix once residuals are
    small). ``valid`` (k,) marks the slots in use (None: all); the others get weight 0.
    ``singular`` (B,) marks samples whose system had no finite solution; their alpha is not
    usable. ``lam`` is floored at 64 machine epsilons so that a numerically singular window
    (collinear residuals, ``lam=0``) still gives bounded weights instead of huge ones. ``eye``
    may pass a cached (k, k) identity.
    """
    xp = backend.xp
    lam = max(lam, 64.0 * float(xp.finfo(gram.dtype).eps))
    k = gram.shape[-1]
    if eye is None:
        eye = xp.eye(k, dtype=gram.dtype, device=array_api_compat.device(gram))
    diag = xp.linalg.diagonal(gram)
    if valid is None:
        shift = xp.sum(diag, axis=-1, keepdims=True) * (lam / k)
        rhs = xp.ones_like(diag)
    else:
        validf = xp.astype(valid, gram.dtype)
        scale = xp.sum(diag * validf, axis=-1, keepdims=True) / xp.sum(validf)
        shift = lam * scale * validf + (1.0 - validf)
        rhs = xp.broadcast_to(validf, diag.shape)
    # The system is SPD; with lam >= 1e-8 its condition number is at most ~k/lam, where a
    # backend's SPD path (JAX: an unrolled Cholesky factorisation) is as accurate as pivoted LU.
    a = backend.linear_solve(gram + shift[:, :, None] * eye, rhs,
                             symmetric_positive_definite=lam >= 1e-8)
    alpha = a / xp.sum(a, axis=-1, keepdims=True)
    # a sum is finite only if every term is: one reduction flags any non-finite weight
    singular = ~xp.isfinite(xp.sum(alpha, axis=-1))
    return alpha, singular


class Anderson(Solver):
    """Anderson acceleration (type II) with a ring memory of ``memory`` iterates.

    Each step mixes the stored iterates: ``z = sum_i a_i X_i + beta * sum_i a_i G_i`` with the
    weights of :func:`mixing_weights`. A sample whose mixing system is singular takes a plain
    damped step instead and is counted in ``state.breakdowns``. One f-evaluation a step. For
    half-precision states the residuals, their Gram matrix and the weights are float32 (a
    bfloat16 Gram matrix keeps 8 significant bits), the iterates the state's dtype.
    """

    name = "anderson"
    memory = Option(5, "number of past iterates mixed (m)", positive_int)
    beta = Option(1.0, "mixing (damping) parameter beta", positive_float)
    lam = Option(1e-4, "Tikhonov regularisation, relative to the mean squared residual",
                 nonnegative_float)

    def init(self, problem: Problem, z0: Any, fz0: Any) -> AndersonState:
        backend = problem.backend
        xp = backend.xp
        device = array_api_compat.device(z0)
        mix = statistics_dtype(xp, z0.dtype)
        self._mix = None if mix == z0.dtype else mix  # None: mix in the state's dtype
        self._eye = xp.eye(self.memory, dtype=mix, device=device)
        self._slots = xp.arange(self.memory, device=device)
        B, n = z0.shape
        G = xp.zeros((B, self.memory, n), dtype=mix, device=device)
        Y = xp.zeros((B, self.memory, n), dtype=z0.dtype, device=device)
        gram = xp.zeros((B, self.memory, self.memory), dtype=mix, device=device)
        breakdowns = xp.zeros(B, dtype=xp.int32, device=device)
        state = AndersonState(z0, fz0, G, Y, gram, 0, breakdowns)
        return self._store(backend, state, z0, fz0, fz0 - z0)

    def _store(self, backend: Any, state: AndersonState, z: Any, fz: Any, g: Any) -> AndersonState:
        xp = backend.xp
        slot = state.count % self.memory
        y = fz if self.beta == 1.0 else z + self.beta * g
        if self._mix is not None:
            g = xp.astype(g, self._mix)
        G = backend.set_index(state.G, slot, g, axis=1)
        Y = backend.set_index(state.Y, slot, y, axis=1)
        row = ring_dots(xp, G, g)
        gram = backend.set_index(backend.set_index(state.gram, slot, row, axis=1), slot, row, axis=2)
        return AndersonState(z, fz, G, Y, gram, state.count + 1, state.breakdowns)

    def step(self, problem: Problem, state: AndersonState, active: Any):
        backend = problem.backend
        xp = backend.xp
        count = state.count
        gram = backend.active_prefix(backend.active_prefix(state.gram, count, axis=1), count, axis=2)
        k = gram.shape[-1]
        eye = self._eye if k == self.memory else self._eye[:k, :k]  # torch's window grows to m
        # Backends with dynamic shapes pass only the filled slots; static ones the whole ring,
        # with a traced count (masks and a one-hot row, never an index).
        valid = None
        if backend.static_shapes:
            valid = self._slots < count
            newest = xp.astype(self._slots == (count - 1) % k, gram.dtype)
        else:
            newest = eye[(count - 1) % self.memory]
        alpha, singular = mixing_weights(backend, gram, self.lam, valid, eye)
        alpha = xp.where(singular[:, None], newest, alpha)
        if self._mix is not None:
            alpha = xp.astype(alpha, state.Y.dtype)
        proposal = ring_combine(xp, alpha, backend.active_prefix(state.Y, count, axis=1))
        z = select_rows(xp, active, proposal, state.z)
        fz = problem.fn(z)
        return z, fz, state._replace(breakdowns=state.breakdowns + (active & singular)), 1

    def commit(self, problem, state: AndersonState, z_new, fz_new, g_new, active, keep):
        return self._store(problem.backend, state, z_new, fz_new, g_new)
