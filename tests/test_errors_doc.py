"""docs/errors.md documents every error and warning class the project defines, and every status.

The classes are found in the source (any class deriving from an exception or warning), so a new
one fails this test until the page says what it means and how to fix it.
"""

from __future__ import annotations

import ast
import builtins
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PAGE = ROOT / "docs" / "errors.md"
SOURCES = ["deqcore", "backends", "models/deqcore_models", "plugins/deqcore-krylov/src"]
BUILTIN_EXCEPTIONS = {name for name, obj in vars(builtins).items()
                      if isinstance(obj, type) and issubclass(obj, BaseException)}


def _exception_classes() -> dict[str, str]:
    """Every class in the sources that derives (directly or through another one found here) from
    a built-in exception or warning: name -> file."""
    bases: dict[str, tuple[set[str], str]] = {}
    for folder in SOURCES:
        for path in sorted((ROOT / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.ClassDef):
                    names = {b.id if isinstance(b, ast.Name) else b.attr for b in node.bases
                             if isinstance(b, (ast.Name, ast.Attribute))}
                    bases[node.name] = (names, str(path.relative_to(ROOT)))
    found: dict[str, str] = {}
    changed = True
    while changed:
        changed = False
        for name, (parents, where) in bases.items():
            if name not in found and parents & (BUILTIN_EXCEPTIONS | set(found)):
                found[name] = where
                changed = True
    return found


def test_the_class_scan_finds_the_known_classes():
    found = _exception_classes()
    for name in ("ConvergenceError", "PluginError", "PluginWarning", "DataError", "CheckpointError",
                 "HigherOrderError", "ConfigTypeError", "WriteError"):
        assert name in found, (name, sorted(found))


def test_every_exception_and_warning_class_is_documented():
    text = PAGE.read_text()
    missing = [f"{name} ({where})" for name, where in sorted(_exception_classes().items())
               if not re.search(rf"`[\w.]*\b{name}\b", text)]
    assert not missing, f"docs/errors.md does not document: {', '.join(missing)}"


def test_every_status_is_documented():
    from deqcore import Status

    text = PAGE.read_text()
    for status in Status:
        assert re.search(rf"`{status.name}` \({int(status)}\)", text), status


def test_the_page_links_resolve():
    text = PAGE.read_text()
    anchors = {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-")
               for h in re.findall(r"^#+ (.+)$", text, flags=re.M)}
    for target in re.findall(r"\]\(([^)]+)\)", text):
        page, _, anchor = target.partition("#")
        path = (PAGE.parent / page) if page else PAGE
        assert path.is_file(), target
        if anchor:
            heads = re.findall(r"^#+ (.+)$", path.read_text(), flags=re.M)
            slugs = {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in heads}
            assert anchor in (slugs if page else anchors), target
