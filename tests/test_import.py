"""Importing deqcore, and using its registry, imports no array framework.

Each check runs in a fresh interpreter, because this test process has long imported torch and
jax. The checks first confirm that both backends really are registered, so "torch was not
imported" cannot pass just because the backend plugins failed to load.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

FRAMEWORKS = ("torch", "jax", "jaxlib")


def _run(body: str) -> dict:
    script = textwrap.dedent("""
        import json, sys
        import warnings
        import deqcore
        warnings.simplefilter("error", deqcore.PluginWarning)  # a plugin failing to load: fail
        out = {"after_import": sorted(m for m in sys.modules if m.split(".")[0] in FRAMEWORKS)}
    """) + textwrap.dedent(body) + textwrap.dedent("""
        out["final"] = sorted(m for m in sys.modules if m.split(".")[0] in FRAMEWORKS)
        print(json.dumps(out))
    """)
    env = {k: v for k, v in os.environ.items() if not k.startswith("DEQCORE_")}
    proc = subprocess.run(
        [sys.executable, "-c", f"FRAMEWORKS = {FRAMEWORKS!r}\n{script}"],
        capture_output=True, text=True, env=env, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_import_and_available_import_no_framework():
    out = _run("""
        out["available"] = deqcore.available()
        out["plugins"] = deqcore.registry().plugins()
    """)
    assert out["after_import"] == []
    assert {"torch", "jax"} <= set(out["available"]["backends"])
    assert {"deqcore_torch", "deqcore_jax"} <= set(out["plugins"])
    assert out["final"] == []


def test_registry_entries_import_no_framework():
    out = _run("""
        entries = deqcore.registry().entries()
        out["entries"] = [[e.kind, e.name, e.plugin] for e in entries]
        out["backend_for_list"] = deqcore.registry().backend_for([1.0])
    """)
    assert ["backends", "torch", "deqcore_torch"] in out["entries"]
    assert ["backends", "jax", "deqcore_jax"] in out["entries"]
    assert ["solvers", "anderson", "deqcore"] in out["entries"]
    assert out["backend_for_list"] is None
    assert out["final"] == []


@pytest.mark.parametrize("backend", [pytest.param(n, marks=pytest.mark.backend(n)) for n in ("torch", "jax")])
def test_using_a_backend_imports_only_its_framework(backend):
    out = _run(f"""
        deqcore.registry().backend({backend!r})
    """)
    imported = {m.split(".")[0] for m in out["final"]}
    assert backend in imported  # the check above would notice a framework import
    other = {"torch": {"jax", "jaxlib"}, "jax": {"torch"}}[backend]
    assert not imported & other


def test_models_package_and_data_loaders_import_no_framework():
    out = _run("""
        import deqcore_models, deqcore_models.data
        out["loaders"] = [n for n in deqcore_models.data.__all__ if n.islower()]
    """)
    assert "fashion_mnist" in out["loaders"] and "wikitext2" in out["loaders"]
    assert out["final"] == []


@pytest.mark.backend("jax")
def test_jax_backend_imports_neither_equinox_nor_flax():
    out = _run("""
        import jax.numpy as jnp
        import deqcore_jax
        deqcore.solve(lambda z, x: 0.5 * z + x, jnp.ones((2, 3)))
        out["modules"] = sorted({m.split(".")[0] for m in sys.modules} & {"equinox", "flax"})
        import deqcore_jax.equinox, deqcore_jax.flax
        out["on_demand"] = sorted({m.split(".")[0] for m in sys.modules} & {"equinox", "flax"})
    """)
    assert out["modules"] == []
    assert out["on_demand"] == ["equinox", "flax"]  # the check above would see them
