from __future__ import annotations

import contextlib
import types
from collections.abc import Callable
from typing import Any

import array_api_compat.torch as compat
import torch
import torch.autograd.forward_ad as forward_ad

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


def _needs_gradient(fz, z):
    """Whether the graph of ``fz`` reaches a leaf requiring grad other than ``z`` (depth-first)."""
    if fz.grad_fn is None:
        return False
    stack, seen = [fz.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        leaf = getattr(node, "variable", None)
        if leaf is not None:
            if leaf is not z:
                return True
            continue
        stack.extend(next_node for next_node, _ in node.next_functions)
    return False


class _Adjoint(torch.autograd.Function):
    """Identity on ``f(z*)`` whose backward replaces the cotangent ``g`` by ``adjoint(g, ...)``.

    The adjoint is computed without a graph; when the backward is recorded (``create_graph``) it
    is returned through :class:`_HigherOrderCheck`, tied to ``g`` and ``f(z*)``.
    """

    @staticmethod
    def forward(ctx, fz, adjoint, vjp_z, make_error, *saved):
        # f(z*) is kept alive by vjp_z's closure already; the check needs its graph, not its data
        ctx.adjoint, ctx.vjp_z, ctx.make_error, ctx.fz = adjoint, vjp_z, make_error, fz
        ctx.save_for_backward(*saved)
        return fz.view_as(fz)

    @staticmethod
    def backward(ctx, g):
        with torch.no_grad():
            u = ctx.adjoint(g.detach(), ctx.vjp_z, *ctx.saved_tensors)
        u = _checked(u, ctx.make_error, g, ctx.fz)
        return (u, None, None, None) + (None,) * len(ctx.saved_tensors)


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

    def attach_adjoint(self, f, z_star, x, adjoint, saved=(), higher_order_error=None):
        z_star = z_star.detach()
        if not torch.is_grad_enabled():
            return z_star
        z = z_star.detach().requires_grad_(True)
        with torch.enable_grad():
            fz = f(z, x)
        if not _needs_gradient(fz, z):  # nothing f uses but z requires a gradient
            return z_star

        def vjp_z(v):
            (out,) = torch.autograd.grad(fz, z, v, retain_graph=True)
            return out

        make_error = higher_order_error or _higher_order_error(None)
        out = _Adjoint.apply(fz, adjoint, vjp_z, make_error, *(s.detach() for s in saved))
        # Equal to z_star in value; the gradient path runs through f(z*, x). A non-finite f(z*)
        # (a flagged sample) must not turn the returned value into NaN.
        delta = out - out.detach()
        return z_star + torch.where(torch.isfinite(delta), delta, torch.zeros_like(delta))

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
