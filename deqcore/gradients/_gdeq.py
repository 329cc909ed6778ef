from __future__ import annotations

from typing import Any

from ..solvers._broyden import apply_inverse_transpose
from ._base import AdjointContext, AdjointMode, BackwardProblem


class GDEQ(AdjointMode):
    """GDEQ: reuse Broyden's inverse-Jacobian estimate ``B_T ~ (J - I)^-1`` in the backward pass.

    ``u = -g B_T = g - sum_i (g . u_i) v_i`` per sample, with the ``(U, V)`` ring the Broyden
    forward solve holds at termination (that of the last iterate). One VJP of ``f`` at ``z*``, no
    VJP for the adjoint; keeps ``2 m n`` floats per sample for the backward pass. Needs
    ``solver="broyden"``; with ``memory=0`` it is exactly JFB.
    """

    name = "gdeq"

    def check(self, solver: str) -> None:
        if solver != "broyden":
            raise ValueError(
                f"gradient mode 'gdeq' reuses Broyden's inverse-Jacobian estimate and needs "
                f"solver='broyden', got solver={solver!r}"
            )

    def saved(self, bp: BackwardProblem) -> tuple[Any, ...]:
        # the solver's final state holds only the ring slots in use (Broyden.final_state)
        return bp.solver_state.U, bp.solver_state.V

    def adjoint(self, ctx: AdjointContext, g: Any, vjp_z: Any, saved: tuple[Any, ...]) -> Any:
        U, V = saved
        return -apply_inverse_transpose(ctx.backend.xp, U, V, g)
