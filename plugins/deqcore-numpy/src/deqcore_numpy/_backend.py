"""The backend protocol on NumPy, built on :class:`deqcore.extend.EagerBackend`'s defaults."""

from __future__ import annotations

from typing import Any

import array_api_compat.numpy as xp
import numpy as np

from deqcore.extend import Capabilities, EagerBackend


class NumpyBackend(EagerBackend):
    """NumPy arrays on the CPU: eager Python loops, in-place ring writes, no autodiff.

    Everything but ``is_array``, ``linear_solve`` and ``device`` is the base class's. A singular
    mixing system is NaN, not an exception (``numpy.linalg.solve`` raises for a whole batch when
    one system is singular), as the protocol asks.
    """

    name = "numpy"
    xp = xp
    capabilities = Capabilities(autodiff=False, jit=False, vmap=False, devices=("cpu",))

    def is_array(self, obj: object) -> bool:
        return isinstance(obj, (np.ndarray, np.number, np.bool_))

    def linear_solve(self, a: Any, b: Any, symmetric_positive_definite: bool = False) -> Any:
        try:
            return np.linalg.solve(a, b[..., None])[..., 0]
        except np.linalg.LinAlgError:
            pass
        # one system at a time: a singular one is NaN, the others keep their solution
        out = np.full(b.shape, np.nan, dtype=np.result_type(a, b))
        for i in np.ndindex(a.shape[:-2]):
            try:
                out[i] = np.linalg.solve(a[i], b[i])
            except np.linalg.LinAlgError:
                pass
        return out

    def device(self, x: Any) -> Any:
        return "cpu"
