"""The plugin registry, exercised with real third-party plugins installed on disk.

Each plugin is a module in ``tmp_path`` plus a ``<dist>-<version>.dist-info`` directory whose
``entry_points.txt`` declares it in the ``[deqcore]`` group; ``tmp_path`` goes on ``sys.path``
so ``importlib.metadata`` finds it exactly as it finds an installed distribution. Nothing in
``importlib.metadata`` is mocked.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import itertools
import json
import os
import re
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest

import deqcore
from deqcore import _registry

# deqcore's own plugins, in registration order (more may be added; these three must be there)
BUILTIN_PLUGINS = [name for name, _ in _registry.BUILTIN_PLUGINS]
assert BUILTIN_PLUGINS[:3] == ["deqcore", "deqcore_torch", "deqcore_jax"]
BUILTIN_SOLVERS = ["anderson", "broyden", "fixed_point", "reversible"]

_unique = itertools.count()


class Installer:
    """Installs real plugin distributions into a directory on ``sys.path``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.modules: list[str] = []

    def install(self, ep_name: str, source: str, *, dist: str | None = None,
                extra_entry_points: str = "") -> str:
        """Write a plugin module and its dist-info; return the (unique) module name."""
        module = f"deqplug_{ep_name}_{next(_unique)}"
        dist = dist or f"deqcore-test-{ep_name.replace('_', '-')}"
        (self.root / f"{module}.py").write_text(textwrap.dedent(source))
        info = self.root / f"{dist.replace('-', '_')}-1.0.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.0\n")
        (info / "entry_points.txt").write_text(f"[deqcore]\n{ep_name} = {module}\n{extra_entry_points}")
        self.modules.append(module)
        importlib.invalidate_caches()  # drops importlib.metadata's cached directory listings
        return module


# Plugins installed in the environment running the tests (e.g. plugins/deqcore-krylov in a dev
# venv) are hidden, so that these tests see exactly the built-ins plus what they install themselves.
_PREINSTALLED = {(ep.name, ep.value)
                 for ep in importlib.metadata.entry_points(group=_registry.ENTRY_POINT_GROUP)}
_entry_points = importlib.metadata.entry_points


def _test_entry_points(**kwargs):
    found = _entry_points(**kwargs)
    return type(found)(ep for ep in found if (ep.name, ep.value) not in _PREINSTALLED)


@pytest.fixture(autouse=True)
def fresh_registry(monkeypatch):
    """A registry that loads afresh, with the plugin env variables unset and preinstalled
    third-party plugins hidden; reset again after."""
    monkeypatch.delenv(_registry.DISABLE_ENV, raising=False)
    monkeypatch.delenv(_registry.BLOCK_ENV, raising=False)
    monkeypatch.setattr(importlib.metadata, "entry_points", _test_entry_points)
    deqcore.registry().reset()
    yield
    deqcore.registry().reset()


@pytest.fixture
def plugins(tmp_path, monkeypatch):
    root = tmp_path / "site"
    root.mkdir()
    monkeypatch.syspath_prepend(str(root))
    installer = Installer(root)
    yield installer
    deqcore.registry().reset()
    for module in installer.modules:
        sys.modules.pop(module, None)
    importlib.invalidate_caches()


SOLVER_PLUGIN = """
    import deqcore
    from deqcore.solvers import FixedPoint

    CALLS = []
    INITS = []


    class Picard(FixedPoint):
        name = "picard_test"

        def init(self, problem, z0, fz0):
            INITS.append(type(self).__name__)
            return super().init(problem, z0, fz0)


    @deqcore.extend.hookimpl
    def deqcore_register_solvers(register):
        CALLS.append("solvers")
        register("picard_test", Picard, doc="plain iteration, from a plugin")
"""


def _framework() -> str:
    """torch where it is installed (and selected), else jax: the registry works the same on both."""
    selected = [n.strip() for n in os.environ.get("DEQCORE_TEST_BACKENDS", "torch,jax").split(",")]
    for name in [n for n in ("torch", "jax") if n in selected]:
        if importlib.util.find_spec(name) is not None:
            return name
    pytest.skip("neither torch nor jax is installed")


def _problem():
    """f(z, x) = z / 2 + x on the installed framework: the fixed point is 2 x."""
    x = np.linspace(-1.0, 1.0, 12).reshape(3, 4)
    if _framework() == "torch":
        import torch

        xa = torch.from_numpy(x)
    else:
        import jax.numpy as jnp

        xa = jnp.asarray(x)
    return (lambda z, x: 0.5 * z + x), xa


def _assert_solves(solver: str, tol: float = 1e-10, **options) -> deqcore.Solution:
    f, x = _problem()
    sol = deqcore.solve(f, x, solver=solver, tol=tol, max_iter=200, **options)
    assert sol.solver == solver
    assert bool(np.all(np.asarray(sol.converged)))
    np.testing.assert_allclose(np.asarray(sol.z), 2 * np.asarray(x), atol=1e-5, rtol=0)
    return sol


def _assert_builtins_work():
    assert set(BUILTIN_SOLVERS) <= set(deqcore.available()["solvers"])
    assert {deqcore.registry().get("solvers", s).plugin for s in BUILTIN_SOLVERS} == {"deqcore"}
    _assert_solves("anderson")  # one solve: these tests are about the registry, not the solvers


def _available_expecting_warning(match: str) -> dict[str, list[str]]:
    with pytest.warns(deqcore.PluginWarning, match=match):
        return deqcore.available()


# ------------------------------------------------------------------------------------------------
# a working plugin


def test_plugin_solver_is_listed_and_solves(plugins):
    module = plugins.install("my_plugin", SOLVER_PLUGIN)
    assert "picard_test" in deqcore.available()["solvers"]
    assert "my_plugin" in deqcore.registry().plugins()

    _assert_solves("picard_test")
    # the plugin's class did the solving
    assert sys.modules[module].INITS == ["Picard"]
    # and, like the built-ins, it takes the options its class declares, and only those
    _assert_solves("picard_test", damping=0.5)
    assert sys.modules[module].INITS == ["Picard", "Picard"]
    f, x = _problem()
    with pytest.raises(TypeError, match="memory"):
        deqcore.solve(f, x, solver="picard_test", memory=3)


def test_registry_lists_plugins_and_who_registered_each_entry(plugins):
    module = plugins.install("my_plugin", SOLVER_PLUGIN)
    reg = deqcore.registry()
    assert reg.plugins() == [*BUILTIN_PLUGINS, "my_plugin"]

    by_name = {(e.kind, e.name): e for e in reg.entries()}
    for name in BUILTIN_SOLVERS:
        assert by_name["solvers", name].plugin == "deqcore"
    assert by_name["backends", "torch"].plugin == "deqcore_torch"
    assert by_name["backends", "jax"].plugin == "deqcore_jax"
    assert by_name["backends", "torch"].info["modules"] == ("torch",)
    assert "install" in by_name["backends", "jax"].info

    plugin_entry = reg.get("solvers", "picard_test")
    assert plugin_entry == by_name["solvers", "picard_test"]
    assert plugin_entry.plugin == "my_plugin"
    assert plugin_entry.kind == "solvers"
    assert plugin_entry.obj is sys.modules[module].Picard
    assert plugin_entry.info == {"doc": "plain iteration, from a plugin"}

    # every entry names a loaded plugin; entries() is sorted by kind, then name
    assert {e.plugin for e in reg.entries()} <= set(reg.plugins())
    keys = [(_registry.KINDS.index(e.kind), e.name) for e in reg.entries()]
    assert keys == sorted(keys)
    assert [e.name for e in reg.entries("solvers")] == sorted([*BUILTIN_SOLVERS, "picard_test"])
    assert deqcore.available() == {kind: reg.names(kind) for kind in deqcore.extend.KINDS}


def test_loading_is_lazy_happens_once_and_reset_reloads(plugins):
    module = plugins.install("my_plugin", SOLVER_PLUGIN)
    assert module not in sys.modules  # installing and resetting load nothing

    assert "picard_test" in deqcore.available()["solvers"]
    assert module in sys.modules
    mod = sys.modules[module]
    assert mod.CALLS == ["solvers"]

    # further use of the registry neither reloads nor calls the hooks again
    deqcore.available()
    deqcore.registry().entries()
    deqcore.registry().plugins()
    deqcore.registry().get("solvers", "picard_test")
    assert mod.CALLS == ["solvers"]
    assert sys.modules[module] is mod

    # reset() forgets everything: the next use calls the hooks again
    deqcore.registry().reset()
    assert mod.CALLS == ["solvers"]
    assert "picard_test" in deqcore.available()["solvers"]
    assert mod.CALLS == ["solvers", "solvers"]


def test_reset_finds_plugins_installed_after_the_first_load(plugins):
    assert "picard_test" not in deqcore.available()["solvers"]
    plugins.install("late_plugin", SOLVER_PLUGIN)
    assert "picard_test" not in deqcore.available()["solvers"]  # loaded once, not re-scanned
    deqcore.registry().reset()
    assert "picard_test" in deqcore.available()["solvers"]
    assert deqcore.registry().get("solvers", "picard_test").plugin == "late_plugin"


# A backend plugin whose backends wrap the installed framework's backend: ``Delegate`` forwards
# every member to it except those dropped or replaced, so each registered backend differs from a
# working one in exactly the way its name says.
BACKEND_PLUGIN = """
    import deqcore

    FRAMEWORK = {framework!r}
    MADE = []


    class Delegate:
        def __init__(self, inner, drop=(), **replace):
            self._inner, self._drop, self._replace = inner, frozenset(drop), replace

        def __getattr__(self, attr):
            if attr.startswith("_") or attr in self._drop:
                raise AttributeError(attr)
            if attr in self._replace:
                if isinstance(self._replace[attr], Exception):  # a property that fails
                    raise self._replace[attr]
                return self._replace[attr]
            return getattr(self._inner, attr)


    def delegate(registered, drop=(), **replace):
        def make():
            MADE.append(registered)
            return Delegate(deqcore.registry().backend(FRAMEWORK), drop, **{{"name": registered, **replace}})

        return make


    def make_none():
        return None


    def make_raising():
        raise RuntimeError("no device found")


    def make_needing_a_framework():
        import deqcore_no_such_framework_xyz  # noqa: F401


    def while_loop_without_options(cond, body, state):
        return state


    @deqcore.extend.hookimpl
    def deqcore_register_backends(register):
        register("proxy", delegate("proxy"), modules=("deqcore_proxy_arrays",), install="pip install proxy")
        for member in {members!r}:
            register("drop_" + member, delegate("drop_" + member, drop=(member,)))
        register("drop_three", delegate("drop_three", drop=("vjp", "xp", "jit")))
        register("noncallable", delegate("noncallable", vjp=3, while_loop="loop"))
        register("misnamed", delegate("misnamed", name="other"))
        register("string_shapes", delegate("string_shapes", static_shapes="no"))
        register("no_xp", delegate("no_xp", xp=None))
        register("raising_xp", delegate("raising_xp", xp=RuntimeError("no device found")))
        register("narrow_loop", delegate("narrow_loop", while_loop=while_loop_without_options))
        register("returns_none", make_none)
        register("raises", make_raising)
        register("needs_framework", make_needing_a_framework, install="pip install no-such-framework")
"""

# The members of deqcore.extend.Backend, read off the Protocol independently of the registry's own
# reading; the known ones guard against this list coming out empty.
PROTOCOL_MEMBERS = sorted(
    set(deqcore.extend.Backend.__annotations__)
    | {n for n, v in vars(deqcore.extend.Backend).items() if not n.startswith("_") and callable(v)})
assert {"name", "xp", "static_shapes", "while_loop", "vjp", "attach_adjoint", "compiled"} <= set(
    PROTOCOL_MEMBERS)


@pytest.fixture
def backend_plugin(plugins):
    """The installed BACKEND_PLUGIN module (not yet imported: the registry imports it)."""
    module = plugins.install("backend_plugin", BACKEND_PLUGIN.format(framework=_framework(),
                                                                     members=PROTOCOL_MEMBERS))
    return module


def test_a_plugin_backend_is_built_once_on_first_use_and_solves(backend_plugin):
    reg = deqcore.registry()
    assert "proxy" in deqcore.available()["backends"]
    assert reg.get("backends", "proxy").info == {"modules": ("deqcore_proxy_arrays",),
                                                "install": "pip install proxy"}
    mod = sys.modules[backend_plugin]
    assert mod.MADE == []  # registering builds nothing
    backend = reg.backend("proxy")
    assert reg.backend("proxy") is backend
    assert mod.MADE == ["proxy"]  # built once, on first use
    assert isinstance(backend, deqcore.extend.Backend) and backend.name == "proxy"

    f, x = _problem()
    sol = deqcore.solve(f, x, backend="proxy", tol=1e-10, max_iter=200)
    np.testing.assert_allclose(np.asarray(sol.z), 2 * np.asarray(x), atol=1e-8, rtol=0)
    assert mod.MADE == ["proxy"]
    reg.reset()
    assert reg.backend("proxy") is not backend


@pytest.mark.parametrize("member", PROTOCOL_MEMBERS)
def test_a_backend_lacking_a_protocol_member_is_a_plugin_error_at_first_use(backend_plugin, member):
    name = f"drop_{member}"
    f, x = _problem()
    assert name in deqcore.available()["backends"]  # registered: the factory has not run yet
    for attempt in (lambda: deqcore.registry().backend(name),
                    lambda: deqcore.solve(f, x, backend=name)):  # not a bare AttributeError mid-solve
        with pytest.raises(deqcore.PluginError) as info:
            attempt()
        message = str(info.value)
        assert message.startswith(f"backend {name!r} of plugin 'backend_plugin' is not a "
                                  "deqcore.extend.Backend")
        assert f"): missing {member}. " in message
        assert message.endswith(f"{_registry.BLOCK_ENV}=backend_plugin")
    # nothing broken is cached: each use builds and checks again
    assert sys.modules[backend_plugin].MADE.count(name) == 2


def test_a_backend_lacking_several_members_names_them_all(backend_plugin):
    with pytest.raises(deqcore.PluginError, match=r"\): missing xp, jit, vjp\. Fix or update the plugin"):
        deqcore.registry().backend("drop_three")


@pytest.mark.parametrize(("name", "problem"), [
    ("noncallable", "while_loop is not callable (it is str); vjp is not callable (it is int)"),
    ("misnamed", "its name is 'other' but it is registered as 'misnamed'"),
    ("string_shapes", "static_shapes is 'no', not a bool"),
    ("no_xp", "xp is None"),
    ("raising_xp", "reading xp raised RuntimeError: no device found"),
    ("narrow_loop", "while_loop(cond, body, state) cannot be called as while_loop(cond, body, state, "
                    "max_steps=None, check_every=1) (too many positional arguments)"),
])
def test_a_backend_with_a_wrong_member_is_a_plugin_error_naming_it(backend_plugin, name, problem):
    with pytest.raises(deqcore.PluginError) as info:
        deqcore.registry().backend(name)
    message = str(info.value)
    assert message.startswith(f"backend {name!r} of plugin 'backend_plugin' is not a deqcore.extend.Backend "
                              f"(its factory {backend_plugin}.delegate.<locals>.make() returned a "
                              f"{backend_plugin}.Delegate): ")
    assert f"): {problem}. Fix" in message


def test_a_backend_factory_that_fails_is_a_plugin_error(backend_plugin):
    reg = deqcore.registry()
    with pytest.raises(deqcore.PluginError, match=(
            rf"^backend 'returns_none' of plugin 'backend_plugin' could not be built: its factory "
            rf"{backend_plugin}.make_none\(\) returned None instead of a deqcore.extend.Backend")):
        reg.backend("returns_none")
    with pytest.raises(deqcore.PluginError, match=(
            r"^backend 'raises' of plugin 'backend_plugin' could not be built: its factory "
            r".*make_raising\(\) raised RuntimeError: no device found\. Fix")) as info:
        reg.backend("raises")
    assert isinstance(info.value.__cause__, RuntimeError)
    # a missing framework stays an ImportError, with the plugin's install hint
    with pytest.raises(ImportError, match=r"backend 'needs_framework' could not import its framework .*"
                       r"deqcore_no_such_framework_xyz.*Install it with: pip install no-such-framework"):
        reg.backend("needs_framework")
    # the working backends of the same plugin are unaffected
    assert reg.backend("proxy").name == "proxy"


# ------------------------------------------------------------------------------------------------
# conflicts and broken plugins


def test_duplicate_of_a_builtin_name_is_a_plugin_error_naming_both(plugins):
    plugins.install("dup_plugin", """
        import deqcore
        from deqcore.solvers import Anderson


        @deqcore.extend.hookimpl
        def deqcore_register_solvers(register):
            register("anderson", Anderson)
    """)
    with pytest.raises(deqcore.PluginError) as info:
        deqcore.available()
    message = str(info.value)
    assert "'anderson'" in message
    assert "'deqcore'" in message and "'dup_plugin'" in message
    # the hint blocks the third-party plugin, not deqcore's own solvers
    assert f"{_registry.BLOCK_ENV}=dup_plugin" in message
    # it fails on every use, not only the first
    with pytest.raises(deqcore.PluginError):
        deqcore.solve(lambda z, x: z, None, solver="anderson")

    # following the hint fixes it
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(_registry.BLOCK_ENV, "dup_plugin")
        deqcore.registry().reset()
        assert deqcore.registry().get("solvers", "anderson").plugin == "deqcore"
        assert "dup_plugin" not in deqcore.registry().plugins()
        _assert_builtins_work()


def test_duplicate_between_two_plugins_names_both(plugins):
    source = """
        import deqcore
        from deqcore.solvers import FixedPoint


        @deqcore.extend.hookimpl
        def deqcore_register_solvers(register):
            register("shared_name", FixedPoint)
    """
    plugins.install("first_plugin", source)
    plugins.install("second_plugin", source)
    with pytest.raises(deqcore.PluginError, match="'shared_name'") as info:
        deqcore.available()
    assert "'first_plugin'" in str(info.value) and "'second_plugin'" in str(info.value)


def test_a_plugin_failing_to_import_warns_and_the_rest_work(plugins):
    plugins.install("broken_plugin", """
        raise RuntimeError("boom while importing")
    """)
    plugins.install("my_plugin", SOLVER_PLUGIN)
    with pytest.warns(deqcore.PluginWarning, match="'broken_plugin'") as record:
        available = deqcore.available()
    assert any("boom while importing" in str(w.message) for w in record)
    assert "picard_test" in available["solvers"]
    assert deqcore.registry().plugins() == [*BUILTIN_PLUGINS, "my_plugin"]
    # the warning is attributed to the caller, not to deqcore's internals
    assert all(w.filename == __file__ for w in record)
    # loaded once: no second warning on later use
    with warnings.catch_warnings():
        warnings.simplefilter("error", deqcore.PluginWarning)
        _assert_builtins_work()
        _assert_solves("picard_test")


def test_an_entry_point_naming_a_missing_module_warns(plugins):
    plugins.install("my_plugin", SOLVER_PLUGIN,
                    extra_entry_points="ghost_plugin = deqcore_no_such_module_xyz\n")
    available = _available_expecting_warning("'ghost_plugin'.*deqcore_no_such_module_xyz")
    assert "picard_test" in available["solvers"]
    assert "ghost_plugin" not in deqcore.registry().plugins()


def test_a_hook_raising_during_registration_warns_and_the_plugin_is_dropped(plugins):
    plugins.install("halfway_plugin", """
        import deqcore
        from deqcore.solvers import FixedPoint


        @deqcore.extend.hookimpl
        def deqcore_register_backends(register):
            register("halfway_backend", object)


        @deqcore.extend.hookimpl
        def deqcore_register_solvers(register):
            register("halfway_solver", FixedPoint)
            raise KeyError("registration went wrong")
    """)
    plugins.install("my_plugin", SOLVER_PLUGIN)
    with pytest.warns(deqcore.PluginWarning, match="'halfway_plugin'.*registration went wrong"):
        available = deqcore.available()
    # nothing of the failed plugin stays: not what it registered before failing, not its backend
    assert "halfway_solver" not in available["solvers"]
    assert "halfway_backend" not in available["backends"]
    assert "halfway_plugin" not in deqcore.registry().plugins()
    assert all(e.plugin != "halfway_plugin" for e in deqcore.registry().entries())
    # the other plugins, and the built-ins, keep working
    assert "picard_test" in available["solvers"]
    assert deqcore.available()["backends"] == ["jax", "torch"]
    _assert_builtins_work()


def test_a_bad_entry_name_is_a_warning(plugins):
    plugins.install("empty_name_plugin", """
        import deqcore


        @deqcore.extend.hookimpl
        def deqcore_register_solvers(register):
            register("", object)
    """)
    available = _available_expecting_warning("'empty_name_plugin'")
    assert "" not in available["solvers"]
    _assert_builtins_work()


def test_a_misspelt_hook_warns(plugins):
    plugins.install("typo_plugin", """
        import deqcore


        @deqcore.extend.hookimpl
        def deqcore_register_solver(register):  # missing "s": not a deqcore hook
            register("never", object)
    """)
    _available_expecting_warning("'typo_plugin'.*'deqcore_register_solver'.*deqcore_register_solvers")
    assert "typo_plugin" in deqcore.registry().plugins()


def test_a_plugin_named_like_a_builtin_is_ignored_with_a_warning(plugins):
    plugins.install("deqcore_torch", """
        import deqcore


        @deqcore.extend.hookimpl
        def deqcore_register_backends(register):
            register("impostor", object)
    """)
    available = _available_expecting_warning("'deqcore_torch'.*already taken")
    assert "impostor" not in available["backends"]
    assert deqcore.registry().get("backends", "torch").plugin == "deqcore_torch"


def test_register_only_works_inside_the_hook(plugins):
    module = plugins.install("keeper_plugin", """
        import deqcore

        KEPT = []


        @deqcore.extend.hookimpl
        def deqcore_register_solvers(register):
            KEPT.append(register)
    """)
    deqcore.available()
    (register,) = sys.modules[module].KEPT
    with pytest.raises(deqcore.PluginError, match="'keeper_plugin'.*after"):
        register("sneaky", object)
    assert "sneaky" not in deqcore.available()["solvers"]


def test_a_hook_using_the_registry_is_a_plugin_error(plugins):
    plugins.install("reentrant_plugin", """
        import deqcore


        @deqcore.extend.hookimpl
        def deqcore_register_solvers(register):
            deqcore.available()
    """)
    with pytest.raises(deqcore.PluginError, match="while plugins were registering"):
        deqcore.available()


# ------------------------------------------------------------------------------------------------
# registrations that break their contract: the plugin is dropped with a warning naming the problem

def _solver(*lines: str, base: str = "Solver", init: str = "init(self, problem, z0, fz0)",
            step: str = "step(self, problem, state, active)",
            commit: str = "commit(self, problem, state, z_new, fz_new, g_new, active, keep)") -> str:
    """A solver class ``Bad`` (with ``lines`` at the top of its body) registered as 'bad_entry';
    a method given as None is left out."""
    body = [f"class Bad({base}):", *(f"    {line}" for line in lines)]
    for sig, result in ((init, "(z0, fz0)"), (step, "state[0], state[1], state, 1"), (commit, "state")):
        if sig is not None:
            body += [f"    def {sig}:", f"        return {result}"]
    return "\n".join([*body, "register('bad_entry', Bad)"])


def _mode(*lines: str, base: str = "AdjointMode") -> str:
    return "\n".join([f"class Bad({base}):", *(f"    {line}" for line in lines or ["pass"]),
                      "register('bad_entry', Bad)"])


_ADJOINT = ["def adjoint(self, ctx, g, vjp_z, saved):", "    return g"]
_NAMED = ["name = 'bad_entry'"]
_INT_OPTION = "options = {'k': Option(1, 'steps', validators.positive_int)}"

BROKEN_REGISTRATIONS = {
    # case: (kind, the registration, what the warning must say: a regular expression)
    "solver_not_a_class": (
        "solvers", "register('bad_entry', lambda problem: None)",
        r"registered solver 'bad_entry' as a function \(<function .*<lambda> at 0x\w+>\), "
        r"which is not a subclass of deqcore.extend.Solver; register the class$"),
    "solver_instance": (
        "solvers", "register('bad_entry', FixedPoint(max_iter=5, damping=1.0))",
        r"as a FixedPoint \(<.*>\), which is not a subclass of deqcore.extend.Solver"),
    "solver_not_a_solver": (
        "solvers", "register('bad_entry', dict)",
        r"as class dict, which is not a subclass of deqcore.extend.Solver"),
    "solver_missing_step": (
        "solvers", _solver("options = {}", step=None),
        r"as class deqplug_bad_plugin_\d+\.deqcore_register_solvers\.<locals>\.Bad, "
        r"which breaks the deqcore.extend.Solver contract: it does not implement step$"),
    "solver_missing_everything": (
        "solvers", _solver("pass", init=None, step=None, commit=None),
        r"contract: it does not implement init, step, commit$"),
    "solver_options_none": (
        "solvers", _solver("options = None"),
        r"contract: it has no class attribute options \(a dict of option name -> deqcore.extend.Option; "
        r"\{\} for none\)$"),
    "solver_options_list": (
        "solvers", _solver("options = ['k']"),
        r"contract: its options are a list, not a dict of option name -> deqcore.extend.Option$"),
    "solver_option_not_an_option": (
        "solvers", _solver("options = {'k': 3}"),
        r"option 'k' is 3 \(type int\), not a deqcore.extend.Option\(default, doc, check\)$"),
    "solver_option_bad_default": (
        "solvers", _solver("options = {'k': Option(0, 'steps', validators.positive_int)}"),
        r"option 'k' has default 0, which its own check rejects \(must be an int >= 1\)$"),
    "solver_option_check_raises": (
        "solvers", _solver("options = {'k': Option(None, 'steps', lambda v: v + 1)}"),
        r"option 'k': its check raised TypeError: .* on the default None$"),
    "solver_option_shadowed": (
        "solvers", _solver("options = {'tol': Option(0.1, 'inner', validators.positive_float)}"),
        r"option 'tol' is a parameter of deqcore.solve itself, so it could never reach the solver; "
        r"rename it$"),
    # the commit without g_new once shown in the plugin docs
    "solver_commit_signature": (
        "solvers", _solver(_INT_OPTION, commit="commit(self, problem, state, z_new, fz_new, active, keep)"),
        r": commit\(problem, state, z_new, fz_new, active, keep\) cannot be called as "
        r"commit\(problem, state, z_new, fz_new, g_new, active, keep\) \(too many positional arguments\)$"),
    "solver_grow_signature": (
        "solvers", _solver("def grow(self, problem, state):", "    return state", base="FixedPoint"),
        r": grow\(problem, state\) cannot be called as grow\(problem, state, capacity\) "
        r"\(too many positional arguments\)$"),
    "solver_method_not_callable": (
        "solvers", _solver(_INT_OPTION, "final_state = 3"), r": final_state is not callable$"),
    "gradient_a_function": (
        "gradients", "register('bad_entry', lambda bp: bp.z_star)",
        r"registered gradient 'bad_entry' as a function .*, which is not a subclass of "
        r"deqcore.extend.GradientMode; register the class$"),
    "gradient_without_attach": (
        "gradients", _mode(*_NAMED, base="GradientMode"),
        r"breaks the deqcore.extend.GradientMode contract: it does not implement attach$"),
    "adjoint_without_adjoint": (
        "gradients", _mode(*_NAMED), r"contract: it does not implement adjoint$"),
    "gradient_without_name": (
        "gradients", _mode(*_ADJOINT), r"contract: it has no class attribute name$"),
    "gradient_other_name": (
        "gradients", _mode("name = 'other'", *_ADJOINT),
        r"contract: its class attribute name is 'other'; it must be the registered name 'bad_entry'$"),
    "adjoint_signature": (
        "gradients", _mode(*_NAMED, "def adjoint(self, g, vjp_z):", "    return g"),
        r": adjoint\(g, vjp_z\) cannot be called as adjoint\(ctx, g, vjp_z, saved\) "
        r"\(too many positional arguments\)$"),
    "gradient_options_none": (
        "gradients", _mode(*_NAMED, "options = None", base="JFB"),
        r"contract: it has no class attribute options"),
    "gradient_option_not_an_option": (
        "gradients", _mode(*_NAMED, "options = {'k': 1}", base="JFB"),
        r"option 'k' is 1 \(type int\), not a deqcore.extend.Option"),
    "gradient_unrolled_not_bool": (
        "gradients", _mode(*_NAMED, "unrolled = 'yes'", base="JFB"),
        r"its class attribute unrolled is 'yes', not True or False$"),
    "gradient_exact_higher_order_not_bool": (
        "gradients", _mode(*_NAMED, "exact_higher_order = 1", base="JFB"),
        r"its class attribute exact_higher_order is 1, not True or False$"),
    "adjoint_exact_without_linear_solver": (
        "gradients", _mode(*_NAMED, "exact_higher_order = True", base="JFB"),
        r"it declares exact_higher_order but does not implement linear_solver, which the backend "
        r"needs for the linear systems of higher derivatives$"),
    "hypersolver_not_a_hypersolver": (
        "hypersolvers", "register('bad_entry', FixedPoint)",
        r"registered hypersolver 'bad_entry' as class deqcore.solvers.*FixedPoint, "
        r"which is not a subclass of deqcore.extend.Hypersolver; register the class$"),
    "hypersolver_other_name": (
        "hypersolvers", _mode(base="HyperAnderson"),
        r"its class attribute name is 'hyperanderson'; it must be the registered name 'bad_entry'$"),
    "hypersolver_without_bind": (
        "hypersolvers", _mode(*_NAMED, base="Hypersolver"),
        r"contract: it does not implement bind, initial_state$"),
    "backend_not_callable": (
        "backends", "register('bad_entry', 3)",
        r"registered backend 'bad_entry': its factory 3 is not callable \(register a "
        r"function that returns the backend; it is called on first use\)$"),
    "backend_modules_a_string": (
        "backends", "register('bad_entry', object, modules='torch')",
        r"modules='torch': expected a tuple of top-level module names, such as modules=\('torch',\)$"),
    "backend_submodule": (
        "backends", "register('bad_entry', object, modules=('torch.nn',))",
        r"modules=\('torch.nn',\): expected a tuple of top-level module names"),
    "backend_unknown_keyword": (
        "backends", "register('bad_entry', object, module=('torch',))",
        r"unknown keyword module \(a backend takes modules, install\)$"),
    "backend_install_not_str": (
        "backends", "register('bad_entry', object, install=['pip', 'install'])",
        r"install=\['pip', 'install'\]: expected the install command as a str$"),
}

_BROKEN_PLUGIN = """
import deqcore
from deqcore import HyperAnderson
from deqcore.extend import AdjointMode, GradientMode, Hypersolver, Option, Solver, validators
from deqcore.gradients import JFB
from deqcore.solvers import FixedPoint

REGISTERED = []


@deqcore.extend.hookimpl
def deqcore_register_{kind}(register):
    register("fine_first", {fine})  # registered before the bad one: must be dropped too
    REGISTERED.append("fine_first")
{body}
"""

@pytest.mark.parametrize("case", sorted(BROKEN_REGISTRATIONS))
def test_a_registration_breaking_its_contract_drops_the_plugin_with_a_warning(plugins, case):
    kind, body, problem = BROKEN_REGISTRATIONS[case]
    fine = {"solvers": "FixedPoint", "backends": "object",
            "gradients": "type('Fine', (JFB,), {'name': 'fine_first'})",
            "hypersolvers": "type('Fine', (HyperAnderson,), {'name': 'fine_first'})"}[kind]
    source = _BROKEN_PLUGIN.format(kind=kind, fine=fine, body=textwrap.indent(body, "    "))
    module = plugins.install("bad_plugin", source)
    plugins.install("my_plugin", SOLVER_PLUGIN)
    with pytest.warns(deqcore.PluginWarning) as record:
        available = deqcore.available()
    (message,) = [str(w.message) for w in record]
    prefix = (f"deqcore: plugin 'bad_plugin' failed while registering {kind} and is ignored: TypeError: "
              f"plugin 'bad_plugin' registered {kind[:-1]} 'bad_entry'")
    assert message.startswith(prefix), message
    assert re.search(problem, message), (problem, message)
    # the hook ran up to the bad registration, and nothing of the plugin stays
    assert sys.modules[module].REGISTERED == ["fine_first"]
    assert "bad_entry" not in available[kind] and "fine_first" not in available[kind]
    assert "bad_plugin" not in deqcore.registry().plugins()
    # the others keep working
    assert "picard_test" in available["solvers"]
    assert set(BUILTIN_SOLVERS) <= set(available["solvers"])


def test_registrations_that_follow_their_contracts_pass(plugins):
    """Every contract case above differs from a registration that is accepted: the same hooks
    with the problem fixed register without a warning."""
    plugins.install("good_plugin", """
        import deqcore
        from deqcore.extend import AdjointMode, Option, Solver, validators
        from deqcore.hypersolvers import HyperAnderson


        class Good(Solver):
            options = {"k": Option(1, "steps", validators.positive_int)}

            def init(self, problem, z0, fz0):
                return (z0, fz0)

            def step(self, problem, state, active, *more):
                return state[0], state[1], state, 1

            def commit(self, problem, state, z_new, fz_new, g_new, active, keep):
                return state


        class GoodMode(AdjointMode):
            name = "good_mode"
            options = {"tol": Option(1e-6, "backward tolerance", validators.positive_float)}

            def adjoint(self, ctx, g, vjp_z, saved):
                return g


        class GoodHyper(HyperAnderson):
            name = "good_hyper"


        @deqcore.extend.hookimpl
        def deqcore_register_solvers(register):
            register("good_solver", Good)


        @deqcore.extend.hookimpl
        def deqcore_register_gradients(register):
            register("good_mode", GoodMode)


        @deqcore.extend.hookimpl
        def deqcore_register_hypersolvers(register):
            register("good_hyper", GoodHyper)


        @deqcore.extend.hookimpl
        def deqcore_register_backends(register):
            register("good_backend", object, modules=["good_arrays"], install="pip install good")
    """)
    available = deqcore.available()  # PluginWarning is an error in this suite
    assert "good_solver" in available["solvers"] and "good_mode" in available["gradients"]
    assert "good_hyper" in available["hypersolvers"] and "good_backend" in available["backends"]
    assert deqcore.registry().plugins() == [*BUILTIN_PLUGINS, "good_plugin"]
    # a mode option named like a solve parameter is fine: grad_options is the mode's own namespace
    f, x = _problem()
    sol = deqcore.solve(f, x, tol=1e-10, max_iter=200, grad="good_mode", grad_options={"tol": 1e-3})
    np.testing.assert_allclose(np.asarray(sol.z), 2 * np.asarray(x), atol=1e-8, rtol=0)


def test_an_installed_distribution_with_broken_plugins_fails_clearly_in_a_fresh_interpreter(tmp_path):
    """The whole path a user sees: a distribution built and installed by pip, loaded by a fresh
    interpreter through its entry points. Registration checks import no framework."""
    dist = tmp_path / "dist"
    dist.mkdir()
    (dist / "pyproject.toml").write_text(textwrap.dedent("""
        [build-system]
        requires = ["setuptools>=68"]
        build-backend = "setuptools.build_meta"

        [project]
        name = "deqcore-test-broken"
        version = "1.0"

        [project.entry-points.deqcore]
        partial_backend = "deqplug_partial_backend"
        broken_solvers = "deqplug_broken_solvers"

        [tool.setuptools]
        py-modules = ["deqplug_partial_backend", "deqplug_broken_solvers"]
    """))
    (dist / "deqplug_partial_backend.py").write_text(textwrap.dedent("""
        import deqcore


        class Partial:
            name = "partial"
            xp = None
            static_shapes = False

            def is_array(self, obj):
                return False

            def to_numpy(self, x):
                return x


        @deqcore.extend.hookimpl
        def deqcore_register_backends(register):
            register("partial", Partial, modules=("deqplug_partial_arrays",))
    """))
    (dist / "deqplug_broken_solvers.py").write_text(textwrap.dedent("""
        import deqcore


        class Relaxed(deqcore.extend.Solver):
            options = {}

            def init(self, problem, z0, fz0):
                return (z0, fz0)


        @deqcore.extend.hookimpl
        def deqcore_register_solvers(register):
            register("relaxed", Relaxed)
    """))
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index",
                    "--no-build-isolation", "--target", str(site), str(dist)], check=True)
    script = textwrap.dedent("""
        import json, sys, warnings
        import deqcore

        out = {}
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            out["available"] = deqcore.available()
        out["warnings"] = [f"{w.category.__name__}: {w.message}" for w in record]
        out["frameworks"] = sorted(m for m in ("torch", "jax") if m in sys.modules)
        out["plugins"] = deqcore.registry().plugins()
        try:
            deqcore.registry().backend("partial")
        except Exception as exc:
            out["error"] = f"{type(exc).__name__}: {exc}"
        print(json.dumps(out))
    """)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]),
           _registry.BLOCK_ENV: "partial_backnd"}
    env.pop(_registry.DISABLE_ENV, None)
    run = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
    out = json.loads(run.stdout)

    assert out["frameworks"] == []
    assert "partial" in out["available"]["backends"] and "relaxed" not in out["available"]["solvers"]
    assert "partial_backend" in out["plugins"] and "broken_solvers" not in out["plugins"]
    blocked, dropped = sorted(w for w in out["warnings"] if "partial_backnd" in w or "broken_solvers" in w)
    assert dropped == (
        "PluginWarning: deqcore: plugin 'broken_solvers' failed while registering solvers and is ignored: "
        "TypeError: plugin 'broken_solvers' registered solver 'relaxed' as class "
        "deqplug_broken_solvers.Relaxed, which breaks the deqcore.extend.Solver contract: it does not "
        "implement step, commit")
    match = re.fullmatch(r"PluginWarning: deqcore: DEQCORE_BLOCK_PLUGINS names 'partial_backnd', which "
                         r"matches no installed plugin \((.*)\), so it blocks nothing; did you mean "
                         r"'partial_backend'\?", blocked)
    assert match is not None, blocked
    listing = match.group(1).split(", ")
    assert listing == sorted(listing)
    assert {*BUILTIN_PLUGINS, "partial_backend", "broken_solvers"} <= set(listing)
    implemented = ("name", "xp", "static_shapes", "is_array", "to_numpy")
    missing = [m for m in PROTOCOL_MEMBERS if m not in implemented]
    assert out["error"].startswith(
        "PluginError: backend 'partial' of plugin 'partial_backend' is not a deqcore.extend.Backend (its "
        "factory deqplug_partial_backend.Partial() returned a deqplug_partial_backend.Partial): missing ")
    listed = out["error"].split("): missing ")[1].split("; xp is None")[0].split(", ")
    assert sorted(listed) == missing
    assert out["error"].endswith("; xp is None. Fix or update the plugin, or block it with "
                                 "DEQCORE_BLOCK_PLUGINS=partial_backend")


# ------------------------------------------------------------------------------------------------
# environment switches


@pytest.mark.parametrize("value", ["1", "true", "yes", "on", " TRUE ", "Yes"])
def test_disable_autoload_skips_entry_point_plugins(plugins, monkeypatch, value):
    module = plugins.install("my_plugin", SOLVER_PLUGIN)
    monkeypatch.setenv(_registry.DISABLE_ENV, value)
    assert "picard_test" not in deqcore.available()["solvers"]
    assert deqcore.registry().plugins() == BUILTIN_PLUGINS
    assert module not in sys.modules  # not even imported
    _assert_builtins_work()

    monkeypatch.setenv(_registry.DISABLE_ENV, "0")
    deqcore.registry().reset()
    assert "picard_test" in deqcore.available()["solvers"]


def test_disable_autoload_also_skips_broken_plugins(plugins, monkeypatch):
    plugins.install("broken_plugin", "raise RuntimeError('boom')\n")
    monkeypatch.setenv(_registry.DISABLE_ENV, "1")
    with warnings.catch_warnings():
        warnings.simplefilter("error", deqcore.PluginWarning)
        assert set(BUILTIN_SOLVERS) <= set(deqcore.available()["solvers"])
    assert deqcore.registry().plugins() == BUILTIN_PLUGINS


def test_block_plugins_skips_a_plugin_by_name(plugins, monkeypatch):
    module = plugins.install("my_plugin", SOLVER_PLUGIN)
    plugins.install("broken_plugin", "raise RuntimeError('boom')\n")
    monkeypatch.setenv(_registry.BLOCK_ENV, " my_plugin , broken_plugin ")
    with warnings.catch_warnings():
        # the blocked broken plugin is not even imported, so it cannot warn
        warnings.simplefilter("error", deqcore.PluginWarning)
        assert "picard_test" not in deqcore.available()["solvers"]
    assert module not in sys.modules
    assert deqcore.registry().plugins() == BUILTIN_PLUGINS
    _assert_builtins_work()


def test_blocking_deqcore_jax_removes_the_jax_backend(monkeypatch):
    assert "jax" in deqcore.available()["backends"]
    monkeypatch.setenv(_registry.BLOCK_ENV, "deqcore_jax")
    deqcore.registry().reset()
    assert deqcore.available()["backends"] == ["torch"]
    assert deqcore.registry().plugins() == ["deqcore", "deqcore_torch"]
    with pytest.raises(ValueError, match="unknown backend 'jax'.*torch"):
        deqcore.registry().backend("jax")
    f, x = _problem()
    with pytest.raises(ValueError, match="unknown backend 'jax'"):
        deqcore.solve(f, x, backend="jax")
    if _framework() == "torch":
        _assert_builtins_work()  # torch is unaffected
    else:  # jax arrays no longer have a backend
        with pytest.raises(TypeError, match="cannot infer the backend.*available: torch"):
            deqcore.solve(f, x)


def test_blocking_the_builtin_solvers(monkeypatch):
    monkeypatch.setenv(_registry.BLOCK_ENV, "deqcore")
    deqcore.registry().reset()
    assert deqcore.available()["solvers"] == []
    assert deqcore.available()["backends"] == ["jax", "torch"]
    with pytest.raises(ValueError, match=r"available solvers: \(none\)"):
        deqcore.registry().get("solvers", "anderson")


@pytest.mark.parametrize("value", ["", "0", "false", "no", "off", " Off ", "FALSE"])
def test_disable_autoload_off_values_load_plugins(plugins, monkeypatch, value):
    plugins.install("my_plugin", SOLVER_PLUGIN)
    monkeypatch.setenv(_registry.DISABLE_ENV, value)
    assert "picard_test" in deqcore.available()["solvers"]
    assert deqcore.registry().plugins() == [*BUILTIN_PLUGINS, "my_plugin"]


@pytest.mark.parametrize("value", ["yes please", "2", "disable", "y", "-1"])
def test_disable_autoload_with_an_unrecognised_value_is_a_value_error(plugins, monkeypatch, value):
    module = plugins.install("my_plugin", SOLVER_PLUGIN)
    monkeypatch.setenv(_registry.DISABLE_ENV, value)
    expected = (rf"^{_registry.DISABLE_ENV}={value!r} is not a recognised value: set it to one of '1', "
                rf"'true', 'yes', 'on' to skip entry-point plugins, or to one of '', '0', 'false', 'no', "
                rf"'off' \(or unset it\) to load them$")
    with pytest.raises(ValueError, match=expected):
        deqcore.available()
    with pytest.raises(ValueError, match=expected):  # on every use, not only the first
        deqcore.solve(*_problem())
    assert module not in sys.modules
    monkeypatch.setenv(_registry.DISABLE_ENV, "yes")  # the fix
    deqcore.registry().reset()
    assert deqcore.registry().plugins() == BUILTIN_PLUGINS


def test_blocking_a_name_that_matches_no_plugin_warns_listing_the_plugins(plugins, monkeypatch):
    module = plugins.install("my_plugin", SOLVER_PLUGIN)
    plugins.install("other_plugin", "import deqcore\n")
    monkeypatch.setenv(_registry.BLOCK_ENV, "my_plugn, nothing_like_it")
    with pytest.warns(deqcore.PluginWarning) as record:
        available = deqcore.available()
    listing = ", ".join(sorted([*BUILTIN_PLUGINS, "my_plugin", "other_plugin"]))
    assert sorted(str(w.message) for w in record) == [
        f"deqcore: {_registry.BLOCK_ENV} names 'my_plugn', which matches no installed plugin "
        f"({listing}), so it blocks nothing; did you mean 'my_plugin'?",
        f"deqcore: {_registry.BLOCK_ENV} names 'nothing_like_it', which matches no installed plugin "
        f"({listing}), so it blocks nothing",
    ]
    assert all(w.filename == __file__ for w in record)
    # the misspelt block blocked nothing: the plugin it meant is loaded (which the warning says)
    assert "picard_test" in available["solvers"] and module in sys.modules


def test_blocking_mixes_real_and_unknown_names(plugins, monkeypatch):
    module = plugins.install("my_plugin", SOLVER_PLUGIN)
    monkeypatch.setenv(_registry.BLOCK_ENV, "my_plugin,deqcore_jaxx")
    available = _available_expecting_warning(r"names 'deqcore_jaxx'.*did you mean 'deqcore_jax'\?")
    assert "picard_test" not in available["solvers"] and module not in sys.modules
    assert available["backends"] == ["jax", "torch"]


def test_blocking_an_installed_plugin_while_autoload_is_off_does_not_warn(plugins, monkeypatch):
    plugins.install("my_plugin", SOLVER_PLUGIN)
    monkeypatch.setenv(_registry.DISABLE_ENV, "1")
    monkeypatch.setenv(_registry.BLOCK_ENV, "my_plugin,deqcore_jax")
    assert deqcore.available()["backends"] == ["torch"]  # PluginWarning is an error in this suite
    assert deqcore.registry().plugins() == ["deqcore", "deqcore_torch"]


# ------------------------------------------------------------------------------------------------
# unknown names


def test_unknown_solver_lists_the_available_ones(plugins):
    plugins.install("my_plugin", SOLVER_PLUGIN)
    f, x = _problem()
    with pytest.raises(ValueError, match="unknown solver 'andersen'") as info:
        deqcore.solve(f, x, solver="andersen")
    for name in [*BUILTIN_SOLVERS, "picard_test"]:
        assert name in str(info.value)
    with pytest.raises(ValueError, match="unknown solver 'nope'; available solvers: ") as info:
        deqcore.registry().get("solvers", "nope")
    listed = str(info.value).split("available solvers: ")[1].split(", ")
    assert listed == deqcore.available()["solvers"]
    assert {*BUILTIN_SOLVERS, "picard_test"} <= set(listed)


def test_unknown_backend_lists_the_available_ones():
    f, x = _problem()
    with pytest.raises(ValueError, match="unknown backend 'pytorch'.*jax, torch"):
        deqcore.solve(f, x, backend="pytorch")
    with pytest.raises(ValueError, match="available backends: jax, torch"):
        deqcore.registry().backend("numpy")


def test_unknown_kind_lists_the_kinds():
    with pytest.raises(ValueError, match="unknown registry kind 'solver'.*backends, solvers, gradients"):
        deqcore.registry().names("solver")
    with pytest.raises(ValueError, match="unknown registry kind"):
        deqcore.registry().entries("widgets")


def test_backend_for_judges_by_module_and_bases_without_importing():
    reg = deqcore.registry()
    assert reg.backend_for(np.zeros(2)) is None
    assert reg.backend_for([1.0]) is None
    assert reg.backend_for(None) is None
    framework = _framework()
    _, x = _problem()
    assert reg.backend_for(x) == framework
    if framework == "torch":
        import torch

        class MyTensor(torch.Tensor):  # defined here, in a module no backend names
            pass

        sub = x.as_subclass(MyTensor)
        assert type(sub).__module__ == __name__
        assert reg.backend_for(sub) == "torch"
        sol = deqcore.solve(lambda z, x: 0.5 * z + x, sub, tol=1e-10, max_iter=100)
        assert bool(sol.converged.all())


def test_available_lists_every_kind():
    available = deqcore.available()
    assert list(available) == list(deqcore.extend.KINDS)
    assert set(BUILTIN_SOLVERS) <= set(available["solvers"])
    assert available["solvers"] == sorted(available["solvers"])
    assert available["backends"] == ["jax", "torch"]
    assert deqcore.registry().plugins() == BUILTIN_PLUGINS
