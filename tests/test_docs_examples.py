"""Every Python example in README.md, docs/ and the plugins' READMEs runs as written.

Each page's runnable blocks run in order in one namespace (tests/docs_examples.py), in a fresh
Python process and working directory, on the frameworks the page uses: a page that imports (or
names) only torch runs in the torch env, only JAX in the jax env, both in the ``both`` env,
neither in torch and jax. Pages that need a plugin distribution run in that plugin's own tests
(``PLUGIN_PAGES``).
"""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from docs_examples import (
    PLUGIN_PAGES,
    ROOT,
    Block,
    blocks,
    frameworks,
    pages,
    run_page,
    run_page_in_fresh_python,
)

import deqcore

#: How many Python blocks each page deliberately does not run (each carries a ``no-run`` marker
#: with its reason). A new marker must be counted here, so skipping cannot grow unnoticed.
NOT_RUN = {
    "docs/distributed.md": 2,
    "docs/plugin-authors.md": 3,
}

PAGES = {p.relative_to(ROOT).as_posix(): blocks(p) for p in pages()}


def _param(name: str):
    needs = frameworks(PAGES[name])
    return pytest.param(name, id=name, marks=[pytest.mark.backend(n) for n in sorted(needs)])


@pytest.mark.parametrize("page", [_param(name) for name, found in PAGES.items()
                                  if name not in PLUGIN_PAGES and any(b.runs for b in found)])
def test_page_examples_run(page, tmp_path):
    run_page_in_fresh_python(ROOT / page, tmp_path)


def test_unrun_blocks_are_the_committed_ones():
    unrun: dict[str, list[Block]] = {}
    for found in PAGES.values():
        for b in found:
            if b.no_run is not None:
                unrun.setdefault(b.page, []).append(b)
    listing = "\n".join(f"  {b}: {b.no_run}" for found in unrun.values() for b in found)
    assert {page: len(found) for page, found in unrun.items()} == NOT_RUN, (
        f"the blocks marked no-run are not the ones NOT_RUN counts:\n{listing}")
    # a marker only makes sense on a block that would otherwise run
    text_blocks = [b for found in unrun.values() for b in found if b.lang not in ("python", "py", "pycon")]
    assert not text_blocks, f"no-run markers on blocks that are never run: {text_blocks}"


def test_every_page_with_examples_is_run_somewhere():
    with_examples = {name for name, found in PAGES.items() if any(b.runs for b in found)}
    assert {"README.md", "docs/getting-started.md", "docs/plugins.md"} <= with_examples
    assert set(PLUGIN_PAGES) <= with_examples
    for runner in set(PLUGIN_PAGES.values()):
        assert (ROOT / runner).is_file(), runner


# ------------------------------------------------------------------------------------------------
# the reader of the markdown


def _page(tmp_path: Path, text: str) -> list[Block]:
    page = tmp_path / "page.md"
    page.write_text(textwrap.dedent(text))
    return blocks(page, root=tmp_path)


def test_blocks_run_in_order_in_one_namespace_and_failures_name_the_line(tmp_path):
    found = _page(tmp_path, """\
        Text.

        ```python
        a = 2
        ```

        ```bash
        exit 1
        ```

        <!-- no-run: shows a failure on purpose -->
        ```python
        raise RuntimeError
        ```

        ```pycon
        >>> a * 21
        42
        ```

        ```py
        b = a + 1
        assert b == 4, b
        ```
        """)
    assert [(b.line, b.lang, b.runs) for b in found] == [
        (3, "python", True), (7, "bash", False), (12, "python", False), (16, "pycon", True), (21, "py", True)]
    assert found[2].no_run == "shows a failure on purpose"
    with pytest.raises(AssertionError, match=r"page\.md:21 raises AssertionError") as err:
        run_page(found)
    assert 'page.md", line 23' in str(err.value)  # the page's own line numbers
    namespace = run_page(found[:2] + found[3:4])
    assert namespace["a"] == 2


def test_a_failing_doctest_fails(tmp_path):
    found = _page(tmp_path, """\
        ```pycon
        >>> 1 + 1
        3
        ```
        """)
    with pytest.raises(AssertionError, match=r"pycon block at page\.md:1 fails"):
        run_page(found)


@pytest.mark.parametrize("text, message", [
    ("<!-- no-run -->\n```python\nx\n```\n", "write the reason"),
    ("<!-- no-run:  -->\n```python\nx\n```\n", "write the reason"),
    ("<!-- no-run: why -->\n\nText.\n```python\nx\n```\n", "just before a code block"),
    ("<!-- no-run: why -->\n", "just before a code block"),
    ("```python\nx\n", "never closed"),
])
def test_bad_markers_are_errors(tmp_path, text, message):
    with pytest.raises(ValueError, match=message):
        _page(tmp_path, text)


def test_frameworks_come_from_imports_and_backend_names(tmp_path):
    found = _page(tmp_path, """\
        ```python
        import numpy as np
        ```

        ```python
        from jax import numpy as jnp  # torch in a comment does not count
        ```

        <!-- no-run: never run, so torch is not needed -->
        ```python
        import torch
        ```
        """)
    assert frameworks(found) == {"jax"}
    assert frameworks(_page(tmp_path, '```python\nops = ops_for("torch")\n```\n')) == {"torch"}
    assert frameworks(_page(tmp_path, "```pycon\n>>> import torch.nn\n```\n")) == {"torch"}


# ------------------------------------------------------------------------------------------------
# docs/plugins.md: the example plugin, installed as the page says, registers and solves


def test_plugin_page_solver_is_installed_by_its_entry_point_and_solves(h, tmp_path, monkeypatch):
    python, toml = (b for b in PAGES["docs/plugins.md"] if b.lang in ("python", "toml"))
    first, module_path = python.code.splitlines()[0].split()  # "# my_package/deqcore_plugin.py"
    assert first == "#"
    module = tmp_path / module_path
    module.parent.mkdir()
    (module.parent / "__init__.py").write_text("")
    module.write_text(python.code)
    dist = tmp_path / "my_package-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: my_package\nVersion: 0.1\n")
    section = toml.code[toml.code.index("[project.entry-points.deqcore]"):]
    entry = section.splitlines()[1].replace('"', "")  # my_plugin = my_package.deqcore_plugin
    (dist / "entry_points.txt").write_text(f"[deqcore]\n{entry}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delenv("DEQCORE_DISABLE_PLUGIN_AUTOLOAD", raising=False)
    deqcore.registry().reset()
    try:
        assert "relaxed" in deqcore.available()["solvers"]
        rng = np.random.default_rng(0)
        W = rng.standard_normal((16, 16))
        f = h.tanh_layer(0.8 * W / np.linalg.norm(W, 2), rng.standard_normal((16, 16)), np.zeros(16))
        x = h.asarray(rng.standard_normal((4, 16)))
        sol = h.solve(f, x, solver="relaxed", omega=0.7, tol=1e-12, max_iter=300)
        ref = h.solve(f, x, solver="anderson", tol=1e-13, max_iter=100)
        assert h.numpy(sol.converged).all()
        np.testing.assert_allclose(h.numpy(sol.z), h.numpy(ref.z), rtol=0, atol=1e-10)
        with pytest.raises(ValueError, match="omega"):
            h.solve(f, x, solver="relaxed", omega=1.5)
    finally:
        sys.modules.pop("my_package.deqcore_plugin", None)
        sys.modules.pop("my_package", None)
        deqcore.registry().reset()

