"""A kit for backend authors: the base class, the capabilities, and the conformance suite.

A new backend (NumPy, CuPy, MLX ...) subclasses :class:`EagerBackend` (eager defaults for most
of :class:`deqcore.Backend`), declares its :class:`Capabilities`, registers a factory through
``deqcore_register_backends`` and proves itself with one call::

    deqcore.testing.check_backend("mybackend", reference="torch")

which runs every check and raises :class:`ConformanceError` listing the failures.
:func:`conformance_checks` gives the same checks by name, for a test suite to parametrize over.
Importing this module imports no array framework; the checks import only what the backend
under test (and the reference) use.
"""

from .._capabilities import Capabilities, CapabilityError
from .._eager_backend import EagerBackend
from ._conformance import ConformanceError, check_backend, conformance_checks

__all__ = ["Capabilities", "CapabilityError", "ConformanceError", "EagerBackend", "check_backend",
           "conformance_checks"]
