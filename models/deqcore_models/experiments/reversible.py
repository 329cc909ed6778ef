"""``reversible``: the reversible solver with its exact reversed gradient against Broyden with the
implicit and the GDEQ gradient, trained for the same wall time (MDEQ on Fashion-MNIST, the
DEQ-Transformer on WikiText-2, or any family and data set of the trainer).

Equal wall time is set by calibration: a short pilot run of each setting measures its median
seconds per DEQ training step (all pilots first, back to back, so that they share the machine's
load), and each run then gets as many DEQ steps as fit into ``--seconds``
(after the same unrolled pre-training for every setting), so each run completes its learning-rate
schedule. The report gives the test metric, NFE per forward solve, seconds per step, the
bytes a training step keeps for its backward pass (PyTorch) and the training loss over wall time.
"""

from __future__ import annotations

import argparse
import math
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np

from .._command_line import UsageError, report_flags
from .._results_files import pyplot, read_csv, save_figure, save_json
from ..doc_blocks import load, refresh_pages_of, renderer, write_page
from ..families import FAMILIES, metric_in
from ..train import TrainConfig, Trainer
from ._common import add_output_flags, check_names, command_line, names, refuse_existing

#: setting name -> (solver, solver options, gradient mode, gradient options, forward steps flag)
SETTINGS: dict[str, tuple[str, dict[str, Any], str, dict[str, Any], str]] = {
    "reversible": ("reversible", {}, "reversible", {}, "reversible_max_iter"),
    "broyden-implicit": ("broyden", {}, "implicit", {}, "max_iter"),
    "broyden-gdeq": ("broyden", {}, "gdeq", {}, "max_iter"),
}


def _config(args: argparse.Namespace, name: str, out: Path, max_steps: int, epochs: int) -> TrainConfig:
    solver, solver_options, grad, grad_options, steps_flag = SETTINGS[name]
    if name == "reversible":
        solver_options = {**solver_options, "checkpoints": args.checkpoints}
        if args.beta is not None:
            solver_options["beta"] = args.beta
    extra = {"unrolled_layers": args.unrolled_layers} if args.unrolled_layers is not None else {}
    return TrainConfig(backend=args.backend, model=args.model, config=args.config, dataset=args.dataset,
                       data=args.data, train_limit=args.train_limit, test_limit=args.test_limit,
                       solver=solver, solver_options=solver_options, tol=args.tol,
                       max_iter=getattr(args, steps_flag), grad=grad, grad_options=grad_options,
                       pretrain_steps=args.pretrain, epochs=epochs, max_steps=max_steps,
                       batch_size=args.batch_size, lr=args.lr, seed=args.seed, out=str(out),
                       checkpoint_every=10**6, **extra)


def _deq_column(run: Path, column: str) -> list[float]:
    """A column of the DEQ-phase rows of a run's ``steps.csv`` (blank entries left out)."""
    return [float(r[column]) for r in read_csv(run / "steps.csv") if r["phase"] == "deq" and r[column]]


def saved_bytes(trainer: Trainer) -> int | None:
    """Bytes one DEQ training step's forward pass keeps for its backward pass: the unique storages
    autograd saves while the loss is computed (``saved_tensors_hooks``), the parameters' excluded;
    what the backward pass itself builds and frees (the reversible gradient's per-step graphs) is
    not counted. None on backends other than PyTorch."""
    if trainer.cfg.backend != "torch":
        return None
    import torch

    engine, settings = trainer.engine, trainer.cfg.deq_settings()
    params = {p.untyped_storage().data_ptr() for p in engine.params.values()}
    seen: dict[int, int] = {}

    def pack(t: Any) -> Any:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    batch = trainer.work.train_batch(trainer.cfg.pretrain_steps)
    x, y, masks = engine.ops.asarray(batch.x), engine.ops.asarray(batch.y), engine._arrays(batch.masks)
    hooks = torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)
    with hooks, engine.ops.precision(settings.precision):
        loss, _ = engine.task.loss(engine.ops, engine.params, engine.state, x, y, masks, settings, True)
    del loss
    return int(sum(seen.values()))


def run_reversible(args: argparse.Namespace) -> dict[str, Any]:
    out = Path(args.out)
    refuse_existing(out, args.overwrite)
    for name in args.settings:  # every setting checked before anything runs
        _config(args, name, out / name, args.pretrain + args.pilot_steps, 1)
    # every pilot first, back to back, so that the step budgets are set under the same load
    pilots: dict[str, tuple[float, int | None, int]] = {}
    for name in args.settings:
        pilot_dir = out / f"{name}-pilot"
        pilot = _config(args, name, pilot_dir, args.pretrain + args.pilot_steps, 10**6)
        print(f"== {name}: pilot of {args.pilot_steps} DEQ steps", file=sys.stderr)
        trainer = Trainer(pilot, progress=not args.no_progress)
        trainer.run(overwrite=True)
        pilot_s = _deq_column(pilot_dir, "seconds")
        pilots[name] = (float(np.median(pilot_s[1:] if len(pilot_s) > 2 else pilot_s)), saved_bytes(trainer),
                        trainer.steps_per_epoch)
        shutil.rmtree(pilot_dir)
    rows = []
    for name in args.settings:
        step_s, kept, steps_per_epoch = pilots[name]
        deq_steps = max(1, int(args.seconds / step_s))
        total = args.pretrain + deq_steps
        epochs = math.ceil(total / steps_per_epoch)
        cfg = _config(args, name, out / name, total, epochs)
        print(f"== {name}: {deq_steps} DEQ steps at {step_s:.3f} s (pilot) -> {cfg.out}", file=sys.stderr)
        summary = Trainer(cfg, progress=not args.no_progress).run(overwrite=args.overwrite)
        deq = _deq_column(Path(cfg.out), "seconds")
        backward = _deq_column(Path(cfg.out), "bwd_residual")
        final = summary["final"]
        metric = metric_in(final)
        rows.append({"setting": name, "solver": cfg.solver, "grad": cfg.grad, "max_iter": cfg.max_iter,
                     "solver_options": cfg.solver_options, "deq_steps": len(deq),
                     "pilot_step_s": step_s, "deq_step_s": float(np.median(deq)),
                     "deq_step_min_s": float(np.min(deq)), "deq_wall_s": float(np.sum(deq)),
                     "metric": metric.key, "test": final[metric.key], "test_acc": final["test_acc"],
                     "test_loss": final["test_loss"], "test_nfe": final["test_nfe"],
                     "test_residual": final["test_residual"], "train_nfe": final["train_nfe"],
                     "saved_bytes": kept,
                     "bwd_residual_median": float(np.median(backward)) if backward else None,
                     "bwd_residual_max": float(np.max(backward)) if backward else None,
                     "epochs": summary["epochs"], "flags": summary["flags"], "warnings": summary["warnings"]})
    result = {"args": vars(args), "rows": rows,
              "flags": [f"{r['setting']}: {f}" for r in rows for f in r["flags"]]}
    save_json(out / "results.json", result)
    write_page(out / "README.md", "reversible.report", "results.json")
    refresh_pages_of(out / "results.json")
    _plots(out, rows)
    return result


def _plots(out: Path, rows: list[dict[str, Any]]) -> None:
    plt = pyplot(warn="no plots written; the CSV files hold the same data")
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    for r in rows:
        steps = [s for s in read_csv(out / r["setting"] / "steps.csv") if s["phase"] == "deq"]
        t = np.cumsum([float(s["seconds"]) for s in steps])
        loss = np.array([float(s["loss"]) for s in steps])
        window = max(1, len(loss) // 20)
        smooth = np.convolve(loss, np.ones(window) / window, mode="valid")
        ax.plot(t[window - 1:], smooth, label=r["setting"])
    ax.set(xlabel="seconds of DEQ training", ylabel="training loss (moving mean)",
           title="training loss at equal wall time")
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, out / "loss_vs_time.png")
    fig, axes = plt.subplots(1, 3, figsize=(10, 3.5))
    labels = [r["setting"] for r in rows]
    metric = rows[0]["metric"]
    panels = (("test", f"test {metric}"), ("test_nfe", "NFE per forward solve"),
              ("deq_step_s", "seconds per DEQ step"))
    for ax, (key, title) in zip(axes, panels, strict=True):
        ax.bar(range(len(rows)), [100 * r[key] if key == "test" and metric == "test_acc" else r[key]
                                  for r in rows])
        ax.set_xticks(range(len(rows)), labels, fontsize=7, rotation=15)
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    save_figure(fig, out / "summary.png")


@renderer("reversible.report")
def render_reversible_report(source: Path) -> str:
    """The ``reversible`` experiment's title, command and table, from its ``results.json``."""
    result = load(source)
    args, rows = result["args"], result["rows"]
    metric = FAMILIES[args["model"]].metric
    title = (f"# Reversible solver at equal wall time: {args['model']} ({args['config']}) on "
             f"{args['dataset']}, backend {args['backend']}")
    command = command_line("reversible", args, skip=("overwrite", "no_progress"))
    lines = [title, "", f"Command: `{command}`", "",
             f"| setting | forward steps | DEQ steps for {args['seconds']:g} s | DEQ seconds taken "
             f"| s / step (median) | test {metric.name} | test loss | NFE / forward solve | test residual "
             f"| backward residual (median) | kept for backward |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        test = f"{metric.shown(r['test']):.2f} %" if metric.percent else f"{r['test']:.1f}"
        kept = "n/a" if r["saved_bytes"] is None else f"{r['saved_bytes'] / 2**20:.1f} MiB"
        bwd = "n/a" if r["bwd_residual_median"] is None else f"{r['bwd_residual_median']:.1e}"
        lines.append(f"| {r['setting']} | {r['max_iter']} | {r['deq_steps']} | {r['deq_wall_s']:.0f} "
                     f"| {r['deq_step_s']:.3f} "
                     f"| {test} | {r['test_loss']:.4f} | {r['test_nfe']:.1f} | {r['test_residual']:.1e} "
                     f"| {bwd} | {kept} |")
    lines += ["", "DEQ seconds taken: the sum of the run's DEQ step times; the step count comes from the "
              "pilot's median step time, so it differs from the target where the steps got faster or "
              "slower than the pilot's.", "",
              "Backward residual: implicit's adjoint residual; for the reversible gradient the drift of "
              "its reconstruction (relative distance of the reconstructed initial state from the exact "
              "one); none for GDEQ.", "",
              "Plots: `loss_vs_time.png` (training loss over seconds of DEQ training), `summary.png`. "
              "Per-run CSVs in the subfolders."]
    return "\n".join(lines) + "\n"


def add_parser(sub: Any) -> None:
    g = sub.add_parser("reversible", help="reversible solver vs Broyden with implicit and GDEQ gradients "
                                          "at equal wall time")
    g.add_argument("--backend", choices=["torch", "jax"], default="torch", help="framework (default torch)")
    g.add_argument("--model", choices=list(FAMILIES), default="mdeq", help="model family (default mdeq)")
    g.add_argument("--config", default="cpu", help="model config (default cpu)")
    g.add_argument("--dataset", default="fashion-mnist", help="data set (default fashion-mnist)")
    g.add_argument("--data", default=None, help="data folder (default $DEQCORE_DATA)")
    g.add_argument("--train-limit", type=int, default=None, help="first N training examples only")
    g.add_argument("--test-limit", type=int, default=None, help="first N test examples only")
    g.add_argument("--settings", type=names, default=list(SETTINGS),
                   help=f"comma-separated settings (default {','.join(SETTINGS)})")
    g.add_argument("--seconds", type=float, default=600.0,
                   help="seconds of DEQ training steps per setting (default 600)")
    g.add_argument("--pilot-steps", type=int, default=15,
                   help="DEQ steps of the pilot run that measures a step's time (default 15)")
    g.add_argument("--pretrain", type=int, default=0, help="unrolled pre-training steps (default 0)")
    g.add_argument("--unrolled-layers", type=int, default=None, help="layers when unrolled (trainer default)")
    g.add_argument("--max-iter", type=int, default=18, help="Broyden forward steps (default 18)")
    g.add_argument("--reversible-max-iter", type=int, default=8,
                   help="reversible forward steps, two f-evaluations each (default 8)")
    g.add_argument("--beta", type=float, default=None, help="the reversible solver's beta (its default)")
    g.add_argument("--checkpoints", type=int, default=0,
                   help="exact pairs the reversible solver keeps for its reversal (default 0)")
    g.add_argument("--tol", type=float, default=1e-3, help="relative residual tolerance (default 1e-3)")
    g.add_argument("--batch-size", type=int, default=64, help="batch size (default 64)")
    g.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (default 1e-3)")
    g.add_argument("--seed", type=int, default=0, help="seed (default 0)")
    add_output_flags(g, None)


def run(args: argparse.Namespace) -> int:
    check_names("--settings", args.settings, SETTINGS)
    for flag in ("seconds", "pilot_steps"):
        if getattr(args, flag) <= 0:
            raise UsageError(f"--{flag.replace('_', '-')} must be > 0, got {getattr(args, flag)}")
    result = run_reversible(args)
    print(f"wrote {Path(args.out) / 'README.md'} and results.json", file=sys.stderr)
    return report_flags(result)


__all__ = ["SETTINGS", "render_reversible_report", "run_reversible", "saved_bytes"]
