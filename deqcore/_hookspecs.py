"""Hook specifications for deqcore plugins (pluggy project name ``"deqcore"``).

A plugin is a module or object with functions marked ``@deqcore.extend.hookimpl`` whose names are the
hooks below. Third-party plugins are found through the entry-point group ``deqcore``::

    [project.entry-points.deqcore]
    my_plugin = "my_package.deqcore_plugin"

Each hook receives a ``register`` callable bound to the plugin (see :class:`deqcore.extend.Register`);
call it once per thing the plugin adds. deqcore's own backends and solvers register through
these same hooks. Registration must be cheap and must not import heavy frameworks: backends
register a factory that imports its framework when the backend is first used.

``register`` checks what it is given against the contract below (the class's base, the methods
it must implement and their signatures, its ``options``) and raises ``TypeError`` naming the
plugin and every problem; the registry then drops the whole plugin with a
:class:`deqcore.PluginWarning`, and the other plugins keep working. A backend is checked against
:class:`deqcore.extend.Backend` when its factory first runs: a failure there is a
:class:`deqcore.PluginError` for whoever asked for that backend.
"""

from __future__ import annotations

import pluggy

hookspec = pluggy.HookspecMarker("deqcore")
hookimpl = pluggy.HookimplMarker("deqcore")


@hookspec
def deqcore_register_backends(register):  # type: ignore[no-untyped-def]
    """Add array backends.

    Call ``register(name, factory, modules=(...), install="...")`` where ``factory()`` returns
    an object implementing :class:`deqcore.extend.Backend` (called once, on first use), ``modules``
    names the top-level modules whose array types belong to this backend (used to infer the
    backend from an input, without importing anything), and ``install`` is the hint shown when
    the factory fails to import its framework. No other keywords are accepted.

    At registration ``factory`` must be callable and ``modules`` a tuple of top-level module
    names. On first use (``deqcore.registry().backend(name)``, ``deqcore.solve``) an
    ``ImportError`` from ``factory()`` is re-raised with the install hint; any other exception,
    a ``None`` result, or an object lacking a member of :class:`deqcore.extend.Backend` (the attributes
    ``name``, ``xp``, ``static_shapes``, ``capabilities`` and every method), with a member that is
    not callable or cannot be called as the protocol declares, a ``static_shapes`` that is not a
    bool, ``capabilities`` that are not a :class:`deqcore.extend.Capabilities`, or a ``name``
    other than the registered one, is a :class:`deqcore.PluginError` naming the plugin, the
    backend and each problem. :func:`deqcore.testing.check_backend` checks that it computes right.
    """


@hookspec
def deqcore_register_solvers(register):  # type: ignore[no-untyped-def]
    """Add forward fixed-point solvers.

    Call ``register(name, solver_class)``. The class subclasses :class:`deqcore.extend.Solver`:
    its options are :class:`deqcore.extend.Option` class attributes, collected into ``options``
    (unknown options given to ``deqcore.solve`` are rejected against it; the base's constructor
    takes ``max_iter=`` and those options as keywords and validates them), and
    ``init``/``step``/``commit`` written over the backend protocol so the solver runs on every
    backend.

    Checked at registration: the base class; ``init``, ``step`` and ``commit`` implemented, and
    every method it overrides callable with the base's arguments; ``options`` a dict whose
    values are ``Option``s whose defaults pass their own check, and whose names are not
    parameters of ``deqcore.solve`` (``tol``, ``max_iter``, ...: those never reach a solver).
    """


@hookspec
def deqcore_register_gradients(register):  # type: ignore[no-untyped-def]
    """Add gradient modes (backward estimators through the fixed point).

    Call ``register(name, mode_class)``. The class subclasses :class:`deqcore.extend.AdjointMode`
    (implementing ``adjoint``: the incoming cotangent ``g`` becomes an adjoint
    ``u ~ g (I - J)^-1``, carried back through the backend's ``attach_adjoint`` hook) or
    :class:`deqcore.extend.GradientMode` (implementing ``attach``). Its class attribute
    ``exact_higher_order`` (default False) declares whether its gradient may be differentiated
    again; when False, a second derivative raises :class:`deqcore.HigherOrderError`. An
    ``AdjointMode`` that declares it (its adjoint is exact) implements ``linear_solver``.

    Checked at registration: the base class; ``attach`` (``adjoint`` for an ``AdjointMode``)
    implemented, and every method it overrides callable with the base's arguments; a class
    attribute ``name`` equal to the registered name (``solution.backward`` reports it);
    ``options`` as for solvers (a mode's option names are its own: ``tol`` is allowed);
    ``unrolled`` and ``exact_higher_order`` bools; ``linear_solver`` implemented by an
    ``AdjointMode`` that declares ``exact_higher_order``.
    """


@hookspec
def deqcore_register_hypersolvers(register):  # type: ignore[no-untyped-def]
    """Add learned solvers (hypersolvers).

    Call ``register(name, hypersolver_class)``. The class subclasses
    :class:`deqcore.hypersolvers.Hypersolver`: an instance holds its weights as NumPy arrays,
    ``bind(backend, structure, like, max_iter=, params=)`` returns a :class:`deqcore.extend.Solver` for
    one solve (written over the backend protocol), and ``initial_state(backend, x, like)`` its
    learned first guess (or None). Instances are passed as ``deqcore.solve(f, x, solver=hs)``.
    The registered name is stored in saved weights, and
    :func:`deqcore.hypersolvers.load_hypersolver` finds the class by it.

    Checked at registration: the base class; ``bind`` and ``initial_state`` implemented and
    callable with the base's arguments; a class attribute ``name`` equal to the registered name.
    """
