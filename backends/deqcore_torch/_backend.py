from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import array_api_compat.torch as xp
import torch


class TorchBackend:
    """The protocol on PyTorch: eager loops, in-place buffer writes, autograd hooks.

    Works for any floating dtype and device; arrays are created on the input's device. The only
    host round-trip in a solver iteration is the loop's stop check.
    """

    name = "torch"
    xp = xp
    static_shapes = False

    def is_array(self, obj: object) -> bool:
        return isinstance(obj, torch.Tensor)

    def no_grad(self) -> contextlib.AbstractContextManager[Any]:
        return torch.no_grad()

    def while_loop(self, cond, body, state):
        with torch.no_grad():
            while bool(cond(state)):
                state = body(state)
        return state

    def fori_loop(self, length, body, state):
        for i in range(length):
            state = body(i, state)
        return state

    def set_index(self, buffer, index, value, axis=0):
        buffer.select(axis, int(index)).copy_(value)
        return buffer

    def active_prefix(self, buffer, count, axis):
        return buffer.narrow(axis, 0, min(int(count), buffer.shape[axis]))

    def linear_solve(self, a, b, symmetric_positive_definite=False):
        dtype = a.dtype
        if dtype in (torch.float16, torch.bfloat16):  # LAPACK has no half-precision solve
            a, b = a.float(), b.float()
        x, _ = torch.linalg.solve_ex(a, b.unsqueeze(-1), check_errors=False)
        return x.squeeze(-1).to(dtype)

    def vjp(self, fn, *primals):
        leaves = [p.detach().requires_grad_(True) for p in primals]
        with torch.enable_grad():
            out = fn(*leaves)

        def pullback(ct):
            grads = torch.autograd.grad(out, leaves, ct, retain_graph=True, allow_unused=True)
            return tuple(torch.zeros_like(p) if g is None else g for p, g in zip(leaves, grads, strict=True))

        return out, pullback

    def stop_gradient(self, x):
        return x.detach()

    def attach_adjoint(self, f, z_star, x, adjoint):
        z = z_star.detach().requires_grad_(True)
        with torch.enable_grad():
            fz = f(z, x)
        if not fz.requires_grad:
            return z_star.detach()
        busy = []

        def vjp_z(v):
            (out,) = torch.autograd.grad(fz, z, v, retain_graph=True)
            return out

        def hook(g):
            if busy:  # a VJP issued by the adjoint itself: leave its cotangent alone
                return g
            busy.append(True)
            try:
                return adjoint(g, vjp_z)
            finally:
                busy.clear()

        fz.register_hook(hook)
        # Equal to z_star in value; the gradient path runs through f(z*, x).
        return z_star.detach() + (fz - fz.detach())

    def to_numpy(self, x):
        return x.detach().cpu().numpy()

    def is_concrete(self, x):
        return True

    def device(self, x):
        return x.device

    def host_check(self, failed, make_error: Callable[..., Exception], *payload):
        if bool(torch.any(failed)):
            raise make_error(self.to_numpy(failed), *(self.to_numpy(p) for p in payload))

    def register_pytree(self, cls, data_fields, meta_fields):
        return None
