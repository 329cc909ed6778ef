from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from deqcore._solution import SOLUTION_DATA_FIELDS, SOLUTION_META_FIELDS, Solution


class JaxBackend:
    """The protocol on JAX: ``lax`` loops over fixed-shape state, so a whole solve runs under
    ``jax.jit`` and ``jax.vmap``; ``custom_vjp`` with closure conversion for gradients.
    """

    name = "jax"
    xp = jnp
    static_shapes = True

    def __init__(self) -> None:
        self.register_pytree(Solution, SOLUTION_DATA_FIELDS, SOLUTION_META_FIELDS)

    def is_array(self, obj: object) -> bool:
        return isinstance(obj, (jax.Array, jax.core.Tracer))

    def no_grad(self) -> contextlib.AbstractContextManager[Any]:
        return contextlib.nullcontext()

    def while_loop(self, cond, body, state):
        return jax.lax.while_loop(cond, body, state)

    def differentiable_loop(self, cond, body, state, max_steps):
        def step(_, s):
            return jax.lax.cond(cond(s), body, lambda s_: s_, s)

        return jax.lax.fori_loop(0, max_steps, step, state)

    def fori_loop(self, length, body, state):
        return jax.lax.fori_loop(0, length, body, state)

    def jit(self, fn):
        return jax.jit(fn)

    def set_index(self, buffer, index, value, axis=0):
        idx = (slice(None),) * (axis % buffer.ndim) + (index,)
        return buffer.at[idx].set(value)

    def active_prefix(self, buffer, count, axis):
        return buffer

    def linear_solve(self, a, b, symmetric_positive_definite=False):
        k = a.shape[-1]
        if not symmetric_positive_definite or k > 16:
            return jnp.linalg.solve(a, b[..., None])[..., 0]
        # Unrolled Gauss-Jordan with diagonal pivoting (the largest remaining diagonal entry, as in
        # pivoted Cholesky): stable for SPD matrices and several times cheaper than LU's pivot
        # search for the tiny batched systems of Anderson mixing. Each row is the pivot once, so
        # the matrix ends diagonal. Jacobi equilibration first: Anderson's Gram diagonal spans
        # many orders of magnitude (residuals fall geometrically).
        scale = 1.0 / jnp.sqrt(jnp.abs(jnp.diagonal(a, axis1=-2, axis2=-1)))
        a = a * scale[..., :, None] * scale[..., None, :]
        b = b * scale
        used = jnp.zeros(a.shape[:-1], dtype=bool)
        for _ in range(k):
            diag = jnp.where(used, -jnp.inf, jnp.abs(jnp.diagonal(a, axis1=-2, axis2=-1)))
            pick = jax.nn.one_hot(jnp.argmax(diag, axis=-1), k, dtype=a.dtype)
            row = jnp.sum(a * pick[..., :, None], axis=-2)
            col = jnp.sum(a * pick[..., None, :], axis=-1)
            factors = col / jnp.sum(row * pick, axis=-1, keepdims=True) * (1.0 - pick)
            a = a - factors[..., :, None] * row[..., None, :]
            b = b - factors * jnp.sum(b * pick, axis=-1, keepdims=True)
            used = used | (pick > 0)
        return scale * b / jnp.diagonal(a, axis1=-2, axis2=-1)

    def vjp(self, fn, *primals, create_graph=False):
        del create_graph  # JAX cotangents are always differentiable
        return jax.vjp(fn, *primals)

    def stop_gradient(self, x):
        return jax.lax.stop_gradient(x)

    def attach_adjoint(self, f, z_star, x, adjoint, saved=()):
        z_star = jax.lax.stop_gradient(z_star)
        saved = tuple(jax.lax.stop_gradient(s) for s in saved)
        f_closed, consts = jax.closure_convert(f, z_star, x)

        @jax.custom_vjp
        def fixed_point(z, x, consts, saved):
            return z

        def fwd(z, x, consts, saved):
            return z, (z, x, consts, saved)

        def bwd(res, g):
            z, x, consts, saved = res
            _, pullback = jax.vjp(lambda z_, x_, c_: f_closed(z_, x_, *c_), z, x, consts)
            u = adjoint(g, lambda v: pullback(v)[0], *saved)
            _, gx, gc = pullback(u)
            return jnp.zeros_like(z), gx, gc, tuple(jnp.zeros_like(s) for s in saved)

        fixed_point.defvjp(fwd, bwd)
        return fixed_point(z_star, x, consts, saved)

    def host_callback(self, fn, *arrays):
        if all(self.is_concrete(a) for a in arrays):
            fn(*(np.asarray(a) for a in arrays))
            return
        jax.debug.callback(lambda *a: fn(*(np.asarray(v) for v in a)), *arrays)

    def to_numpy(self, x):
        return np.asarray(x)

    def is_concrete(self, x):
        return not isinstance(x, jax.core.Tracer)

    def device(self, x):
        return None

    def host_check(self, failed, make_error: Callable[..., Exception], *payload):
        if self.is_concrete(failed) and all(self.is_concrete(p) for p in payload):
            if bool(jnp.any(failed)):
                raise make_error(np.asarray(failed), *(np.asarray(p) for p in payload))
            return

        def callback(failed, *payload):
            if np.any(failed):
                raise make_error(np.asarray(failed), *(np.asarray(p) for p in payload))

        jax.debug.callback(callback, failed, *payload)

    def register_pytree(self, cls, data_fields, meta_fields):
        try:
            jax.tree_util.register_dataclass(cls, data_fields=data_fields, meta_fields=meta_fields)
        except ValueError:  # already registered (registry reset in tests)
            pass
