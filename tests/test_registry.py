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
import os
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
BUILTIN_SOLVERS = ["anderson", "broyden", "fixed_point"]

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


    @deqcore.hookimpl
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
    assert deqcore.available() == {kind: reg.names(kind) for kind in deqcore.KINDS}


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


def test_a_plugin_can_add_a_backend_lazily(plugins):
    plugins.install("backend_plugin", """
        import deqcore

        MADE = []


        def make():
            MADE.append(1)
            return object()


        @deqcore.hookimpl
        def deqcore_register_backends(register):
            register("fake_np", make, modules=("fake_np_module",), install="pip install fake")
    """)
    reg = deqcore.registry()
    assert "fake_np" in deqcore.available()["backends"]
    mod = sys.modules[reg.get("backends", "fake_np").obj.__module__]
    assert mod.MADE == []  # registering does not create the backend
    backend = reg.backend("fake_np")
    assert reg.backend("fake_np") is backend
    assert mod.MADE == [1]  # created once, on first use
    reg.reset()
    assert reg.backend("fake_np") is not backend


# ------------------------------------------------------------------------------------------------
# conflicts and broken plugins


def test_duplicate_of_a_builtin_name_is_a_plugin_error_naming_both(plugins):
    plugins.install("dup_plugin", """
        import deqcore
        from deqcore.solvers import Anderson


        @deqcore.hookimpl
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


        @deqcore.hookimpl
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


        @deqcore.hookimpl
        def deqcore_register_backends(register):
            register("halfway_backend", object)


        @deqcore.hookimpl
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


        @deqcore.hookimpl
        def deqcore_register_solvers(register):
            register("", object)
    """)
    available = _available_expecting_warning("'empty_name_plugin'")
    assert "" not in available["solvers"]
    _assert_builtins_work()


def test_a_misspelt_hook_warns(plugins):
    plugins.install("typo_plugin", """
        import deqcore


        @deqcore.hookimpl
        def deqcore_register_solver(register):  # missing "s": not a deqcore hook
            register("never", object)
    """)
    _available_expecting_warning("'typo_plugin'.*'deqcore_register_solver'.*deqcore_register_solvers")
    assert "typo_plugin" in deqcore.registry().plugins()


def test_a_plugin_named_like_a_builtin_is_ignored_with_a_warning(plugins):
    plugins.install("deqcore_torch", """
        import deqcore


        @deqcore.hookimpl
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


        @deqcore.hookimpl
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


        @deqcore.hookimpl
        def deqcore_register_solvers(register):
            deqcore.available()
    """)
    with pytest.raises(deqcore.PluginError, match="while plugins were registering"):
        deqcore.available()


# ------------------------------------------------------------------------------------------------
# environment switches


@pytest.mark.parametrize("value", ["1", "true", "yes"])
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
    assert list(available) == list(deqcore.KINDS)
    assert set(BUILTIN_SOLVERS) <= set(available["solvers"])
    assert available["solvers"] == sorted(available["solvers"])
    assert available["backends"] == ["jax", "torch"]
    assert deqcore.registry().plugins() == BUILTIN_PLUGINS
