from __future__ import annotations

import contextlib
import types
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.custom_derivatives import SymbolicZero

from deqcore import Solution
from deqcore.extend import SOLUTION_DATA_FIELDS, SOLUTION_META_FIELDS, Capabilities
from deqcore.extend import higher_order_error as _higher_order_error
from deqcore.internal import UNROLLED_SPD_MAX, spd_solve_unrolled


def _ring_dots(ring, y, /):
    # dot_general without matmul's singleton row axis: 3-6x faster on XLA:CPU at solver sizes
    return jnp.einsum("bkn,bn->bk", ring, y)


def _ring_combine(weights, ring, /):
    return jnp.einsum("bk,bkn->bn", weights, ring)


def _pair_dots(pairs, a, b, /):
    out = jnp.einsum("bskn,bsn->bsk", pairs, jnp.stack([a, b], axis=1))
    return out[:, 0], out[:, 1]


def _pair_combine(pairs, wa, wb, /):
    out = jnp.einsum("bsk,bskn->bsn", jnp.stack([wa, wb], axis=1), pairs)
    return out[:, 0], out[:, 1]


#: ``jax.numpy`` with deqcore's ring products (see :mod:`deqcore._batched_linalg`).
xp = types.SimpleNamespace(**{k: getattr(jnp, k) for k in dir(jnp) if not k.startswith("__")})
xp.ring_dots, xp.ring_combine = _ring_dots, _ring_combine
xp.pair_dots, xp.pair_combine = _pair_dots, _pair_combine


def _numpy(x):
    # bfloat16 becomes float32, as on torch: ml_dtypes' bfloat16 arrays lack parts of NumPy's API
    x = np.asarray(x)
    return x.astype(np.float32) if x.dtype == jnp.bfloat16 else x


def _checked(make_error, ct, anchors):
    """``ct`` unchanged; ``make_error()`` is raised at trace time when a transformation
    differentiates it, that is when ``ct`` or a floating leaf of ``anchors`` carries a nonzero
    tangent (``jax.grad`` or ``jax.jacfwd`` of a gradient)."""
    floating = [a for a in jax.tree.leaves(anchors) if jnp.issubdtype(jnp.result_type(a), jnp.inexact)]

    @jax.custom_jvp
    def check(ct, anchors):
        return ct

    def rule(primals, tangents):
        if not all(isinstance(t, SymbolicZero) for t in jax.tree.leaves(
                tangents, is_leaf=lambda t: isinstance(t, SymbolicZero))):
            raise make_error()
        return primals[0], jnp.zeros_like(primals[0])

    check.defjvp(rule, symbolic_zeros=True)
    return check(ct, floating)


def _closed(f, z_star, x, saved, higher_order_error):
    """What the custom-gradient hooks start from: ``z*`` and ``saved`` cut from the forward's
    graph, ``f`` closure-converted (its closed-over arrays as ``consts``) and the error factory."""
    z_star = jax.lax.stop_gradient(z_star)
    saved = tuple(jax.lax.stop_gradient(s) for s in saved)
    f_closed, consts = jax.closure_convert(f, z_star, x)
    return z_star, saved, f_closed, consts, higher_order_error or _higher_order_error(None)


def _identity(bwd, point=None):
    """``(z, x, consts, saved) -> z`` whose backward is ``bwd(residuals, g)``, the residuals being
    the four arguments; ``point(z, x, consts)``, when given, replaces ``z`` (in value the same) in
    the output and the residuals."""

    @jax.custom_vjp
    def identity(z, x, consts, saved):
        return z

    def fwd(z, x, consts, saved):
        z = z if point is None else point(z, x, consts)
        return z, (z, x, consts, saved)

    identity.defvjp(fwd, bwd)
    return identity


class JaxBackend:
    """The protocol on JAX: ``lax`` loops over fixed-shape state, so a whole solve runs under
    ``jax.jit`` and ``jax.vmap``; ``custom_vjp`` with closure conversion for gradients.
    """

    name = "jax"
    xp = xp
    static_shapes = True
    capabilities = Capabilities(autodiff=True, jit=True, vmap=True, devices=("cpu", "gpu", "tpu"))

    def __init__(self) -> None:
        self.register_pytree(Solution, SOLUTION_DATA_FIELDS, SOLUTION_META_FIELDS)

    def is_array(self, obj: object) -> bool:
        return isinstance(obj, (jax.Array, jax.core.Tracer))

    def no_grad(self) -> contextlib.AbstractContextManager[Any]:
        return contextlib.nullcontext()

    def while_loop(self, cond, body, state, max_steps=None, check_every=1):
        if max_steps is None and check_every == 1:
            return _loop(lambda s: jax.lax.while_loop(cond, body, s), state)

        def test(carry):
            i, s = carry
            go = cond(s) if check_every == 1 else (i % check_every != 0) | cond(s)
            return go if max_steps is None else go & (i < max_steps)

        def step(carry):
            i, s = carry
            return i + 1, body(s)

        return _loop(lambda s: jax.lax.while_loop(test, step, (0, s))[1], state)

    def differentiable_loop(self, cond, body, state, max_steps, check_every=1):
        def step(i, carry):
            running, s = carry
            running = running & ((i % check_every != 0) | cond(s))
            return running, jax.lax.cond(running, body, lambda s_: s_, s)

        return _loop(lambda s: jax.lax.fori_loop(0, max_steps, step, (True, s))[1], state)

    def fori_loop(self, length, body, state):
        return _loop(lambda s: jax.lax.fori_loop(0, length, body, s), state)

    def jit(self, fn):
        return jax.jit(fn)

    def set_index(self, buffer, index, value, axis=0):
        idx = (slice(None),) * (axis % buffer.ndim) + (index,)
        return buffer.at[idx].set(value)

    def active_prefix(self, buffer, count, axis):
        return buffer

    def linear_solve(self, a, b, symmetric_positive_definite=False):
        if symmetric_positive_definite and a.shape[-1] <= UNROLLED_SPD_MAX:
            return spd_solve_unrolled(jnp, a, b)
        return jnp.linalg.solve(a, b[..., None])[..., 0]

    def vjp(self, fn, *primals, create_graph=False):
        del create_graph  # JAX cotangents are always differentiable
        return jax.vjp(fn, *primals)

    def stop_gradient(self, x):
        return jax.lax.stop_gradient(x)

    def attach_adjoint(self, f, z_star, x, adjoint, saved=(), higher_order_error=None, linear_solve=None):
        z_star, saved, f_closed, consts, make_error = _closed(f, z_star, x, saved, higher_order_error)
        exact = None if linear_solve is None else _ExactAdjoint(f_closed, adjoint, linear_solve)

        def bwd(res, g):
            if exact is None:
                # first, before the adjoint's loops are traced: a derivative of this backward (the
                # residuals or g carry tangents) is an error, not a wrong answer
                g = _checked(make_error, g, res)
            z, x, consts, saved = res
            _, pullback = jax.vjp(lambda z_, x_, c_: f_closed(z_, x_, *c_), z, x, consts)
            if exact is None:
                u = adjoint(g, lambda v: pullback(v)[0], *saved)
            else:
                u = exact.adjoint(g, z, x, consts, saved)
            _, gx, gc = pullback(u)
            return jnp.zeros_like(z), gx, gc, tuple(jnp.zeros_like(s) for s in saved)

        # exact: z* carries its implicit tangent, to the loss and into the residuals, when an outer
        # transformation differentiates the gradient (it differentiates fwd and bwd)
        return _identity(bwd, None if exact is None else exact.point)(z_star, x, consts, saved)

    def attach_reverse(self, f, z_star, x, backward, saved=(), higher_order_error=None):
        z_star, saved, f_closed, consts, make_error = _closed(f, z_star, x, saved, higher_order_error)

        def bwd(res, g):
            g = _checked(make_error, g, res)
            _, x, consts, saved = res

            def pullback(p, v, acc):
                out, pb = jax.vjp(lambda p_, x_, c_: f_closed(p_, x_, *c_), p, x, consts)
                gp, gx, gc = pb(v)
                return out, gp, jax.tree.map(jnp.add, acc, (gx, gc))

            acc = backward(g, pullback, jax.tree.map(jnp.zeros_like, (x, consts)), *saved)
            return jnp.zeros_like(g), acc[0], acc[1], tuple(jnp.zeros_like(s) for s in saved)

        return _identity(bwd)(z_star, x, consts, saved)

    def first_order_only(self, x, make_error):
        @jax.custom_vjp
        def identity(x):
            return x

        def fwd(x):
            return x, x

        def bwd(x, g):
            return (_checked(make_error, g, x),)

        identity.defvjp(fwd, bwd)
        return identity(x)

    def host_callback(self, fn, *arrays):
        if all(self.is_concrete(a) for a in arrays):
            fn(*(_numpy(a) for a in arrays))
            return
        jax.debug.callback(lambda *a: fn(*(_numpy(v) for v in a)), *arrays)

    def to_numpy(self, x):
        return _numpy(x)

    def is_concrete(self, x):
        return not isinstance(x, jax.core.Tracer)

    def device(self, x):
        return None

    def host_check(self, failed, make_error: Callable[..., Exception], *payload):
        if self.is_concrete(failed) and all(self.is_concrete(p) for p in payload):
            if bool(jnp.any(failed)):
                raise make_error(_numpy(failed), *(_numpy(p) for p in payload))
            return

        def callback(failed, *payload):
            if np.any(failed):
                raise make_error(_numpy(failed), *(_numpy(p) for p in payload))

        jax.debug.callback(callback, failed, *payload)

    def compiled(self, mode=None):
        # lax loops are compiled by XLA already, inside jax.jit or not; there are no modes
        if mode is not None:
            raise ValueError(f"deqcore: JAX solver loops are always compiled by XLA; compile takes "
                             f"True or False on JAX, not a mode (got {mode!r})")
        return self

    def register_pytree(self, cls, data_fields, meta_fields):
        try:
            jax.tree_util.register_dataclass(cls, data_fields=data_fields, meta_fields=meta_fields)
        except ValueError:  # already registered (registry reset in tests)
            pass


class _ExactAdjoint:
    """The implicit function theorem at every order, for ``attach_adjoint(linear_solve=...)``.

    ``point(z, x, consts)`` is ``z*`` whose tangent solves ``(I - J) dz = f_x dx + f_c dc``;
    ``adjoint(g, z, x, consts, saved)`` is the first-order adjoint ``u`` whose tangent solves
    ``du (I - J) = dg + u dJ``. Both are ``custom_jvp`` functions: their rules run only when a
    transformation differentiates them, so the first derivative is the mode's own. The rules call
    the functions themselves for the primal (a third derivative differentiates the rule again) and
    solve through ``lax.custom_linear_solve``, whose solves are ``linear_solve`` with JVPs
    (``v -> J v``) and, transposed, VJPs (``v -> v J``) of ``f``: the iterations are never
    differentiated, and the derivative of the solve with respect to ``z*``, ``x`` and the
    constants ``f`` closes over is the implicit one.
    """

    def __init__(self, f: Callable[..., Any], adjoint: Callable[..., Any],
                 linear_solve: Callable[[Any, Any], Any]) -> None:
        self.f, self.first_adjoint, self.linear_solve = f, adjoint, linear_solve
        self.point = jax.custom_jvp(lambda z, x, consts: z)
        self.point.defjvp(self._point_jvp)
        self.adjoint = jax.custom_jvp(self._adjoint)
        self.adjoint.defjvp(self._adjoint_jvp)

    def _at(self, z: Any, x: Any, consts: Any) -> Callable[[Any], Any]:
        return lambda z_: self.f(z_, x, *consts)

    def _solve(self, b: Any, z: Any, x: Any, consts: Any, transpose: bool) -> Any:
        """``w = b + J w`` (or ``w = b + w J`` with ``transpose``), differentiable implicitly."""
        fz = self._at(z, x, consts)
        _, pullback = jax.vjp(fz, z)

        def jvp_z(v: Any) -> Any:
            return jax.jvp(fz, (z,), (v,))[1]

        def vjp_z(v: Any) -> Any:
            return pullback(v)[0]

        op, op_t = (vjp_z, jvp_z) if transpose else (jvp_z, vjp_z)
        return jax.lax.custom_linear_solve(
            lambda v: v - op(v), b, solve=lambda _, r: self.linear_solve(r, op),
            transpose_solve=lambda _, r: self.linear_solve(r, op_t))

    def _point_jvp(self, primals: Any, tangents: Any) -> Any:
        z, x, consts = primals
        _, dx, dconsts = tangents
        z = self.point(z, x, consts)
        df = jax.jvp(lambda x_, c_: self.f(z, x_, *c_), (x, consts), (dx, dconsts))[1]
        return z, self._solve(df, z, x, consts, transpose=False)

    def _adjoint(self, g: Any, z: Any, x: Any, consts: Any, saved: Any) -> Any:
        _, pullback = jax.vjp(self._at(z, x, consts), z)
        return self.first_adjoint(g, lambda v: pullback(v)[0], *saved)

    def _adjoint_jvp(self, primals: Any, tangents: Any) -> Any:
        g, z, x, consts, saved = primals
        dg, dz, dx, dconsts, _ = tangents
        u = self.adjoint(g, z, x, consts, saved)

        def u_jacobian(z_: Any, x_: Any, c_: Any) -> Any:  # u J at (z_, x_, c_), u held
            return jax.vjp(lambda zz: self.f(zz, x_, *c_), z_)[1](u)[0]

        du_j = jax.jvp(u_jacobian, (z, x, consts), (dz, dx, dconsts))[1]
        return u, self._solve(dg + du_j, z, x, consts, transpose=True)


def _loop(run: Callable[[Any], Any], state: Any) -> Any:
    """Run a lax loop; outside any trace, inside a ``jax.jit`` that lives only for this call.

    An eager ``lax`` loop is compiled once per traced body and kept in JAX's primitive cache for
    the life of the process (thousands of entries); every solve traces a new body, so a program
    that solves eagerly in a loop would grow by one executable per solve until the process runs
    out of memory mappings and crashes inside the compiler. A jitted function that is dropped
    after the call takes its executable with it."""
    if any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree_util.tree_leaves(state)):
        return run(state)
    return jax.jit(run)(state)

