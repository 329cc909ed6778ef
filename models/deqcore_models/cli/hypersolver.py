"""``deqcore hypersolver train|eval``: HyperDEQ on a training run's checkpoint (see
:mod:`deqcore_models.hyperdeq` for the library calls behind them).

Every flag is checked before the run's checkpoint and data are loaded (a bad one is one
``error:`` line and exit status 2), and no earlier result is replaced unless ``--overwrite``
says so."""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any

import deqcore
from deqcore.hypersolvers import TRAIN_OPTIONS
from deqcore.internal import resolve

from .._command_line import UsageError, check_ints, key_values, report_flags
from .._progress import Progress
from .._results_files import save_json
from .._training_engines import require_framework
from ..families import hypersolver_defaults
from ..hyperdeq import (
    all_speedups,
    compare,
    fit,
    load_for,
    load_frozen,
    make_hypersolver,
    save_history,
    speedup_table,
    training_cost,
    write_plots,
)


def add_parser(sub: Any) -> None:
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
                    help=f"K, the budget it is trained for (default {hypersolver_defaults('iterations')})")
    ht.add_argument("--memory", type=int, default=5, help="m; the window holds m+1 iterates (default 5)")
    ht.add_argument("--width", type=int, default=None,
                    help=f"channels of the mixer's convolutions (default {hypersolver_defaults('width')})")
    ht.add_argument("--hidden", type=int, default=None,
                    help=f"channels of the initialiser (default {hypersolver_defaults('hidden')})")
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


def prog(args: argparse.Namespace) -> str:
    return f"hypersolver {args.hyper_command}"


def run(args: argparse.Namespace) -> int:
    return train(args) if args.hyper_command == "train" else evaluate(args)


#: The files ``hypersolver eval`` writes in its folder.
EVAL_FILES = ("results.json", "residual.png", "pareto.png")


def _check_run(args: argparse.Namespace) -> Path:
    """The run's checkpoint path, after the cheap checks: it exists, the backend is installed."""
    path = Path(args.run) / "checkpoint.npz"
    if not path.is_file():
        raise UsageError(f"--run {args.run} has no checkpoint.npz (is it a `deqcore train --out` folder?)")
    if args.backend is not None:
        require_framework(args.backend)
    return path


def _refuse_existing(paths: list[Path], overwrite: bool, flag: str) -> None:
    existing = [str(p) for p in paths if p.exists()]
    if existing and not overwrite:
        raise UsageError(f"{flag}: {', '.join(existing)} already exist(s): pass --overwrite to replace, or "
                         f"choose another {flag}")


def _model(args: argparse.Namespace, test_limit: int | None = None) -> Any:
    return load_frozen(args.run, backend=args.backend, data=args.data, test_limit=test_limit)


def train(args: argparse.Namespace) -> int:
    check_ints(args, ("steps", "batch_size", "iterations", "memory", "width", "hidden"), 1)
    check_ints(args, ("seed",), 0)
    options = key_values(args.train_option, "--train-option")
    try:
        resolve("--train-option", TRAIN_OPTIONS, options)
        deqcore.registry().get("solvers", options.get("target_solver", "broyden"))
    except (TypeError, ValueError) as exc:
        raise UsageError(str(exc)) from None
    _check_run(args)
    out = Path(args.out) if args.out else Path(args.run) / "hypersolver.npz"
    if out.suffix != ".npz":
        raise UsageError(f"--out must name a .npz file, got {out}")
    _refuse_existing([out, out.with_suffix(".csv")], args.overwrite, "--out")
    model = _model(args)
    hidden = None if args.no_initialiser else (args.hidden or model.defaults["hidden"])
    hs = make_hypersolver(model, iterations=args.iterations, memory=args.memory, width=args.width,
                          hidden=hidden, prior=args.prior, normalisation=args.normalisation, seed=args.seed)
    ratio = hs.parameter_count() / model.parameters
    print(f"deqcore hypersolver train: {hs} for {model.run} ({model.parameters} model parameters, "
          f"hypersolver {100 * ratio:.2f} %), backend {model.backend}, {args.steps} steps of "
          f"{args.batch_size} -> {out}",
          file=sys.stderr)
    bar = None if args.no_progress else Progress(args.steps, "hypersolver", every=10)

    def report(r: dict[str, float]) -> None:
        if bar is not None:
            bar.update(int(r["step"]), {"conv": f"{r['conv']:.3g}", "init": f"{r['init']:.3g}",
                                        "targets off": str(r["target_unconverged"])})

    try:
        trained, history = fit(model, hs, steps=args.steps, batch_size=args.batch_size, seed=args.seed,
                               progress=report, **{"log_every": 1, **options})
    finally:
        if bar is not None:
            bar.close()
    final = {k: history[-1][k] for k in ("conv", "init", "alpha")}
    bad = [k for k, v in final.items() if not math.isfinite(v)]
    if bad:
        raise FloatingPointError(f"hypersolver training diverged: final {', '.join(bad)} not finite; "
                                 f"nothing was written (lower --train-option lr=...)")
    cost = training_cost(model, hs, history)
    meta = {"run": str(model.run), "checkpoint_step": model.step, "backend": model.backend,
            "steps": args.steps, "batch_size": args.batch_size, "train_options": options, **cost,
            "final": final}
    trained.save(out, meta=meta)
    save_history(out.with_suffix(".csv"), history)
    share = (f" ({100 * cost['time_ratio']:.2f} % of the DEQ's {model.train_seconds:.0f} s)"
             if cost["time_ratio"] is not None else " (the run has no epochs.csv: DEQ training time unknown)")
    print(f"trained in {cost['seconds']:.1f} s{share}")
    print(f"parameters: {hs.parameter_count()} = {100 * ratio:.2f} % of the model's {model.parameters}")
    print(f"wrote {out} and {out.with_suffix('.csv')}")
    return 0


def _ints(text: str, flag: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UsageError(f"{flag} expects comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise UsageError(f"{flag} needs integers >= 1, got {text!r}")
    return values


def row_flags(rows: list[dict[str, Any]]) -> list[str]:
    """A flag for each result row with a non-finite metric, loss or residual."""
    out = []
    for r in rows:
        bad = [k for k in ("metric", "loss", "residual")
               if isinstance(r.get(k), float) and not math.isfinite(r[k])]
        if bad:
            out.append(f"{r['method']} at {r['budget']} steps: {', '.join(bad)} not finite (the solve "
                       f"diverged or produced NaN)")
    return out


def evaluate(args: argparse.Namespace) -> int:
    budgets = _ints(args.budgets, "--budgets")
    check_ints(args, ("repeats", "test_limit"), 1)
    classic = [s.strip() for s in args.solvers.split(",") if s.strip()]
    known = deqcore.available()["solvers"]
    unknown = [s for s in classic if s not in known]
    if unknown:
        raise UsageError(f"--solvers: unknown solver(s) {', '.join(unknown)}; available: {', '.join(known)}")
    _check_run(args)
    hypers = args.hypersolver or [str(Path(args.run) / "hypersolver.npz")]
    files: dict[str, str] = {}
    for item in hypers:
        label, sep, path = item.partition("=")
        label, path = (label, path) if sep else ("hyper" if len(hypers) == 1 else Path(item).stem, item)
        if not Path(path).is_file():
            raise UsageError(f"--hypersolver: no hypersolver file {path} (train one with "
                             "`deqcore hypersolver train`)")
        if label in files or label in classic:
            raise UsageError(f"--hypersolver: the label {label!r} is used twice")
        files[label] = path
    out = Path(args.out) if args.out else Path(args.run) / "hypersolver-eval"
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file, not a folder")
    _refuse_existing([out / name for name in EVAL_FILES], args.overwrite, "--out")
    model = _model(args, args.test_limit)
    methods: dict[str, Any] = {}
    for label, path in files.items():
        try:
            methods[label] = load_for(model, path)
        except ValueError as exc:
            raise UsageError(f"--hypersolver {path}: {exc}") from None
    first = next(iter(methods.values()))
    if args.from_init and first.initialiser is None:
        raise UsageError("--from-init needs the first hypersolver to have an initialiser")
    for name in classic:
        methods[name] = name
        if args.from_init:
            methods[f"{name}+init"] = (name, first)
    log = None if args.no_progress else (lambda line: print(line, file=sys.stderr, flush=True))
    rows = compare(model, methods, budgets, repeats=args.repeats, progress=log)
    metric = model.family.metric
    hyper_labels = [k for k, v in methods.items() if not isinstance(v, (str, tuple))]
    summary = {
        "run": str(model.run), "backend": model.backend, "test_items": rows[0]["items"],
        "budgets": budgets, "repeats": args.repeats, "rows": rows,
        "parameters": {"model": model.parameters, "layer": model.layer_parameters,
                       **{k: methods[k].parameter_count() for k in hyper_labels}},
        "speedups": all_speedups(rows, hyper_labels, classic, metric),
        "flags": row_flags(rows),
    }
    save_json(out / "results.json", summary)
    plots = write_plots(rows, out, metric, title=f"{model.cfg.model} on {model.cfg.dataset}")
    shown = metric.short + (" %" if metric.percent else "")
    print(f"{'method':<16}{'steps':>6}{shown:>10}{'residual':>11}{'seconds':>9}{'solve s':>9}")
    for r in rows:
        value = metric.shown(r["metric"])
        print(f"{r['method']:<16}{r['budget']:>6}{value:>10.2f}{r['residual']:>11.3e}{r['seconds']:>9.2f}"
              f"{r['solve_seconds']:>9.2f}")
    print("\nspeedup at equal quality (the classic solver's best less 0.5 points / plus 2 % ppl):")
    print("\n".join(speedup_table(summary["speedups"], metric)))
    for p in [str(out / "results.json"), *plots]:
        print(f"wrote {p}")
    return report_flags(summary)
