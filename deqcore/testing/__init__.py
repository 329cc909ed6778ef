"""The conformance suite for backend authors.

A new backend (NumPy, CuPy, MLX ...) subclasses :class:`deqcore.extend.EagerBackend` (eager
defaults for most of :class:`deqcore.extend.Backend`), declares its
:class:`deqcore.extend.Capabilities`, registers a factory through
``deqcore_register_backends`` and proves itself with one call::

    deqcore.testing.check_backend("mybackend", reference="torch")

which runs every check and raises :class:`ConformanceError` listing the failures.
:func:`conformance_checks` gives the same checks by name, for a test suite to parametrize over.
Importing this module imports no array framework; the checks import only what the backend
under test (and the reference) use.
"""

from ._conformance import ConformanceError, check_backend, conformance_checks

__all__ = ["ConformanceError", "check_backend", "conformance_checks"]
