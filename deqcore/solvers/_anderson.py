from __future__ import annotations

from typing import Any, NamedTuple

import array_api_compat

from .._loop import Problem, Solver, select_rows
from .._options import Option, nonnegative_float, positive_float, positive_int


class AndersonState(NamedTuple):
    """Anderson's ring memory: iterates ``X`` and residuals ``G = f(X) - X``, each (B, m, n)."""

    z: Any
    fz: Any
    X: Any
    G: Any
    count: Any
    breakdowns: Any


def mixing_weights(backend: Any, G: Any, valid: Any, lam: float) -> tuple[Any, Any]:
    """Anderson's mixing weights for the residual window ``G`` (B, m, n).

    Returns ``(alpha, singular)``: alpha (B, m) minimises ``||G^T a||^2 + lam*s*||a||^2`` subject to
    ``sum(a) = 1``, where ``s`` is the mean squared norm of the valid residuals, so ``lam`` is
    relative to the residuals' size (an absolute lam swamps the Gram matrix once residuals are
    small). Slots where ``valid`` (m,) is False get weight 0. ``singular`` (B,) marks samples whose
    system had no finite solution; their alpha is not usable. ``lam`` is floored at 64 machine
    epsilons so that a numerically singular window (collinear residuals, ``lam=0``) still gives
    bounded weights instead of huge ones.
    """
    xp = backend.xp
    lam = max(lam, 64.0 * float(xp.finfo(G.dtype).eps))
    gram = xp.matmul(G, xp.matrix_transpose(G))
    validf = xp.astype(valid, G.dtype)
    diag = xp.linalg.diagonal(gram)
    scale = xp.sum(diag * validf, axis=-1, keepdims=True) / xp.sum(validf)
    eye = xp.eye(G.shape[1], dtype=G.dtype, device=array_api_compat.device(G))
    shift = lam * scale * validf + (1.0 - validf)
    a = backend.linear_solve(gram + shift[:, :, None] * eye, xp.broadcast_to(validf, diag.shape))
    alpha = a / xp.sum(a, axis=-1, keepdims=True)
    singular = ~xp.all(xp.isfinite(alpha), axis=-1)
    return alpha, singular


class Anderson(Solver):
    """Anderson acceleration (type II) with a ring memory of ``memory`` iterates.

    Each step mixes the stored iterates: ``z = sum_i a_i X_i + beta * sum_i a_i G_i`` with the
    weights of :func:`mixing_weights`. A sample whose mixing system is singular takes a plain
    damped step instead and is counted in ``state.breakdowns``. One f-evaluation a step.
    """

    name = "anderson"
    options = {
        "memory": Option(5, "number of past iterates mixed (m)", positive_int),
        "beta": Option(1.0, "mixing (damping) parameter beta", positive_float),
        "lam": Option(1e-4, "Tikhonov regularisation, relative to the mean squared residual",
                      nonnegative_float),
    }
    memory: int
    beta: float
    lam: float

    def init(self, problem: Problem, z0: Any, fz0: Any) -> AndersonState:
        xp = problem.backend.xp
        ring = xp.tile(xp.zeros_like(z0)[:, None, :], (1, self.memory, 1))
        X = problem.backend.set_index(ring, 0, z0, axis=1)
        G = problem.backend.set_index(xp.zeros_like(ring), 0, fz0 - z0, axis=1)
        breakdowns = xp.astype(xp.zeros_like(z0[:, 0]), xp.int32)
        return AndersonState(z0, fz0, X, G, 1, breakdowns)

    def step(self, problem: Problem, state: AndersonState, active: Any):
        backend = problem.backend
        xp = backend.xp
        X = backend.active_prefix(state.X, state.count, axis=1)
        G = backend.active_prefix(state.G, state.count, axis=1)
        slots = xp.arange(X.shape[1], device=array_api_compat.device(state.z))
        newest = slots == (state.count - 1) % self.memory
        alpha, singular = mixing_weights(backend, G, slots < state.count, self.lam)
        alpha = xp.where(singular[:, None], xp.astype(newest, alpha.dtype), alpha)
        weights = alpha[:, None, :]
        proposal = xp.matmul(weights, X)[:, 0]
        mixed_g = xp.matmul(weights, G)[:, 0]
        proposal = proposal + mixed_g if self.beta == 1.0 else proposal + self.beta * mixed_g
        z = select_rows(xp, active, proposal, state.z)
        fz = problem.fn(z)
        breakdowns = state.breakdowns + xp.astype(active & singular, xp.int32)
        return z, fz, state._replace(breakdowns=breakdowns), 1

    def commit(self, problem, state: AndersonState, z_new, fz_new, active, keep):
        backend = problem.backend
        slot = state.count % self.memory
        X = backend.set_index(state.X, slot, z_new, axis=1)
        G = backend.set_index(state.G, slot, fz_new - z_new, axis=1)
        return AndersonState(z_new, fz_new, X, G, state.count + 1, state.breakdowns)
