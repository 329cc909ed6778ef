"""What the models need from a framework beyond deqcore's array namespace: convolution, array
conversion, a hand-written gradient and gradients of a loss. Everything else in the models is
written once over ``xp``.

:func:`ops_for` returns the :class:`Ops` of a backend; the framework is imported only then.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any, Protocol

import numpy as np


class Ops(Protocol):
    """The framework glue of deqcore_models. ``name`` is the deqcore backend name; ``replicas``
    the data-parallel processes that each hold an equal share of a training batch (1 in one
    process, and under JAX, where a function jitted over a device mesh sees the global batch),
    and ``replica_sum(a)`` the sum of ``a`` over them, differentiable (``a`` itself for one)."""

    name: str
    xp: Any
    replicas: int
    replica_sum: Callable[[Any], Any]

    def conv2d(self, x: Any, w: Any, stride: int = 1, padding: int = 0) -> Any:
        """2-D cross-correlation, NCHW input, OIHW weight, symmetric zero padding, no bias."""
        ...

    def precision(self, name: str) -> contextlib.AbstractContextManager[Any]:
        """A block whose model code runs its convolutions (torch: also its matrix products) in
        ``name``, ``"float32"`` (nothing changes), ``"bfloat16"`` or ``"float16"``; other
        operations run in float32, the dtype of the parameters, which stay float32 (gradients
        too). torch: ``torch.autocast`` on the CPU (the engine's device); JAX: :meth:`conv2d`
        casts its operands. float16 needs a GPU: on a CPU it is a ``ValueError``."""
        ...

    def asarray(self, a: np.ndarray, dtype: str | None = None) -> Any:
        """A framework array (on the default device) from a NumPy array."""
        ...

    def to_numpy(self, a: Any) -> np.ndarray:
        """A NumPy copy of a framework array (detached from any graph)."""
        ...

    def stop_gradient(self, a: Any) -> Any:
        """``a`` with no gradient flowing back (the deqcore backend's ``stop_gradient``)."""
        ...

    def custom_gradient(self, fwd: Callable[..., tuple[Any, Any, tuple[Any, ...]]],
                        bwd: Callable[..., tuple[Any, ...]]) -> Callable[..., tuple[Any, Any]]:
        """``fn(*args) -> (value, aux)`` with a hand-written first-order gradient.

        ``fwd(*args)`` returns ``(value, aux, residuals)``: ``value`` is the one differentiable
        output, ``aux`` an integer array carrying no gradient (a count), ``residuals`` a tuple of
        arrays for the backward pass. ``bwd(residuals, g)`` returns one cotangent per argument
        of ``fn`` given the cotangent ``g`` of ``value`` (None for an argument without gradient,
        such as integer targets). The residuals are kept the framework's way (torch:
        ``ctx.save_for_backward``, visible to ``saved_tensors_hooks``; JAX: ``custom_vjp``
        residuals), so a memory measurement sees exactly them. ``fwd`` and ``bwd`` must not close
        over arrays (under ``jax.jit`` that would leak a tracer); Python numbers are fine.
        """
        ...


def _same(a: Any) -> Any:
    return a


def _half_precision_error(name: str, where: str) -> ValueError:
    return ValueError(f"precision {name!r} needs a GPU ({where}); on a CPU use 'bfloat16' or 'float32'")


class TorchOps:
    """PyTorch. A data-parallel engine sets :attr:`replicas` and :attr:`replica_sum` (an
    all-reduce whose backward all-reduces the cotangent)."""

    name = "torch"
    replicas = 1
    replica_sum: Callable[[Any], Any] = staticmethod(_same)

    def __init__(self) -> None:
        import torch
        import torch.nn.functional as F

        import deqcore

        self._torch, self._F = torch, F
        backend = deqcore.registry().backend("torch")
        self.xp, self.stop_gradient = backend.xp, backend.stop_gradient

    def conv2d(self, x, w, stride=1, padding=0):
        return self._F.conv2d(x, w, stride=stride, padding=padding)

    def precision(self, name):
        if name == "float32":
            return contextlib.nullcontext()
        if name == "float16":
            raise _half_precision_error(name, "the torch engine trains on the CPU")
        return self._torch.autocast("cpu", dtype=getattr(self._torch, name))

    def asarray(self, a, dtype=None):
        # np.array, not ascontiguousarray: the latter turns 0-d arrays into shape (1,)
        return self._torch.from_numpy(np.array(a, dtype=dtype, order="C", copy=True))

    def to_numpy(self, a):
        return a.detach().cpu().numpy()

    def custom_gradient(self, fwd, bwd):
        class Fn(self._torch.autograd.Function):
            @staticmethod
            def forward(ctx, *args):
                value, aux, residuals = fwd(*args)
                ctx.save_for_backward(*residuals)
                ctx.mark_non_differentiable(aux)
                return value, aux

            @staticmethod
            def backward(ctx, g, _g_aux):
                return tuple(bwd(ctx.saved_tensors, g))

        return Fn.apply


class JaxOps:
    name = "jax"
    replicas = 1
    replica_sum: Callable[[Any], Any] = staticmethod(_same)

    def __init__(self) -> None:
        import jax.numpy as jnp

        import deqcore

        self._jnp = jnp
        self.xp = jnp
        self.stop_gradient = deqcore.registry().backend("jax").stop_gradient
        self._conv = _jax_conv2d()
        self._compute_dtype: Any = None

    def conv2d(self, x, w, stride=1, padding=0):
        if self._compute_dtype is not None:
            x, w = x.astype(self._compute_dtype), w.astype(self._compute_dtype)
        return self._conv(x, w, stride, padding)

    @contextlib.contextmanager
    def precision(self, name):
        import jax

        if name == "float16" and jax.default_backend() == "cpu":
            raise _half_precision_error(name, "JAX runs on the CPU here")
        before = self._compute_dtype
        self._compute_dtype = None if name == "float32" else getattr(self._jnp, name)
        try:
            yield
        finally:
            self._compute_dtype = before

    def asarray(self, a, dtype=None):
        return self._jnp.asarray(a if dtype is None else np.asarray(a, dtype=dtype))

    def to_numpy(self, a):
        return np.asarray(a)

    def custom_gradient(self, fwd, bwd):
        import jax

        @jax.custom_vjp
        def fn(*args):
            value, aux, _ = fwd(*args)
            return value, aux

        def fn_fwd(*args):
            value, aux, residuals = fwd(*args)
            return (value, aux), residuals

        def fn_bwd(residuals, g):
            return tuple(bwd(residuals, g[0]))

        fn.defvjp(fn_fwd, fn_bwd)
        return fn


def _jax_conv2d():
    """NCHW/OIHW convolution for JAX whose forward and input-gradient run as NHWC/HWIO convs.

    Why: inside ``lax.while_loop`` bodies (every solver iteration, the implicit backward's VJP
    loop) XLA:CPU cannot re-lay-out loop-carried NCHW arrays and falls back to a conv about 9x
    slower than the NHWC one it picks outside loops (measured on this project's MDEQ: 110 ms per f
    in a loop against 7 ms jitted alone). Explicit transposes around an NHWC conv, and a
    custom VJP whose input gradient is again an explicit NHWC conv (JAX's own transpose rule
    emits a layout XLA:CPU also runs slowly in loops), keep both at full speed. The weight
    gradient uses JAX's rule: it is taken once per backward pass, outside the solver loops.
    """
    import functools

    import jax
    import jax.numpy as jnp
    from jax import lax

    def nhwc_conv(x, w_hwio, stride, pad_lo, pad_hi, lhs_dilation=1):
        return lax.conv_general_dilated(
            x, w_hwio, window_strides=(stride, stride),
            padding=((pad_lo[0], pad_hi[0]), (pad_lo[1], pad_hi[1])),
            lhs_dilation=(lhs_dilation, lhs_dilation), dimension_numbers=("NHWC", "HWIO", "NHWC"))

    def forward(x, w, stride, padding):
        y = nhwc_conv(jnp.transpose(x, (0, 2, 3, 1)), jnp.transpose(w, (2, 3, 1, 0)), stride,
                      (padding, padding), (padding, padding))
        return jnp.transpose(y, (0, 3, 1, 2))

    @functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
    def conv(x, w, stride, padding):
        return forward(x, w, stride, padding)

    def fwd(x, w, stride, padding):
        return forward(x, w, stride, padding), (x, w)

    def bwd(stride, padding, res, g):
        x, w = res
        k_h, k_w = w.shape[2], w.shape[3]
        size_in, size_out = x.shape[2:], g.shape[2:]
        # dx: the transposed convolution, as a stride-1 conv of the stride-dilated cotangent with
        # the spatially flipped kernel, input and output channels swapped
        w_t = jnp.transpose(jnp.flip(w, (2, 3)), (2, 3, 0, 1))
        lo = (k_h - 1 - padding, k_w - 1 - padding)
        hi = tuple(n_in - (n_out - 1) * stride - 1 + padding
                   for n_in, n_out in zip(size_in, size_out, strict=True))
        dx = nhwc_conv(jnp.transpose(g, (0, 2, 3, 1)), w_t, 1, lo, hi, lhs_dilation=stride)
        dx = jnp.transpose(dx, (0, 3, 1, 2))
        _, pull_w = jax.vjp(lambda w_: forward(x, w_, stride, padding), w)
        (dw,) = pull_w(g)
        return dx, dw

    conv.defvjp(fwd, bwd)
    return conv


_OPS: dict[str, Any] = {"torch": TorchOps, "jax": JaxOps}


def ops_for(backend: str) -> Ops:
    """The :class:`Ops` of ``"torch"`` or ``"jax"``; an unknown name is a ``ValueError``."""
    if backend not in _OPS:
        raise ValueError(f"unknown model backend {backend!r}; deqcore_models supports {sorted(_OPS)}")
    ops: Ops = _OPS[backend]()
    return ops
