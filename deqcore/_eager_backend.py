"""A base class for backends of eager array libraries: every protocol method that has an obvious
eager implementation in terms of the Array-API namespace ``xp``, so a backend writes only what
its framework does differently."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any, ClassVar

import numpy as np

from ._capabilities import Capabilities, CapabilityError, require_autodiff
from ._protocol import Array, Backend, State


class EagerBackend:
    """Eager defaults for :class:`deqcore.extend.Backend`; a subclass sets ``name`` and ``xp`` and
    implements ``is_array``.

    The defaults: Python loops (``while_loop``, ``differentiable_loop``, ``fori_loop``), ``jit``
    returning its function, in-place ``set_index`` by item assignment, ``active_prefix`` as a slice,
    ``linear_solve`` by ``xp.linalg.solve``, host checks and callbacks by direct calls on
    ``to_numpy`` copies (``numpy.asarray``), no pytrees and no compiled mode. Without autodiff
    (``capabilities = Capabilities()``, the default) ``vjp``, ``attach_adjoint`` and
    ``attach_reverse`` raise :class:`deqcore.CapabilityError` and
    ``stop_gradient``/``first_order_only`` return their input. A backend overrides what its library
    does better or differently: ``linear_solve`` must never raise on a singular system
    (``numpy.linalg.solve`` does), ``to_numpy`` must copy from an accelerator, and a backend with
    autodiff overrides ``vjp``, ``attach_adjoint``, ``attach_reverse``, ``stop_gradient``,
    ``first_order_only``, ``no_grad`` and declares ``autodiff=True``.
    """

    name: ClassVar[str]
    xp: ClassVar[Any]
    static_shapes: ClassVar[bool] = False
    capabilities: ClassVar[Capabilities] = Capabilities()

    def is_array(self, obj: object) -> bool:
        raise NotImplementedError(f"{type(self).__name__} must implement is_array(obj)")

    def no_grad(self) -> contextlib.AbstractContextManager[Any]:
        return contextlib.nullcontext()

    def while_loop(self, cond: Callable[[State], Array], body: Callable[[State], State], state: State,
                   max_steps: int | None = None, check_every: int = 1) -> State:
        with self.no_grad():
            return self.differentiable_loop(cond, body, state, max_steps, check_every)

    def differentiable_loop(self, cond: Callable[[State], Any], body: Callable[[State], State],
                            state: State, max_steps: int | None, check_every: int = 1) -> State:
        i = 0
        while max_steps is None or i < max_steps:
            if i % check_every == 0 and not bool(cond(state)):
                break
            state = body(state)
            i += 1
        return state

    def fori_loop(self, length: int, body: Callable[[int, State], State], state: State) -> State:
        for i in range(length):
            state = body(i, state)
        return state

    def jit(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        return fn

    def set_index(self, buffer: Array, index: Any, value: Array, axis: int = 0) -> Array:
        buffer[(slice(None),) * (axis % buffer.ndim) + (int(index),)] = value
        return buffer

    def active_prefix(self, buffer: Array, count: Any, axis: int) -> Array:
        return buffer[(slice(None),) * (axis % buffer.ndim) + (slice(0, int(count)),)]

    def linear_solve(self, a: Array, b: Array, symmetric_positive_definite: bool = False) -> Array:
        return self.xp.linalg.solve(a, b[..., None])[..., 0]

    def vjp(self, fn: Callable[..., Array], *primals: Array,
            create_graph: bool = False) -> tuple[Array, Callable[..., Any]]:
        require_autodiff(self, "a vector-Jacobian product (Backend.vjp)", "do not differentiate on it")
        raise NotImplementedError(f"{type(self).__name__} declares autodiff but does not implement vjp")

    def stop_gradient(self, x: Array) -> Array:
        return x

    def attach_adjoint(self, f: Callable[[Array, Any], Array], z_star: Array, x: Any,
                       adjoint: Callable[..., Array], saved: tuple[Array, ...] = (),
                       higher_order_error: Callable[[], Exception] | None = None,
                       linear_solve: Callable[[Array, Callable[[Array], Array]], Array] | None = None,
                       ) -> Array:
        require_autodiff(self, "a gradient mode (Backend.attach_adjoint)", "solve with grad=None")
        raise NotImplementedError(f"{type(self).__name__} declares autodiff but does not implement "
                                  "attach_adjoint")

    def attach_reverse(self, f: Callable[[Array, Any], Array], z_star: Array, x: Any,
                       backward: Callable[..., Any], saved: tuple[Array, ...] = (),
                       higher_order_error: Callable[[], Exception] | None = None) -> Array:
        require_autodiff(self, "a gradient mode (Backend.attach_reverse)", "solve with grad=None")
        raise CapabilityError(f"deqcore: backend {self.name!r} does not implement attach_reverse, which "
                              f"grad='reversible' needs; use grad='unroll' with solver='reversible' for "
                              f"the same gradient (memory then grows with the steps)")

    def first_order_only(self, x: Array, make_error: Callable[[], Exception]) -> Array:
        return x

    def host_callback(self, fn: Callable[..., None], *arrays: Array) -> None:
        fn(*(self.to_numpy(a) for a in arrays))

    def to_numpy(self, x: Array) -> Any:
        return np.array(x, copy=True)

    def is_concrete(self, x: Array) -> bool:
        return True

    def device(self, x: Array) -> Any:
        return getattr(x, "device", None)

    def host_check(self, failed: Array, make_error: Callable[..., Exception], *payload: Array) -> None:
        if bool(self.xp.any(failed)):
            raise make_error(self.to_numpy(failed), *(self.to_numpy(p) for p in payload))

    def register_pytree(self, cls: type, data_fields: list[str], meta_fields: list[str]) -> None:
        return None

    def compiled(self, mode: str | None = None) -> Backend:
        raise TypeError(f"deqcore.solve: backend {self.name!r} has no compiled mode (compile={mode!r}); "
                        "solve with compile=False")
