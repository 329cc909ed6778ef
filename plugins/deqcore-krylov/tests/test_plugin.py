"""The distribution's entry point: deqcore finds the plugin through ``importlib.metadata``,
lazily, and the plugin switches honour it."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

import deqcore


@pytest.fixture
def fresh(monkeypatch):
    monkeypatch.delenv("DEQCORE_BLOCK_PLUGINS", raising=False)
    monkeypatch.delenv("DEQCORE_DISABLE_PLUGIN_AUTOLOAD", raising=False)
    deqcore.registry().reset()
    yield monkeypatch
    monkeypatch.undo()
    deqcore.registry().reset()


def test_registered_by_the_krylov_entry_point(fresh):
    reg = deqcore.registry()
    assert "krylov" in reg.plugins()
    solver, mode = reg.get("solvers", "newton_krylov"), reg.get("gradients", "implicit_gmres")
    assert solver.plugin == mode.plugin == "krylov"
    assert solver.obj.__module__.startswith("deqcore_krylov.")
    assert issubclass(solver.obj, deqcore.extend.Solver) and issubclass(mode.obj, deqcore.extend.AdjointMode)


@pytest.mark.parametrize("env", [{"DEQCORE_BLOCK_PLUGINS": "krylov"},
                                 {"DEQCORE_DISABLE_PLUGIN_AUTOLOAD": "1"}])
def test_switched_off_by_the_plugin_environment(fresh, env):
    for key, value in env.items():
        fresh.setenv(key, value)
    deqcore.registry().reset()
    available = deqcore.available()
    assert "newton_krylov" not in available["solvers"] and "implicit_gmres" not in available["gradients"]
    assert "anderson" in available["solvers"]  # the built-ins stay
    with pytest.raises(ValueError, match="unknown solver 'newton_krylov'"):
        deqcore.registry().get("solvers", "newton_krylov")


def test_loading_the_plugin_imports_no_framework():
    script = (
        "import json, sys, deqcore\n"
        "names = deqcore.available()\n"
        "print(json.dumps({'solvers': names['solvers'], 'loaded': 'deqcore_krylov._plugin' in sys.modules,"
        " 'frameworks': sorted(m for m in ('torch', 'jax') if m in sys.modules)}))\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("DEQCORE_")}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "newton_krylov" in out["solvers"] and out["loaded"] and out["frameworks"] == []
