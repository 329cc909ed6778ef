"""HyperDEQ on trained models: fit a hypersolver to a training run's frozen checkpoint, and compare
it with classic solvers on held-out data at equal budgets.

    model = load_frozen("runs/mdeq")                      # the run's checkpoint and data
    hs = make_hypersolver(model, iterations=6)
    hs, history = fit(model, hs, steps=300)
    rows = compare(model, {"anderson": "anderson", "hyper": hs}, budgets=[2, 4, 8])

Used by ``deqcore hypersolver train|eval`` and ``python -m deqcore_models.experiments hyperdeq``.
The model runs in evaluation mode (BatchNorm running statistics, no dropout) on either backend,
whatever backend trained it (checkpoints are framework-neutral).
"""

from __future__ import annotations

import csv
import json
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

import deqcore
from deqcore.hypersolvers import HyperAnderson, Hypersolver, load_hypersolver, train_hypersolver

from ._hyper import MDEQCompression, MDEQInitialiser, TransformerCompression, TransformerInitialiser
from ._ops import ops_for
from ._workloads import make_workload
from .checkpoint import load_checkpoint
from .mdeq import equilibrium_shapes, mdeq_parts
from .train import TrainConfig, _read_csv
from .transformer import transformer_parts


@dataclass
class FrozenModel:
    """A trained run's model, frozen, split around its equilibrium layer on one backend.

    ``inject(x)``, ``layer(z, inj)`` and ``head(z)`` as in :func:`deqcore_models.mdeq.mdeq_parts`;
    ``zeros(inj)`` the classic start; ``compression`` and ``initialiser(hidden)`` the
    model-specific hypersolver pieces; ``parameters`` the model's parameter count (and
    ``layer_parameters`` without the embedding/stem/head); ``train_seconds`` the run's DEQ
    training time (summed over its epochs, from ``epochs.csv``)."""

    run: Path
    backend: str
    cfg: TrainConfig
    work: Any
    ops: Any
    inject: Callable[[Any], Any]
    layer: Callable[[Any, Any], Any]
    head: Callable[[Any], Any]
    zeros: Callable[[Any], Any]
    compression: Any
    initialiser: Callable[[int], Any]
    parameters: int
    layer_parameters: int
    train_seconds: float
    step: int

    @property
    def text(self) -> bool:
        return bool(self.work.text)

    @property
    def default_hidden(self) -> int:
        """Initialiser channels by default: 4 for MDEQ (so the hypersolver stays under 4 % of the
        53K-parameter ``cpu`` model), 16 for the DEQ-Transformer."""
        return 16 if self.text else 4


def load_frozen(run: str | Path, backend: str | None = None, data: str | None = None,
                test_limit: int | None = None) -> FrozenModel:
    """The model of ``run/checkpoint.npz`` with the run's data (``data`` overrides the folder;
    ``test_limit`` the number of test images or tokens; default the run's)."""
    run = Path(run)
    ck = load_checkpoint(run / "checkpoint.npz")
    saved = dict(ck.meta["train_config"])
    if data is not None:
        saved["data"] = data
    if test_limit is not None:
        saved["test_limit"] = test_limit
    saved["backend"] = backend or saved["backend"]
    saved["out"] = str(run)
    cfg = TrainConfig(**saved)
    work = make_workload(cfg)
    ops = ops_for(cfg.backend)
    P = {k: ops.asarray(v) for k, v in ck.params.items()}
    S = {k: ops.asarray(v) for k, v in ck.state.items()}
    pieces = _text_pieces if work.text else _image_pieces
    parts, zeros, compression, initialiser, prefix = pieces(ops, work.model_cfg, P, S)
    epochs = _read_csv(run / "epochs.csv")
    train_seconds = float(sum(float(r["train_seconds"]) for r in epochs)) if epochs else math.nan
    count = int(sum(np.asarray(v).size for v in ck.params.values()))
    layer_count = int(sum(np.asarray(v).size for k, v in ck.params.items() if k.startswith(prefix)))
    return FrozenModel(run, cfg.backend, cfg, work, ops, parts.inject, parts.layer, parts.head, zeros,
                       compression, initialiser, count, layer_count, train_seconds, int(ck.meta["step"]))


def _text_pieces(ops: Any, mc: Any, P: dict[str, Any], S: dict[str, Any]) -> tuple[Any, ...]:
    xp = ops.xp

    def zeros(u: Any) -> Any:
        return xp.zeros((*u.shape[:2], mc.d_model), dtype=u.dtype)

    def initialiser(hidden: int) -> Any:
        return TransformerInitialiser(3 * mc.d_model, mc.d_model, hidden)

    return (transformer_parts(ops, mc, P, mc.tgt_len), zeros, TransformerCompression(mc.d_model), initialiser,
            "deq.")


def _image_pieces(ops: Any, mc: Any, P: dict[str, Any], S: dict[str, Any]) -> tuple[Any, ...]:
    xp = ops.xp

    def zeros(inj: Any) -> Any:
        scale = 2 ** mc.downsample
        shape = (inj.shape[0], 1, inj.shape[2] * scale, inj.shape[3] * scale)
        return tuple(xp.zeros(s, dtype=inj.dtype) for s in equilibrium_shapes(mc, shape))

    def initialiser(hidden: int) -> Any:
        return MDEQInitialiser(mc.channels[0], mc.channels, hidden)

    return mdeq_parts(ops, mc, P, S), zeros, MDEQCompression(mc.channels), initialiser, "deq."


def make_hypersolver(model: FrozenModel, *, iterations: int = 6, memory: int = 5, width: int = 16,
                     hidden: int | None = 8, prior: str = "anderson", normalisation: str = "shift",
                     seed: int = 0) -> HyperAnderson:
    """A fresh hypersolver for ``model``: the model's compression, its initialiser with ``hidden``
    channels (None: no initialiser, the zero start), a temporal-conv mixer of ``width``."""
    init = None if hidden is None else model.initialiser(hidden)
    return HyperAnderson(model.compression, init, iterations=iterations, memory=memory, width=width,
                         prior=prior, normalisation=normalisation, seed=seed)


def load_for(model: FrozenModel, path: str | Path) -> HyperAnderson:
    """Hypersolver weights saved for ``model`` (the saved initialiser's width is read back)."""
    from deqcore._arrays_io import load_arrays

    _, meta = load_arrays(path)
    init_cfg = meta.get("config", {}).get("initialiser")
    init = None if init_cfg is None else model.initialiser(int(init_cfg["hidden"]))
    return load_hypersolver(path, model.compression, init)


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
    ``options``). Unless ``options`` say otherwise, targets come from Broyden at 60 steps,
    relative tolerance 1e-5, and Adam's learning rate is 1e-2 (on the Fashion-MNIST MDEQ, 1e-3
    barely moved L_conv in 300 steps)."""
    opts = {"target_max_iter": 60, "target_tol": 1e-5, "lr": 1e-2, **options}
    return train_hypersolver(hs, model.layer, training_inputs(model, batch_size, seed), steps=steps,
                             backend=model.backend, start=model.zeros, progress=progress, **opts)


def training_cost(model: FrozenModel, hs: HyperAnderson,
                  history: Sequence[Mapping[str, float]]) -> dict[str, Any]:
    """The issue's cost figures of a trained hypersolver: parameters (and their share of the
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
    """``train_hypersolver``'s per-step records as CSV."""
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(history[0]))
        writer.writeheader()
        writer.writerows(history)


def _test_batches(model: FrozenModel) -> list[tuple[Any, np.ndarray]]:
    out = []
    for x, y, _ in model.work.eval_batches():
        if model.text and x.shape[1] != model.work.model_cfg.tgt_len:
            continue  # the stream's short last segment: the parts are built for one length
        out.append((model.ops.asarray(x), np.asarray(y)))
    return out


def _method(model: FrozenModel, spec: str | Hypersolver, budget: int) -> Callable[[Any], tuple[Any, ...]]:
    """``x -> (per-item scores, rel residual (B,), nfe)``: scores are class logits, or
    per-token log-likelihood terms for text. Compiled on JAX."""
    be = deqcore.registry().backend(model.backend)
    xp = model.ops.xp
    name, start = (spec, None) if not isinstance(spec, tuple) else spec

    def run(x: Any) -> tuple[Any, Any, Any]:
        inj = model.inject(x)
        if isinstance(name, Hypersolver) and getattr(name, "initialiser", None) is not None:
            z0 = None  # the hypersolver's own initialiser
        elif start is not None:
            z0 = start.initial_state(be, inj, inj)
        else:
            z0 = model.zeros(inj)
        sol = deqcore.solve(model.layer, inj, z0, backend=model.backend, solver=name, max_iter=budget,
                            tol=1e-30, grad=None)
        logits = model.head(sol.z)
        if model.text:
            m = xp.max(logits, axis=-1, keepdims=True)
            logits = logits - m - xp.log(xp.sum(xp.exp(logits - m), axis=-1, keepdims=True))
        return logits, sol.rel_residual, sol.nfe

    return be.jit(run)


def compare(model: FrozenModel, methods: Mapping[str, Any], budgets: Sequence[int],
            progress: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """Every method at every budget on the model's test set: one row each with ``method``,
    ``budget`` (solver steps; NFE = budget + 1), ``metric`` (test accuracy, or perplexity for
    text), ``loss``, ``residual`` (mean relative residual) and ``seconds`` (wall time of the
    whole test pass, inject + solve + head, after a warm-up batch that compiles on JAX).

    A method is a classic solver name, a hypersolver, or ``(solver name, hypersolver)``: that
    solver started from the hypersolver's initialiser. Every solve runs exactly ``budget`` steps
    (no early stop)."""
    batches = _test_batches(model)
    if not batches:
        raise ValueError("the test set is empty (or shorter than one segment)")
    rows = []
    for label, spec in methods.items():
        for budget in budgets:
            fn = _method(model, spec, int(budget))
            deqcore.registry().backend(model.backend).to_numpy(fn(batches[0][0])[1])  # warm-up / compile
            loss = correct = count = res = 0.0
            t0 = time.perf_counter()
            for x, y in batches:
                scores, rel, _ = fn(x)
                s = model.ops.to_numpy(scores).astype(np.float64)
                r = model.ops.to_numpy(rel).astype(np.float64)
                if model.text:
                    picked = np.take_along_axis(s, y[..., None].astype(np.int64), axis=-1)[..., 0]
                    loss -= float(picked.sum())
                    correct += float((s.argmax(-1) == y).sum())
                    count += y.size
                else:
                    labels = y.argmax(-1)
                    m = s.max(-1, keepdims=True)
                    logp = s - m - np.log(np.exp(s - m).sum(-1, keepdims=True))
                    loss -= float(logp[np.arange(len(labels)), labels].sum())
                    correct += float((s.argmax(-1) == labels).sum())
                    count += len(labels)
                res += float(r.sum())
            seconds = time.perf_counter() - t0
            items = sum(x.shape[0] for x, _ in batches)
            row = {"method": label, "budget": int(budget), "nfe": int(budget) + 1, "items": int(count),
                   "loss": loss / count,
                   "accuracy": correct / count, "residual": res / items, "seconds": seconds}
            row["metric"] = math.exp(min(row["loss"], 700.0)) if model.text else row["accuracy"]
            rows.append(row)
            if progress is not None:
                progress(f"{label} @ {budget}: {'ppl' if model.text else 'acc'} "
                         f"{row['metric'] if model.text else 100 * row['metric']:.2f}"
                         f"{'' if model.text else ' %'}, residual {row['residual']:.3e}, {seconds:.1f} s")
    return rows


def speedups(rows: Sequence[Mapping[str, Any]], method: str, baselines: Sequence[str], text: bool,
             slack: float | None = None) -> dict[str, Any]:
    """Time ratios at equal quality. For each baseline the target is its best quality over the
    budgets, loosened by ``slack`` (default 0.5 accuracy points, or 2 % of the perplexity) so that
    test-set noise between neighbouring budgets does not decide it: the baseline's fastest run
    reaching the target, divided by ``method``'s. Returns ``{baseline: {"target",
    "baseline_seconds", "method_seconds", "speedup"}}``; ``speedup`` is None when the method never
    reaches the target."""
    slack = (0.02 if text else 0.005) if slack is None else slack

    def reaches(value: float, target: float) -> bool:
        return value <= target if text else value >= target

    out: dict[str, Any] = {}
    mine = sorted((r for r in rows if r["method"] == method), key=lambda r: r["seconds"])
    for base in baselines:
        theirs = sorted((r for r in rows if r["method"] == base), key=lambda r: r["seconds"])
        if not theirs or not mine:
            continue
        if text:
            target = min(r["metric"] for r in theirs) * (1 + slack)
        else:
            target = max(r["metric"] for r in theirs) - slack
        t_base = next(r["seconds"] for r in theirs if reaches(r["metric"], target))
        hit = next((r for r in mine if reaches(r["metric"], target)), None)
        out[base] = {"target": target, "baseline_seconds": t_base,
                     "method_seconds": None if hit is None else hit["seconds"],
                     "speedup": None if hit is None else t_base / hit["seconds"]}
    return out


def write_plots(rows: Sequence[Mapping[str, Any]], out: Path, text: bool, title: str = "") -> list[str]:
    """``residual.png`` (mean relative residual vs NFE) and ``pareto.png`` (accuracy or
    perplexity vs test-pass seconds) of :func:`compare`'s rows; [] without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    out.mkdir(parents=True, exist_ok=True)
    methods = list(dict.fromkeys(r["method"] for r in rows))
    written = []
    for name, x_key, y_key, ylabel, logy in (
            ("residual.png", "nfe", "residual", "mean relative residual", True),
            ("pareto.png", "seconds", "metric", "test perplexity" if text else "test accuracy", text)):
        fig, ax = plt.subplots(figsize=(6.4, 4.4))
        for m in methods:
            pts = sorted((r[x_key], r[y_key]) for r in rows if r["method"] == m)
            ys = [100 * y if (y_key == "metric" and not text) else y for _, y in pts]
            ax.plot([p[0] for p in pts], ys, "o-", ms=3, label=m)
        if logy:
            ax.set_yscale("log")
        ax.set(xlabel="NFE (f evaluations)" if x_key == "nfe" else "seconds per test pass",
               ylabel=ylabel + (" %" if (y_key == "metric" and not text) else ""), title=title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        written.append(str(out / name))
    return written


def save_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    tmp.replace(path)
