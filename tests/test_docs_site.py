"""The documentation site (mkdocs.yml) without building it: the API reference covers the public
names, and the site's hooks (scripts/docs_site_hooks.py) keep repository links honest and
docstring roles out of the pages. The build itself, with warnings as errors, is the ``docs`` tox
env."""

from __future__ import annotations

import importlib
import importlib.util
import logging
import re
from pathlib import Path
from types import ModuleType, SimpleNamespace

import pytest

import deqcore

ROOT = Path(__file__).resolve().parents[1]
API = ROOT / "docs" / "api"


def _targets() -> set[str]:
    """The objects the API pages render (``::: dotted.name`` lines)."""
    return {m.group(1) for page in API.glob("*.md")
            for m in re.finditer(r"^::: ([\w.]+)\s*$", page.read_text(), re.M)}


def _resolve(target: str) -> object:
    """The object a dotted name names: the longest importable module prefix, then attributes."""
    parts = target.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ModuleNotFoundError:
            continue
        for name in parts[i:]:
            obj = getattr(obj, name)
        return obj
    raise ModuleNotFoundError(target)


def test_api_reference_covers_every_public_name_of_deqcore():
    targets = _targets()
    # every page's target exists; a backend's module imports its framework, so it is read, not imported
    objects = {t: _resolve(t) for t in targets if t.split(".")[0] == "deqcore"}
    for target in targets - set(objects):
        if importlib.util.find_spec(target.split(".")[0]) is None or "." not in target:
            assert importlib.util.find_spec(target) is not None, target
            continue
        module, _, name = target.rpartition(".")
        source = Path(importlib.util.find_spec(module).origin).read_text()
        assert re.search(rf"^(?:class|def) {name}\b", source, re.M), f"{target} is not defined"
    modules = [obj for obj in objects.values() if isinstance(obj, ModuleType)]
    submodules = {n for n in deqcore.__all__ if isinstance(getattr(deqcore, n), ModuleType)}
    missing = [n for n in deqcore.__all__ if n != "__version__" and f"deqcore.{n}" not in targets
               and not any(n in getattr(m, "__all__", ()) for m in modules)
               and not (n in submodules and any(t.startswith(f"deqcore.{n}.") for t in targets))]
    assert not missing, f"public names of deqcore missing from docs/api/: {missing}"
    missing = [n for n in deqcore.extend.__all__ if f"deqcore.extend.{n}" not in targets]
    assert not missing, f"names of deqcore.extend missing from docs/api/extend.md: {missing}"
    assert {"deqcore.solve", "deqcore.Solution", "deqcore.extend.Solver", "deqcore.extend.Backend"} <= targets


def _hooks():
    spec = importlib.util.spec_from_file_location("docs_site_hooks", ROOT / "scripts" / "docs_site_hooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _render(tmp_path: Path, markdown: str, repo_url: str | None = None) -> str:
    docs = tmp_path / "docs"
    (docs / "sub").mkdir(parents=True, exist_ok=True)
    (docs / "sub" / "page.md").write_text(markdown)
    (docs / "other.md").write_text("")
    (tmp_path / "README.md").write_text("")
    (tmp_path / "mkdocs.yml").write_text("")
    config = {"docs_dir": str(docs), "config_file_path": str(tmp_path / "mkdocs.yml"), "repo_url": repo_url}
    page = SimpleNamespace(file=SimpleNamespace(abs_src_path=str(docs / "sub" / "page.md"),
                                                src_uri="sub/page.md"))
    return _hooks().on_page_markdown(markdown, page, config, None)


def test_links_outside_docs_become_repository_paths(tmp_path, caplog):
    text = ("See the [`README`](../../README.md#usage), [other](../other.md), "
            "[web](https://example.org/x.md) and [anchor](#here).\n"
            "```\n[in code](../../README.md)\n```\n`[inline](../../README.md)`\n")
    with caplog.at_level(logging.WARNING):
        out = _render(tmp_path, text)
    assert out.splitlines()[0] == ("See the `README` (`README.md` in the repository), [other](../other.md), "
                                   "[web](https://example.org/x.md) and [anchor](#here).")
    assert out.splitlines()[1:] == text.splitlines()[1:]  # code is left alone
    assert not caplog.records
    linked = _render(tmp_path, "[r](../../README.md)", repo_url="https://example.org/deqcore/")
    assert linked == "[r](https://example.org/deqcore/blob/main/README.md)"


@pytest.mark.parametrize("target", ["../../NOPE.md", "../../../outside.md"])
def test_a_missing_repository_file_is_a_warning(tmp_path, caplog, target):
    with caplog.at_level(logging.WARNING):
        out = _render(tmp_path, f"[x]({target})")
    assert out == f"[x]({target})"
    assert [r.levelname for r in caplog.records] == ["WARNING"]
    assert target in caplog.records[0].getMessage()
    assert caplog.records[0].name.startswith("mkdocs.")  # counted by mkdocs --strict


def test_docstring_roles_are_dropped_and_the_code_kept():
    html = ("<p>raise :class:<code>ConvergenceError</code>; see :meth:<code>Solver.step</code>, "
            "a:b:<code>c</code></p>")
    assert _hooks().on_page_content(html, None, None, None) == (
        "<p>raise <code>ConvergenceError</code>; see <code>Solver.step</code>, a:b:<code>c</code></p>")
