"""``deqcore hypersolver train|eval``: HyperDEQ on a training run's checkpoint (see
:mod:`deqcore_models.hyperdeq` for the library calls behind them)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from ._progress import Progress
from .cli import _key_values


def _model(args: argparse.Namespace, test_limit: int | None = None) -> Any:
    from .hyperdeq import load_frozen

    if not (Path(args.run) / "checkpoint.npz").exists():
        raise SystemExit(f"error: {args.run} has no checkpoint.npz (is it a `deqcore train --out` folder?)")
    return load_frozen(args.run, backend=args.backend, data=args.data, test_limit=test_limit)


def hypersolver_train(args: argparse.Namespace) -> int:
    from .hyperdeq import fit, make_hypersolver, save_history, training_cost

    for flag in ("steps", "batch_size", "iterations", "memory", "width", "hidden"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise SystemExit(f"error: --{flag.replace('_', '-')} must be >= 1, got {value}")
    options = _key_values(args.train_option, "--train-option")
    model = _model(args)
    hidden = None if args.no_initialiser else (args.hidden or model.defaults["hidden"])
    hs = make_hypersolver(model, iterations=args.iterations, memory=args.memory, width=args.width,
                          hidden=hidden, prior=args.prior, normalisation=args.normalisation, seed=args.seed)
    out = Path(args.out) if args.out else Path(args.run) / "hypersolver.npz"
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
    except (TypeError, ValueError) as exc:
        raise SystemExit(f"error: {exc}") from exc
    finally:
        if bar is not None:
            bar.close()
    cost = training_cost(model, hs, history)
    meta = {"run": str(model.run), "checkpoint_step": model.step, "backend": model.backend,
            "steps": args.steps, "batch_size": args.batch_size, "train_options": options, **cost,
            "final": {k: history[-1][k] for k in ("conv", "init", "alpha")}}
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
        raise SystemExit(f"error: {flag} expects comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise SystemExit(f"error: {flag} needs integers >= 1, got {text!r}")
    return values


def hypersolver_eval(args: argparse.Namespace) -> int:
    import deqcore

    from .hyperdeq import all_speedups, compare, load_for, save_json, speedup_table, write_plots

    budgets = _ints(args.budgets, "--budgets")
    if args.repeats < 1:
        raise SystemExit(f"error: --repeats must be >= 1, got {args.repeats}")
    classic = [s.strip() for s in args.solvers.split(",") if s.strip()]
    known = deqcore.available()["solvers"]
    unknown = [s for s in classic if s not in known]
    if unknown:
        raise SystemExit(f"error: unknown solver(s) {', '.join(unknown)}; available: {', '.join(known)}")
    model = _model(args, args.test_limit)
    methods: dict[str, Any] = {}
    hypers = args.hypersolver or [str(Path(args.run) / "hypersolver.npz")]
    for item in hypers:
        label, sep, path = item.partition("=")
        label, path = (label, path) if sep else ("hyper" if len(hypers) == 1 else Path(item).stem, item)
        if not Path(path).exists():
            raise SystemExit(f"error: no hypersolver file {path} (train one with "
                             "`deqcore hypersolver train`)")
        try:
            methods[label] = load_for(model, path)
        except ValueError as exc:
            raise SystemExit(f"error: {exc}") from exc
    first = next(iter(methods.values()))
    if args.from_init and first.initialiser is None:
        raise SystemExit("error: --from-init needs the first hypersolver to have an initialiser")
    for name in classic:
        methods[name] = name
        if args.from_init:
            methods[f"{name}+init"] = (name, first)
    log = None if args.no_progress else (lambda line: print(line, file=sys.stderr, flush=True))
    rows = compare(model, methods, budgets, repeats=args.repeats, progress=log)
    hyper_labels = [k for k, v in methods.items() if not isinstance(v, (str, tuple))]
    summary = {
        "run": str(model.run), "backend": model.backend, "test_items": rows[0]["items"],
        "budgets": budgets, "repeats": args.repeats, "rows": rows,
        "parameters": {"model": model.parameters, "layer": model.layer_parameters,
                       **{k: methods[k].parameter_count() for k in hyper_labels}},
        "speedups": all_speedups(rows, hyper_labels, classic, model.text),
    }
    out = Path(args.out) if args.out else Path(args.run) / "hypersolver-eval"
    save_json(out / "results.json", summary)
    plots = write_plots(rows, out, model.text, title=f"{model.cfg.model} on {model.cfg.dataset}")
    metric = "ppl" if model.text else "acc %"
    print(f"{'method':<16}{'steps':>6}{metric:>10}{'residual':>11}{'seconds':>9}{'solve s':>9}")
    for r in rows:
        value = r["metric"] if model.text else 100 * r["metric"]
        print(f"{r['method']:<16}{r['budget']:>6}{value:>10.2f}{r['residual']:>11.3e}{r['seconds']:>9.2f}"
              f"{r['solve_seconds']:>9.2f}")
    print("\nspeedup at equal quality (the classic solver's best less 0.5 points / plus 2 % ppl):")
    print("\n".join(speedup_table(summary["speedups"], model.text)))
    for p in [str(out / "results.json"), *plots]:
        print(f"wrote {p}")
    return 0
