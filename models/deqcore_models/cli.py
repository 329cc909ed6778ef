"""``deqcore`` command line: train and evaluate DEQ models on local data, on PyTorch or JAX.

    deqcore train --backend torch --dataset fashion-mnist --data ../shared/data --epochs 1
    deqcore eval --run runs/mdeq                 # test accuracy of a run's latest checkpoint
    deqcore bench --backend jax                  # step time and NFE on a few batches
    deqcore hypersolver train --run runs/mdeq    # fit a HyperDEQ solver to the run's frozen model
    deqcore hypersolver eval --run runs/mdeq     # it against Anderson and Broyden on the test set

Run ``deqcore <command> --help`` for every flag.
"""

from __future__ import annotations

import argparse
import ast
import json
import sys
from collections.abc import Sequence
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

from .mdeq import MDEQ_CONFIGS
from .transformer import TRANSFORMER_CONFIGS


def _key_values(items: Sequence[str] | None, flag: str) -> dict[str, Any]:
    """``["memory=8", "line_search=True"]`` -> ``{"memory": 8, "line_search": True}``."""
    out: dict[str, Any] = {}
    for item in items or ():
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise SystemExit(f"error: {flag} expects KEY=VALUE, got {item!r}")
        try:
            value = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            value = raw  # a bare word such as anderson
        out[key.strip()] = value
    return out


def _add_run_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model and data")
    g.add_argument("--backend", choices=["torch", "jax"], default="torch",
                   help="framework to train on (default torch)")
    g.add_argument("--model", choices=["mdeq", "transformer"], default="mdeq",
                   help="model family: mdeq (image classifier) or transformer (DEQ-Transformer language "
                        "model) (default mdeq)")
    g.add_argument("--config", choices=sorted({*MDEQ_CONFIGS, *TRANSFORMER_CONFIGS}), default="cpu",
                   help="model size. mdeq: tiny = the paper's MDEQ-small (159K parameters on CIFAR), cpu = "
                        "a narrower model for CPU runs (53K), micro = for tests (default cpu). transformer: "
                        "small = d 64, 4 heads, d_inner 256, segments of 64 tokens; small-mem = the same "
                        "with a 64-token memory of the previous segment; micro = for tests")
    g.add_argument("--dataset", choices=["fashion-mnist", "cifar10", "wikitext2", "tiny-shakespeare"],
                   default="fashion-mnist",
                   help="data set: fashion-mnist or cifar10 for mdeq, wikitext2 (words) or tiny-shakespeare "
                        "(characters) for transformer (default fashion-mnist)")
    g.add_argument("--data", default=None,
                   help="data folder holding fashion-mnist/, cifar-10/, wikitext-2/, tiny-shakespeare/ "
                        "(default: $DEQCORE_DATA); never downloaded")
    g.add_argument("--train-limit", type=int, default=None,
                   help="use only the first N training images (tokens for text)")
    g.add_argument("--test-limit", type=int, default=None,
                   help="use only the first N test images (tokens for text)")
    s = p.add_argument_group("solver and gradient")
    s.add_argument("--solver", default="broyden",
                   help="forward solver: broyden (default), anderson, fixed_point or a plugin's")
    s.add_argument("--tol", type=float, default=1e-3, help="relative residual tolerance (default 1e-3)")
    s.add_argument("--max-iter", type=int, default=18, help="forward solver steps at most (default 18)")
    s.add_argument("--solver-option", action="append", metavar="KEY=VALUE",
                   help="a solver option, repeatable (e.g. memory=8, line_search=True); unknown keys are "
                        "errors listing the valid ones")
    s.add_argument("--grad", default="implicit",
                   help="gradient mode: implicit (default), jfb, npg, upg, gdeq (needs broyden), unroll")
    s.add_argument("--grad-option", action="append", metavar="KEY=VALUE",
                   help="a gradient-mode option, repeatable (e.g. k=5, lam=0.5 for npg; max_iter=20 for "
                        "implicit)")
    s.add_argument("--pretrain-steps", type=int, default=0,
                   help="first N steps run the layer unrolled (weight-tied) with ordinary backprop "
                        "(default 0)")
    s.add_argument("--unrolled-layers", type=int, default=6,
                   help="layers of the unrolled pre-training (default 6)")
    s.add_argument("--jac-weight", type=float, default=0.0,
                   help="Jacobian regularisation: add this weight times the Hutchinson estimate of "
                        "||df/dz||_F^2 / numel at the layer's output to the training loss (default 0: off)")
    s.add_argument("--jac-freq", type=float, default=1.0,
                   help="probability that a training step carries the Jacobian penalty (default 1; the "
                        "JR paper's regularised MDEQ used weight 0.4, frequency 0.02)")
    s.add_argument("--softmax-chunk", type=int, default=None,
                   help="transformer only: compute the output softmax over N positions at a time, in the "
                        "forward pass and again in backward, so no vocabulary-sized tensor is kept for "
                        "backward (default 32); 0: the whole softmax at once, all logits kept")
    t = p.add_argument_group("optimisation and output")
    t.add_argument("--epochs", type=int, default=1, help="epochs (default 1)")
    t.add_argument("--max-steps", type=int, default=None, help="stop after N optimiser steps in total")
    t.add_argument("--batch-size", type=int, default=64,
                   help="training batch size: images, or rows of the token stream for text (default 64)")
    t.add_argument("--lr", type=float, default=1e-3,
                   help="Adam learning rate, cosine-annealed per step to --min-lr (default 1e-3)")
    t.add_argument("--min-lr", type=float, default=1e-6, help="final learning rate (default 1e-6)")
    t.add_argument("--weight-decay", type=float, default=0.0, help="L2 weight decay (default 0)")
    t.add_argument("--clip-norm", type=float, default=None,
                   help="clip the gradient's global norm to this before the Adam step (default: no "
                        "clipping; the DEQ-Transformer paper used 0.25)")
    t.add_argument("--seed", type=int, default=0, help="seed of weights, data order and dropout (default 0)")
    t.add_argument("--out", default="runs/mdeq",
                   help="output folder: steps.csv, epochs.csv, summary.json, checkpoint.npz, curves.png")
    t.add_argument("--checkpoint-every", type=int, default=100, help="checkpoint every N steps (default 100)")
    t.add_argument("--eval-batch-size", type=int, default=None,
                   help="evaluation batch size (default 500 images, or 10 rows of the test stream for text)")
    t.add_argument("--no-progress", action="store_true",
                   help="no progress bar; one status line on stderr per checkpoint instead")
    t.add_argument("--cosine-every", type=int, default=0,
                   help="every N DEQ steps, log to cosine.csv the cosine between this mode's gradient and "
                        "the implicit gradient (backward max_iter 40) on the same batch (default 0: off)")


def _train_config(args: argparse.Namespace):
    from .train import TrainConfig

    names = {f.name for f in fields(TrainConfig)}
    kw = {k: v for k, v in vars(args).items() if k in names}
    kw["solver_options"] = _key_values(args.solver_option, "--solver-option")
    kw["grad_options"] = _key_values(args.grad_option, "--grad-option")
    try:
        return TrainConfig(**kw)
    except ValueError as exc:
        raise SystemExit(f"error: {exc}") from exc


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="deqcore", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True,
                                help="train, eval, bench or hypersolver (each has --help)")
    tr = sub.add_parser("train", help="train a DEQ model",
                        description="Train an MDEQ classifier or a DEQ-Transformer language model.")
    _add_run_flags(tr)
    tr.add_argument("--resume", action="store_true",
                    help="continue from OUT/checkpoint.npz (same settings; --epochs/--max-steps may grow)")
    ev = sub.add_parser("eval", help="evaluate a run's checkpoint on the test set",
                        description="Evaluate OUT/checkpoint.npz of a training run on its test set.")
    ev.add_argument("--run", required=True, help="the run folder (its --out)")
    ev.add_argument("--backend", choices=["torch", "jax"], default=None,
                    help="evaluate on this backend (default: the run's); checkpoints are framework-neutral")
    ev.add_argument("--data", default=None, help="data folder (default: the run's, else $DEQCORE_DATA)")
    ev.add_argument("--max-iter", type=int, default=None, help="override the forward solver steps")
    ev.add_argument("--solver", default=None, help="override the forward solver")
    be = sub.add_parser("bench", help="time training steps (forward + backward) and report NFE",
                        description="Time a few training steps of a configuration.")
    _add_run_flags(be)
    be.add_argument("--steps", type=int, default=5, help="timed steps after one warm-up step (default 5)")
    _add_hypersolver_parser(sub)
    return parser


def _add_hypersolver_parser(sub: Any) -> None:
    hp = sub.add_parser("hypersolver", help="train or evaluate a HyperDEQ solver for a trained run",
                        description="HyperDEQ: a learned initialiser and HyperAnderson iterations fitted to "
                                    "a run's frozen model (docs/hypersolvers.md).")
    hsub = hp.add_subparsers(dest="hyper_command", required=True,
                             help="train: fit a hypersolver; eval: compare it with classic solvers")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--run", required=True, help="the training run's folder (holds checkpoint.npz)")
    common.add_argument("--backend", choices=["torch", "jax"], default=None,
                        help="backend (default: the run's; checkpoints are framework-neutral)")
    common.add_argument("--data", default=None, help="data folder (default: the run's, else $DEQCORE_DATA)")
    common.add_argument("--no-progress", action="store_true", help="no progress lines")
    ht = hsub.add_parser("train", parents=[common], help="fit a hypersolver to the run's frozen model",
                         description="Fit a hypersolver to RUN's frozen model on its training data; the "
                                     "model's parameters are not changed.")
    ht.add_argument("--out", default=None, help="weights file (default RUN/hypersolver.npz); the training "
                                                "history goes beside it as .csv")
    ht.add_argument("--steps", type=int, default=300, help="Adam steps (default 300)")
    ht.add_argument("--batch-size", type=int, default=16,
                    help="images, or rows of one segment, per step (default 16)")
    ht.add_argument("--iterations", type=int, default=None,
                    help="K, the budget it is trained for (default 3)")
    ht.add_argument("--memory", type=int, default=5, help="m; the window holds m+1 iterates (default 5)")
    ht.add_argument("--width", type=int, default=None,
                    help="channels of the mixer's convolutions (default 8 for MDEQ, 16 for the transformer)")
    ht.add_argument("--hidden", type=int, default=None,
                    help="channels of the initialiser (default 8 for MDEQ, 16 for the transformer)")
    ht.add_argument("--no-initialiser", action="store_true", help="start from zeros (an ablation)")
    ht.add_argument("--prior", choices=["anderson", "newest"], default="anderson",
                    help="weights the mixer corrects (default anderson)")
    ht.add_argument("--normalisation", choices=["shift", "softmax", "none"], default="shift",
                    help="how raw weights become weights summing to 1 (default shift)")
    ht.add_argument("--seed", type=int, default=0, help="seed of the weights and the batch order (default 0)")
    ht.add_argument("--train-option", action="append", metavar="KEY=VALUE",
                    help="a train_hypersolver option, repeatable (lr, conv_loss, unroll, target_tol, ...); "
                         "unknown keys are errors listing the valid ones")
    he = hsub.add_parser("eval", parents=[common], help="compare a hypersolver with classic solvers",
                         description="Every method at every budget on the run's test set: accuracy (or "
                                     "perplexity), mean relative residual, the seconds of the test pass "
                                     "and of its solve phase; writes results.json, residual.png and "
                                     "pareto.png.")
    he.add_argument("--hypersolver", action="append", metavar="[LABEL=]FILE",
                    help="hypersolver weights, repeatable (default RUN/hypersolver.npz, label hyper)")
    he.add_argument("--solvers", default="anderson,broyden",
                    help="classic solvers to compare, comma-separated (default anderson,broyden)")
    he.add_argument("--budgets", default="1,2,3,4,5,6,8,12",
                    help="solver steps, comma-separated; every solve runs exactly this many (default "
                         "1,2,3,4,5,6,8,12)")
    he.add_argument("--from-init", action="store_true",
                    help="also run each classic solver from the first hypersolver's initialiser")
    he.add_argument("--test-limit", type=int, default=None, help="first N test images (tokens for text)")
    he.add_argument("--repeats", type=int, default=3,
                    help="timed passes per method and budget; the fastest counts (default 3)")
    he.add_argument("--out", default=None, help="output folder (default RUN/hypersolver-eval)")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .checkpoint import CheckpointError
    from .data import DataError

    try:
        if args.command == "train":
            return _train(args)
        if args.command == "eval":
            return _eval(args)
        if args.command == "hypersolver":
            from .hypersolver_cli import hypersolver_eval, hypersolver_train

            return hypersolver_train(args) if args.hyper_command == "train" else hypersolver_eval(args)
        return _bench(args)
    except (DataError, CheckpointError, TypeError, ImportError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def _train(args) -> int:
    from .train import Trainer

    cfg = _train_config(args)
    trainer = Trainer(cfg, progress=not args.no_progress)
    print(f"deqcore train: {cfg.model}/{cfg.config} on {cfg.dataset} ({trainer.work.describe()}), backend "
          f"{cfg.backend}, solver {cfg.solver}, grad {cfg.grad}, {trainer.total_steps} steps -> {cfg.out}",
          file=sys.stderr)
    summary = trainer.run(resume=args.resume)
    final = summary["final"]
    if final:
        print(f"epoch {final['epoch']}: train loss {final['train_loss']:.4f} "
              f"acc {100 * final['train_acc']:.2f}%"
              f" | test loss {final['test_loss']:.4f} acc {100 * final['test_acc']:.2f}%"
              + (f" ppl {final['test_ppl']:.2f}" if "test_ppl" in final else "")
              + f" | NFE {final['test_nfe']:.1f}, worst residual {final['test_residual']:.2e}"
              f" | {final['train_seconds']:.1f} s/epoch")
    for plot in summary.get("plots", []):
        print(f"wrote {plot}")
    print(f"wrote {Path(cfg.out) / 'summary.json'}, steps.csv, epochs.csv, checkpoint.npz")
    return 0


def _eval(args) -> int:
    from .checkpoint import load_checkpoint
    from .train import TrainConfig, Trainer

    ck = load_checkpoint(Path(args.run) / "checkpoint.npz")
    saved = dict(ck.meta["train_config"])
    for key in ("backend", "data", "max_iter", "solver"):
        if getattr(args, key) is not None:
            saved[key] = getattr(args, key)
    saved["out"] = args.run
    trainer = Trainer(TrainConfig(**saved), progress=False)
    trainer.engine.load(ck.params, ck.state, ck.extra)
    result = trainer.evaluate()
    result["step"] = ck.meta["step"]
    print(json.dumps(result, indent=2))
    return 0


def _bench(args) -> int:
    import time

    import numpy as np

    from .train import Trainer

    cfg = _train_config(args)
    trainer = Trainer(cfg, progress=False)
    times, nfes = [], []
    settings = cfg.deq_settings()
    for i in range(args.steps + 1):
        batch = trainer.work.train_batch(i % trainer.steps_per_epoch)
        t0 = time.perf_counter()
        r = trainer.engine.train_step(batch.x, batch.y, batch.masks, settings, cfg.lr, batch.probe)
        if i:
            times.append(time.perf_counter() - t0)
            nfes.append(r["nfe"])
    print(json.dumps({"backend": cfg.backend, "config": asdict(cfg), "median_step_s": float(np.median(times)),
                      "min_step_s": float(np.min(times)), "nfe": nfes}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
