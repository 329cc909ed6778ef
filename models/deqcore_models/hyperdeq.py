"""HyperDEQ on trained models: fit a hypersolver to a training run's frozen checkpoint, and compare
it with classic solvers on held-out data at equal budgets.

    model = load_frozen("runs/mdeq")                      # the run's checkpoint and data
    hs = make_hypersolver(model)                          # K = 3, sizes per model
    hs, history = fit(model, hs, steps=300)
    rows = compare(model, {"anderson": "anderson", "hyper": hs}, budgets=[2, 4, 8])

Used by ``deqcore hypersolver train|eval`` and ``python -m deqcore_models.experiments hyperdeq``.
The model runs in evaluation mode (BatchNorm running statistics, no dropout) on either backend,
whatever backend trained it (checkpoints are framework-neutral).
"""

from __future__ import annotations

import csv
import io
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

import deqcore
from deqcore._arrays_io import dumps_json, write_atomic, write_text
from deqcore.hypersolvers import HyperAnderson, Hypersolver, load_hypersolver, train_hypersolver

from ._engines import require_framework
from ._hyper import MDEQCompression, MDEQInitialiser, TransformerCompression, TransformerInitialiser
from ._layers import cross_entropy, token_cross_entropy
from ._ops import ops_for
from ._workloads import make_workload
from .checkpoint import check_checkpoint, load_checkpoint
from .mdeq import equilibrium_shapes, mdeq_parts
from .train import TrainConfig, _read_csv, checkpoint_step, config_from_checkpoint, model_schema
from .transformer import transformer_parts


@dataclass
class FrozenModel:
    """A trained run's model, frozen, split around its equilibrium layer on one backend.

    ``inject(x)``, ``layer(z, inj)`` and ``head(z)`` as in :func:`deqcore_models.mdeq.mdeq_parts`
    (the parts ``rebuild(*arrays)`` gives);
    ``zeros(inj)`` the classic start; ``compression`` and ``initialiser(hidden)`` the
    model-specific hypersolver pieces; ``parameters`` the model's parameter count (and
    ``layer_parameters`` without the embedding/stem/head); ``train_seconds`` the run's DEQ
    training time (summed over its epochs, from ``epochs.csv``). ``arrays`` are the model's
    (params, state) as framework arrays and ``rebuild(params, state)`` gives the parts again
    over them: a compiled function that takes the arrays as arguments, instead of closing over
    them, is not constant-folded by XLA (which made the zero start's first ``f`` cheaper than
    any other start's, and compilation slow)."""

    run: Path
    backend: str
    cfg: TrainConfig
    work: Any
    ops: Any
    zeros: Callable[[Any], Any]
    compression: Any
    initialiser: Callable[[int], Any]
    parameters: int
    layer_parameters: int
    train_seconds: float
    step: int
    arrays: tuple[dict[str, Any], dict[str, Any]]
    rebuild: Callable[[dict[str, Any], dict[str, Any]], Any]

    @cached_property
    def parts(self) -> Any:
        return self.rebuild(*self.arrays)

    @property
    def inject(self) -> Callable[[Any], Any]:
        return self.parts.inject

    @property
    def layer(self) -> Callable[[Any, Any], Any]:
        return self.parts.layer

    @property
    def head(self) -> Callable[[Any], Any]:
        return self.parts.head

    @property
    def text(self) -> bool:
        return bool(self.work.text)

    @property
    def defaults(self) -> dict[str, int]:
        """:func:`make_hypersolver`'s sizes for this model: K = 3 (the budgets where a learned
        solver can pay off; the loss unrolls 2K = 6), and an initialiser of 8 channels with a
        mixer of width 8 for MDEQ (a wider initialiser, paid for by a narrower mixer, is what
        lifts the 1-step accuracy), 16 and 16 for the DEQ-Transformer. What they cost and gain
        on trained models: docs/experiments/hyperdeq-fmnist and hyperdeq-wt2."""
        return {"iterations": 3, "hidden": 16, "width": 16} if self.text else \
            {"iterations": 3, "hidden": 8, "width": 8}

    @property
    def fit_defaults(self) -> dict[str, Any]:
        """:func:`fit`'s per-model target settings: the DEQ-Transformer's targets converge within
        neither 30 nor 60 Broyden steps, so 30 steps, half the target solve, give targets that are
        as useful (docs/experiments/hyperdeq-wt2 records the residual they reach)."""
        return {"target_max_iter": 30} if self.text else {}


def load_frozen(run: str | Path, backend: str | None = None, data: str | None = None,
                test_limit: int | None = None) -> FrozenModel:
    """The model of ``run/checkpoint.npz`` with the run's data (``data`` overrides the folder;
    ``test_limit`` the number of test images or tokens; default the run's). The checkpoint is
    checked as every load is (:func:`~deqcore_models.checkpoint.check_checkpoint` against
    :func:`~deqcore_models.train.model_schema`): a mismatch, a corrupted file or NaN weights are
    a :class:`~deqcore_models.checkpoint.CheckpointError` listing every difference."""
    run = Path(run)
    source = run / "checkpoint.npz"
    ck = load_checkpoint(source)
    cfg = config_from_checkpoint(ck, str(source), backend=backend, data=data, test_limit=test_limit,
                                 out=str(run))
    require_framework(cfg.backend)
    work = make_workload(cfg)
    check_checkpoint(ck, model_schema(cfg, work), str(source))
    ops = ops_for(cfg.backend)
    P = {k: ops.asarray(v) for k, v in ck.params.items()}
    S = {k: ops.asarray(v) for k, v in ck.state.items()}
    pieces = _text_pieces if work.text else _image_pieces
    rebuild, zeros, compression, initialiser, prefix = pieces(ops, work.model_cfg)
    epochs = _read_csv(run / "epochs.csv")
    seconds = [_number(r.get("train_seconds")) for r in epochs]
    train_seconds = float(sum(seconds)) if seconds and all(math.isfinite(v) for v in seconds) else math.nan
    count = int(sum(np.asarray(v).size for v in ck.params.values()))
    layer_count = int(sum(np.asarray(v).size for k, v in ck.params.items() if k.startswith(prefix)))
    return FrozenModel(run, cfg.backend, cfg, work, ops, zeros, compression, initialiser, count, layer_count,
                       train_seconds, checkpoint_step(ck, str(source)), (P, S), rebuild)


def _number(v: Any) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.nan


def _text_pieces(ops: Any, mc: Any) -> tuple[Any, ...]:
    xp = ops.xp

    def zeros(u: Any) -> Any:
        return xp.zeros((*u.shape[:2], mc.d_model), dtype=u.dtype)

    def initialiser(hidden: int) -> Any:
        return TransformerInitialiser(3 * mc.d_model, mc.d_model, hidden)

    def rebuild(P: dict[str, Any], S: dict[str, Any]) -> Any:
        return transformer_parts(ops, mc, P, mc.tgt_len)

    return rebuild, zeros, TransformerCompression(mc.d_model), initialiser, "deq."


def _image_pieces(ops: Any, mc: Any) -> tuple[Any, ...]:
    xp = ops.xp

    def zeros(inj: Any) -> Any:
        scale = 2 ** mc.downsample
        shape = (inj.shape[0], 1, inj.shape[2] * scale, inj.shape[3] * scale)
        return tuple(xp.zeros(s, dtype=inj.dtype) for s in equilibrium_shapes(mc, shape))

    def initialiser(hidden: int) -> Any:
        return MDEQInitialiser(mc.channels[0], mc.channels, hidden)

    def rebuild(P: dict[str, Any], S: dict[str, Any]) -> Any:
        return mdeq_parts(ops, mc, P, S)

    return rebuild, zeros, MDEQCompression(mc.channels), initialiser, "deq."


_DEFAULT = -1  # make_hypersolver's "the model's default" (None already means no initialiser)


def make_hypersolver(model: FrozenModel, *, iterations: int | None = None, memory: int = 5,
                     width: int | None = None, hidden: int | None = _DEFAULT, prior: str = "anderson",
                     normalisation: str = "shift", seed: int = 0) -> HyperAnderson:
    """A fresh hypersolver for ``model``: the model's compression, its initialiser with ``hidden``
    channels (None: no initialiser, the zero start), a temporal-conv mixer of ``width``, trained
    for ``iterations`` = K. Sizes left out are ``model.defaults``."""
    d = model.defaults
    iterations = d["iterations"] if iterations is None else iterations
    width = d["width"] if width is None else width
    hidden = d["hidden"] if hidden == _DEFAULT else hidden
    init = None if hidden is None else model.initialiser(hidden)
    return HyperAnderson(model.compression, init, iterations=iterations, memory=memory, width=width,
                         prior=prior, normalisation=normalisation, seed=seed)


def load_for(model: FrozenModel, path: str | Path) -> HyperAnderson:
    """Hypersolver weights saved for ``model`` (the saved initialiser's width is read back). A
    file that is unreadable, not a hypersolver's, or made for another model (its compression or
    initialiser differs, a weight's name, shape or dtype does not match, a weight is NaN) is a
    ``ValueError`` naming the file (:func:`deqcore.hypersolvers.load_hypersolver` checks them)."""
    from deqcore._arrays_io import load_arrays

    _, meta = load_arrays(path)
    cfg = meta.get("config")
    init_cfg = cfg.get("initialiser") if isinstance(cfg, dict) else None
    hidden = init_cfg.get("hidden") if isinstance(init_cfg, dict) else None
    if init_cfg is None:
        return load_hypersolver(path, model.compression, None)
    if isinstance(hidden, bool) or not isinstance(hidden, int) or hidden < 1:
        raise ValueError(f"{path}: its initialiser settings {init_cfg!r} have no valid 'hidden' width")
    return load_hypersolver(path, model.compression, model.initialiser(hidden))


def training_inputs(model: FrozenModel, batch_size: int, seed: int = 0) -> Iterator[Any]:
    """Injections of training batches (``batch_size`` images, or rows of ``tgt_len`` tokens),
    endlessly, in the run's data order shifted by ``seed``."""
    work = model.work
    step = seed * 7919
    while True:
        x = work.train_batch(step).x[:batch_size]
        step += 1
        yield model.inject(model.ops.asarray(x))


def fit(model: FrozenModel, hs: HyperAnderson, *, steps: int, batch_size: int = 16, seed: int = 0,
        progress: Callable[[dict[str, float]], None] | None = None,
        **options: Any) -> tuple[HyperAnderson, list[dict[str, float]]]:
    """Train ``hs`` for ``steps`` on the frozen model (see :func:`deqcore.train_hypersolver` for
    ``options``). Unless ``options`` say otherwise, targets come from Broyden at 60 steps
    (``model.fit_defaults`` may lower that), relative tolerance 1e-4, and Adam's learning rate is
    1e-2. Why: on the Fashion-MNIST MDEQ, 1e-3 barely moved L_conv in 300 steps; targets to 1e-5
    made a training step slower and the hypersolver no better in our runs (its residual after
    2K steps is far above 1e-4, so a 1e-4 target is exact enough: the residual table of
    docs/experiments/hyperdeq-fmnist)."""
    opts = {"target_max_iter": 60, "target_tol": 1e-4, "lr": 1e-2, **model.fit_defaults, **options}
    return train_hypersolver(hs, model.layer, training_inputs(model, batch_size, seed), steps=steps,
                             backend=model.backend, start=model.zeros, progress=progress, **opts)


def training_cost(model: FrozenModel, hs: HyperAnderson,
                  history: Sequence[Mapping[str, float]]) -> dict[str, Any]:
    """The cost figures of a trained hypersolver: parameters (and their share of the
    model's and of the equilibrium layer's) and training seconds (and their share of the DEQ's
    training time; None when the run has no ``epochs.csv``)."""
    seconds = float(history[-1]["seconds"])
    known = math.isfinite(model.train_seconds) and model.train_seconds > 0
    return {"parameters": hs.parameter_count(), "model_parameters": model.parameters,
            "parameter_ratio": hs.parameter_count() / model.parameters,
            "layer_parameter_ratio": hs.parameter_count() / model.layer_parameters,
            "seconds": seconds, "model_train_seconds": model.train_seconds if known else None,
            "time_ratio": seconds / model.train_seconds if known else None}


def save_history(path: Path, history: Sequence[Mapping[str, float]]) -> None:
    """``train_hypersolver``'s per-step records as CSV, written atomically."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(history[0]))
    writer.writeheader()
    writer.writerows(history)
    write_text(path, buf.getvalue())


def _test_batches(model: FrozenModel) -> list[tuple[Any, Any, int]]:
    """``(x, y, items)`` of the test set as framework arrays: ``y`` one-hot labels, or target
    tokens for text (the stream's short last segment is dropped: the parts are built for one
    length)."""
    out = []
    for x, y, _ in model.work.eval_batches():
        if model.text and x.shape[1] != model.work.model_cfg.tgt_len:
            continue
        yy = model.ops.asarray(np.asarray(y, np.int32 if model.text else np.float32))
        out.append((model.ops.asarray(x), yy, int(y.size if model.text else y.shape[0])))
    return out


def _phases(model: FrozenModel, spec: Any, budget: int) -> tuple[Callable[..., Any], ...]:
    """The two timed phases of one method at one budget, each compiled on JAX and taking the
    model's arrays as arguments: ``solve(x, P, S) -> (z, rel residual (B,))``: the injection,
    the hypersolver's initialiser (or the start) and exactly ``budget`` solver steps;
    ``score(z, y, P, S) -> (summed cross-entropy, correct predictions)``: the output layer and
    loss, on the device (a language model's vocabulary-sized scores never leave it)."""
    be = deqcore.registry().backend(model.backend)
    xp = model.ops.xp
    name, start = (spec, None) if not isinstance(spec, tuple) else spec

    def solve(x: Any, P: dict[str, Any], S: dict[str, Any]) -> tuple[Any, Any]:
        parts = model.rebuild(P, S)
        inj = parts.inject(x)
        if isinstance(name, Hypersolver) and getattr(name, "initialiser", None) is not None:
            z0 = None  # the hypersolver's own initialiser
        elif start is not None:
            z0 = start.initial_state(be, inj, inj)
        else:
            z0 = model.zeros(inj)
        sol = deqcore.solve(parts.layer, inj, z0, backend=model.backend, solver=name, max_iter=budget,
                            tol=1e-30, grad=None)
        return sol.z, sol.rel_residual

    def score(z: Any, y: Any, P: dict[str, Any], S: dict[str, Any]) -> tuple[Any, Any]:
        logits = model.rebuild(P, S).head(z)
        if model.text:
            return token_cross_entropy(xp, logits, y)
        correct = xp.sum(xp.astype(xp.argmax(logits, axis=-1) == xp.argmax(y, axis=-1), xp.int32))
        return cross_entropy(xp, logits, y) * logits.shape[0], correct

    return be.jit(solve), be.jit(score)


def compare(model: FrozenModel, methods: Mapping[str, Any], budgets: Sequence[int], repeats: int = 1,
            progress: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """Every method at every budget on the model's test set: one row each with ``method``,
    ``budget`` (solver steps; NFE = budget + 1), ``metric`` (test accuracy, or perplexity for
    text), ``loss``, ``residual`` (mean relative residual), ``seconds`` (wall time of the whole
    test pass) and ``solve_seconds`` (its part up to the equilibrium state: injection,
    initialiser or start, solver steps; the rest is the output layer and the loss).
    Times are the fastest of ``repeats`` passes, each after a warm-up batch that compiles on
    JAX; every phase is synchronised before its clock stops.

    A method is a classic solver name, a hypersolver, or ``(solver name, hypersolver)``: that
    solver started from the hypersolver's initialiser. Every solve runs exactly ``budget`` steps
    (no early stop)."""
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats must be an int >= 1, got {repeats!r}")
    batches = _test_batches(model)
    if not batches:
        raise ValueError("the test set is empty (or shorter than one segment)")
    to_numpy = model.ops.to_numpy
    rows = []
    for label, spec in methods.items():
        for budget in budgets:
            solve, score = _phases(model, spec, int(budget))
            x0, y0, _ = batches[0]
            P, S = model.arrays
            z, rel = solve(x0, P, S)
            to_numpy(score(z, y0, P, S)[0])  # warm-up / compile
            best_total = best_solve = math.inf
            for _ in range(repeats):
                loss = correct = res = 0.0
                t_solve = t_other = 0.0
                for x, y, _ in batches:
                    t0 = time.perf_counter()
                    z, rel = solve(x, P, S)
                    r = to_numpy(rel)
                    t1 = time.perf_counter()
                    total, hits = score(z, y, P, S)
                    total, hits = float(to_numpy(total)), float(to_numpy(hits))
                    t2 = time.perf_counter()
                    t_solve += t1 - t0
                    t_other += t2 - t1
                    loss += total
                    correct += hits
                    res += float(np.asarray(r, np.float64).sum())
                best_total = min(best_total, t_solve + t_other)
                best_solve = min(best_solve, t_solve)
            count = sum(n for _, _, n in batches)
            items = sum(int(x.shape[0]) for x, _, _ in batches)
            mean_loss, accuracy = loss / count, correct / count
            row: dict[str, Any] = {
                "method": label, "budget": int(budget), "nfe": int(budget) + 1, "items": int(count),
                "loss": mean_loss, "accuracy": accuracy, "residual": res / items, "seconds": best_total,
                "solve_seconds": best_solve,
                "metric": math.exp(min(mean_loss, 700.0)) if model.text else accuracy}
            rows.append(row)
            if progress is not None:
                progress(f"{label} @ {budget}: {'ppl' if model.text else 'acc'} "
                         f"{row['metric'] if model.text else 100 * row['metric']:.2f}"
                         f"{'' if model.text else ' %'}, residual {row['residual']:.3e}, "
                         f"{best_total:.2f} s (solve {best_solve:.2f} s)")
    return rows


#: the costs :func:`speedups` compares: the whole test pass, its solve phase, and f evaluations
COSTS = ("seconds", "solve_seconds", "nfe")


def speedups(rows: Sequence[Mapping[str, Any]], method: str, baselines: Sequence[str], text: bool,
             slack: float | None = None, cost: str = "seconds") -> dict[str, Any]:
    """Cost ratios at equal quality. For each baseline the target is its best quality over the
    budgets, loosened by ``slack`` (default 0.5 accuracy points, or 2 % of the perplexity) so that
    test-set noise between neighbouring budgets does not decide it; the speedup is the
    baseline's cheapest row reaching the target divided by ``method``'s cheapest row reaching it.
    ``cost`` is a row field of :data:`COSTS`: ``"seconds"`` (the whole test pass),
    ``"solve_seconds"`` (up to the equilibrium state) or ``"nfe"`` (f evaluations per item,
    free of timing noise). Returns ``{baseline: {"target", "baseline_cost", "method_cost",
    "speedup"}}``; ``method_cost`` and ``speedup`` are None when the method never reaches the
    target."""
    if cost not in COSTS:
        raise ValueError(f"cost must be one of {', '.join(COSTS)}; got {cost!r}")
    slack = (0.02 if text else 0.005) if slack is None else slack

    def reaches(value: float, target: float) -> bool:
        return value <= target if text else value >= target

    out: dict[str, Any] = {}
    mine = sorted((r for r in rows if r["method"] == method), key=lambda r: r[cost])
    for base in baselines:
        theirs = sorted((r for r in rows if r["method"] == base), key=lambda r: r[cost])
        if not theirs or not mine:
            continue
        if text:
            target = min(r["metric"] for r in theirs) * (1 + slack)
        else:
            target = max(r["metric"] for r in theirs) - slack
        c_base = next(r[cost] for r in theirs if reaches(r["metric"], target))
        hit = next((r for r in mine if reaches(r["metric"], target)), None)
        out[base] = {"target": target, "baseline_cost": c_base,
                     "method_cost": None if hit is None else hit[cost],
                     "speedup": None if hit is None else c_base / hit[cost]}
    return out


def all_speedups(rows: Sequence[Mapping[str, Any]], methods: Sequence[str], baselines: Sequence[str],
                 text: bool) -> dict[str, Any]:
    """:func:`speedups` of every method against every baseline for every cost in :data:`COSTS`:
    ``{cost: {method: {baseline: ...}}}``."""
    return {cost: {m: speedups(rows, m, baselines, text, cost=cost) for m in methods} for cost in COSTS}


def operating_points(rows: Sequence[Mapping[str, Any]], method: str, baseline: str, text: bool,
                     cost: str = "solve_seconds") -> list[dict[str, Any]]:
    """The Pareto view of :func:`speedups`: for each of ``baseline``'s rows (by budget), the
    cheapest row of ``method`` at least as good (no slack), and the cost ratio. Each item:
    ``{"budget", "metric", "baseline_cost", "method_budget", "method_cost", "speedup"}`` (the
    last three None when ``method`` never gets there)."""
    if cost not in COSTS:
        raise ValueError(f"cost must be one of {', '.join(COSTS)}; got {cost!r}")
    mine = sorted((r for r in rows if r["method"] == method), key=lambda r: r[cost])
    out = []
    for base in sorted((r for r in rows if r["method"] == baseline), key=lambda r: r["budget"]):
        good = [r for r in mine if (r["metric"] <= base["metric"] if text else r["metric"] >= base["metric"])]
        hit = good[0] if good else None
        out.append({"budget": base["budget"], "metric": base["metric"], "baseline_cost": base[cost],
                    "method_budget": None if hit is None else hit["budget"],
                    "method_cost": None if hit is None else hit[cost],
                    "speedup": None if hit is None else base[cost] / hit[cost]})
    return out


def operating_points_table(rows: Sequence[Mapping[str, Any]], methods: Sequence[str],
                           baselines: Sequence[str], text: bool) -> list[str]:
    """Markdown: one line per hypersolver and baseline, one column per budget of the baseline;
    a cell is the solve-phase speedup at that budget's quality and the hypersolver's budget
    reaching it ("—": never)."""
    budgets = sorted({r["budget"] for r in rows})
    lines = ["| hypersolver | vs | " + " | ".join(f"@{b}" for b in budgets) + " |",
             "|---|---|" + "---|" * len(budgets)]
    for m in methods:
        for base in baselines:
            cells = {p["budget"]: "—" if p["speedup"] is None
                     else f"{p['speedup']:.2f}× (@{p['method_budget']})"
                     for p in operating_points(rows, m, base, text)}
            lines.append(f"| {m} | {base} | " + " | ".join(cells.get(b, "") for b in budgets) + " |")
    return lines


def speedup_table(table: Mapping[str, Any], text: bool) -> list[str]:
    """Markdown rows of :func:`all_speedups`'s result: one line per hypersolver and baseline with
    the target and the speedup in f evaluations, solve time and whole-pass time ("—" where the
    hypersolver never reaches the target)."""
    lines = ["| hypersolver | vs | target | NFE (classic → hyper) | solve phase | whole test pass |",
             "|---|---|---|---|---|---|"]
    by_nfe = table["nfe"]
    for name, per in by_nfe.items():
        for base, v in per.items():
            target = f"{v['target']:.1f}" if text else f"{100 * v['target']:.2f} %"
            cells = []
            for cost in COSTS:
                w = table[cost][name][base]
                if w["speedup"] is None:
                    cells.append("—")
                elif cost == "nfe":
                    cells.append(f"{w['speedup']:.2f}× ({w['baseline_cost']} → {w['method_cost']})")
                else:
                    cells.append(f"{w['speedup']:.2f}× ({w['baseline_cost']:.2f} → {w['method_cost']:.2f} s)")
            nfe, solve_phase, whole = cells[2], cells[1], cells[0]
            lines.append(f"| {name} | {base} | {target} | {nfe} | {solve_phase} | {whole} |")
    return lines


def write_plots(rows: Sequence[Mapping[str, Any]], out: Path, text: bool, title: str = "") -> list[str]:
    """``residual.png`` (mean relative residual vs NFE) and ``pareto.png`` (accuracy or
    perplexity vs seconds, of the whole test pass and of its solve phase; zoomed to the
    quality range near the best, the full numbers are in the rows) of :func:`compare`'s rows;
    [] without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    out.mkdir(parents=True, exist_ok=True)
    methods = list(dict.fromkeys(r["method"] for r in rows))

    def series(m: str, x_key: str, y_key: str) -> tuple[list[float], list[float]]:
        pts = [(r[x_key], r[y_key]) for r in sorted(rows, key=lambda r: r["budget"]) if r["method"] == m]
        scale = 100.0 if (y_key == "metric" and not text) else 1.0
        return [p[0] for p in pts], [scale * p[1] for p in pts]

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for m in methods:
        ax.plot(*series(m, "nfe", "residual"), "o-", ms=3, label=m)
    ax.set_yscale("log")
    ax.set(xlabel="NFE (f evaluations)", ylabel="mean relative residual", title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    _save_figure(fig, out / "residual.png")

    metrics = [r["metric"] for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.4), sharey=True)
    for ax, key, label in ((axes[0], "seconds", "seconds per test pass"),
                           (axes[1], "solve_seconds", "seconds of its solve phase")):
        for m in methods:
            ax.plot(*series(m, key, "metric"), "o-", ms=3, label=m)
        ax.set(xlabel=label)
        ax.grid(alpha=0.3)
    if text:
        best = min(metrics)
        axes[0].set_yscale("log")
        axes[0].set_ylim(0.97 * best, min(max(metrics), 3.0 * best) * 1.03)
        axes[0].set_ylabel("test perplexity (zoomed)")
    else:
        best = 100 * max(metrics)
        axes[0].set_ylim(max(100 * min(metrics), best - 8.0) - 0.3, best + 0.3)
        axes[0].set_ylabel("test accuracy % (zoomed)")
    axes[1].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    _save_figure(fig, out / "pareto.png")
    return [str(out / "residual.png"), str(out / "pareto.png")]


def _save_figure(fig: Any, path: Path) -> None:
    """Write ``fig`` as PNG atomically, then close it (also when the write fails)."""
    import matplotlib.pyplot as plt

    try:
        write_atomic(path, lambda fh: fig.savefig(fh, format="png", dpi=110))
    finally:
        plt.close(fig)


def save_json(path: Path, data: Any) -> None:
    """``data`` as strict JSON (non-finite numbers as ``null``), written atomically."""
    write_text(path, dumps_json(data, indent=2))
