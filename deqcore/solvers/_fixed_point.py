from __future__ import annotations

from typing import Any, NamedTuple

from .._options import Option, unit_interval
from ._base import Problem, Solver, select_rows


class FixedPointState(NamedTuple):
    z: Any
    fz: Any


class FixedPoint(Solver):
    """Damped fixed-point iteration ``z <- z + damping * (f(z) - z)``; one f-evaluation a step."""

    name = "fixed_point"
    damping = Option(1.0, "step fraction in (0, 1]; 1 is plain iteration z <- f(z)", unit_interval)

    def init(self, problem: Problem, z0: Any, fz0: Any) -> FixedPointState:
        return FixedPointState(z0, fz0)

    def step(self, problem: Problem, state: FixedPointState, active: Any):
        xp = problem.backend.xp
        if self.damping == 1.0:
            proposal = state.fz
        else:
            proposal = state.z + self.damping * (state.fz - state.z)
        z = select_rows(xp, active, proposal, state.z)
        fz = problem.fn(z)
        return z, fz, FixedPointState(z, fz), 1

    def commit(self, problem, state, z_new, fz_new, g_new, active, keep):
        return state
