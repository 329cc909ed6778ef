from __future__ import annotations

import contextlib
import types
from collections.abc import Callable
from typing import Any

import array_api_compat.torch as compat
import torch
import torch.autograd.forward_ad as forward_ad
from torch.utils._pytree import tree_flatten, tree_unflatten

from deqcore import HigherOrderError
from deqcore.extend import Capabilities, EagerBackend
from deqcore.extend import higher_order_error as _higher_order_error


def _matmul(x1, x2, /):
    # Batched (B, k, n) products are the solvers' inner loops: call bmm directly, skipping
    # matmul's broadcast bookkeeping (three view ops) and the compat layer's dtype promotion.
    if x1.ndim == 3 and x2.ndim == 3 and x1.shape[0] == x2.shape[0] and x1.dtype == x2.dtype:
        return torch.bmm(x1, x2)
    return compat.matmul(x1, x2)


def _where(condition, x1, x2, /):
    # torch.where directly for same-dtype tensors, and for a tensor and a Python number (the
    # tensor's dtype wins, as the Array API asks); compat's dtype promotion otherwise, which
    # torch.compile cannot trace
    t1, t2 = isinstance(x1, torch.Tensor), isinstance(x2, torch.Tensor)
    if (t1 and t2 and x1.dtype == x2.dtype) or (t1 and _number(x2)) or (t2 and _number(x1)):
        return torch.where(condition, x1, x2)
    return compat.where(condition, x1, x2)


def _number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _select_rows(mask, new, old, /):
    # torch.where does not vectorise on the CPU (~35 us for 64K floats, 6x an add): when every
    # row or no row is selected, which is most steps of a solve, hand back an input instead. The
    # two reads cost a host round-trip, which is free on the CPU but not on an accelerator.
    if new.device.type == "cpu" and new.numel() >= 4096 and not torch.compiler.is_compiling():
        if bool(mask.all()):
            return new
        if not bool(mask.any()):
            return old
    return torch.where(mask.reshape((mask.shape[0],) + (1,) * (new.ndim - 1)), new, old)


def _ring_dots(ring, y, /):
    return torch.bmm(y.unsqueeze(1), ring.transpose(1, 2)).squeeze(1)


def _ring_combine(weights, ring, /):
    return torch.bmm(weights.unsqueeze(1), ring).squeeze(1)


def _pair_dots(pairs, a, b, /):
    return _ring_dots(pairs[:, 0], a), _ring_dots(pairs[:, 1], b)


def _pair_combine(pairs, wa, wb, /):
    return _ring_combine(wa, pairs[:, 0]), _ring_combine(wb, pairs[:, 1])


#: array_api_compat's torch namespace with faster same-dtype ``matmul`` and ``where``, a
#: ``select_rows`` (see :func:`deqcore.extend.select_rows`) and ``bmm`` ring products (see
#: :mod:`deqcore._batched_linalg`).
xp = types.SimpleNamespace(**{k: getattr(compat, k) for k in dir(compat) if not k.startswith("__")})
xp.matmul, xp.where, xp.select_rows = _matmul, _where, _select_rows
xp.ring_dots, xp.ring_combine = _ring_dots, _ring_combine
xp.pair_dots, xp.pair_combine = _pair_dots, _pair_combine


def _dual(*tensors):
    """Whether a tensor carries a forward-mode tangent (torch.func.jvp, jacfwd, forward_ad)."""
    # outside a dual level no tensor has a tangent (unpack_dual's own first test); asked several
    # times per solver iteration, where unpack_dual's call costs ~2 us each
    if forward_ad._current_level < 0:
        return False
    return any(forward_ad.unpack_dual(t).tangent is not None for t in tensors)


def _solve(a, b):
    if _dual(a, b):
        # torch.linalg.solve's forward-mode rule is wrong once it is differentiated again (jvp of
        # jvp, grad of jvp: measured off by 25 % against finite differences); the LU
        # factorisation's rules are exact
        lu, pivots, _ = torch.linalg.lu_factor_ex(a, check_errors=False)
        return torch.linalg.lu_solve(lu, pivots, b)
    return torch.linalg.solve_ex(a, b, check_errors=False)[0]


def _graph_leaves(out):
    """The leaf tensors requiring grad that the graph of ``out`` reaches (depth-first, in order)."""
    if out.grad_fn is None:
        return []
    stack, seen, found = [out.grad_fn], set(), {}
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        leaf = getattr(node, "variable", None)
        if leaf is not None:
            found[id(leaf)] = leaf
            continue
        stack.extend(next_node for next_node, _ in node.next_functions)
    return list(found.values())


def _needs_gradient(fz, z):
    """Whether the graph of ``fz`` reaches a leaf requiring grad other than ``z``."""
    return any(leaf is not z for leaf in _graph_leaves(fz))


def _discard(t):
    return None


def _discarded(_):
    raise RuntimeError("deqcore: a graph built only to find the tensors f uses was differentiated")


def _requires_grad(t):
    return isinstance(t, torch.Tensor) and t.requires_grad


def _sequence_mark():
    """A number below that of every autograd node recorded after this call (in this thread)."""
    with torch.enable_grad():
        return (torch.zeros((), requires_grad=True) * 1).grad_fn._sequence_nr() + 1


def _intermediate_error():
    return HigherOrderError(
        "deqcore: the gradient mode is exact to every order (grad='implicit'), but f closes over a "
        "tensor that requires grad and was computed outside f (neither a leaf, such as a parameter, "
        "nor part of x), so a derivative of the gradient could not reach it and is refused. Pass "
        "that tensor through x (f(z, x) with x a tuple), or compute it inside f")


class _Adjoint(torch.autograd.Function):
    """Identity on ``f(z*)`` whose backward replaces the cotangent ``g`` by ``adjoint(g, ...)``.

    The adjoint is computed without a graph. When the backward is recorded (``create_graph``) it
    is returned through :class:`_HigherOrderCheck`, tied to ``g`` and ``f(z*)``, unless ``exact``
    (an :class:`_ExactAdjoint`) makes the recorded backward exact; its inputs then follow the
    saved arrays and receive the recorded gradients.
    """

    @staticmethod
    def forward(ctx, fz, adjoint, vjp_z, make_error, exact, n_saved, *arrays):
        # f(z*) is kept alive by vjp_z's closure already; the check needs its graph, not its data
        ctx.adjoint, ctx.vjp_z, ctx.make_error, ctx.fz = adjoint, vjp_z, make_error, fz
        ctx.exact, ctx.n_saved = exact, n_saved
        ctx.save_for_backward(*arrays[:n_saved])
        ctx.n_inputs = len(arrays) - n_saved
        ctx.set_materialize_grads(False)  # no cotangent (a stopped _Reconnect): nothing to solve
        return fz.view_as(fz)

    @staticmethod
    def backward(ctx, g):
        if g is None:
            return (None,) * (6 + ctx.n_saved + ctx.n_inputs)
        saved = ctx.saved_tensors
        with torch.no_grad():
            u = ctx.adjoint(g.detach(), ctx.vjp_z, *saved)
        none = (None,) * (5 + ctx.n_saved)
        if ctx.exact is not None and torch.is_grad_enabled():
            return (None, *none, *ctx.exact.backward(g, u))
        u = _checked(u, ctx.make_error, g, ctx.fz)
        return (u, *none) + (None,) * ctx.n_inputs


class _Reconnect(torch.autograd.Function):
    """Identity on ``x`` whose backward passes the cotangent on, except while ``cell.stop``."""

    @staticmethod
    def forward(ctx, x, cell):
        ctx.cell = cell
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return (None if ctx.cell.stop else g), None


class _ExactAdjoint:
    """The recorded backward of an adjoint mode that is exact to every order.

    ``x``'s tensors that require grad are passed to ``f`` through :class:`_Reconnect` identities
    (``self.x``); ``f``'s graph ends there, at ``z`` and at leaves (parameters), which become
    inputs of :class:`_Adjoint` next to the identities. Under ``create_graph`` its backward
    rebuilds ``z*`` with its implicit gradient (``attach_adjoint`` again), solves for the adjoint
    as an attached linear fixed point ``u = g + u J(z*)`` (whose own adjoint solves the transposed
    system ``w = b + J w``, the JVP being the VJP of the VJP), and differentiates
    ``u f(z*, x)`` with respect to those inputs with ``create_graph``: every term of the next
    derivative, ``dz*`` included, is then on the recorded graph. The identities stop while that
    derivative is taken, so what reaches a parameter through ``x`` is not counted twice.
    """

    def __init__(self, backend, f, z_star, x, adjoint, linear_solve):
        self.backend, self.f, self.z_star, self.adjoint, self.linear_solve = (
            backend, f, z_star, adjoint, linear_solve)
        # the identities' switch; not self, which holds their outputs (no reference cycle)
        self.cell = types.SimpleNamespace(stop=False)
        leaves, self.spec = tree_flatten(x)
        self.inputs = tuple(_Reconnect.apply(t, self.cell) for t in leaves if _requires_grad(t))
        it = iter(self.inputs)
        self.x = tree_unflatten([next(it) if _requires_grad(t) else t for t in leaves], self.spec)

    def leaves(self, fz, z, mark):
        """The leaves ``f``'s graph reaches other than ``z`` and through ``self.x``; None when it
        reaches a tensor computed before ``f`` ran that is neither (it cannot be an input)."""
        stops = {t.grad_fn for t in self.inputs}
        stack, seen, found = [fz.grad_fn], set(), {}
        while stack:
            node = stack.pop()
            if node is None or node in seen or node in stops:
                continue
            seen.add(node)
            leaf = getattr(node, "variable", None)
            if leaf is not None:
                if leaf is not z:
                    found[id(leaf)] = leaf
                continue
            if node._sequence_nr() < mark:
                return None
            stack.extend(next_node for next_node, _ in node.next_functions)
        self.leaf_tensors = tuple(found.values())
        return self.leaf_tensors

    def backward(self, g, u):
        be, f = self.backend, self.f
        z_att = be.attach_adjoint(f, self.z_star, self.x, self.adjoint, linear_solve=self.linear_solve)

        def h(u_, state):  # g + u J(z*), linear in u
            g_, z_, x_ = state
            if not z_.requires_grad:
                z_ = z_.detach().requires_grad_(True)
            (uj,) = torch.autograd.grad(f(z_, x_), z_, u_, create_graph=True)
            return g_ + uj

        transposed = lambda b, vjp_w: self.linear_solve(b, vjp_w)  # noqa: E731
        u_att = be.attach_adjoint(h, u, (g, z_att, self.x), transposed, linear_solve=self.linear_solve)
        # the partial derivative at z*: the path through z_att is on the graph, cut while it is taken
        fz = f(_Reconnect.apply(z_att, self.cell), self.x)
        self.cell.stop = True
        try:
            grads = torch.autograd.grad(fz, self.inputs + self.leaf_tensors, u_att, create_graph=True,
                                        allow_unused=True)
        finally:
            self.cell.stop = False
        return grads


class _HigherOrderCheck(torch.autograd.Function):
    """Identity on a cotangent whose own backward raises ``make_error()``.

    ``anchors`` are inputs only so that every derivative of the result reaches this node: the
    cotangent itself (for what the loss depends on) and an array whose graph reaches the
    parameters and ``x``.
    """

    generate_vmap_rule = True  # torch.func.jacrev, torch.func.hessian

    @staticmethod
    def forward(ct, make_error, *anchors):
        return ct.view_as(ct)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.make_error = inputs[1]

    @staticmethod
    def backward(ctx, *grads):
        raise ctx.make_error()

    @staticmethod
    def jvp(ctx, *tangents):  # forward over reverse: torch.func.hessian, jvp of grad
        raise ctx.make_error()


def _checked(ct, make_error, *anchors):
    """``ct``, with :class:`_HigherOrderCheck` on it when a backward is being recorded."""
    if not torch.is_grad_enabled():
        return ct
    return _HigherOrderCheck.apply(ct, make_error, *anchors)


class _FirstOrderOnly(torch.autograd.Function):
    """Identity on ``x`` whose backward returns the cotangent through :func:`_checked`; forward
    mode raises (a forward-mode tangent cannot be checked against a second differentiation)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x, anchor, make_error):
        return x.view_as(x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _, anchor, ctx.make_error = inputs
        ctx.save_for_backward(anchor)

    @staticmethod
    def backward(ctx, g):
        (anchor,) = ctx.saved_tensors
        return _checked(g, ctx.make_error, anchor), None, None

    @staticmethod
    def jvp(ctx, *tangents):
        raise ctx.make_error()


class _Reverse(torch.autograd.Function):
    """Identity on ``z*`` whose backward runs ``backward(g, pullback, acc0, *saved)`` without a
    graph and returns the accumulator as the gradients of its ``inputs`` (``x``'s tensors and
    the leaves ``f`` uses)."""

    @staticmethod
    def forward(ctx, z, backward, pullback, make_error, n_saved, *tensors):
        ctx.backward_fn, ctx.pullback, ctx.make_error, ctx.n_saved = backward, pullback, make_error, n_saved
        ctx.save_for_backward(*tensors[:n_saved])
        ctx.inputs = tensors[n_saved:]
        return z.clone()

    @staticmethod
    def backward(ctx, g):
        acc0 = tuple(torch.zeros_like(t) for t in ctx.inputs)
        with torch.no_grad():
            acc = ctx.backward_fn(g.detach(), ctx.pullback, acc0, *ctx.saved_tensors)
        acc = tuple(_checked(a, ctx.make_error, g, *ctx.inputs) for a in acc)
        return (None, None, None, None, None) + (None,) * ctx.n_saved + acc


class TorchBackend(EagerBackend):
    """The protocol on PyTorch: eager loops, in-place buffer writes, autograd hooks.

    Works for any floating dtype and device; arrays are created on the input's device. The only
    host round-trip in a solver iteration is the loop's stop check. The loops, ``jit``, host
    checks and callbacks are :class:`deqcore.extend.EagerBackend`'s.
    """

    name = "torch"
    xp = xp
    static_shapes = False
    # eager loops read the stop test on the host, so neither torch.func.vmap nor a whole-solve
    # torch.compile can trace a solve (compile= compiles the loop bodies instead)
    capabilities = Capabilities(autodiff=True, jit=False, vmap=False, devices=("cpu", "cuda", "mps"))

    def __init__(self, make_compiled: Callable[..., Any] | None = None) -> None:
        # the compiled variant (a subclass, in _compiled.py) is handed in by the package's factory
        self.make_compiled = make_compiled
        self.compiled_by_mode: dict[str, Any] = {}

    def is_array(self, obj: object) -> bool:
        return isinstance(obj, torch.Tensor)

    def no_grad(self) -> contextlib.AbstractContextManager[Any]:
        return torch.no_grad()

    def set_index(self, buffer, index, value, axis=0):
        if (torch.is_grad_enabled() and (buffer.requires_grad or value.requires_grad)) or _dual(value):
            # recorded for autograd (the unroll mode, also in forward mode): an in-place write
            # would invalidate tensors saved for backward
            return torch.select_scatter(buffer, value, axis, int(index))
        buffer.select(axis, int(index)).copy_(value)
        return buffer

    def active_prefix(self, buffer, count, axis):
        return buffer.narrow(axis, 0, min(int(count), buffer.shape[axis]))

    def linear_solve(self, a, b, symmetric_positive_definite=False):
        dtype = a.dtype
        if dtype in (torch.float16, torch.bfloat16):  # LAPACK has no half-precision solve
            a, b = a.float(), b.float()
        x = _solve(a, b.unsqueeze(-1))
        return x.squeeze(-1).to(dtype)

    def vjp(self, fn, *primals, create_graph=False):
        leaves = [p.detach().requires_grad_(True) for p in primals]
        with torch.enable_grad():
            out = fn(*leaves)

        def pullback(ct):
            with torch.enable_grad():
                grads = torch.autograd.grad(out, leaves, ct, retain_graph=True, allow_unused=True,
                                            create_graph=create_graph)
            return tuple(torch.zeros_like(p) if g is None else g for p, g in zip(leaves, grads, strict=True))

        return out, pullback

    def stop_gradient(self, x):
        return x.detach()

    def attach_adjoint(self, f, z_star, x, adjoint, saved=(), higher_order_error=None, linear_solve=None):
        z_star = z_star.detach()
        if not torch.is_grad_enabled():
            return z_star
        z = z_star.detach().requires_grad_(True)
        exact = None
        if linear_solve is not None:
            exact = _ExactAdjoint(self, f, z_star, x, adjoint, linear_solve)
            x = exact.x
        mark = None if exact is None else _sequence_mark()
        with torch.enable_grad():
            fz = f(z, x)
        if not _needs_gradient(fz, z):  # nothing f uses but z requires a gradient
            return z_star

        def vjp_z(v):
            (out,) = torch.autograd.grad(fz, z, v, retain_graph=True)
            return out

        make_error = higher_order_error or _higher_order_error(None)
        inputs = ()
        if exact is not None:
            leaves = exact.leaves(fz, z, mark)
            if leaves is None:  # f closes over an intermediate tensor: first derivatives only
                exact, make_error = None, _intermediate_error
            else:
                inputs = (*exact.inputs, *leaves)
        out = _Adjoint.apply(fz, adjoint, vjp_z, make_error, exact, len(saved),
                             *(s.detach() for s in saved), *inputs)
        # Equal to z_star in value; the gradient path runs through f(z*, x). A non-finite f(z*)
        # (a flagged sample) must not turn the returned value into NaN.
        delta = out - out.detach()
        return z_star + torch.where(torch.isfinite(delta), delta, torch.zeros_like(delta))

    def attach_reverse(self, f, z_star, x, backward, saved=(), higher_order_error=None):
        z_star = z_star.detach()
        if not torch.is_grad_enabled():
            return z_star
        x_leaves, spec = tree_flatten(x)
        slots = [i for i, t in enumerate(x_leaves) if _requires_grad(t)]
        x_inputs = tuple(x_leaves[i] for i in slots)
        # x's differentiated tensors as leaves of their own: f's graph then ends at them and at
        # the tensors f closes over, whatever computed x
        x_own = [t.detach().requires_grad_(True) for t in x_inputs]
        for i, t in zip(slots, x_own, strict=True):
            x_leaves[i] = t
        x_local = tree_unflatten(x_leaves, spec)
        z = z_star.requires_grad_(True)
        # a graph only to find the leaves: it keeps no tensor (nothing differentiates it)
        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(_discard, _discarded):
            fz = f(z, x_local)
        own = {id(t) for t in (z, *x_own)}
        params = tuple(t for t in _graph_leaves(fz) if id(t) not in own)
        z_star = z_star.detach()
        del fz
        if not params and not x_inputs:
            return z_star
        wrt = (*x_own, *params)

        def pullback(p, v, acc):
            p = p.detach().requires_grad_(True)
            with torch.enable_grad():
                out = f(p, x_local)
                # the graph above the parameters (a weight computed outside f) is shared with
                # the caller's and with later pullbacks: keep it
                grads = torch.autograd.grad(out, (p, *wrt), v, retain_graph=True, allow_unused=True)
            gp = torch.zeros_like(p) if grads[0] is None else grads[0]
            acc = tuple(a if d is None else a + d for a, d in zip(acc, grads[1:], strict=True))
            return out.detach(), gp, acc

        make_error = higher_order_error or _higher_order_error(None)
        saved = tuple(s.detach() for s in saved)
        return _Reverse.apply(z_star, backward, pullback, make_error, len(saved), *saved, *x_inputs, *params)

    def first_order_only(self, x, make_error):
        # attached for reverse mode, and for forward mode (a dual x), which it does not support
        if not (torch.is_grad_enabled() and x.requires_grad) and not _dual(x):
            return x
        # one element of x, multiplied by 0: a new tensor (no storage of x kept, no version
        # counter shared) whose graph reaches everything x depends on
        anchor = x.reshape(-1)[:1] * 0
        return _FirstOrderOnly.apply(x, anchor, make_error)

    def to_numpy(self, x):
        x = x.detach().cpu()
        if x.dtype == torch.bfloat16:  # NumPy has no bfloat16; float32 holds every value
            x = x.float()
        return x.numpy()

    def device(self, x):
        return x.device

    def compiled(self, mode=None):
        if self.make_compiled is None:
            raise TypeError("deqcore: this torch backend was made without a compiled variant")
        return self.make_compiled(self, mode)
