"""The result of a fixed-point solve: :class:`Solution`, its :class:`Status` codes with their
messages, and the error and warning a solve raises."""

from __future__ import annotations

import dataclasses
import enum
from typing import Any


class Status(enum.IntEnum):
    """The outcome of a solve, per sample (``Solution.status``) and for the whole batch
    (``Solution.result``: the worst over the samples); larger values are worse. Each member
    carries its ``message``.
    """

    CONVERGED = 0
    MAX_ITER = 1
    DIVERGED = 2
    OVERFLOW = 3
    NONFINITE = 4

    @property
    def message(self) -> str:
        """What the status means, in one or two sentences."""
        return _MESSAGES[self]


_MESSAGES = {
    Status.CONVERGED: "the stop residual reached tol",
    Status.MAX_ITER: "max_iter steps ran without reaching tol; the lowest-residual iterate is kept",
    Status.DIVERGED: "the residual grew beyond divergence times the initial one; the sample was frozen",
    Status.OVERFLOW: (
        "the iterate and f(z) stayed finite but the residual norm overflowed the dtype's range (the "
        "sum of squares of entries above about sqrt(finfo.max): 1.8e19 in float32 and in half "
        "precision, whose norms are taken in float32; 1.3e154 in float64); the loop stopped the sample "
        "there and measured its residuals again without overflow (inf where the norm itself is not "
        "representable). Rescale the state or solve in a wider dtype"
    ),
    Status.NONFINITE: (
        "f produced NaN or Inf for this sample (for example from a NaN in x); the sample was frozen "
        "at its last finite iterate, or at z0 if f(z0) was not finite"
    ),
}


class ConvergenceError(RuntimeError):
    """Raised by ``deqcore.solve(..., throw=True)`` when a sample did not converge."""


class CompileWarning(UserWarning):
    """``deqcore.solve(..., compile=...)`` could not compile the solver loop and ran it eagerly
    (the same results at eager speed); the message says why."""


@dataclasses.dataclass(frozen=True)
class Solution:
    """The outcome of :func:`deqcore.solve`.

    Per-sample arrays have the batch as their (last) axis and live on the input's device; for an
    empty batch (B = 0) they have length 0, ``steps`` is 0 and ``result`` is ``CONVERGED``.
    Residuals and traces are in the state's dtype, or in float32 for half-precision states
    (float16, bfloat16), where they are computed.

    Attributes:
        z: the fixed point, with the structure of ``z0`` (an array or a tuple of arrays). Per
            sample, the iterate with the lowest stop residual seen.
        abs_residual: (B,) ``||f(z) - z||`` at the returned ``z``.
        rel_residual: (B,) ``||f(z) - z|| / (||f(z)|| + 1e-9)`` at the returned ``z``.
        converged: (B,) bool, the stop residual reached ``tol``.
        status: (B,) int, a :class:`Status` code per sample.
        iterations: (B,) int, the steps each sample took before it was frozen.
        steps: int scalar, the loop steps run (the largest of ``iterations``).
        nfe: int scalar, batched evaluations of ``f`` (the initial ``f(z0)`` included, also for
            an empty batch; with ``check_every > 1`` also those that ran after every sample had
            stopped).
        abs_trace: (min(max_iter, trace) + 1, B) absolute residual of the iterate at each step
            (row 0: ``z0``), for the first ``trace`` steps (1000 by default); entries after a
            sample was frozen repeat its final value. None when solved with ``trace=False``.
        rel_trace: the relative residual, likewise.
        solver_state: the solver's final state (for Broyden: ``U``, ``V`` of the low-rank inverse
            Jacobian estimate, kept for the GDEQ gradient).
        solver: the solver's name.
        stop_mode: ``"abs"`` or ``"rel"``, the residual ``tol`` applied to.
        tol: the tolerance.
        grad: the gradient mode attached to ``z`` (None: no gradient path).
        correction_states: a tuple of states, each with the structure of ``z``, recorded at the
            steps ``correction_states`` asked for (in step order) and carrying their own phantom
            gradient; empty when none were asked for.
        backward: a :class:`deqcore.BackwardReport` filled in when a backward pass runs
            (backward-solve statistics of the ``implicit`` mode), None when ``grad`` is None.
    """

    z: Any
    abs_residual: Any
    rel_residual: Any
    converged: Any
    status: Any
    iterations: Any
    steps: Any
    nfe: Any
    abs_trace: Any
    rel_trace: Any
    solver_state: Any
    correction_states: Any = ()
    solver: str = dataclasses.field(default="", metadata={"static": True})
    stop_mode: str = dataclasses.field(default="rel", metadata={"static": True})
    tol: float = dataclasses.field(default=0.0, metadata={"static": True})
    grad: str | None = dataclasses.field(default=None, metadata={"static": True})
    backward: Any = dataclasses.field(default=None, metadata={"static": True}, compare=False)

    @property
    def result(self) -> Status:
        """The worst per-sample :class:`Status` (``CONVERGED`` when every sample converged, and
        for an empty batch); its ``message`` says what it means. Needs concrete arrays."""
        import numpy as np

        status = np.asarray(_to_numpy(self.status))
        return Status(int(status.max())) if status.size else Status.CONVERGED

    @property
    def residual(self) -> Any:
        """The per-sample residual that ``tol`` was applied to."""
        return self.rel_residual if self.stop_mode == "rel" else self.abs_residual

    def summary(self) -> str:
        """A one-line human-readable report (needs concrete arrays)."""
        import numpy as np

        res = np.asarray(_to_numpy(self.residual), dtype=float)
        conv = np.asarray(_to_numpy(self.converged))
        return (
            f"{self.solver}: {self.result.name}, {int(conv.sum())}/{conv.size} converged, "
            f"steps {int(_to_numpy(self.steps))}, nfe {int(_to_numpy(self.nfe))}, "
            f"max {self.stop_mode} residual {res.max(initial=0.0):.3e}"
        )


SOLUTION_DATA_FIELDS = [
    f.name for f in dataclasses.fields(Solution) if not f.metadata.get("static", False)
]
"""The fields of :class:`Solution` that hold arrays (a pytree's children)."""
SOLUTION_META_FIELDS = [f.name for f in dataclasses.fields(Solution) if f.metadata.get("static")]
"""The static fields of :class:`Solution` (a pytree's auxiliary data: solver name, tol, ...)."""


def _to_numpy(x: Any) -> Any:
    import numpy as np

    if hasattr(x, "detach"):
        x = x.detach().cpu()
        if str(x.dtype) == "torch.bfloat16":  # NumPy has no bfloat16
            x = x.float()
    return np.asarray(x)
