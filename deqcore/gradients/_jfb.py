from __future__ import annotations

from typing import Any

from ._base import AdjointContext, AdjointMode


class JFB(AdjointMode):
    """Jacobian-free backpropagation: ``u = g`` (the Jacobian term is dropped).

    One VJP of ``f`` at ``z*``; nothing kept from the forward solve.
    """

    name = "jfb"

    def adjoint(self, ctx: AdjointContext, g: Any, vjp_z: Any, saved: tuple[Any, ...]) -> Any:
        return g
