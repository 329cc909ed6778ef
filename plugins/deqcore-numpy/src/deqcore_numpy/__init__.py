"""deqcore's NumPy backend: a float64 reference on the CPU, without autodiff.

Installed, it registers the backend ``"numpy"`` (``[project.entry-points.deqcore]``); NumPy
arrays passed to :func:`deqcore.solve` then solve on it. Gradient modes need autodiff, which
NumPy has not: a solve's default (``grad="auto"``) attaches none, and naming one is an error.
"""

from ._backend import NumpyBackend

__all__ = ["NumpyBackend"]
