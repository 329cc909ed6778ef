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
import dataclasses
import math
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

from .mdeq import MDEQ_CONFIGS
from .transformer import TRANSFORMER_CONFIGS


class UsageError(Exception):
    """A command-line mistake: ``main`` prints it as one ``error:`` line and exits with status 2."""


class _Parser(argparse.ArgumentParser):
    """argparse with its errors on one line (the flag, what is wrong, where the help is)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _key_values(items: Sequence[str] | None, flag: str) -> dict[str, Any]:
    """``["memory=8", "line_search=True"]`` -> ``{"memory": 8, "line_search": True}``."""
    out: dict[str, Any] = {}
    for item in items or ():
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"{flag} expects KEY=VALUE, got {item!r}")
        if key.strip() in out:
            raise UsageError(f"{flag} sets {key.strip()!r} twice")
        try:
            value = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            value = raw  # a bare word such as anderson
        if isinstance(value, float) and not math.isfinite(value):
            raise UsageError(f"{flag} {item}: the value must be finite")
        out[key.strip()] = value
    return out


def _default(name: str) -> Any:
    from .train import TrainConfig

    f = TrainConfig.__dataclass_fields__[name]
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def _add_run_flags(p: argparse.ArgumentParser, *, output: bool = True) -> None:
    """The :class:`~deqcore_models.train.TrainConfig` flags. Every default is left out of the
    namespace (``SUPPRESS``), so the one default of each setting is the TrainConfig field's;
    ``output=False`` leaves out the flags of a run's files and schedule (``bench``)."""
    d = _default
    g = p.add_argument_group("model and data")
    g.add_argument("--backend", choices=["torch", "jax"],
                   help=f"framework to train on (default {d('backend')})")
    g.add_argument("--model", choices=["mdeq", "transformer"],
                   help="model family: mdeq (image classifier) or transformer (DEQ-Transformer language "
                        f"model) (default {d('model')})")
    g.add_argument("--config", choices=sorted({*MDEQ_CONFIGS, *TRANSFORMER_CONFIGS}),
                   help="model size. mdeq: tiny = the paper's MDEQ-small (159K parameters on CIFAR), cpu = "
                        "a narrower model for CPU runs (53K), micro = for tests (default "
                        f"{d('config')}). transformer: "
                        "small = d 64, 4 heads, d_inner 256, segments of 64 tokens; small-mem = the same "
                        "with a 64-token memory of the previous segment; micro = for tests")
    g.add_argument("--dataset", choices=["fashion-mnist", "cifar10", "wikitext2", "tiny-shakespeare"],
                   help="data set: fashion-mnist or cifar10 for mdeq, wikitext2 (words) or tiny-shakespeare "
                        f"(characters) for transformer (default {d('dataset')})")
    g.add_argument("--data",
                   help="data folder holding fashion-mnist/, cifar-10/, wikitext-2/, tiny-shakespeare/ "
                        "(default: $DEQCORE_DATA); never downloaded")
    g.add_argument("--train-limit", type=int, metavar="N",
                   help="use only the first N training images (tokens for text), N >= 1 and at most the "
                        "data set's size (default: all)")
    g.add_argument("--test-limit", type=int, metavar="N",
                   help="use only the first N test images (tokens for text) (default: all)")
    s = p.add_argument_group("solver and gradient")
    s.add_argument("--solver",
                   help=f"forward solver: broyden (default {d('solver')}), anderson, fixed_point or a "
                        "plugin's")
    s.add_argument("--tol", type=float, help=f"relative residual tolerance, > 0 (default {d('tol'):g})")
    s.add_argument("--max-iter", type=int, help=f"forward solver steps at most (default {d('max_iter')})")
    s.add_argument("--solver-option", action="append", metavar="KEY=VALUE",
                   help="a solver option, repeatable (e.g. memory=8, line_search=True); unknown keys are "
                        "errors listing the valid ones")
    s.add_argument("--grad",
                   help=f"gradient mode (default {d('grad')}): implicit, jfb, npg, upg, gdeq (needs "
                        "broyden), unroll, or a plugin's")
    s.add_argument("--grad-option", action="append", metavar="KEY=VALUE",
                   help="a gradient-mode option, repeatable (e.g. k=5, lam=0.5 for npg; max_iter=20 for "
                        "implicit)")
    s.add_argument("--pretrain-steps", type=int,
                   help="first N steps run the layer unrolled (weight-tied) with ordinary backprop "
                        f"(default {d('pretrain_steps')})")
    s.add_argument("--unrolled-layers", type=int,
                   help=f"layers of the unrolled pre-training (default {d('unrolled_layers')})")
    s.add_argument("--jac-weight", type=float,
                   help="Jacobian regularisation: add this weight times the Hutchinson estimate of "
                        "||df/dz||_F^2 / numel at the layer's output to the training loss (default "
                        f"{d('jac_weight'):g}: off)")
    s.add_argument("--jac-freq", type=float,
                   help="probability in (0, 1] that a training step carries the Jacobian penalty (default "
                        f"{d('jac_freq'):g}; the JR paper's regularised MDEQ used weight 0.4, frequency "
                        "0.02)")
    s.add_argument("--softmax-chunk", type=int,
                   help="transformer only: compute the output softmax over N positions at a time, in the "
                        "forward pass and again in backward, so no vocabulary-sized tensor is kept for "
                        "backward (default 32); 0: the whole softmax at once, all logits kept")
    t = p.add_argument_group("optimisation and output")
    if output:
        t.add_argument("--epochs", type=int, help=f"epochs (default {d('epochs')})")
        t.add_argument("--max-steps", type=int, help="stop after N >= 1 optimiser steps in total")
    t.add_argument("--batch-size", type=int,
                   help="training batch size: images, or rows of the token stream for text (default "
                        f"{d('batch_size')})")
    t.add_argument("--lr", type=float,
                   help=f"Adam learning rate, cosine-annealed per step to --min-lr (default {d('lr'):g})")
    t.add_argument("--min-lr", type=float, help=f"final learning rate, <= --lr (default {d('min_lr'):g})")
    t.add_argument("--weight-decay", type=float, help=f"L2 weight decay (default {d('weight_decay'):g})")
    t.add_argument("--clip-norm", type=float,
                   help="clip the gradient's global norm to this before the Adam step (default: no "
                        "clipping; the DEQ-Transformer paper used 0.25)")
    t.add_argument("--seed", type=int,
                   help=f"seed (>= 0) of weights, data order and dropout (default {d('seed')})")
    if output:
        t.add_argument("--out",
                       help="output folder: steps.csv, epochs.csv, summary.json, checkpoint.npz, curves.png "
                            f"(default {d('out')}); must be empty or missing unless --resume or --overwrite")
        t.add_argument("--checkpoint-every", type=int,
                       help=f"checkpoint every N steps (default {d('checkpoint_every')})")
    t.add_argument("--eval-batch-size", type=int,
                   help="evaluation batch size (default 500 images, or 10 rows of the test stream for text)")
    if output:
        t.add_argument("--no-progress", action="store_true",
                       help="no progress bar; one status line on stderr per checkpoint instead")
        t.add_argument("--cosine-every", type=int,
                       help="every N DEQ steps, log to cosine.csv the cosine between this mode's gradient "
                            "and the implicit gradient (backward max_iter 40) on the same batch (default 0: "
                            "off)")
    for action in p._actions:
        if action.dest not in ("help", "no_progress"):
            action.default = argparse.SUPPRESS


def _train_config(args: argparse.Namespace, **fixed: Any):
    """The TrainConfig of the flags given (the others at TrainConfig's defaults); a bad value is
    the :class:`~deqcore_models.train.ConfigError` of its flag."""
    from .train import TrainConfig

    names = {f.name for f in dataclasses.fields(TrainConfig)}
    kw = {k: v for k, v in vars(args).items() if k in names}
    kw["solver_options"] = _key_values(getattr(args, "solver_option", None), "--solver-option")
    kw["grad_options"] = _key_values(getattr(args, "grad_option", None), "--grad-option")
    kw.pop("solver_option", None)
    kw.pop("grad_option", None)
    return TrainConfig(**kw, **fixed)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="deqcore", description=__doc__,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True,
                                help="train, eval, bench or hypersolver (each has --help)")
    tr = sub.add_parser("train", help="train a DEQ model",
                        description="Train an MDEQ classifier or a DEQ-Transformer language model.")
    _add_run_flags(tr)
    mode = tr.add_mutually_exclusive_group()
    mode.add_argument("--resume", action="store_true",
                      help="continue from OUT/checkpoint.npz (same settings; --epochs/--max-steps may grow)")
    mode.add_argument("--overwrite", action="store_true",
                      help="replace the run in a non-empty --out (its files are removed only once the new "
                           "run's first step has succeeded)")
    ev = sub.add_parser("eval", help="evaluate a run's checkpoint on the test set",
                        description="Evaluate OUT/checkpoint.npz of a training run on its test set.")
    ev.add_argument("--run", required=True, help="the run folder (its --out)")
    ev.add_argument("--backend", choices=["torch", "jax"], default=None,
                    help="evaluate on this backend (default: the run's); checkpoints are framework-neutral")
    ev.add_argument("--data", default=None, help="data folder (default: the run's, else $DEQCORE_DATA)")
    ev.add_argument("--max-iter", type=int, default=None, help="override the forward solver steps (>= 1)")
    ev.add_argument("--solver", default=None,
                    help="evaluate with this forward solver at its default options (default: the run's)")
    be = sub.add_parser("bench", help="time training steps (forward + backward) and report NFE",
                        description="Time a few training steps of a configuration; writes no file.")
    _add_run_flags(be, output=False)
    be.add_argument("--steps", type=int, default=5,
                    help="timed steps (>= 1) after one warm-up step (default 5)")
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
    ht.add_argument("--out", default=None, help="weights file, ending in .npz (default RUN/hypersolver.npz); "
                                                "the training history goes beside it as .csv")
    ht.add_argument("--overwrite", action="store_true",
                    help="replace an existing --out file and its .csv (written only once training finished)")
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
    ht.add_argument("--seed", type=int, default=0,
                    help="seed (>= 0) of the weights and the batch order (default 0)")
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
    he.add_argument("--out", default=None, help="output folder (default RUN/hypersolver-eval); must not hold "
                                                "results yet unless --overwrite")
    he.add_argument("--overwrite", action="store_true",
                    help="replace the results in --out (written only once every method has run)")


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``deqcore`` with ``argv``; returns the exit status. A user error (a bad flag or
    combination, a data or checkpoint problem, a file that cannot be written) is one ``error:``
    line on stderr and status 2, before any data is loaded or file written where the check
    allows; a run that fails (a non-finite loss) or whose results are non-finite is status 1."""
    args = build_parser().parse_args(argv)
    prog = f"deqcore {args.command}" + (f" {args.hyper_command}" if args.command == "hypersolver" else "")

    def command() -> int:
        if args.command == "train":
            return _train(args)
        if args.command == "eval":
            return _eval(args)
        if args.command == "hypersolver":
            from .hypersolver_cli import hypersolver_eval, hypersolver_train

            return hypersolver_train(args) if args.hyper_command == "train" else hypersolver_eval(args)
        return _bench(args)

    return run_command(prog, command)


def run_command(prog: str, command: Callable[[], int]) -> int:
    """``command()``'s exit status, with the errors a user can cause turned into one ``error:``
    line on stderr: status 2 for a user error (a bad setting or flag, a data, checkpoint or
    framework problem, a file that cannot be written), 1 for a run that failed (a diverged loss,
    a solve that did not converge with ``throw=True``). Other exceptions are bugs and keep their
    traceback."""
    from deqcore import ConvergenceError

    from .checkpoint import CheckpointError
    from .data import DataError
    from .train import ConfigError

    try:
        return command()
    except ConfigError as exc:
        print(f"{prog}: error: {_one_line(exc.for_cli())}", file=sys.stderr)
        return 2
    except (UsageError, DataError, CheckpointError, ImportError, OSError) as exc:
        print(f"{prog}: error: {_one_line(str(exc))}", file=sys.stderr)
        return 2
    except (FloatingPointError, ConvergenceError) as exc:
        print(f"{prog}: error: {_one_line(str(exc))}", file=sys.stderr)
        return 1


def report_flags(result: dict[str, Any]) -> int:
    """Print a result's ``flags`` and ``warnings`` on stderr, one line each; 1 if it has flags."""
    for line in result.get("flags", []):
        print(f"flagged: {_one_line(line)}", file=sys.stderr)
    for line in result.get("warnings", []):
        print(f"warning: {_one_line(line)}", file=sys.stderr)
    return 1 if result.get("flags") else 0


def _train(args: argparse.Namespace) -> int:
    from ._engines import require_framework
    from .checkpoint import check_checkpoint, load_checkpoint
    from .train import Trainer, check_out_dir, check_resumable

    cfg = _train_config(args)
    require_framework(cfg.backend)
    check_out_dir(cfg.out, resume=args.resume, overwrite=args.overwrite)
    ck = None
    if args.resume:
        ck = load_checkpoint(Path(cfg.out) / "checkpoint.npz")
        check_resumable(cfg, ck)  # the settings, before the data is loaded
    trainer = Trainer(cfg, progress=not args.no_progress)
    if ck is not None:  # the arrays, now that the model is built (run() checks them again)
        check_checkpoint(ck, trainer.schema(), str(Path(cfg.out) / "checkpoint.npz"))
    print(f"deqcore train: {cfg.model}/{cfg.config} on {cfg.dataset} ({trainer.work.describe()}), backend "
          f"{cfg.backend}, solver {cfg.solver}, grad {cfg.grad}, {trainer.total_steps} steps -> {cfg.out}",
          file=sys.stderr)
    summary = trainer.run(resume=args.resume, overwrite=args.overwrite)
    if "note" in summary:
        print(summary["note"], file=sys.stderr)
        return 0
    final = summary["final"]
    if final:
        print(f"epoch {final['epoch']}: train loss {final['train_loss']:.4f} "
              f"acc {100 * final['train_acc']:.2f}%"
              f" | test loss {final['test_loss']:.4f} acc {100 * final['test_acc']:.2f}%"
              + (f" ppl {final['test_ppl']:.2f}" if "test_ppl" in final else "")
              + f" | NFE {final['test_nfe']:.1f}, worst residual {final['test_residual']:.2e}"
              f" | {final['train_seconds']:.1f} s/epoch")
    print("wrote " + ", ".join(summary["written"]))
    return report_flags(summary)


def _eval(args: argparse.Namespace) -> int:
    from deqcore._arrays_io import dumps_json

    from ._engines import require_framework
    from .checkpoint import load_checkpoint
    from .train import Trainer, checkpoint_step, config_from_checkpoint, result_flags

    path = Path(args.run) / "checkpoint.npz"
    ck = load_checkpoint(path)
    overrides: dict[str, Any] = {"backend": args.backend, "data": args.data, "max_iter": args.max_iter,
                                 "out": args.run}
    saved = ck.meta.get("train_config")
    if args.solver is not None and isinstance(saved, dict) and args.solver != saved.get("solver"):
        # evaluation never differentiates, and the run's solver options are another solver's
        overrides.update(solver=args.solver, solver_options={}, grad="jfb", grad_options={})
    cfg = config_from_checkpoint(ck, str(path), **overrides)
    require_framework(cfg.backend)
    step = checkpoint_step(ck, str(path))
    trainer = Trainer(cfg, progress=False)
    trainer.load(ck, str(path))
    result: dict[str, Any] = {**trainer.evaluate(), "step": step}
    result["flags"], result["warnings"] = result_flags([result], cfg)
    print(dumps_json(result, indent=2))
    return report_flags(result)


def _bench(args: argparse.Namespace) -> int:
    import time

    import numpy as np

    from deqcore._arrays_io import dumps_json

    from ._engines import require_framework
    from .train import Trainer

    if args.steps < 1:
        raise UsageError(f"--steps must be an int >= 1, got {args.steps}")
    cfg = _train_config(args)
    require_framework(cfg.backend)
    trainer = Trainer(cfg, progress=False)
    times, nfes, losses = [], [], []
    settings = cfg.deq_settings()
    for i in range(args.steps + 1):
        batch = trainer.work.train_batch(i % trainer.steps_per_epoch)
        t0 = time.perf_counter()
        r = trainer.engine.train_step(batch.x, batch.y, batch.masks, settings, cfg.lr, batch.probe)
        if i:
            times.append(time.perf_counter() - t0)
            nfes.append(r["nfe"])
            losses.append(r["loss"])
    bad = [i + 1 for i, v in enumerate(losses) if not math.isfinite(v)]
    flags = [f"timed steps {bad} had a non-finite loss: the steps timed did not train"] if bad else []
    result = {"backend": cfg.backend, "config": dataclasses.asdict(cfg),
              "median_step_s": float(np.median(times)), "min_step_s": float(np.min(times)), "nfe": nfes,
              "loss": losses, "flags": flags}
    print(dumps_json(result, indent=2))
    return report_flags(result)


if __name__ == "__main__":  # run the package's module, whose error classes the subcommands raise
    from deqcore_models.cli import main as package_main

    sys.exit(package_main())
