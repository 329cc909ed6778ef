"""The dtype ``f`` runs in, when it is narrower than the state's (``solve(..., f_dtype=...)``).

Mixed precision keeps the solver's state (the master iterate) in its own dtype, float32 as a rule,
and evaluates ``f`` in a half dtype: every evaluation casts the state down to ``f_dtype`` on the
way in and ``f``'s output up to the state's dtype on the way out. Everything the solver computes
from iterates (residuals, the stop test, Anderson's mixing system, Broyden's updates) and the
implicit adjoint solve therefore run in the state's dtype; the backward pass of ``f`` (its VJPs)
runs in whatever dtypes ``f``'s forward ran in. No cast happens unless ``f_dtype`` is given.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from ._structure import Structure, leaves


@dataclasses.dataclass(frozen=True)
class LayerPrecision:
    """The dtype ``f`` is called in (``None``: the state's own) and the state's."""

    f_dtype: Any
    state_dtype: Any

    @classmethod
    def of(cls, backend: Any, f_dtype: Any, structure: Structure) -> LayerPrecision:
        """Validated: ``f_dtype`` None, or a real floating dtype of ``backend`` narrower than the
        state's (a ``TypeError`` otherwise, saying what would be accepted)."""
        state = structure.dtype
        if f_dtype is None:
            return cls(None, state)
        xp = backend.xp
        try:
            floating = xp.isdtype(f_dtype, "real floating")
        except (TypeError, ValueError, AttributeError):
            floating = False
        if not floating:
            raise TypeError(f"deqcore.solve: f_dtype must be None or a real floating {backend.name} "
                            f"dtype (such as bfloat16), got {f_dtype!r}")
        if xp.finfo(f_dtype).bits >= xp.finfo(state).bits:
            raise TypeError(f"deqcore.solve: f_dtype {_name(f_dtype)} is not narrower than the state's "
                            f"dtype {_name(state)}; f_dtype is for evaluating f in a half dtype while "
                            "the state stays wider (pass z0 in float32, or leave f_dtype None)")
        return cls(f_dtype, state)

    def inward(self, backend: Any, zf: Any) -> Any:
        """The flat state as ``f`` gets it."""
        return zf if self.f_dtype is None else backend.xp.astype(zf, self.f_dtype)

    def outward(self, backend: Any, out: Any) -> Any:
        """``f``'s output (its structure) in the state's dtype."""
        if self.f_dtype is None:
            return out
        xp = backend.xp
        cast = [a if a.dtype == self.state_dtype else xp.astype(a, self.state_dtype) for a in leaves(out)]
        return tuple(cast) if isinstance(out, (tuple, list)) else cast[0]

    def evaluate(self, backend: Any, structure: Structure, f: Any, zf: Any, x: Any, ref: Any = None,
                 defaulted: bool = False) -> Any:
        """``f`` at the flat state ``zf``, flat and in the state's dtype; with ``ref`` (an array
        on the state's device) its output is checked first (:meth:`Structure.check_output`)."""
        out = f(structure.unflatten(backend, self.inward(backend, zf)), x)
        if ref is not None:
            structure.check_output(backend, out, ref, defaulted, self.output_dtypes())
        return structure.flatten(backend, self.outward(backend, out))

    def output_dtypes(self) -> tuple[Any, ...]:
        """The dtypes ``f`` may return: the state's, and ``f_dtype`` when given."""
        return (self.state_dtype,) if self.f_dtype is None else (self.state_dtype, self.f_dtype)


def _name(dtype: Any) -> str:
    return str(dtype).removeprefix("torch.")
