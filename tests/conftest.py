"""Shared fixtures: the ``backend`` fixture runs a test once per selected backend.

``DEQCORE_TEST_BACKENDS=torch`` (or ``jax``, or ``torch,jax``) selects backends; by default every
backend whose framework imports. A selected backend whose framework is missing is an error, not a
skip, so a misconfigured tox env cannot pass silently. Any other registered backend (a plugin's,
such as ``numpy`` from plugins/deqcore-numpy) may be selected too: the harness builds its arrays
with the backend's own ``xp``; a name no plugin registers is an error.

Tests that need a backend that is not selected are *deselected* at collection (and counted in
pytest's summary), never skipped: ``@pytest.mark.backend("jax")`` needs JAX (jit, vmap),
``@pytest.mark.equivalence`` needs both. Each such test runs in the tox env that selects what it
needs (torch, jax, or both for the equivalence tests), so a skip in a report always means
something went wrong.

``equivalence`` is exactly "needs every backend": a test that needs both without the marker (it
uses the ``both`` fixture, or carries ``backend("torch")`` and ``backend("jax")``) gets it here,
before ``-m`` selects, so the tox envs that select by the marker (``-m "not equivalence"`` in
torch and jax, ``-m equivalence`` in both) cannot all leave it out. tests/test_selection.py
checks that every collected test runs in some tox env.
"""

from __future__ import annotations

import importlib.util
import os

import numpy as np
import pytest

import deqcore

ALL_BACKENDS = ("torch", "jax")


def _selected() -> tuple[str, ...]:
    raw = os.environ.get("DEQCORE_TEST_BACKENDS", "").strip()
    if raw:
        names = tuple(n.strip() for n in raw.split(",") if n.strip())
        missing = [n for n in names if n in ALL_BACKENDS and importlib.util.find_spec(n) is None]
        if missing:
            raise pytest.UsageError(f"DEQCORE_TEST_BACKENDS selects {missing} but they are not installed")
        others = [n for n in names if n not in ALL_BACKENDS]
        registered = deqcore.available()["backends"] if others else []
        unknown = [n for n in others if n not in registered]
        if unknown:
            raise pytest.UsageError(f"DEQCORE_TEST_BACKENDS selects {unknown}, which no installed plugin "
                                    f"registers (registered backends: {', '.join(registered)})")
        return names
    return tuple(n for n in ALL_BACKENDS if importlib.util.find_spec(n) is not None)


SELECTED = _selected()

if "jax" in SELECTED:
    import jax

    jax.config.update("jax_enable_x64", True)

    @pytest.fixture(autouse=True, scope="module")
    def _release_jax_executables():
        # Every compiled executable holds memory mappings; the JAX suite compiles thousands of
        # test functions in one process, and the kernel's limit (65530 mappings) is a crash inside
        # the compiler. The library's own eager solves are checked not to accumulate any
        # (test_solvers.py); this keeps the tests' own jitted functions from adding up.
        yield
        jax.clear_caches()


def _needs(item: pytest.Item) -> set[str]:
    need = {name for m in item.iter_markers("backend") for name in m.args}
    if item.get_closest_marker("equivalence") is not None or "both" in getattr(item, "fixturenames", ()):
        need.update(ALL_BACKENDS)
    return need


@pytest.hookimpl(tryfirst=True)  # before pytest's own -m/-k selection sees the markers
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    unknown = {n for item in items for n in _needs(item)} - set(ALL_BACKENDS)
    if unknown:
        raise pytest.UsageError(f"@pytest.mark.backend names unknown backends {sorted(unknown)}")
    for item in items:
        if _needs(item) >= set(ALL_BACKENDS) and item.get_closest_marker("equivalence") is None:
            item.add_marker(pytest.mark.equivalence)
    keep = [item for item in items if _needs(item) <= set(SELECTED)]
    if len(keep) < len(items):
        config.hook.pytest_deselected(items=[item for item in items if item not in keep])
        items[:] = keep


def pytest_report_header(config: pytest.Config) -> str:
    return f"deqcore test backends: {', '.join(SELECTED)} (DEQCORE_TEST_BACKENDS)"


class Harness:
    """Array conversion and solving for one backend, so tests read the same for all backends."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.backend = deqcore.registry().backend(name)
        self.xp = self.backend.xp

    def asarray(self, a, dtype="float64"):
        a = np.array(a, dtype=dtype)  # a copy: a backend writing in place never changes the caller's
        if self.name == "torch":
            import torch

            return torch.from_numpy(a)
        return self.xp.asarray(a)

    def numpy(self, a):
        return np.asarray(self.backend.to_numpy(a))

    def solve(self, f, x, z0=None, jit=False, **kw):
        """``deqcore.solve``; with ``jit=True`` on JAX the whole solve is compiled."""
        if self.name == "jax" and jit:
            import jax

            return jax.jit(lambda x, z0: deqcore.solve(f, x, z0, **kw))(x, z0)
        return deqcore.solve(f, x, z0, **kw)

    def tanh_layer(self, W, U, b):
        """f(z, x) = tanh(z W^T + x U^T + b) with numpy weights converted to this backend."""
        Wb, Ub, bb = (self.asarray(a, dtype=W.dtype) for a in (W, U, b))
        return lambda z, x: self.xp.tanh(z @ Wb.T + x @ Ub.T + bb)

    def affine_layer(self, A, c):
        """f(z, x) = z A^T + x + c."""
        Ab, cb = self.asarray(A, dtype=A.dtype), self.asarray(c, dtype=c.dtype)
        return lambda z, x: z @ Ab.T + x + cb


@pytest.fixture(params=SELECTED)
def h(request) -> Harness:
    return Harness(request.param)


@pytest.fixture
def both() -> tuple[Harness, Harness]:
    if set(ALL_BACKENDS) - set(SELECTED):
        pytest.skip("cross-backend equivalence needs both torch and jax selected")
    return Harness("torch"), Harness("jax")


@pytest.fixture(scope="session")
def data_root():
    """The real data folder: ``$DEQCORE_DATA`` (tox sets it), else ``../shared/data`` beside the
    checkout. Missing data fails the test run rather than skipping the checks."""
    from pathlib import Path

    env = os.environ.get("DEQCORE_DATA", "").strip()
    root = Path(env) if env else Path(__file__).resolve().parents[1].parent / "shared" / "data"
    if not (root / "fashion-mnist").is_dir():
        pytest.fail(f"data folder {root} not found: set DEQCORE_DATA to the folder holding fashion-mnist/")
    return root
