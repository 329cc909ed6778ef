from __future__ import annotations

from typing import Any

from ._base import BackwardProblem, GradientMode


class Unroll(GradientMode):
    """Backpropagation through the forward solver's iterations (the reference; memory grows).

    The forward solve itself is recorded: every step's intermediates are kept for the backward
    pass, so memory grows linearly with the number of iterations. On JAX the recorded loop always
    runs ``max_iter`` steps (finished samples are frozen, so the result is the same). The only
    mode exact to every order: its gradient can be differentiated again (Hessian-vector products,
    ``jax.hessian``, ``create_graph=True``), since the recorded iterations depend on the parameters.
    """

    name = "unroll"
    unrolled = True
    exact_higher_order = True

    def attach(self, bp: BackwardProblem) -> Any:  # pragma: no cover - solve never calls it
        raise RuntimeError("the unroll mode differentiates the forward solve; attach is not used")
