"""The examples of this distribution's README run as written, with the plugin installed.

deqcore's own suite runs every other page of its documentation (tests/test_docs_examples.py in
the deqcore repository); this page needs the NumPy backend registered, so it runs here, in the
plugin's tox env, with the same reader.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT / "tests"))

from docs_examples import PLUGIN_PAGES, blocks, run_page_in_fresh_python  # noqa: E402

PAGES = [page for page, test in PLUGIN_PAGES.items() if ROOT / test == Path(__file__).resolve()]


def test_this_distribution_has_pages_to_run():
    assert PAGES == ["plugins/deqcore-numpy/README.md"]


@pytest.mark.parametrize("page", PAGES)
def test_page_examples_run(page, tmp_path):
    assert any(b.runs for b in blocks(ROOT / page)), f"{page} has no example to run"
    run_page_in_fresh_python(ROOT / page, tmp_path)
