"""Backend selection for the plugin's tests: ``DEQCORE_TEST_BACKENDS=torch,jax`` (as deqcore's own
suite reads it) or, by default, every backend whose framework imports. A selected framework that is
missing is an error, not a skip. JAX runs in float64."""

from __future__ import annotations

import pytest
from krylov_testing import SELECTED, Harness

if "jax" in SELECTED:
    import jax

    jax.config.update("jax_enable_x64", True)


@pytest.fixture(params=SELECTED, scope="module")
def h(request) -> Harness:
    return Harness(request.param)
