from __future__ import annotations

from typing import Any

from .._options import Option, positive_int, unit_interval
from ._base import AdjointContext, AdjointMode, BackwardProblem, GradientMode


class PhantomOptions:
    """The options both phantom gradients take."""

    k = Option(5, "number of damped steps (k=1, lam=1 is JFB)", positive_int)
    lam = Option(0.5, "damping lambda in (0, 1]", unit_interval)


class NPG(PhantomOptions, AdjointMode):
    """Neumann phantom gradient: ``u = lam * sum_{t<k} g M^t`` with ``M = lam J + (1 - lam) I``.

    The first ``k`` terms of the damped Neumann series of ``g (I - J)^-1``; ``k - 1`` VJPs with
    respect to ``z`` plus the final one to the parameters, evaluated at ``z*`` only, so the
    memory does not depend on ``k``.
    """

    name = "npg"

    def adjoint(self, ctx: AdjointContext, g: Any, vjp_z: Any, saved: tuple[Any, ...]) -> Any:
        term, total = g, g
        for _ in range(self.k - 1):
            term = self.lam * vjp_z(term) + (1.0 - self.lam) * term
            total = total + term
        return self.lam * total


class UPG(PhantomOptions, GradientMode):
    """Unrolled phantom gradient: differentiate through ``k`` damped steps from ``stop_gradient(z*)``.

    ``z_{t+1} = z_t + lam (f(z_t) - z_t)``; the returned value stays ``z*``, its gradient is that of
    ``z_k``. Memory grows with ``k`` (the ``k`` steps are recorded); equals NPG for affine ``f``.
    """

    name = "upg"

    def attach(self, bp: BackwardProblem) -> Any:
        be = bp.backend
        z = bp.z_star
        for _ in range(self.k):
            z = z + self.lam * (bp.f(z, bp.x) - z)
        delta = z - be.stop_gradient(z)
        # zero in value; a non-finite sample (flagged NONFINITE) must not turn z* into NaN
        return bp.z_star + be.xp.where(be.xp.isfinite(delta), delta, be.xp.zeros_like(delta))
