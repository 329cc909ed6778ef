"""``hyperdeq``: HyperDEQ on a trained run: fits the hypersolver and its ablations (no initialiser,
softmax weights, the "newest" prior) to the frozen model, then runs them, Anderson, Broyden and
Anderson from the learned initialiser at every budget on the test set: residual vs NFE and
accuracy (perplexity) vs time plots, the speedup at equal quality, parameter and training-time
ratios; writes results.md, results.json, residual.png, pareto.png, training.png."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from deqcore.validators import positive_float

from .._command_line import UsageError
from .._results_files import pyplot, read_csv, save_figure, save_json
from ..doc_blocks import load, refresh_pages_of, renderer, write_page
from ..families import family, hypersolver_defaults
from ..hyperdeq import (
    all_speedups,
    compare,
    fit,
    load_frozen,
    make_hypersolver,
    operating_points_table,
    save_history,
    speedup_table,
    training_cost,
    write_plots,
)
from ._common import add_output_flags, check_names, int_list, names, refuse_existing

#: ablation name -> make_hypersolver overrides
VARIANTS: dict[str, dict[str, Any]] = {
    "hyper": {},
    "no-init": {"hidden": None},
    "softmax": {"normalisation": "softmax"},
    "newest-prior": {"prior": "newest"},
}


def run_hyperdeq(args: argparse.Namespace) -> dict[str, Any]:
    out = Path(args.out)
    refuse_existing(out, args.overwrite)
    model = load_frozen(args.run, backend=args.backend, data=args.data, test_limit=args.test_limit)
    say = (lambda line: None) if args.no_progress else (lambda line: print(line, file=sys.stderr, flush=True))
    methods: dict[str, Any] = {}
    training: dict[str, Any] = {}
    for name in args.variants:
        kw = {"iterations": args.iterations, "width": args.width, "seed": args.seed,
              **({} if args.hidden is None else {"hidden": args.hidden}), **VARIANTS[name]}
        hs = make_hypersolver(model, **kw)
        say(f"training {name}: {hs}")
        trained, history = fit(model, hs, steps=args.steps, batch_size=args.batch_size, seed=args.seed,
                               lr=args.lr, log_every=max(1, args.steps // 10),
                               progress=lambda r: say(f"  step {r['step']}: conv {r['conv']:.4g} "
                                                      f"init {r['init']:.4g} ({r['seconds']:.0f} s)"))
        trained.save(out / f"{name}.npz", meta={"run": str(args.run), "steps": args.steps, "lr": args.lr})
        save_history(out / f"{name}.csv", history)
        training[name] = {**training_cost(model, hs, history),
                          "unconverged_targets": int(sum(r["target_unconverged"] for r in history)),
                          "first_conv": history[0]["conv"], "last_conv": history[-1]["conv"]}
        methods[name] = trained
    first = methods[args.variants[0]]
    for solver in ("anderson", "broyden"):
        methods[solver] = solver
    methods["anderson+init"] = ("anderson", first)
    rows = compare(model, methods, args.budgets, repeats=args.repeats, progress=say)
    metric = model.family.metric
    classic = ["anderson", "broyden"]
    result = {"run": str(args.run), "backend": model.backend, "model": model.cfg.model,
              "dataset": model.cfg.dataset, "checkpoint_step": model.step, "test_items": rows[0]["items"],
              "model_parameters": model.parameters, "layer_parameters": model.layer_parameters,
              "model_train_seconds": training[args.variants[0]]["model_train_seconds"],
              "steps": args.steps, "batch_size": args.batch_size,
              "iterations": first.iterations, "lr": args.lr, "repeats": args.repeats, "training": training,
              "rows": rows, "speedups": all_speedups(rows, args.variants, classic, metric)}
    save_json(out / "results.json", result)
    write_plots(rows, out, metric, title=f"{model.cfg.model} on {model.cfg.dataset}")
    _hyperdeq_training_plot(out, args.variants)
    write_page(out / "results.md", "hyperdeq.results", "results.json")
    if (out / "README.md").exists():  # the report's reading: its blocks, not its prose
        write_page(out / "README.md", "hyperdeq.results", "results.json")
    refresh_pages_of(out / "results.json")  # pages elsewhere in the checkout that quote it
    return result


def _hyperdeq_training_plot(out: Path, variants: list[str]) -> None:
    plt = pyplot()
    if plt is None:
        return
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.8))
    for name in variants:
        rows = read_csv(out / f"{name}.csv")
        steps = [int(r["step"]) for r in rows]
        ax[0].plot(steps, [float(r["conv"]) for r in rows], lw=0.8, label=name)
        ax[1].plot(steps, [float(r["init"]) for r in rows], lw=0.8, label=name)
    ax[0].set(title="L_conv (mean log error over 2K iterations)", xlabel="step")
    ax[1].set(title="L_init ||h(x) - z*||", xlabel="step")
    for a in ax:
        a.legend(fontsize=8)
        a.grid(alpha=0.3)
    fig.tight_layout()
    save_figure(fig, out / "training.png")


def _hyperdeq_targets(t: dict[str, Any], r: dict[str, Any]) -> str:
    missed = t.get("unconverged_targets")
    return "unknown" if missed is None else f"{missed:,} of {r['steps'] * r['batch_size']:,}"


def _hyperdeq_cost(r: dict[str, Any]) -> list[str]:
    lines = ["| hypersolver | parameters | of the model | of the layer | training s | of the DEQ's "
             "training | targets unconverged | L_conv first → last |", "|---|---|---|---|---|---|---|---|"]
    for name, t in r["training"].items():
        share = "unknown" if t["time_ratio"] is None else f"{100 * t['time_ratio']:.2f} %"
        lines.append(f"| {name} | {t['parameters']:,} | {100 * t['parameter_ratio']:.2f} % | "
                     f"{100 * t['layer_parameter_ratio']:.1f} % | {t['seconds']:.0f} | {share} | "
                     f"{_hyperdeq_targets(t, r)} | {t['first_conv']:.3g} → {t['last_conv']:.3g} |")
    return lines


def _hyperdeq_grid(r: dict[str, Any], field: str) -> list[str]:
    """One row per method, one column per budget, of ``field`` (``metric``: accuracy % or
    perplexity)."""
    metric = family(r["model"]).metric
    budgets = sorted({row["budget"] for row in r["rows"]})
    methods = list(dict.fromkeys(row["method"] for row in r["rows"]))
    cell = {(row["method"], row["budget"]): row for row in r["rows"]}

    def fmt(row: dict[str, Any]) -> str:
        if field == "metric":
            return f"{metric.shown(row['metric']):.2f}" if metric.percent else f"{row['metric']:.1f}"
        return f"{row[field]:.2e}" if field == "residual" else f"{row[field]:.2f}"

    lines = ["| method | " + " | ".join(str(b) for b in budgets) + " |", "|---|" + "---|" * len(budgets)]
    for m in methods:
        values = [fmt(cell[(m, b)]) if (m, b) in cell else "" for b in budgets]
        lines.append(f"| {m} | " + " | ".join(values) + " |")
    return lines


def _hyperdeq_speedups(r: dict[str, Any]) -> list[str]:
    return speedup_table(r["speedups"], family(r["model"]).metric)


def _hyperdeq_operating_points(r: dict[str, Any]) -> list[str]:
    return operating_points_table(r["rows"], list(r["training"]), ["anderson", "broyden"],
                                  family(r["model"]).metric)


#: the cost goals of a hypersolver: a share of the model's parameters and of its training time
HYPERDEQ_GOALS = {"speedup": 2.0, "parameter_ratio": 0.04, "time_ratio": 0.02}


def _hyperdeq_goals(r: dict[str, Any]) -> list[str]:
    """The main hypersolver (the first trained) against :data:`HYPERDEQ_GOALS`: its solve-phase
    speedup at equal quality against each classic solver, its parameter and training-time shares."""
    name, t = next(iter(r["training"].items()))
    goal = HYPERDEQ_GOALS
    per = r["speedups"]["solve_seconds"].get(name, {})
    cells = [f"{base} " + ("not reached" if v["speedup"] is None else f"{v['speedup']:.2f}×")
             for base, v in per.items()]
    fast = bool(per) and all(v["speedup"] is not None and v["speedup"] >= goal["speedup"]
                             for v in per.values())

    def mark(ok: bool) -> str:
        return "✓" if ok else "✗"

    rows = ["| goal | result |", "|---|---|",
            f"| ≥ {goal['speedup']:g}× faster than each classic solver at equal quality (solve phase) | "
            f"{mark(fast)} {', '.join(cells) or 'no classic solver compared'} |",
            f"| ≤ {100 * goal['parameter_ratio']:g} % of the model's parameters | "
            f"{mark(t['parameter_ratio'] <= goal['parameter_ratio'])} {100 * t['parameter_ratio']:.2f} % "
            f"({t['parameters']:,} of {t['model_parameters']:,}) |"]
    if t["time_ratio"] is None:
        rows.append(f"| training ≤ {100 * goal['time_ratio']:g} % of the DEQ's | unknown (the run has no "
                    f"epochs.csv); {t['seconds']:.0f} s |")
    else:
        rows.append(f"| training ≤ {100 * goal['time_ratio']:g} % of the DEQ's | "
                    f"{mark(t['time_ratio'] <= goal['time_ratio'])} {100 * t['time_ratio']:.2f} % "
                    f"({t['seconds']:.0f} s of {t['model_train_seconds']:,.0f} s) |")
    return rows


def _hyperdeq_table(r: dict[str, Any]) -> str:
    """The whole ``results.md`` of a ``hyperdeq`` run from its results."""
    fam = family(r["model"])
    metric = fam.metric.label()
    seconds = r["model_train_seconds"]
    trained = "for an unknown time" if seconds is None else f"{seconds:.0f} s"
    lines = [f"# HyperDEQ on {r['model']} / {r['dataset']} ({r['backend']}, {r['test_items']} test "
             f"{fam.items})", "",
             f"Model: {r['model_parameters']:,} parameters ({r['layer_parameters']:,} in the equilibrium "
             f"layer), trained {trained} (checkpoint step {r['checkpoint_step']}). "
             f"Hypersolvers: {r['steps']} steps of batch {r['batch_size']}, K = {r['iterations']}, "
             f"lr {r['lr']}.", "", *_hyperdeq_cost(r)]
    tables = ((f"Test {metric} at each budget (solver steps; NFE = steps + 1)", "metric"),
              ("Mean relative residual", "residual"),
              ("Seconds per test pass", "seconds"),
              ("Seconds of the solve phase (injection, start, solver steps)", "solve_seconds"))
    for title, field in tables:
        lines += ["", f"## {title}", "", *_hyperdeq_grid(r, field)]
    lines += ["", "## Speedup at equal quality", "",
              "Target: the classic solver's best quality over these budgets, less 0.5 accuracy points "
              "(plus 2 % perplexity). Speedup: the classic solver's cheapest run reaching it, divided by "
              f"the hypersolver's; times are the fastest of {r.get('repeats', 1)} passes.", "",
              *_hyperdeq_speedups(r),
              "", "## Speedup at each classic operating point (solve phase)", "",
              "At the quality a classic solver reaches at each budget: its solve-phase seconds divided by "
              "the hypersolver's cheapest run at least as good (no slack), and that run's budget.", "",
              *_hyperdeq_operating_points(r)]
    return "\n".join(lines) + "\n"


def _hyperdeq_renderer(name: str, make: Callable[[dict[str, Any]], list[str] | str]) -> None:
    def render(source: Path) -> str:
        out = make(load(source))
        return out if isinstance(out, str) else "\n".join(out) + "\n"

    render.__doc__ = f"The ``{name}`` part of a ``hyperdeq`` run's report, from its results.json."
    renderer(name)(render)


for _name, _make in (("hyperdeq.results", _hyperdeq_table), ("hyperdeq.cost", _hyperdeq_cost),
                     ("hyperdeq.metric", lambda r: _hyperdeq_grid(r, "metric")),
                     ("hyperdeq.residual", lambda r: _hyperdeq_grid(r, "residual")),
                     ("hyperdeq.seconds", lambda r: _hyperdeq_grid(r, "seconds")),
                     ("hyperdeq.solve-seconds", lambda r: _hyperdeq_grid(r, "solve_seconds")),
                     ("hyperdeq.speedups", _hyperdeq_speedups), ("hyperdeq.goals", _hyperdeq_goals),
                     ("hyperdeq.operating-points", _hyperdeq_operating_points)):
    _hyperdeq_renderer(_name, _make)


def add_parser(sub: Any) -> None:
    hd = sub.add_parser("hyperdeq", help="HyperDEQ and its ablations against Anderson and Broyden on a run")
    hd.add_argument("--run", required=True, help="the trained run's folder (holds checkpoint.npz)")
    hd.add_argument("--backend", choices=["torch", "jax"], default=None, help="backend (default: the run's)")
    hd.add_argument("--data", default=None, help="data folder (default: the run's, else $DEQCORE_DATA)")
    hd.add_argument("--test-limit", type=int, default=None, help="first N test items (images, tokens)")
    hd.add_argument("--variants", type=names, default=list(VARIANTS),
                    help="comma-separated hypersolvers, the first is the main one (default "
                         f"{','.join(VARIANTS)})")
    hd.add_argument("--steps", type=int, default=300, help="training steps per hypersolver (default 300)")
    hd.add_argument("--batch-size", type=int, default=16, help="training batch (default 16)")
    hd.add_argument("--lr", type=float, default=1e-2, help="Adam learning rate (default 1e-2)")
    hd.add_argument("--iterations", type=int, default=None,
                    help=f"K (default {hypersolver_defaults('iterations')})")
    hd.add_argument("--width", type=int, default=None,
                    help=f"mixer width (default {hypersolver_defaults('width')})")
    hd.add_argument("--hidden", type=int, default=None,
                    help=f"initialiser channels (default {hypersolver_defaults('hidden')})")
    hd.add_argument("--budgets", type=int_list, default=[1, 2, 3, 4, 5, 6, 8, 12],
                    help="solver steps to compare at (default 1,2,3,4,5,6,8,12)")
    hd.add_argument("--repeats", type=int, default=3,
                    help="timed passes per method and budget; the fastest counts (default 3)")
    hd.add_argument("--seed", type=int, default=0, help="seed (default 0)")
    add_output_flags(hd)


def _check(args: argparse.Namespace) -> None:
    check_names("--variants", args.variants, VARIANTS)
    for flag, value in (("--steps", args.steps), ("--batch-size", args.batch_size),
                        ("--repeats", args.repeats), ("--iterations", args.iterations),
                        ("--width", args.width), ("--hidden", args.hidden), ("--test-limit", args.test_limit),
                        ("--budgets", min(args.budgets))):
        if value is not None and value < 1:
            raise UsageError(f"{flag} needs integers >= 1, got {value}")
    if args.seed < 0:
        raise UsageError(f"--seed must be an int >= 0, got {args.seed}")
    if positive_float(args.lr) is not None:
        raise UsageError(f"--lr must be a finite float > 0, got {args.lr}")
    if not (Path(args.run) / "checkpoint.npz").is_file():
        raise UsageError(f"--run {args.run} has no checkpoint.npz (is it a `deqcore train --out` folder?)")


def run(args: argparse.Namespace) -> int:
    _check(args)
    run_hyperdeq(args)
    print((Path(args.out) / "results.md").read_text())
    return 0
