"""What a backend declares it supports, and the checks that turn a missing capability into an error.

A backend's ``capabilities`` attribute (a :class:`Capabilities`) is declared once, on its class.
deqcore reads ``autodiff`` before anything that differentiates (a gradient mode, hypersolver
training, the Jacobian penalty), so a backend without it gives a :class:`CapabilityError` naming
the backend, the request and the fix, instead of silently returning an array with no gradient.
"""

from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass(frozen=True)
class Capabilities:
    """What a backend supports beyond the eager operations every backend has.

    Attributes:
        autodiff: ``vjp`` and ``attach_adjoint`` work (reverse-mode differentiation through
            ``f`` and through a solve). Without it, ``solve(grad=...)`` other than ``grad=None``,
            ``train_hypersolver`` and ``jacobian_penalty`` raise :class:`CapabilityError`.
        jit: a whole solve can be compiled by the framework (``jax.jit``); ``compile=`` of
            :func:`deqcore.solve` is a separate matter (the backend's ``compiled``).
        vmap: a solve can run under the framework's vectorising map (``batched=False`` inside
            ``jax.vmap``).
        devices: the kinds of device arrays may live on (``("cpu",)``, ``("cpu", "cuda")``).
    """

    autodiff: bool = False
    jit: bool = False
    vmap: bool = False
    devices: tuple[str, ...] = ("cpu",)

    def __post_init__(self) -> None:
        for flag in ("autodiff", "jit", "vmap"):
            if not isinstance(getattr(self, flag), bool):
                raise TypeError(f"Capabilities: {flag} must be True or False, got {getattr(self, flag)!r}")
        if not (isinstance(self.devices, tuple) and self.devices
                and all(isinstance(d, str) and d for d in self.devices)):
            raise TypeError(f"Capabilities: devices must be a non-empty tuple of device kinds such as "
                            f"('cpu',), got {self.devices!r}")


class CapabilityError(TypeError):
    """A backend was asked for something its :class:`Capabilities` say it cannot do (a gradient
    mode, or hypersolver training, on a backend without autodiff)."""


def require_autodiff(backend: Any, request: str, fix: str) -> None:
    """Raise :class:`CapabilityError` unless ``backend`` declares ``autodiff``.

    ``request`` says what needed it (``"grad='implicit'"``), ``fix`` what to do instead.
    """
    if not backend.capabilities.autodiff:
        raise CapabilityError(
            f"deqcore: {request} needs reverse-mode differentiation, which backend {backend.name!r} "
            f"does not support (its capabilities declare autodiff=False); {fix}"
        )


def check_gradient_mode(backend: Any, grad: str | None) -> None:
    """The check :func:`deqcore.solve` makes: a gradient mode (``grad`` not None) needs autodiff."""
    if grad is not None:
        require_autodiff(backend, f"deqcore.solve(grad={grad!r})", "solve with grad=None, or on a "
                         "backend with autodiff (torch, jax) to differentiate the solution")
