"""``deqcore train``: train a DEQ model of any family on local data."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from .._command_line import UsageError, report_flags
from .._replicas import Replicas
from .._training_engines import require_framework
from ..checkpoint import check_checkpoint, load_checkpoint
from ..families import FAMILIES
from ..train import Trainer, check_out_dir, check_resumable
from ._run_flags import add_run_flags, train_config


def add_parser(sub: Any) -> None:
    tr = sub.add_parser("train", help="train a DEQ model",
                        description="Train a model of any family: "
                                    + ", ".join(f"{f.name} ({f.summary})" for f in FAMILIES.values()) + ".")
    add_run_flags(tr)
    mode = tr.add_mutually_exclusive_group()
    mode.add_argument("--resume", action="store_true",
                      help="continue from OUT/checkpoint.npz (same settings; --epochs/--max-steps may grow)")
    mode.add_argument("--overwrite", action="store_true",
                      help="replace the run in a non-empty --out (its files are removed only once the new "
                           "run's first step has succeeded)")


def run(args: argparse.Namespace) -> int:
    """Train; under ``torchrun --nproc-per-node N`` (its environment) as N data-parallel
    processes of which the first writes and reports, every one checking the same."""
    cfg = train_config(args)
    try:
        replicas = Replicas.from_environment(cfg.backend)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    require_framework(cfg.backend)
    try:
        return _train(args, cfg, replicas)
    finally:
        replicas.close()


def _train(args: argparse.Namespace, cfg: Any, replicas: Replicas) -> int:
    check_out_dir(cfg.out, resume=args.resume, overwrite=args.overwrite)
    ck = None
    if args.resume:
        ck = load_checkpoint(Path(cfg.out) / "checkpoint.npz")
        check_resumable(cfg, ck)  # the settings, before the data is loaded
    trainer = Trainer(cfg, progress=not args.no_progress, replicas=replicas)
    if ck is not None:  # the arrays, now that the model is built (run() checks them again)
        check_checkpoint(ck, trainer.schema(), str(Path(cfg.out) / "checkpoint.npz"))
    workers = f", {replicas.size} workers" if replicas.distributed else ""
    if replicas.writes:
        print(f"deqcore train: {cfg.model}/{cfg.config} on {cfg.dataset} ({trainer.work.describe()}), "
              f"backend {cfg.backend}{workers}, solver {cfg.solver}, grad {cfg.grad}, {trainer.total_steps} "
              f"steps -> {cfg.out}", file=sys.stderr)
    summary = trainer.run(resume=args.resume, overwrite=args.overwrite)
    if not replicas.writes:  # the first process reports
        return 1 if summary.get("flags") else 0
    if "note" in summary:
        print(summary["note"], file=sys.stderr)
        return 0
    final, metric = summary["final"], cfg.family.metric
    if final:
        print(f"epoch {final['epoch']}: train loss {final['train_loss']:.4f} "
              f"acc {100 * final['train_acc']:.2f}%"
              f" | test loss {final['test_loss']:.4f} acc {100 * final['test_acc']:.2f}%"
              + (f" {metric.short} {final[metric.key]:.2f}" if metric.beside_accuracy else "")
              + f" | NFE {final['test_nfe']:.1f}, worst residual {final['test_residual']:.2e}"
              f" | {final['train_seconds']:.1f} s/epoch")
    print("wrote " + ", ".join(summary["written"]))
    return report_flags(summary)
