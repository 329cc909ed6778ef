"""``backends``: compares two training runs of the same command on different backends (their
``steps.csv`` and ``summary.json``): per-step loss difference, final test metrics, median step
time ratio; writes ``backends.md``, ``backends.json`` and ``backends.png`` (both loss curves)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np

from .._command_line import UsageError
from .._results_files import pyplot, read_csv, save_figure, save_json
from ..doc_blocks import load, renderer, write_page
from ..families import metric_in
from ._common import refuse_existing


@renderer("experiments.backends")
def render_backends(source: Path) -> str:
    """The ``backends`` comparison's table, from its ``backends.json``."""
    r = load(source)
    na, nb = r["backends"]
    fa, fb = r["final"]
    sec_a, sec_b = r["median_step_s"]
    metric = metric_in(fa).key
    lines = [f"# Same command, {na} vs {nb}", "",
             f"Runs: `{r['runs'][0]}`, `{r['runs'][1]}` ({r['steps']} steps each).", "",
             f"| | {na} | {nb} |", "|---|---|---|",
             f"| final test loss | {fa['test_loss']:.4f} | {fb['test_loss']:.4f} |",
             f"| final {metric} | {fa[metric]:.4f} | {fb[metric]:.4f} |",
             f"| median step s | {sec_a:.3f} | {sec_b:.3f} |", "",
             f"Largest per-step training-loss difference: {r['max_abs_loss_diff']:.2e} "
             f"(relative {r['max_rel_loss_diff']:.2e}); step time ratio {na}/{nb} "
             f"{r['step_time_ratio']:.2f}."]
    return "\n".join(lines) + "\n"


BACKEND_FILES = ("backends.md", "backends.json", "backends.png")


def compare_backends(run_a: Path, run_b: Path, out: Path, overwrite: bool = False) -> dict[str, Any]:
    """Loss curves and final metrics of two runs of one command (see the module docstring);
    earlier results in ``out`` are replaced only with ``overwrite``."""
    refuse_existing(out, overwrite, BACKEND_FILES)
    runs = {}
    for run in (run_a, run_b):
        summary = json.loads((run / "summary.json").read_text())
        steps = read_csv(run / "steps.csv")
        if not steps:
            raise ValueError(f"{run / 'steps.csv'} is missing or holds no steps")
        runs[summary["config"]["backend"] + ("" if run == run_a else " ")] = (run, summary, steps)
    (na, (_, sa, ta)), (nb, (_, sb, tb)) = runs.items()
    same = {k for k in sa["config"] if sa["config"][k] != sb["config"][k]} - {"backend", "out"}
    if same:
        raise ValueError(f"the runs differ in more than the backend: {sorted(same)}")
    if any(not s.get("final") or s.get("status") == "failed" for s in (sa, sb)):
        raise ValueError("a run has no final results (it failed or has not finished): compare complete runs")
    if any(s.get("flags") or None in s["final"].values() for s in (sa, sb)):
        raise ValueError("a run's results are flagged (non-finite metrics in its summary.json): nothing to "
                         "compare")
    n = min(len(ta), len(tb))
    la = np.array([float(r["loss"]) for r in ta[:n]])
    lb = np.array([float(r["loss"]) for r in tb[:n]])
    sec_a = float(np.median([float(r["seconds"]) for r in ta[1:n]]))
    sec_b = float(np.median([float(r["seconds"]) for r in tb[1:n]]))
    fa, fb = sa["final"], sb["final"]
    result = {"runs": [str(run_a), str(run_b)], "backends": [na.strip(), nb.strip()], "steps": n,
              "max_abs_loss_diff": float(np.abs(la - lb).max()),
              "max_rel_loss_diff": float((np.abs(la - lb) / np.abs(la)).max()),
              "final": [fa, fb], "median_step_s": [sec_a, sec_b], "step_time_ratio": sec_a / sec_b}
    save_json(out / "backends.json", result)
    write_page(out / "backends.md", "experiments.backends", "backends.json")
    plt = pyplot(warn="no plot written")
    if plt is None:
        return result
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.8))
    ax[0].plot(la, lw=1, label=na.strip())
    ax[0].plot(lb, lw=1, ls="--", label=nb.strip())
    ax[0].set(xlabel="step", ylabel="training loss", title="training loss per step")
    ax[0].legend()
    ax[1].semilogy(np.abs(la - lb) + 1e-12, lw=0.8)
    ax[1].set(xlabel="step", ylabel="|loss difference|", title="backend difference")
    fig.tight_layout()
    save_figure(fig, out / "backends.png")
    return result


def add_parser(sub: Any) -> None:
    c = sub.add_parser("backends", help="compare two runs of one command on different backends")
    c.add_argument("runs", nargs=2, type=Path, help="the two run folders (their --out)")
    c.add_argument("--out", type=Path, required=True, help="where backends.md/.json/.png go")
    c.add_argument("--overwrite", action="store_true", help="replace earlier backends.* files in --out")


def run(args: argparse.Namespace) -> int:
    try:
        res = compare_backends(args.runs[0], args.runs[1], args.out, overwrite=args.overwrite)
    except (ValueError, KeyError) as exc:  # a run folder without its summary or steps
        raise UsageError(f"cannot compare the runs: {exc}") from None
    print((args.out / "backends.md").read_text())
    return 0 if res else 1
