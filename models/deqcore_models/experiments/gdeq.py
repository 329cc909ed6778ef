"""``gdeq``: MDEQ with a Broyden forward trained with the gradient modes implicit, JFB, NPG (k=5,
lambda=0.5), GDEQ and GDEQ-refined, with and without unrolled pre-training (the seed paper's Table 2 and
Figures 1-2 at CPU scale): seconds per epoch of DEQ training, speedup against implicit, test
accuracy, and the cosine between each mode's gradient and the implicit gradient over training."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from .._command_line import UsageError, report_flags
from .._results_files import pyplot, read_csv, save_figure, save_json
from ..doc_blocks import load, refresh_pages_of, renderer, write_page
from ..families.mdeq import MDEQ
from ..train import TrainConfig, Trainer
from ._common import add_output_flags, check_names, command_line, int_list, names, refuse_existing

#: Each mode with the trainer's defaults (for implicit and gdeq_refined, the backward budget of 20
#: steps) except NPG's, which are the phantom-gradient paper's k = 5, lam = 0.5.
MODES: dict[str, tuple[str, dict[str, Any]]] = {
    "implicit": ("implicit", {}),
    "jfb": ("jfb", {}),
    "npg": ("npg", {"k": 5, "lam": 0.5}),
    "gdeq": ("gdeq", {}),
    "gdeq_refined": ("gdeq_refined", {}),
}


def gdeq_configs(args: argparse.Namespace) -> list[TrainConfig]:
    """The runs of the ``gdeq`` experiment, one per pre-training length and mode, all checked
    before any runs (a bad value is the :class:`~deqcore_models.train.ConfigError` of its
    flag)."""
    out = Path(args.out)
    configs = []
    for pretrain in args.pretrain:
        for mode in args.modes:
            grad, grad_options = MODES[mode]
            configs.append(TrainConfig(backend=args.backend, config=args.config, dataset=args.dataset,
                                       data=args.data, train_limit=args.train_limit,
                                       test_limit=args.test_limit,
                                       solver="broyden", max_iter=args.max_iter, grad=grad,
                                       grad_options=grad_options, pretrain_steps=pretrain,
                                       unrolled_layers=args.unrolled_layers, epochs=args.epochs,
                                       batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                                       out=str(out / f"{mode}-pre{pretrain}"), checkpoint_every=200,
                                       cosine_every=args.cosine_every))
    return configs


def run_gdeq(args: argparse.Namespace) -> dict[str, Any]:
    out = Path(args.out)
    configs = gdeq_configs(args)
    if args.resume and args.overwrite:
        raise UsageError("--resume continues the runs in --out, --overwrite replaces them: pass one")
    if not args.resume:
        refuse_existing(out, args.overwrite)
    rows = []
    for cfg in configs:
        mode = next(m for m, (g, _) in MODES.items() if g == cfg.grad)
        pretrain = cfg.pretrain_steps
        run = Path(cfg.out)
        resume = args.resume and (run / "checkpoint.npz").is_file()
        print(f"== {mode}, pretrain {pretrain} steps -> {cfg.out}{' (resumed)' if resume else ''}",
              file=sys.stderr)
        Trainer(cfg, progress=not args.no_progress).run(resume=resume, overwrite=args.overwrite)
        summary = json.loads((run / "summary.json").read_text())
        steps = read_csv(Path(cfg.out) / "steps.csv")
        deq = [float(r["seconds"]) for r in steps if r["phase"] == "deq"]
        cos = [float(r["cosine"]) for r in read_csv(Path(cfg.out) / "cosine.csv")]
        final = summary["final"]
        rows.append({"mode": mode, "pretrain": pretrain, "test_acc": final["test_acc"],
                     "test_loss": final["test_loss"], "test_nfe": final["test_nfe"],
                     "deq_step_s": float(np.median(deq)) if deq else float("nan"),
                     "cosine_mean": float(np.mean(cos)) if cos else float("nan"),
                     "cosine_last": cos[-1] if cos else float("nan"),
                     "wall_s": sum(float(r["seconds"]) for r in steps), "epochs": summary["epochs"],
                     "flags": summary["flags"], "warnings": summary["warnings"]})
    for r in rows:
        base = next((b for b in rows if b["mode"] == "implicit" and b["pretrain"] == r["pretrain"]), None)
        r["speedup_vs_implicit"] = base["deq_step_s"] / r["deq_step_s"] if base else float("nan")
        r["acc_vs_implicit"] = r["test_acc"] - base["test_acc"] if base else float("nan")
    result = {"args": vars(args), "rows": rows, "config": asdict(TrainConfig()),
              "flags": [f"{r['mode']} (pre {r['pretrain']}): {f}" for r in rows for f in r["flags"]]}
    save_json(out / "results.json", result)
    _report(out, args, rows)
    return result

@renderer("gdeq.report")
def render_gdeq_report(source: Path) -> str:
    """The ``gdeq`` experiment's title, command and table, from its ``results.json``."""
    result = load(source)
    args, rows = result["args"], result["rows"]
    title = f"# GDEQ comparison: MDEQ ({args['config']}) on {args['dataset']}, backend {args['backend']}"
    lines = [title, "",
             f"Command: `{command_line('gdeq', args, skip=('resume',))}`", "",
             "| mode | pretrain steps | s / DEQ step (median) | speedup vs implicit | test acc | vs implicit "
             "| forward NFE | mean cos vs implicit | last cos |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['mode']} | {r['pretrain']} | {r['deq_step_s']:.3f} "
                     f"| {r['speedup_vs_implicit']:.2f}x | {100 * r['test_acc']:.2f}% "
                     f"| {100 * r['acc_vs_implicit']:+.2f} | {r['test_nfe']:.1f} "
                     f"| {r['cosine_mean']:.3f} | {r['cosine_last']:.3f} |")
    lines += ["", "Plots: `accuracy.png` (test accuracy per epoch), `cosine.png` (cosine with the implicit "
              "gradient over training), `step_time.png`. Per-run CSVs in the subfolders."]
    return "\n".join(lines) + "\n"


@renderer("gdeq.epochs")
def render_gdeq_epochs(source: Path) -> str:
    """Test accuracy per epoch of every run of a ``gdeq`` experiment, and each mode's difference
    from implicit with the same pre-training."""
    rows = load(source)["rows"]
    runs = [(f"{r['mode']} (pre {r['pretrain']})", r) for r in rows]
    diffs = [(f"{name} − implicit", r, next(b for b in rows if b["mode"] == "implicit"
                                           and b["pretrain"] == r["pretrain"]))
             for name, r in runs if r["mode"] != "implicit"
             and any(b["mode"] == "implicit" and b["pretrain"] == r["pretrain"] for b in rows)]
    epochs = max(len(r["epochs"]) for r in rows)
    lines = ["| epoch | " + " | ".join([n for n, _ in runs] + [n for n, _, _ in diffs]) + " |",
             "|---|" + "---|" * (len(runs) + len(diffs))]
    def acc(r: dict[str, Any], e: int) -> float | None:
        return r["epochs"][e]["test_acc"] if e < len(r["epochs"]) else None

    for e in range(epochs):
        cells = [f"{100 * a:.2f} %" if (a := acc(r, e)) is not None else "" for _, r in runs]
        for _, r, base in diffs:
            a, b = acc(r, e), acc(base, e)
            cells.append(f"{100 * (a - b):+.2f}" if a is not None and b is not None else "")
        lines.append(f"| {e + 1} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _report(out: Path, args: argparse.Namespace, rows: list[dict[str, Any]]) -> None:
    write_page(out / "README.md", "gdeq.report", "results.json")
    refresh_pages_of(out / "results.json")  # pages elsewhere in the checkout that quote it
    plt = pyplot(warn="no plots written; the CSV files hold the same data")
    if plt is None:
        return
    def plot_lines(name: str, series: list[tuple[str, list[Any], list[float]]], style: str,
              **labels: str) -> None:
        fig, ax = plt.subplots(figsize=(6, 4))
        for label, xs, ys in series:
            ax.plot(xs, ys, style, label=label)
        ax.set(**labels)
        ax.legend(fontsize=8)
        fig.tight_layout()
        save_figure(fig, out / name)

    def tag(r: dict[str, Any]) -> str:
        return f"{r['mode']} (pre {r['pretrain']})"

    plot_lines("accuracy.png",
               [(tag(r), [e["epoch"] for e in r["epochs"]], [100 * e["test_acc"] for e in r["epochs"]])
                for r in rows], "o-", xlabel="epoch", ylabel="test accuracy %", title="test accuracy")
    probes = [(tag(r), read_csv(out / f"{r['mode']}-pre{r['pretrain']}" / "cosine.csv")) for r in rows]
    plot_lines("cosine.png", [(t, [int(c["step"]) for c in cos], [float(c["cosine"]) for c in cos])
                              for t, cos in probes if cos], ".-", xlabel="step",
               ylabel="cosine with implicit gradient", title="gradient fidelity over training")
    fig, ax = plt.subplots(figsize=(6, 4))
    labels = [f"{r['mode']}\npre {r['pretrain']}" for r in rows]
    ax.bar(range(len(rows)), [r["deq_step_s"] for r in rows])
    ax.set_xticks(range(len(rows)), labels, fontsize=7)
    ax.set(ylabel="seconds per DEQ training step (median)", title="training step time")
    fig.tight_layout()
    save_figure(fig, out / "step_time.png")


def add_parser(sub: Any) -> None:
    g = sub.add_parser("gdeq", help="implicit / JFB / NPG / GDEQ / GDEQ-refined on MDEQ, with and "
                                        "without pre-training")
    g.add_argument("--backend", choices=["torch", "jax"], default="torch", help="framework (default torch)")
    g.add_argument("--config", default="cpu", help="MDEQ config (default cpu)")
    g.add_argument("--dataset", choices=list(MDEQ.datasets), default="fashion-mnist",
                   help="data set (default fashion-mnist)")
    g.add_argument("--data", default=None, help="data folder (default $DEQCORE_DATA)")
    g.add_argument("--train-limit", type=int, default=None, help="first N training images only")
    g.add_argument("--test-limit", type=int, default=None, help="first N test images only")
    g.add_argument("--modes", type=names, default=list(MODES),
                   help=f"comma-separated gradient modes (default {','.join(MODES)})")
    g.add_argument("--pretrain", type=int_list, default=[0, 300],
                   help="comma-separated unrolled pre-training step counts (default 0,300)")
    g.add_argument("--unrolled-layers", type=int, default=6, help="layers when unrolled (default 6)")
    g.add_argument("--max-iter", type=int, default=18, help="Broyden forward steps (default 18)")
    g.add_argument("--epochs", type=int, default=1, help="epochs per run (default 1)")
    g.add_argument("--batch-size", type=int, default=64, help="batch size (default 64)")
    g.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (default 1e-3)")
    g.add_argument("--seed", type=int, default=0, help="seed (default 0)")
    g.add_argument("--cosine-every", type=int, default=50,
                   help="gradient-cosine probe every N steps (default 50)")
    add_output_flags(g, "docs/experiments/gdeq-fmnist")
    g.add_argument("--resume", action="store_true",
                   help="continue the experiment in --out: finished runs are kept, stopped ones resumed "
                        "from their checkpoint, missing ones run")


def run(args: argparse.Namespace) -> int:
    check_names("--modes", args.modes, MODES)
    result = run_gdeq(args)
    print(f"wrote {Path(args.out) / 'README.md'} and results.json", file=sys.stderr)
    return report_flags(result)
