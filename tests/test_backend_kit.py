"""The backend kit: deqcore's own backends pass the conformance suite (deqcore.testing), the suite
fails a backend that breaks the protocol, and capabilities are declared and enforced.

Each selected backend (DEQCORE_TEST_BACKENDS) runs every check of
:func:`deqcore.testing.conformance_checks` as its own test, so a failure names the check.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import SELECTED
from test_registry import Installer

import deqcore
from deqcore import CapabilityError
from deqcore.extend import Capabilities, EagerBackend
from deqcore.testing import ConformanceError, check_backend, conformance_checks

ROOT = Path(__file__).resolve().parents[1]
CHECKS = [(name, label) for name in SELECTED for label in conformance_checks(name)]


@pytest.mark.parametrize(("name", "label"), CHECKS, ids=[f"{n}-{c}" for n, c in CHECKS])
def test_conformance(name, label):
    conformance_checks(name)[label]()


def test_the_suite_covers_the_protocol_solvers_and_gradient_modes(h):
    checks = set(conformance_checks(h.name))
    methods = {n for n, v in vars(deqcore.extend.Backend).items() if not n.startswith("_") and callable(v)}
    covered = {part for label in checks for part in label.split("-")}
    # every protocol method is checked by name but attach_adjoint, which the grad-* checks run, and
    # compiled, which a backend may refuse (the eager base raises TypeError)
    assert methods - covered == {"attach_adjoint", "compiled"}
    for solver in ("anderson", "broyden", "fixed_point", "reversible"):
        assert {f"{solver}-linear", f"{solver}-tanh", f"{solver}-tuple", f"{solver}-freezing"} <= checks
    modes = {f"grad-{m}" for m in deqcore.available()["gradients"]
             if deqcore.registry().get("gradients", m).plugin == "deqcore"}
    assert h.backend.capabilities.autodiff and modes <= checks and "vjp" in checks


# A backend plugin wrapping the selected backend, with some members replaced: the kit must
# report exactly what breaks.
BROKEN_PLUGIN = """
    import deqcore

    FRAMEWORK = {framework!r}


    class Wrapped:
        def __init__(self, name, **replace):
            self._inner, self._replace = deqcore.registry().backend(FRAMEWORK), {{"name": name, **replace}}

        def __getattr__(self, attr):
            if attr in self._replace:
                return self._replace[attr]
            return getattr(self._inner, attr)


    def set_index_ignored(buffer, index, value, axis=0):
        return buffer


    def not_mine(obj):
        return False


    @deqcore.extend.hookimpl
    def deqcore_register_backends(register):
        register("kit_drops_writes", lambda: Wrapped("kit_drops_writes", set_index=set_index_ignored))
        register("kit_owns_nothing", lambda: Wrapped("kit_owns_nothing", is_array=not_mine))
        register("kit_undeclared", lambda: Wrapped("kit_undeclared", capabilities={{"autodiff": True}}))
"""


@pytest.fixture
def broken(h, tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    installer = Installer(tmp_path)
    installer.install("kit_broken", BROKEN_PLUGIN.format(framework=h.name))
    deqcore.registry().reset()
    yield
    deqcore.registry().reset()
    for module in installer.modules:
        sys.modules.pop(module, None)


def test_the_suite_names_the_method_that_breaks_its_contract(broken):
    checks = conformance_checks("kit_drops_writes")
    with pytest.raises(AssertionError, match=r"set_index\(zeros \(3, 4\), 1, value, axis=0\): differs"):
        checks["set_index"]()
    checks["while_loop"]()  # the other methods are the working backend's
    checks["linear_solve"]()


def test_check_backend_runs_every_check_and_lists_each_failure(broken):
    with pytest.raises(ConformanceError) as info:
        check_backend("kit_owns_nothing")
    lines = str(info.value).splitlines()
    failed = {line.strip().split(":")[0] for line in lines[1:]}
    assert lines[0] == (f"backend 'kit_owns_nothing' failed {len(failed)} of "
                        f"{len(conformance_checks('kit_owns_nothing'))} conformance checks:")
    assert "is_array" in failed and "anderson-linear" in failed and "fixed_point-tuple" in failed
    assert "while_loop" not in failed and "linear_solve" not in failed


def test_an_unknown_backend_or_reference_is_an_error_before_any_check():
    with pytest.raises(ValueError, match="unknown backend 'nonesuch'; available backends: "):
        conformance_checks("nonesuch")
    with pytest.raises(ValueError, match="unknown backend 'nonesuch'"):
        conformance_checks(SELECTED[0], reference="nonesuch")


def test_the_kit_compares_a_backend_with_a_reference(both):
    checks = conformance_checks("jax", reference="torch")
    compared = [label for label in checks if label.endswith("-equals-torch")]
    assert len(compared) == 12  # four solvers (anderson, broyden, fixed_point, reversible), three problems
    for label in compared:
        checks[label]()


def test_the_harness_rejects_a_backend_no_plugin_registers():
    """DEQCORE_TEST_BACKENDS may name any registered backend; another name stops the run at once."""
    env = {**os.environ, "DEQCORE_TEST_BACKENDS": "nonesuch"}
    command = [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
               str(ROOT / "tests" / "test_import.py")]
    run = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    assert run.returncode == pytest.ExitCode.USAGE_ERROR, run.stdout + run.stderr
    assert ("DEQCORE_TEST_BACKENDS selects ['nonesuch'], which no installed plugin registers (registered "
            "backends: ") in run.stderr


# ------------------------------------------------------------------------------------------------
# capabilities


def test_the_builtin_backends_declare_their_capabilities(h):
    caps = h.backend.capabilities
    assert isinstance(caps, Capabilities) and caps.autodiff and "cpu" in caps.devices
    assert (caps.jit, caps.vmap) == ((True, True) if h.name == "jax" else (False, False))


@pytest.mark.parametrize(("fields", "match"), [
    ({"autodiff": 1}, "autodiff must be True or False, got 1"),
    ({"vmap": "yes"}, "vmap must be True or False"),
    ({"devices": "cpu"}, r"devices must be a non-empty tuple of device kinds such as \('cpu',\), got 'cpu'"),
    ({"devices": ()}, "devices must be a non-empty tuple"),
])
def test_capabilities_reject_bad_fields(fields, match):
    with pytest.raises(TypeError, match=match):
        Capabilities(**fields)
    with pytest.raises(TypeError):
        Capabilities(ad=True)  # an unknown field


class _ListBackend(EagerBackend):
    """The eager defaults alone, on a namespace nobody uses: for the refusals below."""

    name = "lists"
    xp = np

    def is_array(self, obj: object) -> bool:
        return isinstance(obj, np.ndarray)


def test_the_eager_base_refuses_differentiation_without_autodiff():
    be = _ListBackend()
    assert be.capabilities == Capabilities()
    with pytest.raises(CapabilityError, match=r"Backend.vjp\) needs reverse-mode differentiation, which "
                                              r"backend 'lists' does not support"):
        be.vjp(lambda a: a, np.ones(2))
    with pytest.raises(CapabilityError, match=r"backend 'lists'.*solve with grad=None"):
        be.attach_adjoint(lambda z, x: z, np.ones(2), None, lambda g, vjp: g)
    with pytest.raises(CapabilityError, match=r"attach_reverse\).*backend 'lists'.*solve with grad=None"):
        be.attach_reverse(lambda z, x: z, np.ones(2), None, lambda g, pullback, acc: acc)
    with pytest.raises(TypeError, match="backend 'lists' has no compiled mode"):
        be.compiled()


def test_the_eager_base_loops_and_writes():
    be = _ListBackend()
    assert be.while_loop(lambda s: s < 5, lambda s: s + 1, 0, max_steps=None, check_every=2) == 6
    assert be.fori_loop(4, lambda i, s: s + i, 0) == 6
    buffer = np.zeros((2, 3))
    assert be.set_index(buffer, np.int64(1), np.ones(2), axis=-1) is buffer
    np.testing.assert_array_equal(buffer, [[0, 1, 0], [0, 1, 0]])
    np.testing.assert_array_equal(be.active_prefix(np.arange(6).reshape(2, 3), 2, axis=1), [[0, 1], [3, 4]])


def test_a_backend_whose_capabilities_are_not_declared_is_refused(broken):
    """The registry's check covers ``capabilities`` like every protocol member."""
    with pytest.raises(deqcore.PluginError, match=r"capabilities is \{'autodiff': True\}, not a Capab"):
        deqcore.registry().backend("kit_undeclared")


def test_importing_the_kit_imports_no_framework():
    code = ("import sys, deqcore.testing; "
            "print(sorted(m for m in ('torch', 'jax') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
