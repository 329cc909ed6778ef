"""The documentation's measured numbers agree with the results files they come from.

Every generated block (``<!-- generated: NAME from SOURCE by COMMAND (do not edit) -->``) must
equal what its renderer makes of SOURCE now, and every checked number (``<!-- checked: SOURCE
QUERY -->``) must round to the values the query selects. The engine is
``deqcore_models.docs_numbers``; the benchmark pages' renderers are ``benchmarks/render_docs.py``.
Regenerate with ``python benchmarks/render_docs.py`` (every block) or ``python -m
deqcore_models.docs_numbers`` (the experiment pages' blocks). No framework is imported.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import render_docs  # noqa: E402  (registers the benchmark pages' renderers)
from deqcore_models import docs_numbers as dn  # noqa: E402
from deqcore_models.doc_blocks import _fixed  # noqa: E402


def _strip(text: str) -> str:
    """``text`` without its generated blocks, code blocks, inline code and HTML comments other
    than checked and quoted markers (line count kept, so line numbers stay right)."""
    for b in reversed(dn.blocks(text)):
        text = text[:b.start] + "\n" * text[b.start:b.end].count("\n") + text[b.end:]
    text = re.sub(r"```.*?```", lambda m: "\n" * m.group(0).count("\n"), text, flags=re.S)
    text = re.sub(r"`[^`\n]*`", "``", text)
    return re.sub(r"<!--(?! checked:| quoted:).*?-->", lambda m: "\n" * m.group(0).count("\n"), text,
                  flags=re.S)


def test_every_generated_block_and_checked_number_matches_its_results():
    pages = dn.pages(ROOT)
    wrong = [item for page in pages for item in dn.problems(page, ROOT)]
    assert not wrong, "docs disagree with their results files:\n" + "\n".join(wrong)
    # not vacuous: the pages that quote results do so through the markers
    texts = {p.relative_to(ROOT).as_posix(): p.read_text() for p in pages}
    named = {b.name for t in texts.values() for b in dn.blocks(t)}
    assert {"solvers.table", "solvers.goals", "solvers.unconverged", "gradients.goals", "backends.table",
            "memory.report", "hyperdeq.results", "hyperdeq.cost", "hyperdeq.goals", "gdeq.report",
            "run.epochs", "experiments.backends"} <= named
    checked = {name: len(dn.CHECK.findall(t)) for name, t in texts.items()}
    for page in ("docs/benchmarks.md", "docs/benchmarks-gradients.md", "docs/models.md",
                 "docs/hypersolvers.md", "docs/experiments/hyperdeq-fmnist/README.md",
                 "docs/experiments/hyperdeq-wt2/README.md", "docs/experiments/fmnist-accuracy/README.md",
                 "docs/experiments/transformer-wt2/README.md"):
        assert checked[page] >= 5, page


CLAIMS = re.compile(r"\b(?:all|every)\s+(?:\w+\s+){0,2}(?:converged|converge)\b|\bno\s+unconverged\b|"
                    r"\bnone\s+(?:of\s+them\s+)?(?:failed|missed)\b", re.I)


def test_convergence_claims_are_generated_not_typed():
    """"all converged", "every method converged": counts, so they must come from a renderer."""
    found = []
    for page in dn.pages(ROOT):
        text = _strip(page.read_text())
        for m in CLAIMS.finditer(text):
            if re.search(r"\b(?:unless|if|whether|until)\s+$", text[max(0, m.start() - 12):m.start()]):
                continue  # a condition of the API, not a claim about a run
            found.append(f"{page.relative_to(ROOT)}:{text.count(chr(10), 0, m.start()) + 1}: {m.group(0)!r}")
    assert not found, "typed convergence claims (generate them from the results):\n" + "\n".join(found)


MEASURED = re.compile(r"(?<![\w.])\d+\.\d+(?:\s?[–-]\s?\d+(?:\.\d+)?)?\s?(?:×|%)")
EXEMPT_BEFORE = re.compile(r"(?:[≤≥<>]|\bgoal\b|\bat most\b|\bbelow\b|\babove\b|\bwithin\b)[^.;|]{0,40}$",
                           re.I)


def test_decimal_ratios_and_percentages_are_checked_or_generated():
    """A decimal followed by × or % in prose is a measured ratio or share: it needs a checked
    marker (or sits in a generated block, or is a goal, or is quoted with a visible source and a
    ``<!-- quoted: SOURCE -->`` marker)."""
    found = []
    for page in dn.pages(ROOT):
        if page.relative_to(ROOT).as_posix() in ("docs/cli.md", "docs/errors.md"):
            continue  # edited elsewhere; their numbers are listed for their owners
        text = _strip(page.read_text())
        for m in MEASURED.finditer(text):
            after = text[m.end():m.end() + 40].lstrip("*")
            if after.startswith(("<!-- checked:", "<!-- quoted:")) or EXEMPT_BEFORE.search(text[:m.start()]):
                continue
            found.append(f"{page.relative_to(ROOT)}:{text.count(chr(10), 0, m.start()) + 1}: {m.group(0)!r}")
    assert not found, "unchecked measured numbers:\n" + "\n".join(found)


def _page(tmp_path: Path, text: str, data: dict) -> Path:
    (tmp_path / "r.json").write_text(json.dumps(data))
    page = tmp_path / "page.md"
    page.write_text(text)
    return page


@pytest.mark.parametrize("written, data, scale", [
    ("69 s", 69.02, ""), ("2.10 %", 0.020994, " %"), ("1.2e-6", 1.15e-6, ""), ("3,288 s", 3287.6, ""),
    ("53K", 53210, ""), ("2.2M", 2230334, ""), ("−2.90", -0.029, " %"), ("0.10", 0.1, ""),
])
def test_checked_number_accepts_the_value_as_written(tmp_path, written, data, scale):
    page = _page(tmp_path, f"The run took {written}<!-- checked: r.json a{scale} --> in all.\n", {"a": data})
    assert dn.problems(page) == []


@pytest.mark.parametrize("written, data, scale", [
    ("59 s", 69.02, ""), ("1.8 %", 0.020994, " %"), ("2.1e-6", 1.15e-6, ""), ("3,280 s", 3287.6, ""),
    ("54K", 53210, ""), ("2.90", -0.029, " %"), ("0.11", 0.1, ""), ("0.0209", 0.020994, ""),
])
def test_checked_number_rejects_a_wrong_value(tmp_path, written, data, scale):
    page = _page(tmp_path, f"The run took {written}<!-- checked: r.json a{scale} -->.\n", {"a": data})
    (item,) = dn.problems(page)
    assert "page.md:1" in item and "r.json a" in item and written.split()[0] in item


def test_checked_range_is_the_smallest_and_largest_selected(tmp_path):
    rows = [{"method": m, "d": d, "ratio": r} for m, d, r in
            [("anderson", 256, 1.52), ("anderson", 1024, 1.25), ("broyden", 256, 1.95),
             ("anderson", 64, 2.0)]]
    text = ("Anderson: 1.25–1.52×<!-- checked: r.json rows[method=anderson,d=256|1024].ratio -->; "
            "all: 1.25–2.00×<!-- checked: r.json rows.*.ratio -->; "
            "bad: 1.25–1.95×<!-- checked: r.json rows[method=anderson].ratio -->; "
            "count 3<!-- checked: r.json count:rows[method=anderson] -->, "
            "sum 4.77<!-- checked: r.json sum:rows[method=anderson,d=256|1024|64].ratio -->, "
            "none 1.0<!-- checked: r.json rows[method=jfb].ratio -->.\n")
    wrong = dn.problems(_page(tmp_path, text, {"rows": rows}))
    assert len(wrong) == 2
    assert "the page says 1.25–1.95, the results say 1.25–2.00" in wrong[0]
    assert "selects nothing" in wrong[1]


def test_checked_number_in_a_table_cell_is_the_cells_own(tmp_path):
    """The marker checks the number of its own cell, not one of the cell before."""
    text = ("| a | b |\n|---|---|\n| 12.5 | 3<!-- checked: r.json b --> |\n"
            "| 7 | <!-- checked: r.json b --> |\n")
    wrong = dn.problems(_page(tmp_path, text, {"b": 3}))
    assert len(wrong) == 1 and ":4:" in wrong[0] and "no number" in wrong[0]


def test_a_stale_generated_block_is_found_and_rewritten(tmp_path):
    """Copy a committed experiment page with its results, change one result: the check names the
    block and the command, and the command's rewrite makes the page agree again, its prose kept."""
    src = ROOT / "docs" / "experiments"
    run = tmp_path / "fmnist-accuracy" / "jax-npg"  # the model's summary, which the page also quotes
    run.mkdir(parents=True)
    shutil.copy(src / "fmnist-accuracy" / "jax-npg" / "summary.json", run)
    tmp_path = tmp_path / "hyperdeq-fmnist"
    tmp_path.mkdir()
    for name in ("README.md", "results.json", "results.md"):
        shutil.copy(src / "hyperdeq-fmnist" / name, tmp_path / name)
    page = tmp_path / "README.md"
    assert dn.problems(page) == []
    result = json.loads((tmp_path / "results.json").read_text())
    result["training"]["hyper"]["unconverged_targets"] = 0
    result["rows"][0]["accuracy"] = result["rows"][0]["metric"] = 0.5
    (tmp_path / "results.json").write_text(json.dumps(result))
    wrong = dn.problems(page)
    assert any("'hyperdeq.cost' differs" in i and "python -m deqcore_models.docs_numbers" in i
               for i in wrong)
    assert any("'hyperdeq.metric' differs" in i for i in wrong)
    # the prose quotes the 22 unconverged targets and the 81.2 % first-step accuracy: both now wrong
    assert any("training.hyper.unconverged_targets" in i and "the page says 22" in i for i in wrong)
    assert any("rows[method=hyper,budget=1].accuracy" in i for i in wrong)
    before = page.read_text()
    dn.write_page(page, "hyperdeq.results", "results.json")
    after = page.read_text()
    assert "| hyper | 1,962 | 3.69 % | 4.8 % | 69 | 2.10 % | 0 of 4,800 |" in after
    assert [b.name for b in dn.blocks(after)] == [b.name for b in dn.blocks(before)]
    assert _strip(after).count("\n") == _strip(before).count("\n")
    assert [i for i in dn.problems(page) if "differs" in i] == []


def test_write_page_makes_a_whole_page_from_its_results(tmp_path):
    """What the experiment command writes: results.md rendered from results.json alone equals the
    committed one, for both HyperDEQ experiments (a rerun renders its page the same way)."""
    for experiment in ("hyperdeq-fmnist", "hyperdeq-wt2"):
        out = tmp_path / experiment
        out.mkdir()
        shutil.copy(ROOT / "docs" / "experiments" / experiment / "results.json", out / "results.json")
        dn.write_page(out / "results.md", "hyperdeq.results", "results.json")
        committed = ROOT / "docs" / "experiments" / experiment / "results.md"
        assert (out / "results.md").read_text() == committed.read_text()


def test_benchmark_pages_name_every_unconverged_run():
    """The solvers benchmark's "NO" rows appear in its generated convergence sentence, one by one."""
    data = json.loads((ROOT / "benchmarks/results/solvers.json").read_text())
    text = render_docs.solvers_unconverged(ROOT / "benchmarks/results/solvers.json")
    missed = [r for r in data["rows"] if not r["converged"]]
    assert missed and f"{len(data['rows']) - len(missed)} of {len(data['rows'])} runs" in text
    assert len(re.findall(r"worst \d", text)) == len(missed)
    assert "Every method converged" not in text


def test_a_marker_without_its_end_or_with_a_bad_query_is_reported(tmp_path):
    page = _page(tmp_path, "<!-- generated: solvers.table from r.json by x (do not edit) -->\n| a |\n", {})
    assert "has no '<!-- end generated -->' line" in dn.problems(page)[0]
    unknown = "<!-- generated: nope from r.json by x (do not edit) -->\n<!-- end generated -->\n"
    page = _page(tmp_path, unknown, {})
    assert "'nope' has no renderer" in dn.problems(page)[0]
    page = _page(tmp_path, "It is 3<!-- checked: r.json rows[method] -->.\n", {"rows": []})
    assert "a filter is [key=value,...]" in dn.problems(page)[0]
    page = _page(tmp_path, "It is 3<!-- checked: missing.json a -->.\n", {})
    assert "missing.json is missing" in dn.problems(page)[0]
    page = _page(tmp_path, "Write `4<!-- checked: missing.json a -->` after a number.\n", {})
    assert dn.problems(page) == []  # an example in inline code is not a marker


def _examples() -> list[tuple[str, str, str]]:
    """``(page, framework, code)`` of every Python example whose printed output a comment quotes."""
    out = []
    for page in ("README.md", "docs/getting-started.md"):
        for code in re.findall(r"```python\n(.*?)```", (ROOT / page).read_text(), flags=re.S):
            if re.search(r"print\(.*\)\s+# \S", code):
                out.append((page, "jax" if "import jax" in code else "torch", code))
    return out


_NUMBER = re.compile(r"\d+(?:\.\d+)?(?:e[-+]?\d+)?")


def _check_examples(framework: str) -> None:
    """Run the ``framework`` examples whose printed output a comment quotes; each printed line
    must read as the comment, its numbers to the precision the comment writes them."""
    examples = [(page, code) for page, fw, code in _examples() if fw == framework]
    assert examples, f"no {framework} example with a quoted output"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(str(ROOT / d) for d in ("", "backends", "models"))}
    for page, code in examples:
        quoted = [line.split("# ", 1)[1].strip() for line in code.splitlines()
                  if re.search(r"print\(.*\)\s+# \S", line)]
        run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                             timeout=600)
        assert run.returncode == 0, f"{page}: the {framework} example fails:\n{run.stderr[-2000:]}"
        printed = run.stdout.strip().splitlines()
        assert len(printed) == len(quoted), (page, printed, quoted)
        for got, want in zip(printed, quoted, strict=True):
            assert _NUMBER.sub("#", got) == _NUMBER.sub("#", want), (page, got, want)
            for g, w in zip(_NUMBER.findall(got), _NUMBER.findall(want), strict=True):
                assert _fixed(float(g), w) == _fixed(float(w), w), f"{page}: {got!r} vs {want!r}"


@pytest.mark.backend("torch")
def test_torch_examples_print_what_their_comments_say():
    _check_examples("torch")


@pytest.mark.backend("jax")
def test_jax_examples_print_what_their_comments_say():
    _check_examples("jax")


def test_a_new_result_renders_the_pages_that_quote_it(tmp_path):
    """What a benchmark or experiment command does after writing its results: every block of the
    checkout sourced from that file is rendered again, other blocks and the prose stay."""
    (tmp_path / "pyproject.toml").write_text("")
    (tmp_path / "docs").mkdir()
    (tmp_path / "results").mkdir()
    rows = json.loads((ROOT / "benchmarks/results/backends.json").read_text())
    (tmp_path / "results" / "backends.json").write_text(json.dumps(rows))
    (tmp_path / "results" / "other.json").write_text(json.dumps(rows))
    page = tmp_path / "docs" / "page.md"
    stale = [dn.block("backends.table", f"../results/{name}.json", "stale", render_docs.COMMAND)
             for name in ("backends", "other")]
    page.write_text("Intro 0.76×<!-- checked: ../results/backends.json [workload=mdeq].ratio_step -->.\n\n"
                    + stale[0] + "\n\nMiddle.\n\n" + stale[1] + "\n")
    rows[0]["ratio_step"] = 0.5
    (tmp_path / "results" / "backends.json").write_text(json.dumps(rows))
    assert dn.refresh_pages_of(tmp_path / "results" / "backends.json") == [page]
    text = page.read_text()
    first, second = dn.blocks(text)
    assert "**0.50× PASS**" in first.body and second.body == "stale\n"
    assert text.startswith("Intro 0.76×") and "\n\nMiddle.\n\n" in text
    (item,) = [i for i in dn.problems(page) if "checked number" in i]
    assert "the page says 0.76, the results say 0.50" in item
    assert dn.refresh_pages_of(tmp_path / "results" / "other.json", tmp_path) == [page]
    assert [i for i in dn.problems(page) if "differs" in i] == []


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


def test_every_committed_results_file_is_strict_json():
    """NaN and Infinity are not JSON: results files write them as null (every writer goes through
    ``deqcore._arrays_io.dumps_json``), so any JSON reader can load them."""
    files = [p for p in ROOT.rglob("*.json")
             if not any(part.startswith(".") or part in ("node_modules", "build", "dist") for part in
                        p.relative_to(ROOT).parts)]
    assert len(files) >= 10, files
    bad = []
    for path in files:
        try:
            json.loads(path.read_text(), parse_constant=_reject_constant)
        except ValueError as exc:
            bad.append(f"{path.relative_to(ROOT)}: {exc}")
    assert not bad, bad
