"""The model experiments, one command each; results, tables and plots go to ``--out``.

    python -m deqcore_models.experiments gdeq --data ../shared/data --out docs/experiments/gdeq-fmnist

``gdeq``: MDEQ with a Broyden forward trained with the gradient modes implicit, JFB, NPG (k=5,
lambda=0.5) and GDEQ, with and without unrolled pre-training (the seed paper's Table 2 and
Figures 1-2 at CPU scale): seconds per epoch of DEQ training, speedup against implicit, test
accuracy, and the cosine between each mode's gradient and the implicit gradient over training.

    python -m deqcore_models.experiments backends RUN_A RUN_B --out DIR

    python -m deqcore_models.experiments hyperdeq --run RUN --out docs/experiments/hyperdeq-fmnist

``hyperdeq``: HyperDEQ on a trained run: fits the hypersolver and its ablations (no initialiser,
softmax weights, the "newest" prior) to the frozen model, then runs them, Anderson, Broyden and
Anderson from the learned initialiser at every budget on the test set: residual vs NFE and
accuracy (perplexity) vs time plots, the speedup at equal quality, parameter and training-time
ratios; writes results.md, results.json, residual.png, pareto.png, training.png.

Every table these commands write is a generated block (:mod:`deqcore_models.docs_numbers`) rendered
from the results files they write, and a rerun renders the blocks of an existing ``README.md`` in
``--out`` again, so a report's hand-written reading never disagrees with its numbers.

``backends``: compares two training runs of the same command on different backends (their
``steps.csv`` and ``summary.json``): per-step loss difference, final test metrics, median step
time ratio; writes ``backends.md``, ``backends.json`` and ``backends.png`` (both loss curves).
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import warnings
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from .cli import UsageError, _one_line, _Parser, run_command
from .docs_numbers import load, refresh_pages_of, renderer, write_page
from .hyperdeq import _save_figure, save_json
from .train import TrainConfig, Trainer

#: Each mode with the trainer's defaults (for implicit, its backward budget of 20 steps) except
#: NPG's, which are the phantom-gradient paper's k = 5, lam = 0.5.
MODES: dict[str, tuple[str, dict[str, Any]]] = {
    "implicit": ("implicit", {}),
    "jfb": ("jfb", {}),
    "npg": ("npg", {"k": 5, "lam": 0.5}),
    "gdeq": ("gdeq", {}),
}


def _csv(path: Path) -> list[dict[str, str]]:
    if not path.exists():
        return []
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


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
    _refuse_existing(out, args.overwrite)
    rows = []
    for cfg in configs:
        mode = next(m for m, (g, _) in MODES.items() if g == cfg.grad)
        pretrain = cfg.pretrain_steps
        print(f"== {mode}, pretrain {pretrain} steps -> {cfg.out}", file=sys.stderr)
        summary = Trainer(cfg, progress=not args.no_progress).run(overwrite=args.overwrite)
        steps = _csv(Path(cfg.out) / "steps.csv")
        deq = [float(r["seconds"]) for r in steps if r["phase"] == "deq"]
        cos = [float(r["cosine"]) for r in _csv(Path(cfg.out) / "cosine.csv")]
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


def _refuse_existing(out: Path, overwrite: bool, names: tuple[str, ...] | None = None) -> None:
    """Refuse an output folder that already holds results (any file, or one of ``names``)
    unless ``overwrite``."""
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file, not a folder")
    held = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if names is not None:
        held = [n for n in held if n in names]
    if held and not overwrite:
        raise UsageError(f"--out {out} already holds {', '.join(held[:6])}"
                         f"{' ...' if len(held) > 6 else ''}: pass --overwrite to replace, or choose another "
                         f"--out")


def _gdeq_command(args: dict[str, Any]) -> str:
    """The command line that reproduces a ``gdeq`` run from its saved arguments (the data folder
    written as DATA)."""
    words = ["python -m deqcore_models.experiments gdeq"]
    for key, value in args.items():
        if key == "experiment" or value is None or value is False:
            continue
        flag = "--" + key.replace("_", "-")
        if key == "data":
            value = "DATA"
        if value is True:
            words.append(flag)
        else:
            words.append(f"{flag} {','.join(map(str, value)) if isinstance(value, list) else value}")
    return " ".join(words)


@renderer("gdeq.report")
def render_gdeq_report(source: Path) -> str:
    """The ``gdeq`` experiment's title, command and table, from its ``results.json``."""
    result = load(source)
    args, rows = result["args"], result["rows"]
    title = f"# GDEQ comparison: MDEQ ({args['config']}) on {args['dataset']}, backend {args['backend']}"
    lines = [title, "",
             f"Command: `{_gdeq_command(args)}`", "",
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
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        warnings.warn("matplotlib is not installed: no plots written (pip install 'deqcore[demo]'); "
                      "the CSV files hold the same data", stacklevel=2)
        return
    def plot_lines(name: str, series: list[tuple[str, list[Any], list[float]]], style: str,
              **labels: str) -> None:
        fig, ax = plt.subplots(figsize=(6, 4))
        for label, xs, ys in series:
            ax.plot(xs, ys, style, label=label)
        ax.set(**labels)
        ax.legend(fontsize=8)
        fig.tight_layout()
        _save_figure(fig, out / name)

    def tag(r: dict[str, Any]) -> str:
        return f"{r['mode']} (pre {r['pretrain']})"

    plot_lines("accuracy.png",
               [(tag(r), [e["epoch"] for e in r["epochs"]], [100 * e["test_acc"] for e in r["epochs"]])
                for r in rows], "o-", xlabel="epoch", ylabel="test accuracy %", title="test accuracy")
    probes = [(tag(r), _csv(out / f"{r['mode']}-pre{r['pretrain']}" / "cosine.csv")) for r in rows]
    plot_lines("cosine.png", [(t, [int(c["step"]) for c in cos], [float(c["cosine"]) for c in cos])
                              for t, cos in probes if cos], ".-", xlabel="step",
               ylabel="cosine with implicit gradient", title="gradient fidelity over training")
    fig, ax = plt.subplots(figsize=(6, 4))
    labels = [f"{r['mode']}\npre {r['pretrain']}" for r in rows]
    ax.bar(range(len(rows)), [r["deq_step_s"] for r in rows])
    ax.set_xticks(range(len(rows)), labels, fontsize=7)
    ax.set(ylabel="seconds per DEQ training step (median)", title="training step time")
    fig.tight_layout()
    _save_figure(fig, out / "step_time.png")


@renderer("experiments.backends")
def render_backends(source: Path) -> str:
    """The ``backends`` comparison's table, from its ``backends.json``."""
    r = load(source)
    na, nb = r["backends"]
    fa, fb = r["final"]
    sec_a, sec_b = r["median_step_s"]
    metric = "test_ppl" if "test_ppl" in fa else "test_acc"
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
    _refuse_existing(out, overwrite, BACKEND_FILES)
    runs = {}
    for run in (run_a, run_b):
        summary = json.loads((run / "summary.json").read_text())
        with open(run / "steps.csv", newline="") as fh:
            steps = list(csv.DictReader(fh))
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
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        warnings.warn("matplotlib is not installed: no plot written (pip install 'deqcore[demo]')",
                      stacklevel=2)
        return result
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.8))
    ax[0].plot(la, lw=1, label=na.strip())
    ax[0].plot(lb, lw=1, ls="--", label=nb.strip())
    ax[0].set(xlabel="step", ylabel="training loss", title="training loss per step")
    ax[0].legend()
    ax[1].semilogy(np.abs(la - lb) + 1e-12, lw=0.8)
    ax[1].set(xlabel="step", ylabel="|loss difference|", title="backend difference")
    fig.tight_layout()
    _save_figure(fig, out / "backends.png")
    return result


#: ablation name -> make_hypersolver overrides
VARIANTS: dict[str, dict[str, Any]] = {
    "hyper": {},
    "no-init": {"hidden": None},
    "softmax": {"normalisation": "softmax"},
    "newest-prior": {"prior": "newest"},
}


def run_hyperdeq(args: argparse.Namespace) -> dict[str, Any]:
    from .hyperdeq import (
        all_speedups,
        compare,
        fit,
        load_frozen,
        make_hypersolver,
        save_history,
        training_cost,
        write_plots,
    )

    out = Path(args.out)
    _refuse_existing(out, args.overwrite)
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
    classic = ["anderson", "broyden"]
    result = {"run": str(args.run), "backend": model.backend, "model": model.cfg.model,
              "dataset": model.cfg.dataset, "checkpoint_step": model.step, "test_items": rows[0]["items"],
              "model_parameters": model.parameters, "layer_parameters": model.layer_parameters,
              "model_train_seconds": training[args.variants[0]]["model_train_seconds"],
              "steps": args.steps, "batch_size": args.batch_size,
              "iterations": first.iterations, "lr": args.lr, "repeats": args.repeats, "training": training,
              "rows": rows, "speedups": all_speedups(rows, args.variants, classic, model.text)}
    save_json(out / "results.json", result)
    write_plots(rows, out, model.text, title=f"{model.cfg.model} on {model.cfg.dataset}")
    _hyperdeq_training_plot(out, args.variants)
    write_page(out / "results.md", "hyperdeq.results", "results.json")
    if (out / "README.md").exists():  # the report's reading: its blocks, not its prose
        write_page(out / "README.md", "hyperdeq.results", "results.json")
    refresh_pages_of(out / "results.json")  # pages elsewhere in the checkout that quote it
    return result


def _hyperdeq_training_plot(out: Path, variants: list[str]) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.8))
    for name in variants:
        rows = _csv(out / f"{name}.csv")
        steps = [int(r["step"]) for r in rows]
        ax[0].plot(steps, [float(r["conv"]) for r in rows], lw=0.8, label=name)
        ax[1].plot(steps, [float(r["init"]) for r in rows], lw=0.8, label=name)
    ax[0].set(title="L_conv (mean log error over 2K iterations)", xlabel="step")
    ax[1].set(title="L_init ||h(x) - z*||", xlabel="step")
    for a in ax:
        a.legend(fontsize=8)
        a.grid(alpha=0.3)
    fig.tight_layout()
    _save_figure(fig, out / "training.png")


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
    text = r["model"] == "transformer"
    budgets = sorted({row["budget"] for row in r["rows"]})
    methods = list(dict.fromkeys(row["method"] for row in r["rows"]))
    cell = {(row["method"], row["budget"]): row for row in r["rows"]}

    def fmt(row: dict[str, Any]) -> str:
        if field == "metric":
            return f"{row['metric']:.1f}" if text else f"{100 * row['metric']:.2f}"
        return f"{row[field]:.2e}" if field == "residual" else f"{row[field]:.2f}"

    lines = ["| method | " + " | ".join(str(b) for b in budgets) + " |", "|---|" + "---|" * len(budgets)]
    for m in methods:
        values = [fmt(cell[(m, b)]) if (m, b) in cell else "" for b in budgets]
        lines.append(f"| {m} | " + " | ".join(values) + " |")
    return lines


def _hyperdeq_speedups(r: dict[str, Any]) -> list[str]:
    from .hyperdeq import speedup_table

    return speedup_table(r["speedups"], r["model"] == "transformer")


def _hyperdeq_operating_points(r: dict[str, Any]) -> list[str]:
    from .hyperdeq import operating_points_table

    return operating_points_table(r["rows"], list(r["training"]), ["anderson", "broyden"],
                                  r["model"] == "transformer")


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
    text = r["model"] == "transformer"
    metric = "perplexity" if text else "accuracy %"
    seconds = r["model_train_seconds"]
    trained = "for an unknown time" if seconds is None else f"{seconds:.0f} s"
    lines = [f"# HyperDEQ on {r['model']} / {r['dataset']} ({r['backend']}, {r['test_items']} test "
             f"{'tokens' if text else 'images'})", "",
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


@renderer("run.epochs")
def render_run_epochs(source: Path) -> str:
    """A training run's ``epochs.csv`` as a table: test and training metric and the seconds of
    training steps per epoch."""
    rows = load(source)
    text = bool(rows) and "test_ppl" in rows[0]
    head = ("| epoch | test perplexity | train loss | seconds (training steps) |" if text else
            "| epoch | test accuracy | train accuracy | seconds (training steps) |")
    lines = [head, "|---|---|---|---|"]
    for r in rows:
        if text:
            lines.append(f"| {r['epoch']} | {r['test_ppl']:.1f} | {r['train_loss']:.3f} "
                         f"| {r['train_seconds']:.0f} |")
        else:
            lines.append(f"| {r['epoch']} | {100 * r['test_acc']:.2f} % | {100 * r['train_acc']:.2f} % "
                         f"| {r['train_seconds']:.0f} |")
    return "\n".join(lines) + "\n"


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one integer")
    return values


def _names(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m deqcore_models.experiments", description=__doc__,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="experiment", required=True)
    g = sub.add_parser("gdeq", help="implicit / JFB / NPG / GDEQ on MDEQ, with and without pre-training")
    g.add_argument("--backend", choices=["torch", "jax"], default="torch", help="framework (default torch)")
    g.add_argument("--config", default="cpu", help="MDEQ config (default cpu)")
    g.add_argument("--dataset", choices=["fashion-mnist", "cifar10"], default="fashion-mnist",
                   help="data set (default fashion-mnist)")
    g.add_argument("--data", default=None, help="data folder (default $DEQCORE_DATA)")
    g.add_argument("--train-limit", type=int, default=None, help="first N training images only")
    g.add_argument("--test-limit", type=int, default=None, help="first N test images only")
    g.add_argument("--modes", type=_names, default=list(MODES),
                   help=f"comma-separated gradient modes (default {','.join(MODES)})")
    g.add_argument("--pretrain", type=_int_list, default=[0, 300],
                   help="comma-separated unrolled pre-training step counts (default 0,300)")
    g.add_argument("--unrolled-layers", type=int, default=6, help="layers when unrolled (default 6)")
    g.add_argument("--max-iter", type=int, default=18, help="Broyden forward steps (default 18)")
    g.add_argument("--epochs", type=int, default=1, help="epochs per run (default 1)")
    g.add_argument("--batch-size", type=int, default=64, help="batch size (default 64)")
    g.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (default 1e-3)")
    g.add_argument("--seed", type=int, default=0, help="seed (default 0)")
    g.add_argument("--cosine-every", type=int, default=50,
                   help="gradient-cosine probe every N steps (default 50)")
    g.add_argument("--out", default="docs/experiments/gdeq-fmnist", help="output folder")
    g.add_argument("--overwrite", action="store_true", help="replace the results in a non-empty --out")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")
    hd = sub.add_parser("hyperdeq", help="HyperDEQ and its ablations against Anderson and Broyden on a run")
    hd.add_argument("--run", required=True, help="the trained run's folder (holds checkpoint.npz)")
    hd.add_argument("--backend", choices=["torch", "jax"], default=None, help="backend (default: the run's)")
    hd.add_argument("--data", default=None, help="data folder (default: the run's, else $DEQCORE_DATA)")
    hd.add_argument("--test-limit", type=int, default=None, help="first N test images (tokens for text)")
    hd.add_argument("--variants", type=_names, default=list(VARIANTS),
                    help="comma-separated hypersolvers, the first is the main one (default "
                         f"{','.join(VARIANTS)})")
    hd.add_argument("--steps", type=int, default=300, help="training steps per hypersolver (default 300)")
    hd.add_argument("--batch-size", type=int, default=16, help="training batch (default 16)")
    hd.add_argument("--lr", type=float, default=1e-2, help="Adam learning rate (default 1e-2)")
    hd.add_argument("--iterations", type=int, default=None, help="K (default 3)")
    hd.add_argument("--width", type=int, default=None,
                    help="mixer width (default 8 for MDEQ, 16 for the transformer)")
    hd.add_argument("--hidden", type=int, default=None,
                    help="initialiser channels (default 8 for MDEQ, 16 for the transformer)")
    hd.add_argument("--budgets", type=_int_list, default=[1, 2, 3, 4, 5, 6, 8, 12],
                    help="solver steps to compare at (default 1,2,3,4,5,6,8,12)")
    hd.add_argument("--repeats", type=int, default=3,
                    help="timed passes per method and budget; the fastest counts (default 3)")
    hd.add_argument("--seed", type=int, default=0, help="seed (default 0)")
    hd.add_argument("--out", required=True, help="output folder")
    hd.add_argument("--overwrite", action="store_true", help="replace the results in a non-empty --out")
    hd.add_argument("--no-progress", action="store_true", help="no progress lines")
    c = sub.add_parser("backends", help="compare two runs of one command on different backends")
    c.add_argument("runs", nargs=2, type=Path, help="the two run folders (their --out)")
    c.add_argument("--out", type=Path, required=True, help="where backends.md/.json/.png go")
    c.add_argument("--overwrite", action="store_true", help="replace earlier backends.* files in --out")
    return parser


def _check_hyperdeq(args: argparse.Namespace) -> None:
    from deqcore._options import positive_float

    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown or not args.variants:
        raise UsageError(f"--variants: unknown {', '.join(unknown) or '(none given)'}; available: "
                         f"{', '.join(VARIANTS)}")
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


def main(argv: list[str] | None = None) -> int:
    """Run an experiment; a user error (a bad flag, data or checkpoint, an output folder that
    already holds results, a file that cannot be written) is one ``error:`` line and exit
    status 2, checked before any run starts where it can be."""
    args = build_parser().parse_args(argv)

    def command() -> int:
        if args.experiment == "backends":
            try:
                res = compare_backends(args.runs[0], args.runs[1], args.out, overwrite=args.overwrite)
            except (ValueError, KeyError) as exc:  # a run folder without its summary or steps
                raise UsageError(f"cannot compare the runs: {exc}") from None
            print((args.out / "backends.md").read_text())
            return 0 if res else 1
        if args.experiment == "hyperdeq":
            _check_hyperdeq(args)
            run_hyperdeq(args)
            print((Path(args.out) / "results.md").read_text())
            return 0
        unknown = [m for m in args.modes if m not in MODES]
        if unknown or not args.modes:
            raise UsageError(f"--modes: unknown {', '.join(unknown) or '(none given)'}; available: "
                             f"{', '.join(MODES)}")
        result = run_gdeq(args)
        print(f"wrote {Path(args.out) / 'README.md'} and results.json", file=sys.stderr)
        for line in result["flags"]:
            print(f"flagged: {_one_line(line)}", file=sys.stderr)
        return 1 if result["flags"] else 0

    return run_command(f"python -m deqcore_models.experiments {args.experiment}", command)


if __name__ == "__main__":
    sys.exit(main())
