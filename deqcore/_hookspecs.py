"""Hook specifications for deqcore plugins (pluggy project name ``"deqcore"``).

A plugin is a module or object with functions marked ``@deqcore.hookimpl`` whose names are the
hooks below. Third-party plugins are found through the entry-point group ``deqcore``::

    [project.entry-points.deqcore]
    my_plugin = "my_package.deqcore_plugin"

Each hook receives a ``register`` callable bound to the plugin (see :class:`deqcore.Register`);
call it once per thing the plugin adds. deqcore's own backends and solvers register through
these same hooks. Registration must be cheap and must not import heavy frameworks: backends
register a factory that imports its framework when the backend is first used.
"""

from __future__ import annotations

import pluggy

hookspec = pluggy.HookspecMarker("deqcore")
hookimpl = pluggy.HookimplMarker("deqcore")


@hookspec
def deqcore_register_backends(register):  # type: ignore[no-untyped-def]
    """Add array backends.

    Call ``register(name, factory, modules=(...), install="...")`` where ``factory()`` returns
    an object implementing :class:`deqcore.Backend` (called once, on first use), ``modules``
    names the top-level modules whose array types belong to this backend (used to infer the
    backend from an input, without importing anything), and ``install`` is the hint shown when
    the factory fails to import its framework.
    """


@hookspec
def deqcore_register_solvers(register):  # type: ignore[no-untyped-def]
    """Add forward fixed-point solvers.

    Call ``register(name, solver_class)``. The class follows the :class:`deqcore.Solver`
    contract: a class attribute ``options`` mapping option names to :class:`deqcore.Option`
    (unknown options given to ``deqcore.solve`` are rejected against it), a constructor taking
    ``max_iter=`` and those options as keywords, and ``init``/``step``/``commit`` written over the
    backend protocol so the solver runs on every backend.
    """


@hookspec
def deqcore_register_gradients(register):  # type: ignore[no-untyped-def]
    """Add gradient modes (backward estimators through the fixed point).

    Call ``register(name, mode)``. Modes turn the incoming cotangent ``g`` into an adjoint
    ``u ~ g (I - J)^-1`` through the backend's ``attach_adjoint`` hook.
    """


@hookspec
def deqcore_register_hypersolvers(register):  # type: ignore[no-untyped-def]
    """Add learned solvers (hypersolvers).

    Call ``register(name, hypersolver_class)``. The class subclasses
    :class:`deqcore.hypersolvers.Hypersolver`: an instance holds its weights as NumPy arrays,
    ``bind(backend, structure, like, max_iter=, params=)`` returns a :class:`deqcore.Solver` for
    one solve (written over the backend protocol), and ``initial_state(backend, x, like)`` its
    learned first guess (or None). Instances are passed as ``deqcore.solve(f, x, solver=hs)``.
    The registered name is stored in saved weights, and
    :func:`deqcore.hypersolvers.load_hypersolver` finds the class by it.
    """
