"""The examples of the plugin's pages run as written, with the plugin installed.

deqcore's own suite runs every other page of its documentation (tests/test_docs_examples.py in
the deqcore repository, which reads the Markdown and runs it); these pages need this
distribution, so they run here, in its tox env, with the same reader.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT / "tests"))

from docs_examples import PLUGIN_PAGES, blocks, frameworks, run_page_in_fresh_python  # noqa: E402
from krylov_testing import SELECTED  # noqa: E402

PAGES = [page for page, test in PLUGIN_PAGES.items() if ROOT / test == Path(__file__).resolve()]


@pytest.mark.parametrize("page", PAGES)
def test_page_examples_run(page, tmp_path):
    found = blocks(ROOT / page)
    assert any(b.runs for b in found), f"{page} has no example to run"
    missing = frameworks(found) - set(SELECTED)
    assert not missing, f"{page} needs {sorted(missing)}: select them in DEQCORE_TEST_BACKENDS"
    run_page_in_fresh_python(ROOT / page, tmp_path)
