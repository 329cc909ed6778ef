"""The code blocks of the documentation, read from Markdown and run like a reader would run them.

A page is a tutorial: its Python blocks (fence ``python`` or ``py``) run in order in one
namespace, in a fresh Python process (nothing left over from other tests, JAX's default
precision) and a fresh working directory; ``pycon`` blocks (``>>>`` examples) run as doctests in
the same namespace. Other fences (shell commands, TOML, output, diagrams) are text.

A block that is deliberately not run carries a marker on the line before its fence, with a
reason::

    <!-- no-run: an excerpt of plugins/deqcore-krylov/src/deqcore_krylov/_newton_krylov.py -->

The tests compare the marked blocks with a committed list, so skipping cannot grow unnoticed.
"""

from __future__ import annotations

import ast
import doctest
import os
import re
import subprocess
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RUN = {"python": "exec", "py": "exec", "pycon": "doctest"}
FRAMEWORKS = ("torch", "jax")
#: Pages whose examples need a plugin distribution installed, and the test (in the plugin's own
#: suite, run where it is installed) that runs them.
PLUGIN_PAGES = {
    "docs/plugins/krylov.md": "plugins/deqcore-krylov/tests/test_plugin_docs.py",
    "plugins/deqcore-krylov/README.md": "plugins/deqcore-krylov/tests/test_plugin_docs.py",
    "plugins/deqcore-numpy/README.md": "plugins/deqcore-numpy/tests/test_plugin_docs.py",
}

_FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})(?P<info>.*)$")
_NO_RUN = re.compile(r"^\s*<!--\s*no-run\b(?P<rest>.*?)-->\s*$")


@dataclass(frozen=True)
class Block:
    """One fenced code block: its page (relative to the repository root), the line of its
    opening fence, its language, its code and, if marked, why it is not run."""

    page: str
    line: int
    lang: str
    code: str
    no_run: str | None = None

    @property
    def runs(self) -> bool:
        return self.lang in RUN and self.no_run is None

    def __str__(self) -> str:
        return f"{self.page}:{self.line}"


def pages() -> list[Path]:
    """Every page whose code blocks are checked: README.md, docs/**/*.md, plugins/*/README.md."""
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md")),
            *sorted(ROOT.glob("plugins/*/README.md"))]


def blocks(page: Path, root: Path = ROOT) -> list[Block]:
    """The fenced code blocks of ``page``, in order, named relative to ``root``. A ``no-run``
    marker without a reason, or one that is not followed by a code block, is an error."""
    name = page.relative_to(root).as_posix()
    lines = page.read_text().splitlines()
    found: list[Block] = []
    marker: tuple[int, str] | None = None
    i = 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        mark = _NO_RUN.match(lines[i])
        if mark is not None:
            reason = mark.group("rest").lstrip(":").strip()
            if not mark.group("rest").startswith(":") or not reason:
                raise ValueError(f"{name}:{i + 1}: write the reason: <!-- no-run: why it is not run -->")
            marker = (i + 1, reason)
        elif m is not None:
            indent, fence = m.group("indent"), m.group("fence")
            end = i + 1
            while end < len(lines) and not re.match(rf"^[ \t]*{re.escape(fence)}\s*$", lines[end]):
                end += 1
            if end == len(lines):
                raise ValueError(f"{name}:{i + 1}: code block is never closed")
            code = "\n".join(line.removeprefix(indent) for line in lines[i + 1:end]) + "\n"
            lang = m.group("info").strip().split(" ")[0].lower()
            found.append(Block(name, i + 1, lang, code, marker[1] if marker else None))
            marker = None
            i = end
        elif marker is not None and lines[i].strip():
            raise ValueError(f"{name}:{marker[0]}: a no-run marker must stand just before a code block")
        i += 1
    if marker is not None:
        raise ValueError(f"{name}:{marker[0]}: a no-run marker must stand just before a code block")
    return found


def frameworks(code_blocks: list[Block]) -> set[str]:
    """The array frameworks the runnable blocks need: those they import, or name as a backend
    (``backend="jax"``, ``ops_for("torch")``)."""
    needed: set[str] = set()
    for block in code_blocks:
        if not block.runs:
            continue
        source = block.code if RUN[block.lang] == "exec" else _doctest_source(block)
        for node in ast.walk(ast.parse(source, str(block))):
            if isinstance(node, ast.Import):
                needed.update(a.name.split(".")[0] for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                needed.add(node.module.split(".")[0])
            elif isinstance(node, ast.Constant) and isinstance(node.value, str):
                needed.add(node.value)
    return needed & set(FRAMEWORKS)


def _doctest_source(block: Block) -> str:
    examples = doctest.DocTestParser().get_examples(block.code, str(block))
    return "".join(e.source for e in examples)


def run_page(code_blocks: list[Block]) -> dict[str, object]:
    """Run the page's runnable blocks in order in one namespace (the caller chooses the working
    directory). A failing block raises AssertionError naming its page and line, with the
    traceback into the block."""
    namespace: dict[str, object] = {"__name__": "__main__"}
    for block in code_blocks:
        if not block.runs:
            continue
        if RUN[block.lang] == "doctest":
            test = doctest.DocTestParser().get_doctest(block.code, namespace, str(block), block.page,
                                                       block.line)
            runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
            out: list[str] = []
            runner.run(test, out=out.append, clear_globs=False)
            if runner.failures:
                raise AssertionError(f"the pycon block at {block} fails:\n{''.join(out)}")
            continue
        # line numbers in tracebacks are the page's: the code starts one line after the fence
        code = compile("\n" * block.line + block.code, block.page, "exec")
        try:
            exec(code, namespace)
        except Exception as exc:
            trace = "".join(traceback.format_exception(exc)[1:])
            raise AssertionError(
                f"the Python block at {block} raises {type(exc).__name__}:\n{trace}") from None
    return namespace


def run_page_in_fresh_python(page: Path, cwd: Path) -> None:
    """:func:`run_page` on ``page`` in a new interpreter started in ``cwd``, as a reader would
    run the examples; any warning they raise is an error. A failure raises AssertionError with
    the process's output."""
    env = dict(os.environ, PYTHONWARNINGS="error")
    run = subprocess.run([sys.executable, __file__, str(page)], cwd=cwd, env=env, capture_output=True,
                         text=True)
    if run.returncode != 0:
        raise AssertionError(f"{page.relative_to(ROOT)}: the examples fail\n{run.stdout}{run.stderr}")


if __name__ == "__main__":
    run_page(blocks(Path(sys.argv[1]).resolve()))
