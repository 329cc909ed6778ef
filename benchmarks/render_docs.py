"""The benchmark pages' generated blocks, rendered from the benchmarks' results files.

docs/benchmarks.md, docs/benchmarks-gradients.md, docs/models.md and the transformer memory
report hold blocks between ``<!-- generated: NAME from SOURCE by python benchmarks/render_docs.py
(do not edit) -->`` and ``<!-- end generated -->``; this script renders them again from SOURCE
(``benchmarks/results/solvers.json``, ``gradients.json``, ``backends.json``, a ``memory.json``).
The benchmark scripts call it after writing their results, so a rerun updates the pages; the
engine, the checked-number markers and the experiment pages' blocks are
``deqcore_models.docs_numbers``'s.

    python benchmarks/render_docs.py            # rewrite every generated block
    python benchmarks/render_docs.py --check    # list stale blocks and wrong numbers, exit 1 if any
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
for _p in (ROOT, ROOT / "models"):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

from deqcore_models import docs_numbers  # noqa: E402

COMMAND = "python benchmarks/render_docs.py"
OURS = ("deqcore", "deqcore-compiled")
PATHS = {("torch", "deqcore"): "torch eager", ("torch", "deqcore-compiled"): "torch compiled",
         ("jax", "deqcore"): "JAX (jit)"}
ANCHORS = {"torchdeq": "TorchDEQ", "jaxopt": "jaxopt", "optimistix": "optimistix"}


def renderer(name: str):
    return docs_numbers.renderer(name, COMMAND)


def _lines(lines: list[str]) -> str:
    return "\n".join(lines) + "\n"


def _x(v: float, digits: int = 2) -> str:
    return f"{v:.{digits}f}×"


# ----------------------------------------------------------------------------------------------
# bench_solvers.py: solvers.json
# ----------------------------------------------------------------------------------------------


def _find(rows: list[dict], **fields: Any) -> dict | None:
    """The row with these field values (None if there is none)."""
    return next((r for r in rows if all(r[k] == v for k, v in fields.items())), None)


def _problems(rows: list[dict]) -> list[tuple[str, str]]:
    """(problem, config) in page order: dense sizes as run, gaussian before symmetric, conv last."""
    seen = list(dict.fromkeys((r["problem"], r["config"]) for r in rows))
    sizes = list(dict.fromkeys(r["d"] for r in rows if r["problem"] != "conv"))
    order = ("gaussian", "symmetric", "conv")

    def key(pc: tuple[str, str]) -> tuple[int, int, int]:
        d = next(r["d"] for r in rows if (r["problem"], r["config"]) == pc)
        return (pc[0] == "conv", sizes.index(d) if d in sizes else 0,
                order.index(pc[0]) if pc[0] in order else len(order))

    return sorted(seen, key=key)


def _cell(r: dict | None, tail: str) -> str:
    if r is None:
        return ""
    return f"{r['ratio_floor']:.2f} ({r['nfe']}{'' if r['converged'] else ', NO'}; {tail})"


@renderer("solvers.table")
def solvers_table(source: Path) -> str:
    """deqcore's solvers per path and problem: time / floor (NFE, NO when unconverged; time over the
    fastest converged anchor)."""
    rows = docs_numbers.load(source)["rows"]
    probs = _problems(rows)
    lines = ["| solver | path | " + " | ".join(f"{p} {c}" for p, c in probs) + " |",
             "|---|---|" + "---|" * len(probs)]
    methods = list(dict.fromkeys(r["method"] for r in rows if r["library"] in OURS))
    for m in methods:
        for (be, lib), label in PATHS.items():
            cells = []
            for p, c in probs:
                r = _find(rows, backend=be, library=lib, method=m, problem=p, config=c)
                va = None if r is None else r.get("vs_anchor")
                cells.append(_cell(r, "no anchor converged" if va is None else f"{va:.2f}"))
            if any(cells):
                lines.append(f"| {m} | {label} | " + " | ".join(cells) + " |")
    return _lines(lines)


@renderer("solvers.anchors")
def solvers_anchors(source: Path) -> str:
    """Every anchor per problem: time / floor (NFE, NO when unconverged; median time)."""
    rows = docs_numbers.load(source)["rows"]
    probs = _problems(rows)
    lines = ["| anchor | " + " | ".join(f"{p} {c}" for p, c in probs) + " |", "|---|" + "---|" * len(probs)]
    anchors = list(dict.fromkeys((r["library"], r["method"]) for r in rows if r["library"] not in OURS))
    for lib, m in anchors:
        cells = []
        for p, c in probs:
            r = _find(rows, library=lib, method=m, problem=p, config=c)
            cells.append(_cell(r, "" if r is None else f"{r['time_ms']:.1f} ms"))
        lines.append(f"| {ANCHORS.get(lib, lib)} {m} | " + " | ".join(cells) + " |")
    return _lines(lines)


@renderer("solvers.unconverged")
def solvers_unconverged(source: Path) -> str:
    """Which methods missed the tolerance (the "NO" cells), or that none did."""
    data = docs_numbers.load(source)
    cfg, rows = data["config"], data["rows"]
    missed = [r for r in rows if not r["converged"]]
    tol = f"{cfg['tol']:.0e}".replace("e-0", "e-")
    head = (f"Reached the tolerance ({tol}, worst sample, judged in float64) within "
            f"{cfg['max_iter']} steps: {len(rows) - len(missed)} of {len(rows)} runs.")
    if not missed:
        return head + " Every method converged on every problem.\n"
    groups: dict[tuple[str, str], list[str]] = {}
    for r in missed:
        who = (PATHS.get((r["backend"], r["library"])) and f"deqcore {r['method']}"
               or f"{ANCHORS.get(r['library'], r['library'])} {r['method']}")
        where = PATHS.get((r["backend"], r["library"]), r["backend"])
        groups.setdefault((who, f"{r['problem']} {r['config']}"), []).append(
            f"{where}, worst {r['worst_rel']:.1e}")
    parts = [f"{who} on {prob} ({'; '.join(ws)})" for (who, prob), ws in groups.items()]
    return head + " Did not (NO): " + ", ".join(parts) + ".\n"


GOAL_TEXT = {"1": "1. every solver ≤ 1.3× its floor (≤ 1.15× at d = 1024)",
             "2": "2. Broyden's time per evaluation ≤ 1.2× Anderson's",
             "3": "3. fastest deqcore solver ≤ 0.5× TorchDEQ's, ≤ 0.8× jaxopt/optimistix's (symmetric "
                  "d = 1024, conv)"}


def _where(g: dict) -> str:
    path = PATHS.get((g["backend"], g.get("library", "deqcore")), g["backend"])
    return f"{path} {g['problem']} {g['config']}"


@renderer("solvers.goals")
def solvers_goals(source: Path) -> str:
    """The goal lines of bench_solvers.py, counted: how many cases pass, the range of the ratios,
    and where they pass."""
    goals = docs_numbers.load(source)["goals"]
    lines = ["| goal | passed | ratio range | where it passed |", "|---|---|---|---|"]
    for number, text in GOAL_TEXT.items():
        gs = [g for g in goals if g["goal"] == number]
        if not gs:
            continue
        groups = ([(m, [g for g in gs if g["method"] == m]) for m in dict.fromkeys(g["method"] for g in gs)]
                  if number == "1" else [("", gs)])
        for method, group in groups:
            ratios = [g["ratio"] for g in group if g["ratio"] == g["ratio"]]
            passed = [g for g in group if g["pass"]]
            where = ", ".join(f"{_where(g)} ({_x(g['ratio'])})" for g in passed) or "nowhere"
            label = f"{text}: {method}" if method else text
            span = f"{_x(min(ratios))}–{_x(max(ratios))}" if ratios else ""
            lines.append(f"| {label} | {len(passed)} of {len(group)} | {span} | {where} |")
    return _lines(lines)


@renderer("solvers.f-cost")
def solvers_f_cost(source: Path) -> str:
    """One evaluation of f per problem and floor (the floor's time over its NFE, deqcore's
    Anderson's floor): what a solver step is compared with."""
    rows = docs_numbers.load(source)["rows"]
    probs = _problems(rows)
    floors = [("torch eager", "torch", "deqcore"), ("torch compiled", "torch", "deqcore-compiled"),
              ("JAX (jit)", "jax", "deqcore")]
    lines = ["| f evaluation, ms | " + " | ".join(f"{p} {c}" for p, c in probs) + " |",
             "|---|" + "---|" * len(probs)]
    for label, be, lib in floors:
        cells = []
        for p, c in probs:
            r = _find(rows, backend=be, library=lib, method="anderson", problem=p, config=c)
            cells.append("" if r is None else f"{r['floor_ms'] / r['nfe']:.3f}")
        if any(cells):
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return _lines(lines)


@renderer("solvers.run")
def solvers_run(source: Path) -> str:
    """The run's settings, versions and machine load."""
    d = docs_numbers.load(source)
    cfg, v = d["config"], d["versions"]
    load = ", ".join(f"{x:.2f}" for x in d["loadavg_start"])
    return (f"Run: `python benchmarks/bench_solvers.py --repeats {cfg['repeats']}` ({cfg['dtype']}, "
            f"{cfg['torch_threads']} torch thread, injection {cfg['injection']:g}), deqcore at commit "
            f"`{v['deqcore git']}`, torch {v['torch']}, JAX {v['jax']}, TorchDEQ {v['torchdeq']}, jaxopt "
            f"{v['jaxopt']}, optimistix {v['optimistix']}, on {v['cpus']} CPUs (load average at the start "
            f"{load}); {d['elapsed_s']:.0f} s.\n")


# ----------------------------------------------------------------------------------------------
# bench_gradients.py: gradients.json
# ----------------------------------------------------------------------------------------------


def _label(r: dict) -> str:
    lib = {"deqcore": "deqcore", "torchdeq": "TorchDEQ"}.get(r["library"], r["library"])
    return f"{lib} {r['method']}"


@renderer("gradients.run")
def gradients_run(source: Path) -> str:
    d = docs_numbers.load(source)
    cfg, v = d["config"], d["versions"]
    return (f"Run: `python benchmarks/bench_gradients.py` ({cfg['dtype']}, batch {cfg['batch']}, d ∈ "
            f"{{{', '.join(map(str, cfg['sizes']))}}}, {cfg['repeats']} repeats), deqcore at commit "
            f"`{v['deqcore git']}`, on {v['cpus']} CPUs; {d['elapsed_s']:.0f} s.\n")


@renderer("gradients.goals")
def gradients_goals(source: Path) -> str:
    """bench_gradients.py's goal lines, as printed."""
    goals = docs_numbers.load(source)["goals"]
    return _lines([f"- `{g['line']}`" for g in goals])


def gradients_table(source: Path, problem: str) -> str:
    """Every method on one problem: backward time, VJPs, cosine, backward error (for the exact
    methods), bytes, and whether its forward reached the tolerance."""
    rows = [r for r in docs_numbers.load(source)["rows"] if r["problem"] == problem]
    lines = ["| d | backend | method | bwd ms | VJPs | cos | bwd err | bytes | forward converged |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        vjps = f"{r['vjps']}" + (f" (+{r['jprods'] - r['vjps']} JVPs)" if r["jprods"] > r["vjps"] else "")
        exact = r["cos"] is not None and r["cos"] > 0.99999
        cos = "" if r["cos"] is None else f"{r['cos']:.5f}" if exact else f"{r['cos']:.3f}"
        err = f"{r['bwd_rel_err']:.1e}" if exact and r["bwd_rel_err"] is not None else ""
        bwd = f"{r['bwd_ms']:.1f}" if r["bwd_ms"] >= 10 else f"{r['bwd_ms']:.2f}"
        lines.append(f"| {r['d']} | {r['backend']} | {_label(r)} | {bwd} | {vjps} | {cos} | {err} | "
                     f"{r['bytes']:,} | {'yes' if r['fwd_converged'] else 'NO'} |")
    return _lines(lines)


for _problem in ("gaussian", "symmetric"):
    renderer(f"gradients.table-{_problem}")(lambda source, p=_problem: gradients_table(source, p))


@renderer("gradients.memory")
def gradients_memory(source: Path) -> str:
    """The memory sweep: bytes kept at two forward budgets and their ratio."""
    d = docs_numbers.load(source)
    a, b = d["config"]["memory_sweep"]["max_iter"]
    lines = [f"| backend | mode | bytes at max_iter {a} | at {b} | growth |", "|---|---|---|---|---|"]
    for m in d["memory"]:
        lines.append(f"| {m['backend']} | {m['method']} | {m['bytes_10']:,} | {m['bytes_40']:,} | "
                     f"{m['growth']:.3f} |")
    return _lines(lines)


# ----------------------------------------------------------------------------------------------
# bench_backends.py: backends.json
# ----------------------------------------------------------------------------------------------


def _workload(s: dict) -> str:
    model = {"mdeq": "MDEQ", "transformer": "DEQ-Transformer"}.get(s["model"], s["model"])
    bwd = s.get("grad_options", {}).get("max_iter")
    grad = f"{s['grad']}" + (f" (backward {bwd})" if bwd else "")
    return (f"{model} `{s['config']}`, {s['dataset']} batch {s['batch_size']}, "
            f"{s['solver']} {s['max_iter']}, {grad}")


@renderer("backends.table")
def backends_table(source: Path) -> str:
    """Each workload's training step, forward and backward on torch and JAX, and the ratios."""
    rows = docs_numbers.load(source)
    lines = ["| workload | backend | step s | forward s | backward s | NFE | JAX/torch step | forward "
             "| backward |", "|---|---|---|---|---|---|---|---|---|"]
    for w in rows:
        t, j = w["torch"], w["jax"]
        lines.append(f"| {_workload(w['settings'])} | torch | {t['step_s']:.3f} | {t['forward_s']:.3f} | "
                     f"{t['backward_s']:.3f} | {t['nfe']:.0f} | | | |")
        verdict = "PASS" if w["pass"] else "FAIL"
        lines.append(f"| | jax | {j['step_s']:.3f} | {j['forward_s']:.3f} | {j['backward_s']:.3f} | "
                     f"{j['nfe']:.0f} | **{_x(w['ratio_step'])} {verdict}** | {_x(w['ratio_forward'])} | "
                     f"{_x(w['ratio_backward'])} |")
    steps = {(w["steps"], w["warmup"]) for w in rows}
    note = ", ".join(f"{s} timed steps after {u} warm-up steps" for s, u in sorted(steps))
    lines += ["", f"Each backend: the better of two blocks' medians of {note}; goal: JAX/torch within 1.5× "
              "either way."]
    return _lines(lines)


# ----------------------------------------------------------------------------------------------
# bench_transformer_memory.py: memory.json
# ----------------------------------------------------------------------------------------------


def _growth(r: dict) -> float:
    return r["peak_rss_mb"] - r["rss_after_setup_mb"]


def memory_summary(rows: dict, depth: int) -> dict[str, Any]:
    """The reductions DEQ against explicit per output layer (what memory.json stores beside the rows)."""
    out = {}
    for output in ("chunked", "full"):
        d, e = rows[f"deq, {output}"], rows[f"explicit-{depth}, {output}"]
        out[output] = {
            "reduction_saved_total": 1 - d["saved_total"] / e["saved_total"],
            "reduction_saved_layers": 1 - d["saved_layers"] / e["saved_layers"],
            "reduction_peak_rss": 1 - d["peak_rss_mb"] / e["peak_rss_mb"],
            "reduction_peak_rss_increase": 1 - _growth(d) / _growth(e),
            "reduction_step_peak": 1 - d["step_peak_mb"] / e["step_peak_mb"],
            "step_time_ratio": d["step_s"] / e["step_s"]}
    return out


@renderer("memory.report")
def memory_report(source: Path) -> str:
    """bench_transformer_memory.py's report (memory.md) from its memory.json."""
    s = json.loads(source.read_text())
    cfg, rows, depth = s["config"], s["rows"], s["depth"]
    lines = [f"# DEQ-Transformer training memory vs an explicit weight-tied transformer of depth {depth}",
             "", "Command: `python benchmarks/bench_transformer_memory.py --data DATA "
             f"--config {cfg['config']} --batch-size {cfg['batch_size']} --solver {cfg['solver']} "
             f"--max-iter {cfg['max_iter']} --steps {cfg['steps']} --chunk {cfg['chunk']}` (PyTorch, "
             f"float32, one WikiText-2 batch of {cfg['batch_size']} x {rows['deq, chunked']['tokens']} "
             "tokens; the explicit depth is the DEQ's measured forward NFE). `chunked`: the output layer "
             f"deqcore_models trains with (softmax over {cfg['chunk']} positions at a time, recomputed in "
             "backward); `full`: all logits kept for backward.", "", *memory_table(s)]
    return _lines(lines)


def memory_table(s: dict) -> list[str]:
    rows, mb = s["rows"], 1 / 2 ** 20
    lines = ["| model, output layer | saved for backward, MB | of which vocabulary-sized | layer stack | "
             "peak RSS MB | RSS growth in training MB | step peak MB | step s |",
             "|---|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['saved_total'] * mb:.1f} | {r['saved_vocab'] * mb:.1f} | "
                     f"{r['saved_layers'] * mb:.1f} | {r['peak_rss_mb']:.0f} | {_growth(r):.0f} | "
                     f"{r['step_peak_mb']:.0f} | {r['step_s']:.3f} |")
    lines.append("")
    for output in ("chunked", "full"):
        sm = s[output]
        lines.append(f"- {output} output layer: saved for backward {100 * sm['reduction_saved_total']:.1f} % "
                     f"less in total ({100 * sm['reduction_saved_layers']:.1f} % in the layer stack); "
                     f"peak process memory {100 * sm['reduction_peak_rss']:.1f} % less, its growth in "
                     f"training {100 * sm['reduction_peak_rss_increase']:.1f} % less, step peak "
                     f"{100 * sm['reduction_step_peak']:.1f} % less; step time DEQ / "
                     f"explicit {sm['step_time_ratio']:.2f}x")
    return lines


@renderer("memory.table")
def memory_table_block(source: Path) -> str:
    """The memory report's table and reductions, for pages that quote it."""
    return _lines(memory_table(json.loads(source.read_text())))


def refresh_pages_of(results: Path) -> list[Path]:
    """Render again every generated block of this checkout whose source is ``results``."""
    return docs_numbers.refresh_pages_of(results, ROOT)


if __name__ == "__main__":
    sys.exit(docs_numbers.main(prog=COMMAND, argv=None))
