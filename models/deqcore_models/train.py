"""Training and evaluation of DEQ models (MDEQ classifiers, DEQ-Transformer language models) on
either backend, with checkpoints and resume.

One loop for both frameworks: batches, dropout masks and the learning-rate schedule come from
NumPy with seeds derived from ``(seed, epoch)`` and ``(seed, step)``, so the same command on
PyTorch and JAX sees the same data in the same order, and a run resumed from a checkpoint
continues exactly where the killed one stopped. Outputs in ``out_dir``: ``steps.csv`` (one row per
step), ``epochs.csv``, ``summary.json``, ``checkpoint.npz`` (latest; ``--resume`` continues from
it) and PNG plots (``curves.png``, ``residuals.png``) when matplotlib is installed.
"""

from __future__ import annotations

import csv
import json
import math
import os
import signal
import sys
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

import deqcore

from ._deq import DEQSettings
from ._engines import make_engine
from ._progress import Progress
from ._workloads import MODELS, make_workload
from .checkpoint import Checkpoint, CheckpointError, check_schema, load_checkpoint, save_checkpoint

DATASETS = tuple(name for _, sets in MODELS.values() for name in sets)
#: The implicit backward's default: the MDEQ papers' budget of 20 backward steps (b_thres of the
#: LARGE configurations), not a tolerance. On these models the adjoint equation is not solved to
#: a small tolerance in any affordable budget (the Fashion-MNIST MDEQ's 20-step backward missed
#: it on every training step of the GDEQ experiment, docs/models.md), so the unmet tolerance is
#: not warned about every step: steps.csv records the residual the backward reached
#: (``bwd_residual``). Options given with ``--grad-option`` override these.
IMPLICIT_BACKWARD: dict[str, Any] = {"max_iter": 20, "on_fail": "ignore"}
#: Fault injection for resume tests: the process SIGKILLs itself right after this step is logged.
KILL_ENV = "DEQCORE_FAULT_KILL_AT_STEP"


@dataclass
class TrainConfig:
    """Everything a training run depends on (saved in every checkpoint and in summary.json)."""

    backend: str = "torch"
    model: str = "mdeq"
    config: str = "cpu"
    dataset: str = "fashion-mnist"
    data: str | None = None
    train_limit: int | None = None
    test_limit: int | None = None
    solver: str = "broyden"
    tol: float = 1e-3
    max_iter: int = 18
    solver_options: dict[str, Any] = field(default_factory=dict)
    grad: str = "implicit"
    grad_options: dict[str, Any] = field(default_factory=dict)
    pretrain_steps: int = 0
    unrolled_layers: int = 6
    jac_weight: float = 0.0
    jac_freq: float = 1.0
    softmax_chunk: int | None = None
    epochs: int = 1
    max_steps: int | None = None
    batch_size: int = 64
    lr: float = 1e-3
    min_lr: float = 1e-6
    weight_decay: float = 0.0
    clip_norm: float | None = None
    seed: int = 0
    out: str = "runs/mdeq"
    checkpoint_every: int = 100
    eval_batch_size: int | None = None
    cosine_every: int = 0
    cosine_reference: dict[str, Any] = field(default_factory=lambda: {"max_iter": 40})

    def __post_init__(self) -> None:
        if self.model not in MODELS:
            raise ValueError(f"unknown model {self.model!r}; available: {sorted(MODELS)}")
        configs, datasets = MODELS[self.model]
        if self.config not in configs:
            raise ValueError(f"unknown {self.model} config {self.config!r}; available: {sorted(configs)}")
        if self.dataset not in datasets:
            raise ValueError(f"model {self.model} trains on {list(datasets)}, not {self.dataset!r}")
        if self.eval_batch_size is not None and self.eval_batch_size <= 0:
            raise ValueError(f"eval_batch_size must be positive, got {self.eval_batch_size}")
        if self.cosine_every < 0:
            raise ValueError(f"cosine_every must be >= 0, got {self.cosine_every}")
        for name in ("epochs", "batch_size", "checkpoint_every", "max_iter",
                     "unrolled_layers"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if not self.jac_weight >= 0:
            raise ValueError(f"jac_weight must be >= 0, got {self.jac_weight}")
        if not 0 < self.jac_freq <= 1:
            raise ValueError(f"jac_freq is the probability of a penalised step, in (0, 1]; "
                             f"got {self.jac_freq}")
        if self.softmax_chunk is not None:
            if self.model != "transformer":
                raise ValueError(f"softmax_chunk is an option of the transformer's output layer; model "
                                 f"{self.model} has none")
            if self.softmax_chunk < 0:
                raise ValueError(f"softmax_chunk must be >= 0 (0: the whole softmax at once), got "
                                 f"{self.softmax_chunk}")
        if self.clip_norm is not None and not self.clip_norm > 0:
            raise ValueError(f"clip_norm must be positive (or None: no clipping), got {self.clip_norm}")
        if self.pretrain_steps < 0:
            raise ValueError(f"pretrain_steps must be >= 0, got {self.pretrain_steps}")
        if self.lr <= 0 or self.min_lr < 0 or self.min_lr > self.lr:
            raise ValueError(f"need 0 <= min_lr <= lr and lr > 0, got lr={self.lr}, min_lr={self.min_lr}")

    def grad_options_used(self) -> dict[str, Any]:
        """The gradient mode's options: the trainer's defaults for the mode, then ``grad_options``."""
        defaults = IMPLICIT_BACKWARD if self.grad == "implicit" else {}
        return {**defaults, **self.grad_options}

    def deq_settings(self) -> DEQSettings:
        return DEQSettings(solver=self.solver, tol=self.tol, max_iter=self.max_iter,
                           solver_options=dict(self.solver_options), grad=self.grad,
                           grad_options=self.grad_options_used(), jac_weight=self.jac_weight)

    def pretrain_settings(self) -> DEQSettings:
        return DEQSettings(unrolled=self.unrolled_layers, jac_weight=self.jac_weight)

    def reference_settings(self) -> DEQSettings:
        """The implicit gradient the cosine probe compares against (same forward solve)."""
        return DEQSettings(solver=self.solver, tol=self.tol, max_iter=self.max_iter,
                           solver_options=dict(self.solver_options), grad="implicit",
                           grad_options=dict(self.cosine_reference))

    def eval_settings(self) -> DEQSettings:
        return DEQSettings(solver=self.solver, tol=self.tol, max_iter=self.max_iter,
                           solver_options=dict(self.solver_options), grad=None)


def cosine_lr(step: int, total: int, base: float, minimum: float) -> float:
    """Cosine annealing stepped per iteration from ``base`` to ``minimum`` over ``total`` steps."""
    t = min(step, total) / max(total, 1)
    return minimum + (base - minimum) * 0.5 * (1.0 + math.cos(math.pi * t))


class Trainer:
    """Runs a :class:`TrainConfig`; :meth:`run` trains (resuming if asked) and returns the summary."""

    def __init__(self, cfg: TrainConfig, *, progress: bool = True) -> None:
        self.cfg = cfg
        self.progress = progress
        self.out = Path(cfg.out)
        self.work = make_workload(cfg)
        self.model_cfg = self.work.model_cfg
        self.params0, self.state0 = self.work.params0, self.work.state0
        self.task = self.work.task
        self.engine = make_engine(cfg.backend, self.task, self.params0, self.state0, cfg.weight_decay,
                                  cfg.clip_norm)
        self.steps_per_epoch = self.work.steps_per_epoch
        self.total_steps = cfg.epochs * self.steps_per_epoch
        if cfg.max_steps is not None:
            self.total_steps = min(self.total_steps, cfg.max_steps)

    # ------------------------------------------------------------------ checkpoints
    def _meta(self, step: int, epoch_acc: dict[str, float], history: list[dict]) -> dict[str, Any]:
        return {"model": self.cfg.model, "config": self.cfg.config, "train_config": asdict(self.cfg),
                "step": step, "epoch_acc": epoch_acc, "history": history,
                "model_config": asdict(self.model_cfg)}

    def save(self, step: int, epoch_acc: dict[str, float], history: list[dict]) -> Path:
        params, state, extra = self.engine.export()
        return save_checkpoint(self.out / "checkpoint.npz",
                               Checkpoint(self._meta(step, epoch_acc, history), params, state, extra))

    def restore(self) -> tuple[int, dict[str, float], list[dict]]:
        ck = load_checkpoint(self.out / "checkpoint.npz")
        check_schema(self.params0, ck.params, "parameters", str(self.out / "checkpoint.npz"))
        check_schema(self.state0, ck.state, "buffers", str(self.out / "checkpoint.npz"))
        saved = ck.meta.get("train_config", {})
        # the run must be the same run: every setting but the stopping point and the backend
        free = {"epochs", "max_steps", "backend", "checkpoint_every", "data", "out"}
        mine = asdict(self.cfg)
        defaults = asdict(TrainConfig(model=self.cfg.model, config=self.cfg.config, dataset=self.cfg.dataset))
        saved = {k: saved.get(k, defaults[k]) for k in mine}  # settings newer than the checkpoint
        diff = {k: (saved[k], mine[k]) for k in mine if k not in free and saved[k] != mine[k]}
        if diff:
            raise CheckpointError("--resume: the checkpoint was written by a run with other settings: "
                                  + ", ".join(f"{k} {a!r} there vs {b!r} now" for k, (a, b) in diff.items()))
        self.engine.load(ck.params, ck.state, ck.extra)
        return int(ck.meta["step"]), dict(ck.meta.get("epoch_acc", {})), list(ck.meta.get("history", []))

    def _probe_cosine(self, step: int, x: np.ndarray, y: np.ndarray, masks: Any) -> None:
        """Append the cosine between this run's gradient and the implicit one (same batch, same
        masks, same weights) to ``cosine.csv``."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", deqcore.BackwardWarning)
            mine = self.engine.gradients(x, y, masks, self.cfg.deq_settings())
            ref = self.engine.gradients(x, y, masks, self.cfg.reference_settings())
        path = self.out / "cosine.csv"
        _truncate_csv(path, step - 1)  # rows a killed run wrote at or after this step
        new = not path.exists()
        with open(path, "a", newline="") as fh:
            w = csv.writer(fh)
            if new:
                w.writerow(["step", "cosine"])
            w.writerow([step, f"{_cosine(mine, ref):.6f}"])

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, settings: DEQSettings | None = None) -> dict[str, float]:
        """Test loss, accuracy (of images, or of next tokens), mean NFE per batch and the worst
        residual; ``test_ppl`` (perplexity) too for language models. A language model's memory
        runs along the test stream from empty."""
        settings = settings or self.cfg.eval_settings()
        state = self.work.eval_state(self.engine.state)
        loss = correct = count = nfe = 0.0
        worst, nb = 0.0, 0
        for x, y, n in self.work.eval_batches():
            r = self.engine.evaluate(x, y, settings, state=state)
            if state is not None:
                state = r["state"]
            loss += r["loss"] * n
            correct += r["correct"]
            count += n
            nfe += r["nfe"]
            worst = max(worst, r["residual"])
            nb += 1
        out = {"test_loss": loss / count, "test_acc": correct / count, "test_nfe": nfe / nb,
               "test_residual": worst}
        if self.work.text:
            out["test_ppl"] = math.exp(min(out["test_loss"], 700.0))
        return out

    # ------------------------------------------------------------------ training
    def run(self, resume: bool = False) -> dict[str, Any]:
        cfg = self.cfg
        self.out.mkdir(parents=True, exist_ok=True)
        start_step, epoch_acc, history = 0, dict[str, float](), list[dict[str, Any]]()
        if resume:
            start_step, epoch_acc, history = self.restore()
        steps_csv = self.out / "steps.csv"
        _truncate_csv(steps_csv, start_step)
        fields = ["step", "epoch", "phase", "loss", "acc", "nfe", "residual", "jac", "bwd_residual",
                  "bwd_unconverged", "lr", "seconds"]
        kill_at = int(os.environ[KILL_ENV]) if os.environ.get(KILL_ENV) else None
        new_file = not steps_csv.exists()
        if not new_file:  # a run resumed: keep the columns its file was started with
            with open(steps_csv, newline="") as fh:
                fields = next(csv.reader(fh), fields)
        bar = Progress(self.total_steps, f"{cfg.backend}/{cfg.grad}") if self.progress else None
        step = start_step
        with open(steps_csv, "a", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=fields, extrasaction="ignore")
            if new_file:
                writer.writeheader()
            while step < self.total_steps:
                epoch, pos = divmod(step, self.steps_per_epoch)
                if pos == 0:
                    epoch_acc = {"loss": 0.0, "correct": 0.0, "count": 0.0, "seconds": 0.0, "nfe": 0.0}
                fresh = self.work.fresh_state(step)
                if fresh is not None:
                    self.engine.set_state(fresh)
                batch = self.work.train_batch(step)
                pre = step < cfg.pretrain_steps
                settings = cfg.pretrain_settings() if pre else cfg.deq_settings()
                lr = cosine_lr(step, self.total_steps, cfg.lr, cfg.min_lr)
                if cfg.cosine_every and not pre and step % cfg.cosine_every == 0:
                    self._probe_cosine(step, batch.x, batch.y, batch.masks)
                t0 = time.perf_counter()
                # an unconverged implicit backward warns every step: count it in the CSV instead
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always", deqcore.BackwardWarning)
                    r = self.engine.train_step(batch.x, batch.y, batch.masks, settings, lr, batch.probe)
                dt = time.perf_counter() - t0
                for w in caught:
                    if not issubclass(w.category, deqcore.BackwardWarning):
                        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
                bwd_bad = sum(issubclass(w.category, deqcore.BackwardWarning) for w in caught)
                if not math.isfinite(r["loss"]):
                    raise FloatingPointError(f"step {step}: loss is {r['loss']}; the last good state is in "
                                             f"{self.out / 'checkpoint.npz'} (resume with a lower --lr)")
                step += 1
                for key, val in (("loss", r["loss"] * batch.count), ("correct", r["correct"]),
                                 ("count", batch.count), ("seconds", dt), ("nfe", r["nfe"])):
                    epoch_acc[key] = epoch_acc.get(key, 0.0) + val
                writer.writerow({"step": step, "epoch": epoch + 1, "phase": "pretrain" if pre else "deq",
                                 "loss": f"{r['loss']:.6f}", "acc": f"{r['correct'] / batch.count:.4f}",
                                 "nfe": r["nfe"], "residual": f"{r['residual']:.4e}",
                                 "jac": "" if batch.probe is None else f"{r['jac']:.4e}",
                                 "bwd_residual": _blank_nan(r.get("bwd_residual", float("nan"))),
                                 "bwd_unconverged": bwd_bad, "lr": f"{lr:.3e}", "seconds": f"{dt:.4f}"})
                if kill_at is not None and step == kill_at:
                    fh.flush()
                    os.kill(os.getpid(), signal.SIGKILL)
                if bar:
                    shown = {"ep": f"{epoch + 1}/{cfg.epochs}", "loss": f"{r['loss']:.3f}"}
                    if self.work.text:
                        shown["ppl"] = f"{math.exp(min(r['loss'], 700.0)):.1f}"
                    shown.update({"acc": f"{100 * r['correct'] / batch.count:.1f}%", "nfe": str(r["nfe"]),
                                  "res": f"{r['residual']:.1e}"})
                    if batch.probe is not None:
                        shown["jac"] = f"{r['jac']:.2e}"
                    bar.update(step, shown)
                end_of_epoch = step % self.steps_per_epoch == 0 or step == self.total_steps
                if end_of_epoch:
                    row = {"epoch": epoch + 1, "step": step,
                           "train_loss": epoch_acc["loss"] / epoch_acc["count"],
                           "train_acc": epoch_acc["correct"] / epoch_acc["count"],
                           "train_nfe": epoch_acc["nfe"] / max(pos + 1, 1),
                           "train_seconds": epoch_acc["seconds"], **self.evaluate()}
                    history.append(row)
                    _write_epochs(self.out / "epochs.csv", history)
                if end_of_epoch or step % cfg.checkpoint_every == 0:
                    fh.flush()
                    self.save(step, epoch_acc, history)
                    if bar is None:  # --no-progress: one line per checkpoint, so a long run shows life
                        print(f"step {step}/{self.total_steps} epoch {epoch + 1}: loss {r['loss']:.4f}, "
                              f"nfe {r['nfe']}, {dt:.3f} s/step; checkpoint saved", file=sys.stderr,
                              flush=True)
        if bar:
            bar.close()
        summary = {"config": asdict(cfg), "steps": step, "epochs": history,
                   "final": history[-1] if history else None,
                   "parameters": int(sum(v.size for v in self.params0.values()))}
        (self.out / "summary.json").write_text(json.dumps(summary, indent=2))
        summary["plots"] = write_plots(self.out)
        return summary


def _blank_nan(v: float) -> str:
    return f"{v:.4e}" if math.isfinite(v) else ""


def _cosine(a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray]) -> float:
    dot = sum(float(np.vdot(a[k].astype(np.float64), b[k])) for k in a)
    na = math.sqrt(sum(float(np.vdot(a[k].astype(np.float64), a[k])) for k in a))
    nb = math.sqrt(sum(float(np.vdot(b[k].astype(np.float64), b[k])) for k in b))
    return dot / (na * nb) if na > 0 and nb > 0 else float("nan")


def _truncate_csv(path: Path, step: int) -> None:
    """Drop rows after ``step`` (written by a run killed after its last checkpoint)."""
    if not path.exists():
        return
    with open(path, newline="") as fh:
        rows = list(csv.reader(fh))
    if not rows:
        return
    kept = [rows[0]] + [r for r in rows[1:] if r and int(r[0]) <= step]
    with open(path, "w", newline="") as fh:
        csv.writer(fh).writerows(kept)


def _write_epochs(path: Path, history: Sequence[Mapping[str, Any]]) -> None:
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(history[0]))
        writer.writeheader()
        writer.writerows(history)


def write_plots(out: Path) -> list[str]:
    """curves.png (loss/accuracy per step and per epoch, NFE and residual per step) from the
    CSVs in ``out``; returns the files written ([] without matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        warnings.warn("matplotlib is not installed: no plots written (pip install 'deqcore[demo]'); "
                      "the CSV files hold the same data", stacklevel=2)
        return []
    steps = _read_csv(out / "steps.csv")
    epochs = _read_csv(out / "epochs.csv")
    if not steps:
        return []
    s = np.array([float(r["step"]) for r in steps])
    fig, ax = plt.subplots(2, 2, figsize=(10, 7))
    ax[0, 0].plot(s, [float(r["loss"]) for r in steps], lw=0.8, label="train (batch)")
    if epochs:
        ax[0, 0].plot([float(r["step"]) for r in epochs], [float(r["test_loss"]) for r in epochs], "o-",
                      label="test")
    ax[0, 0].set(title="loss", xlabel="step")
    ax[0, 0].legend()
    ax[0, 1].plot(s, [100 * float(r["acc"]) for r in steps], lw=0.8, label="train (batch)")
    if epochs:
        ax[0, 1].plot([float(r["step"]) for r in epochs], [100 * float(r["test_acc"]) for r in epochs], "o-",
                      label="test")
    ax[0, 1].set(title="accuracy %", xlabel="step")
    ax[0, 1].legend()
    ax[1, 0].plot(s, [float(r["nfe"]) for r in steps], lw=0.8)
    ax[1, 0].set(title="forward NFE", xlabel="step")
    def positive(values):
        return [v if v > 0 and math.isfinite(v) else np.nan for v in values]

    ax[1, 1].semilogy(s, positive([float(r["residual"]) for r in steps]), lw=0.8, label="forward")
    backward = [float(r["bwd_residual"]) if r.get("bwd_residual") else np.nan for r in steps]
    if not all(np.isnan(backward)):
        ax[1, 1].semilogy(s, positive(backward), lw=0.8, label="implicit backward")
        ax[1, 1].legend()
    ax[1, 1].set(title="worst relative residual (DEQ steps)", xlabel="step")
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=110)
    plt.close(fig)
    return [str(out / "curves.png")]


def _read_csv(path: Path) -> list[dict[str, str]]:
    if not path.exists():
        return []
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))
