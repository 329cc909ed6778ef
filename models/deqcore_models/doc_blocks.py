"""Measured numbers in the documentation come from the results files, never typed by hand.

Two markers, both HTML comments (invisible on the rendered page):

* A **generated block**, from its start line to ``<!-- end generated -->``::

      <!-- generated: hyperdeq.cost from results.json by COMMAND (do not edit) -->
      | hypersolver | parameters | ...
      <!-- end generated -->

  ``hyperdeq.cost`` names a renderer, ``results.json`` is its source (a path relative to the
  page). The block's text is whatever the renderer makes of the source; COMMAND, the command
  that rewrites it (``python -m deqcore_models.docs_numbers`` for the experiment pages), is
  written into the start line.
* A **checked number**: ``1.21×<!-- checked: results.json speedups.nfe.hyper.anderson.speedup -->``
  checks the number (or range ``a–b``) written just before it against the values the query
  selects in the source, rounded as the page writes it: a single number must equal every
  selected value, a range the smallest and the largest. An optional last word scales the values
  first: ``%`` (times 100) or ``*N``. A ``K`` or ``M`` right after the written number (``53K``)
  divides them by a thousand or a million.

A number quoted from elsewhere (a paper) says so in the text and carries ``<!-- quoted: SOURCE
-->`` right after it; it is not checked.

Queries: dot-separated keys (``training.hyper.seconds``; ``a|b`` takes both); ``*`` takes every
item of a dict or list; ``[k=v,k2=v2]`` keeps the list items whose fields print as those values
(``rows[method=hyper,budget=1].accuracy``; ``v1|v2`` accepts either); ``[3]`` picks an item. A
``sum:``, ``count:``, ``mean:``, ``min:`` or ``max:`` in front reduces the selection to one number.
A CSV source is a list of rows, numbers parsed.

    python -m deqcore_models.docs_numbers            # rewrite the blocks this package renders
    python -m deqcore_models.docs_numbers --check    # list every stale block and wrong number

This module is the engine and registers no renderer itself. Renderers register with
:func:`renderer`; the experiment pages' live in :mod:`deqcore_models.experiments` (the command
above, :mod:`deqcore_models.docs_numbers`, imports them), the benchmark pages' in
``benchmarks/render_docs.py`` (which runs this same engine with them: ``python
benchmarks/render_docs.py [--check]``).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import re
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deqcore.internal import write_text

COMMAND = "python -m deqcore_models.docs_numbers"

#: The pages that may hold measured numbers, relative to the repository root.
PAGES = ("README.md", "models/README.md", "docs/**/*.md", "benchmarks/**/*.md", "plugins/**/README.md")

Renderer = Callable[[Path], str]


@dataclass(frozen=True)
class Registered:
    render: Renderer
    command: str


_RENDERERS: dict[str, Registered] = {}


def renderer(name: str, command: str = COMMAND) -> Callable[[Renderer], Renderer]:
    """Register ``fn(source: Path) -> markdown`` as the renderer of blocks named ``name``;
    ``command`` is what rewrites them (written into each block's start line)."""
    def register(fn: Renderer) -> Renderer:
        _RENDERERS[name] = Registered(fn, command)
        return fn
    return register


def renderers() -> dict[str, Registered]:
    """Every renderer registered so far (the experiment pages' once
    :mod:`deqcore_models.experiments` is imported, as :mod:`deqcore_models.docs_numbers` does)."""
    return dict(_RENDERERS)


START = re.compile(r"^<!-- generated: (?P<name>\S+) from (?P<source>\S+) by (?P<command>.+?) "
                   r"\(do not edit\) -->$", re.MULTILINE)
END = "<!-- end generated -->"
CHECK = re.compile(r"<!-- checked: (?P<body>.+?) -->")
_NUM = r"[-+−]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:[eE][-+−]?\d+)?"
_LAST_NUMBER = re.compile(rf"(?P<a>{_NUM})(?:\s?[–-]\s?(?P<b>{_NUM}))?(?P<suffix>[KM](?![A-Za-z]))?[^\d]*$")


def start_line(name: str, source: str, command: str) -> str:
    return f"<!-- generated: {name} from {source} by {command} (do not edit) -->"


def block(name: str, source: str, body: str, command: str = COMMAND) -> str:
    """A whole generated block: start line, ``body`` (ending in a newline), end line."""
    body = body.rstrip("\n")
    return "\n".join([start_line(name, source, command), *([body] if body else []), END])


@dataclass
class Found:
    name: str
    source: str
    command: str
    start: int  # offset of the start line
    end: int  # offset just after the end line
    body: str
    line: int


def blocks(text: str) -> list[Found]:
    """The generated blocks of a page, in order; a start line without its end line is an error."""
    out = []
    for m in START.finditer(text):
        body_start = m.end() + 1
        stop = text.find("\n" + END, m.end())
        if stop < 0:
            line = text.count("\n", 0, m.start()) + 1
            raise ValueError(f"line {line}: generated block {m['name']!r} has no '{END}' line")
        out.append(Found(m["name"], m["source"], m["command"], m.start(), stop + 1 + len(END),
                         text[body_start:stop + 1], text.count("\n", 0, m.start()) + 1))
    for a, b in zip(out, out[1:], strict=False):
        if b.start < a.end:
            raise ValueError(f"line {b.line}: generated block {b.name!r} starts inside {a.name!r} "
                             f"(line {a.line})")
    return out


def load(path: Path) -> Any:
    """A results file: JSON (NaN allowed), or CSV as a list of rows with numbers parsed."""
    if path.suffix == ".csv":
        with open(path, newline="") as fh:
            return [{k: _number(v) for k, v in row.items()} for row in csv.DictReader(fh)]
    return json.loads(path.read_text())


def _number(text: str) -> Any:
    try:
        return int(text)
    except ValueError:
        try:
            return float(text)
        except ValueError:
            return text


def _printed(value: Any) -> str:
    return json.dumps(value) if isinstance(value, bool) or value is None else str(value)


_SEGMENT = re.compile(r"\[(?P<filter>[^\]]*)\]|(?P<key>[^.\[\]]+)")


AGGREGATES: dict[str, Callable[[list[float]], float]] = {
    "sum": lambda v: float(sum(v)), "count": lambda v: float(len(v)),
    "mean": lambda v: float(sum(v)) / len(v), "min": lambda v: float(min(v)), "max": lambda v: float(max(v))}
"""``sum:`` and the others reduce a selection to one number; ``count:`` counts items of any kind."""


def query(data: Any, path: str) -> list[Any]:
    """The values ``path`` selects in ``data`` (see the module docstring)."""
    head, colon, rest = path.partition(":")
    if colon and head in AGGREGATES:
        values = query(data, rest)
        if head == "count":
            return [float(len(values))]
        bad = [v for v in values if isinstance(v, bool) or not isinstance(v, (int, float))]
        return values if bad or not values else [AGGREGATES[head](values)]
    items = [data]
    for m in _SEGMENT.finditer(path):
        nxt: list[Any] = []
        for item in items:
            if m["key"] == "*" or m["filter"] == "*":
                nxt += list(item.values()) if isinstance(item, dict) else list(item)
            elif m["key"] is not None:
                if isinstance(item, dict):
                    nxt += [item[k] for k in m["key"].split("|") if k in item]
            elif re.fullmatch(r"-?\d+", m["filter"]):
                if isinstance(item, list) and -len(item) <= int(m["filter"]) < len(item):
                    nxt.append(item[int(m["filter"])])
            else:
                pairs = [p.split("=", 1) for p in m["filter"].split(",")]
                if any(len(p) != 2 for p in pairs):
                    raise ValueError(f"query {path!r}: a filter is [key=value,...], got [{m['filter']}]")
                rows = list(item.values()) if isinstance(item, dict) else list(item)
                nxt += [r for r in rows if isinstance(r, dict)
                        and all(k in r and _printed(r[k]) in v.split("|") for k, v in pairs)]
        items = nxt
    return items


def _fixed(value: float, like: str) -> str:
    """``value`` printed with the precision of the number ``like`` (decimals, or a mantissa's)."""
    mantissa, _, exponent = like.lower().partition("e")
    decimals = len(mantissa.partition(".")[2])
    if exponent:
        return f"{value:.{decimals}e}"
    return f"{value:.{decimals}f}"


def _clean(text: str) -> str:
    return text.replace(",", "").replace("−", "-")


def check_number(before: str, values: Sequence[Any], scale: str | None) -> str | None:
    """None when the last number (or range) of ``before`` matches ``values``; else the reason."""
    m = _LAST_NUMBER.search(CHECK.sub("", before))
    if m is None:
        return "no number before the marker"
    nums = [v for v in values]
    if not nums:
        return "the query selects nothing"
    bad = [v for v in nums if isinstance(v, bool) or not isinstance(v, (int, float))]
    if bad:
        return f"the query selects non-numbers: {bad[:3]}"
    factor = 1.0
    if scale == "%":
        factor = 100.0
    elif scale:
        factor = float(scale[1:])
    if m["suffix"]:
        factor /= 1e3 if m["suffix"] == "K" else 1e6
    scaled = [float(v) * factor for v in nums]
    if any(not math.isfinite(v) for v in scaled):
        return f"the query selects non-finite values: {nums[:3]}"
    suffix = m["suffix"] or ""
    if m["b"] is None:
        a = _clean(m["a"])
        got = sorted({_fixed(v, a) for v in scaled})
        want = _fixed(float(a), a)
        if got != [want]:
            return f"the page says {m['a']}{suffix}, the results say {' / '.join(g + suffix for g in got)}"
        return None
    a, b = _clean(m["a"]), _clean(m["b"])
    low, high = _fixed(min(scaled), a), _fixed(max(scaled), b)
    if (low, high) != (_fixed(float(a), a), _fixed(float(b), b)):
        return f"the page says {m['a']}–{m['b']}{suffix}, the results say {low}–{high}{suffix}"
    return None


def _marker_parts(body: str) -> tuple[str, str, str | None]:
    words = body.split()
    if len(words) < 2:
        raise ValueError(f"a checked marker is '<!-- checked: SOURCE QUERY [SCALE] -->', got {body!r}")
    scale = words[-1] if len(words) > 2 and re.fullmatch(r"%|\*[0-9.e+-]+", words[-1]) else None
    return words[0], " ".join(words[1:-1] if scale else words[1:]), scale


def refresh(text: str, page: Path, names: Iterable[str] | None = None,
            source: Path | None = None) -> str:
    """``text`` of ``page`` with every generated block whose renderer is registered (and named in
    ``names``, and rendered from ``source``, when given) rendered again from its source."""
    table = renderers()
    wanted = set(table) if names is None else set(names) & set(table)
    out, last = [], 0
    for b in blocks(text):
        if b.name not in wanted or (source is not None and (page.parent / b.source).resolve() != source):
            continue
        reg = table[b.name]
        body = reg.render(page.parent / b.source)
        out += [text[last:b.start], block(b.name, b.source, body, reg.command)]
        last = b.end
    out.append(text[last:])
    return "".join(out)


def write_page(path: Path, name: str, source: str) -> None:
    """Render the generated blocks of the page ``path`` again (its other text stays), or, when it
    does not exist, write it as the one block ``name`` rendered from ``source``. What the
    experiment and benchmark commands call after writing their results files."""
    text = path.read_text() if path.exists() else block(name, source, "") + "\n"
    write_text(path, refresh(text, path))


def repository_of(path: Path) -> Path | None:
    """The checkout ``path`` lies in (the nearest folder above it with ``pyproject.toml`` and
    ``docs/``), or None."""
    for folder in path.resolve().parents:
        if (folder / "pyproject.toml").is_file() and (folder / "docs").is_dir():
            return folder
    return None


def refresh_pages_of(results: Path, root: Path | None = None) -> list[Path]:
    """Render again, in every page of the checkout (``root``, default :func:`repository_of`
    ``results``), the generated blocks whose source is ``results``; the pages changed. Checked
    numbers are not touched: :func:`problems` reports the ones a new result contradicts."""
    results = results.resolve()
    root = repository_of(results) if root is None else root
    changed: list[Path] = []
    for page in pages(root) if root is not None else []:
        text = page.read_text()
        if any((page.parent / b.source).resolve() == results for b in blocks(text)):
            new = refresh(text, page, source=results)
            if new != text:
                write_text(page, new)
                changed.append(page)
    return changed


def problems(page: Path, root: Path | None = None, skip_foreign: bool = False) -> list[str]:
    """Everything wrong with one page: a block that differs from its rendering (or has an unknown
    renderer or a missing source), a checked number that does not match, a marker that does not
    parse. Each item names the page, line and the command that fixes it. ``skip_foreign``: pass
    over blocks whose renderer is not registered here but which name another command."""
    text = page.read_text()
    where = page.relative_to(root) if root is not None else page
    table = renderers()
    found: list[str] = []
    try:
        listed = blocks(text)
    except ValueError as exc:
        return [f"{where}: {exc}"]
    for b in listed:
        reg = table.get(b.name)
        if reg is None and skip_foreign and b.command != COMMAND:
            continue
        if reg is None:
            found.append(f"{where}:{b.line}: generated block {b.name!r} has no renderer (known: "
                         f"{', '.join(sorted(table))})")
            continue
        source = page.parent / b.source
        if not source.exists():
            found.append(f"{where}:{b.line}: generated block {b.name!r}: its source {b.source} is missing")
            continue
        want = block(b.name, b.source, reg.render(source), reg.command)
        if text[b.start:b.end] != want:
            found.append(f"{where}:{b.line}: generated block {b.name!r} differs from {b.source}; "
                         f"run `{reg.command}` to rewrite it")
    loaded: dict[Path, Any] = {}
    for m in CHECK.finditer(text):
        if text.count("`", text.rfind("\n", 0, m.start()) + 1, m.start()) % 2:
            continue  # inside inline code: an example of the marker, not a marker
        line = text.count("\n", 0, m.start()) + 1
        try:
            name, path, scale = _marker_parts(m["body"])
            file = page.parent / name
            if file.exists() and file not in loaded:
                loaded[file] = load(file)
            values = query(loaded[file], path) if file.exists() else None
        except ValueError as exc:
            found.append(f"{where}:{line}: {exc}")
            continue
        if values is None:
            found.append(f"{where}:{line}: checked number: {name} is missing")
            continue
        # the number checked is the last one before the marker in its paragraph or table cell
        cell_start = max(text.rfind("\n\n", 0, m.start()), text.rfind("|", 0, m.start()), 0)
        reason = check_number(text[cell_start:m.start()], values, scale)
        if reason:
            found.append(f"{where}:{line}: checked number ({name} {path}"
                         f"{' ' + scale if scale else ''}): {reason}; correct the page")
    return found


def pages(root: Path) -> list[Path]:
    """The pages of :data:`PAGES` under ``root``."""
    out: list[Path] = []
    for pattern in PAGES:
        out += sorted(p for p in root.glob(pattern) if p.is_file() and p not in out)
    return out


def main(argv: list[str] | None = None, names: Iterable[str] | None = None, prog: str = COMMAND) -> int:
    """Rewrite the generated blocks of every page (only those named in ``names``, when given),
    or with ``--check`` list every problem and exit 1 if there is one."""
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true",
                        help="change nothing; list stale blocks and wrong numbers")
    parser.add_argument("--root", type=Path, default=Path("."), help="the repository root (default: .)")
    parser.add_argument("pages", nargs="*", type=Path, help="only these pages (default: every page)")
    args = parser.parse_args(argv)
    root = args.root.resolve()
    targets = [p.resolve() for p in args.pages] or pages(root)
    if args.check:
        wrong = [i for p in targets for i in problems(p, root, skip_foreign=True)]
        for item in wrong:
            print(item)
        return 1 if wrong else 0
    own = set(renderers()) if names is None else set(names)
    changed = []
    for p in targets:
        text = p.read_text()
        new = refresh(text, p, own)
        if new != text:
            write_text(p, new)
            changed.append(p)
    for p in changed:
        print(f"rewrote {p.relative_to(root) if p.is_relative_to(root) else p}", file=sys.stderr)
    leftover = [i for p in targets for i in problems(p, root, skip_foreign=True)]
    for item in leftover:
        print(item, file=sys.stderr)
    return 1 if leftover else 0
