"""Warm starts in MDEQ training: forward NFE per step, step time and accuracy with and without
``--warm-start``.

Each variant is one ``deqcore train`` run of the same command (MDEQ ``cpu`` configuration, a
Fashion-MNIST subset, PyTorch, one thread), so every run sees the same batches, dropout masks and
initial weights; only the start of each forward solve differs:

* ``cold``: every solve starts from zeros (the trainer's default);
* ``converged``: ``--warm-start``, keeping the fixed points of converged solves only (the
  default policy of ``deqcore.FixedPointCache``);
* ``best``: ``--warm-start --warm-start-keep best``, also keeping the lowest-residual iterate
  of solves stopped by ``--max-iter``.

The subset is small so that every sample comes back once per epoch, many times in the run.
Reported per variant and epoch, from the runs' ``steps.csv`` and ``epochs.csv``: the mean
forward NFE of the DEQ steps and their median worst residual (a batch's solve runs until its
slowest sample stops, so a step's NFE is that of its slowest sample), the mean solver steps per
sample (``iterations``: what a warm start shortens even while one slow sample holds the
batch), the cache's hit rate, the
median step time (forward, backward, Adam, and the cache's lookup and store) and the test
accuracy after the epoch; and
over the DEQ steps of the epochs after the first DEQ epoch (where cached fixed points exist) the
NFE, per-sample steps, time and residual, and the change of NFE, per-sample steps, time and
final accuracy against ``cold``. ``--jac-weight`` adds the Jacobian penalty to every DEQ step,
which keeps the layer contractive so that solves reach ``--tol`` within ``--max-iter``.

    python benchmarks/bench_warm_start.py --data ../shared/data
    python benchmarks/bench_warm_start.py --data ../shared/data --variants cold,best --epochs 4

Results go to ``--out`` (default benchmarks/results/warm_start.json) and a plot beside it
(``.png``); an existing results file is kept unless ``--overwrite``.
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from deqcore.internal import dumps_json, write_text

VARIANTS = {"cold": [], "converged": ["--warm-start"], "best": ["--warm-start", "--warm-start-keep", "best"]}
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}


def train_command(variant: str, args: argparse.Namespace, out: Path, data: bool = True) -> list[str]:
    """The ``deqcore train`` command of one variant (``data=False``: without ``--data``, as the
    results file records it)."""
    return [sys.executable, "-m", "deqcore_models.cli", "train", "--backend", "torch", "--model", "mdeq",
            "--config", "cpu", "--dataset", "fashion-mnist", "--train-limit", str(args.train_limit),
            "--test-limit", str(args.test_limit), "--batch-size", str(args.batch_size), "--epochs",
            str(args.epochs), "--pretrain-steps", str(args.pretrain_steps), "--lr", str(args.lr),
            "--solver", "broyden", "--tol", str(args.tol), "--max-iter", str(args.max_iter),
            "--seed", str(args.seed), *(["--jac-weight", str(args.jac_weight)] if args.jac_weight else []),
            "--checkpoint-every", "100000", "--no-progress", "--out", str(out),
            *(["--data", args.data] if args.data and data else []), *VARIANTS[variant]]


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def summarise(variant: str, run: Path) -> dict:
    """Per-epoch NFE, hit rate, step time and accuracy of one run's files."""
    steps, epochs = _rows(run / "steps.csv"), _rows(run / "epochs.csv")
    per_epoch = []
    for e in epochs:
        deq = [s for s in steps if s["epoch"] == e["epoch"] and s["phase"] == "deq"]
        hits = [float(s["warm_hits"]) for s in deq if s["warm_hits"]]
        iterations = [float(s["iterations"]) for s in deq if s["iterations"]]
        per_epoch.append({
            "epoch": int(e["epoch"]), "deq_steps": len(deq),
            "nfe": statistics.mean(int(s["nfe"]) for s in deq) if deq else None,
            "hit_rate": statistics.mean(hits) if hits else None,
            "iterations": statistics.mean(iterations) if iterations else None,
            "residual": statistics.median(float(s["residual"]) for s in deq) if deq else None,
            "seconds": statistics.median(float(s["seconds"]) for s in deq) if deq else None,
            "test_acc": float(e["test_acc"]), "train_acc": float(e["train_acc"])})
    return {"variant": variant, "epochs": per_epoch, "final_test_acc": per_epoch[-1]["test_acc"],
            "steps": [{"step": int(s["step"]), "epoch": int(s["epoch"]), "phase": s["phase"],
                       "nfe": int(s["nfe"]),
                       "iterations": float(s["iterations"]) if s["iterations"] else None,
                       "residual": float(s["residual"]), "seconds": float(s["seconds"])}
                      for s in steps]}


def compare(results: dict, first_warm_epoch: int) -> dict:
    """Mean NFE and median step time of every variant over the DEQ steps from
    ``first_warm_epoch`` on, and their change against ``cold``."""
    def window(variant: dict) -> tuple[float, float, float, float]:
        rows = [s for s in variant["steps"] if s["phase"] == "deq" and s["epoch"] >= first_warm_epoch]
        return (statistics.mean(s["nfe"] for s in rows), statistics.median(s["seconds"] for s in rows),
                statistics.median(s["residual"] for s in rows),
                statistics.mean(s["iterations"] for s in rows))

    out = {}
    base = window(results["cold"]) if "cold" in results else None
    for name, variant in results.items():
        nfe, seconds, residual, iterations = window(variant)
        hits = [e["hit_rate"] for e in variant["epochs"]
                if e["epoch"] >= first_warm_epoch and e["hit_rate"] is not None]
        row = {"variant": name, "nfe": nfe, "iterations": iterations, "seconds": seconds,
               "residual": residual,
               "hit_rate": statistics.mean(hits) if hits else None,
               "final_test_acc": variant["final_test_acc"]}
        if base is not None:
            row["nfe_saving"] = 1 - nfe / base[0]
            row["iterations_saving"] = 1 - iterations / base[3]
            row["time_saving"] = 1 - seconds / base[1]
            row["acc_change"] = variant["final_test_acc"] - results["cold"]["final_test_acc"]
        out[name] = row
    return out


def plot(results: dict, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot", file=sys.stderr)
        return False
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.6))
    for name, variant in results.items():
        ep = [e for e in variant["epochs"] if e["nfe"] is not None]
        line, = ax[0].plot([e["epoch"] for e in ep], [e["nfe"] for e in ep], marker="o", label=name)
        steps = [e for e in ep if e.get("iterations") is not None]
        if steps:
            ax[0].plot([e["epoch"] for e in steps], [e["iterations"] for e in steps], marker="x", ls="--",
                       color=line.get_color(), label=f"{name}: steps per sample")
        ax[1].plot([e["epoch"] for e in variant["epochs"]], [100 * e["test_acc"] for e in variant["epochs"]],
                   marker="o", label=name)
    ax[0].set(xlabel="epoch", ylabel="per DEQ step (mean)", title="NFE per step, solver steps per sample")
    ax[1].set(xlabel="epoch", ylabel="test accuracy %", title="accuracy")
    for a in ax:
        a.grid(alpha=0.3)
        a.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=os.environ.get("DEQCORE_DATA"),
                   help="data folder holding fashion-mnist/ (default: $DEQCORE_DATA)")
    p.add_argument("--variants", default=",".join(VARIANTS),
                   help=f"comma-separated, of {', '.join(VARIANTS)}")
    p.add_argument("--train-limit", type=int, default=256, help="training images (default 256)")
    p.add_argument("--test-limit", type=int, default=1000, help="test images (default 1000)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--pretrain-steps", type=int, default=16, help="unrolled pre-training steps (default 16)")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--tol", type=float, default=1e-2, help="forward relative tolerance (default 1e-2)")
    p.add_argument("--max-iter", type=int, default=30, help="forward Broyden steps at most (default 30)")
    p.add_argument("--jac-weight", type=float, default=0.0,
                   help="Jacobian penalty weight of every DEQ step (default 0: none); a penalty keeps "
                        "the layer contractive, so that solves reach --tol within --max-iter")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--runs", help="keep the run folders here (default: a temporary folder)")
    p.add_argument("--out", default="benchmarks/results/warm_start.json")
    p.add_argument("--overwrite", action="store_true")
    args = p.parse_args(argv)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown or not variants:
        p.error(f"--variants: unknown {', '.join(unknown) or '(none given)'}; choose from "
                f"{', '.join(VARIANTS)}")
    out = Path(args.out)
    if out.exists() and not args.overwrite:
        p.error(f"{out} exists; pass --overwrite to replace it")
    steps_per_epoch = args.train_limit // args.batch_size
    first_warm_epoch = args.pretrain_steps // steps_per_epoch + 2  # the epoch after the first DEQ epoch
    if first_warm_epoch > args.epochs:
        p.error(f"--epochs {args.epochs} leaves no epoch after the first DEQ epoch ({first_warm_epoch - 1})")
    env = {**os.environ, **ONE_THREAD}
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.runs or tmp)
        for variant in variants:
            run = root / variant
            cmd = train_command(variant, args, run)
            print("$", " ".join(cmd[1:]), file=sys.stderr, flush=True)
            done = subprocess.run([*cmd, "--overwrite"], env=env)
            if done.returncode:
                print(f"the {variant} run failed (exit {done.returncode})", file=sys.stderr)
                return 1
            results[variant] = summarise(variant, run)
            print(dumps_json({k: v for k, v in results[variant].items() if k != "steps"}), file=sys.stderr)
    settings = {k: v for k, v in vars(args).items() if k not in ("overwrite", "runs", "out", "data")}
    summary = {"config": settings,
               "backend": "torch", "model": "mdeq cpu", "first_warm_epoch": first_warm_epoch,
               "commands": {v: " ".join(["deqcore", *train_command(v, args, Path(f"runs/{v}"), False)[3:]])
                            for v in variants},
               "comparison": compare(results, first_warm_epoch), "variants": results}
    out.parent.mkdir(parents=True, exist_ok=True)
    write_text(out, dumps_json(summary) + "\n")
    plotted = plot(results, out.with_suffix(".png"))
    print(dumps_json(summary["comparison"]))
    print(f"wrote {out}" + (f" and {out.with_suffix('.png')}" if plotted else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
