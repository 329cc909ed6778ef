"""Train a small DEQ on Fashion-MNIST, then solve its trained layer with every solver on both frameworks.

Run ``python -m deqcore_models.demo --help``. The demo

1. trains MDEQ (the ``cpu`` configuration, 53K parameters) on Fashion-MNIST with the training
   loop of ``deqcore train`` (:class:`deqcore_models.train.Trainer`: progress on stderr, the run's
   files in ``--out``) and evaluates it on the full test set;
2. loads the checkpoint it wrote (checkpoints are framework-neutral) on PyTorch and on JAX and
   solves the trained equilibrium layer on test images with every solver deqcore ships, printing a
   convergence table (converged samples, steps, NFE, worst relative residual, accuracy, time) and
   the cross-backend agreement (largest ``|z_torch - z_jax|``, agreeing predictions);
3. writes ``demo.json`` (every number printed) and, with matplotlib, ``demo.png`` (the training
   curve and the worst relative residual per solver step, per solver and backend) to ``--out``.

Data come from ``--data`` or ``$DEQCORE_DATA`` and are never downloaded; ``--out`` must be empty
or missing unless ``--overwrite`` (or ``--resume``) is given, as for ``deqcore train``.
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import numpy as np

import deqcore
from deqcore.internal import dumps_json, write_atomic, write_text

from ._ops import ops_for
from .checkpoint import load_checkpoint
from .cli import UsageError, report_flags, run_command
from .data import data_dir
from .mdeq import MDEQ_CONFIGS, equilibrium_shapes, mdeq_parts
from .train import TrainConfig, Trainer, check_out_dir

PROG = "python -m deqcore_models.demo"
BACKENDS = ("torch", "jax")
#: The training recipe: that of docs/experiments/fmnist-accuracy (Broyden forward with a fixed
#: budget, the phantom gradient NPG backward, 300 unrolled pre-training steps) for one epoch, with
#: 12 forward steps instead of 18 and the learning rate 5e-3 annealed to 1e-6 within the epoch
#: (2e-3 reached 84.5 %). The flags of the demo change the run's size, not the recipe.
RECIPE: dict[str, Any] = {
    "model": "mdeq", "dataset": "fashion-mnist", "solver": "broyden", "tol": 1e-3, "max_iter": 12,
    "grad": "npg", "grad_options": {"k": 5, "lam": 0.5}, "unrolled_layers": 6,
}


class _Parser(argparse.ArgumentParser):
    """Flag mistakes become a :class:`UsageError`, which :func:`run_command` prints in one line."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see {self.prog} --help)")


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows ``(default: ...)`` except for switches and None defaults, whose help says it."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or isinstance(action.default, bool):
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    """The demo's flags."""
    ap = _Parser(prog=PROG, description=__doc__.split("\n\n")[0], formatter_class=_HelpFormatter)
    g = ap.add_argument_group("training (the loop of deqcore train)")
    g.add_argument("--data", default=None, metavar="DIR",
                   help="data folder holding fashion-mnist/ (default: $DEQCORE_DATA); never downloaded")
    g.add_argument("--backend", choices=BACKENDS, default="jax", help="framework to train on")
    g.add_argument("--config", choices=sorted(MDEQ_CONFIGS), default="cpu", help="MDEQ size")
    g.add_argument("--epochs", type=int, metavar="N", default=1, help="training epochs")
    g.add_argument("--batch-size", type=int, metavar="N", default=64, help="training batch size")
    g.add_argument("--lr", type=float, default=5e-3, help="Adam learning rate, cosine-annealed to 1e-6")
    g.add_argument("--max-steps", type=int, metavar="N", default=None,
                   help="stop training after N steps (default: all)")
    g.add_argument("--pretrain-steps", type=int, metavar="N", default=300,
                   help="first N steps run the layer unrolled (pre-training)")
    g.add_argument("--train-limit", type=int, metavar="N", default=None,
                   help="first N training images (default: all)")
    g.add_argument("--test-limit", type=int, metavar="N", default=None,
                   help="first N test images (default: all)")
    g.add_argument("--seed", type=int, metavar="N", default=0, help="seed of weights, data order and dropout")
    s = ap.add_argument_group("solving the trained layer")
    s.add_argument("--backends", default=",".join(BACKENDS), help="comma-separated frameworks to solve on")
    s.add_argument("--solvers", default=None,
                   help="comma-separated solvers, also a plugin's (default: every solver deqcore ships)")
    s.add_argument("--images", type=int, metavar="N", default=256, help="test images solved at once")
    s.add_argument("--tol", type=float, default=1e-3, help="relative residual tolerance")
    s.add_argument("--max-iter", type=int, metavar="N", default=40, help="solver steps at most")
    o = ap.add_argument_group("output")
    o.add_argument("--out", default="demo-output", metavar="DIR",
                   help="output folder, empty or missing unless --overwrite")
    o.add_argument("--overwrite", action="store_true", help="replace the run in a non-empty --out")
    o.add_argument("--resume", action="store_true", help="continue the training run in --out")
    o.add_argument("--no-plot", action="store_true", help="do not write demo.png")
    return ap


def _names(text: str, flag: str, known: Sequence[str]) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in known]
    if not names or unknown:
        raise UsageError(f"{flag} must list some of {', '.join(known)}, got {text!r}")
    return list(dict.fromkeys(names))


def check_args(args: argparse.Namespace) -> tuple[list[str], list[str]]:
    """The backends and solvers to solve with; a bad flag is a :class:`UsageError` (the
    training flags are checked by :class:`TrainConfig`)."""
    if args.images < 1:
        raise UsageError(f"--images must be >= 1, got {args.images}")
    if args.max_iter < 1:
        raise UsageError(f"--max-iter must be >= 1, got {args.max_iter}")
    if not 0 < args.tol < 1:
        raise UsageError(f"--tol must be in (0, 1), got {args.tol}")
    if args.resume and args.overwrite:
        raise UsageError("--resume continues the run in --out, --overwrite replaces it: pass one of them")
    backends = _names(args.backends, "--backends", BACKENDS)
    missing = [b for b in dict.fromkeys([args.backend, *backends]) if importlib.util.find_spec(b) is None]
    if missing:
        raise UsageError(f"{' and '.join(missing)} not installed: install it (pip install 'torch==2.13.0' "
                         f"-e '.[jax,demo]' installs both) or leave it out of --backend/--backends")
    registered = deqcore.available()["solvers"]
    if args.solvers:
        return backends, _names(args.solvers, "--solvers", registered)
    return backends, [n for n in registered if deqcore.registry().get("solvers", n).plugin == "deqcore"]


def train_config(args: argparse.Namespace) -> TrainConfig:
    """The :class:`TrainConfig` of the demo's run: :data:`RECIPE` sized by the flags."""
    return TrainConfig(**RECIPE, backend=args.backend, config=args.config, data=str(data_dir(args.data)),
                       pretrain_steps=args.pretrain_steps, epochs=args.epochs, max_steps=args.max_steps,
                       batch_size=args.batch_size, lr=args.lr, train_limit=args.train_limit,
                       test_limit=args.test_limit, seed=args.seed, out=args.out, checkpoint_every=10**9)


def first_test_images(work: Any, count: int) -> tuple[np.ndarray, np.ndarray, int]:
    """The first ``count`` test images of a workload with their labels, and the test set's size."""
    xs, ys, total = [], [], 0
    for x, onehot, n in work.eval_batches():
        xs.append(x)
        ys.append(np.asarray(onehot).argmax(axis=1))
        total += n
    return np.concatenate(xs)[:count], np.concatenate(ys)[:count], total


@dataclass
class Run:
    """One solve of the trained layer: per-sample state, predictions and the solve's statistics."""

    backend: str
    solver: str
    z: np.ndarray  # (B, state size), the branches flattened and concatenated
    pred: np.ndarray
    converged: int
    steps: int
    nfe: int
    max_rel: float
    worst_trace: np.ndarray  # (steps + 1,) the worst sample's relative residual per step
    accuracy: float
    time_ms: float
    compile_ms: float

    def record(self) -> dict[str, Any]:
        """The numbers of the run (demo.json), without the per-sample arrays."""
        return {"backend": self.backend, "solver": self.solver, "converged": self.converged,
                "steps": self.steps, "nfe": self.nfe, "max_rel_residual": self.max_rel,
                "accuracy": self.accuracy, "time_ms": self.time_ms, "compile_ms": self.compile_ms,
                "worst_rel_trace": self.worst_trace.tolist()}


def _solver_call(backend: str, model: Any, params: dict[str, np.ndarray],
                 state: dict[str, np.ndarray], x: np.ndarray,
                 kw: dict[str, Any]) -> tuple[Callable[[], tuple[Any, Any]], float]:
    """A call that solves the layer on ``x`` and returns ``(solution, logits)``, and the seconds
    spent compiling it: eager on torch (0), one compiled function on JAX (weights passed as
    arguments, not closed over)."""
    ops = ops_for(backend)
    P, S = ({k: ops.asarray(v) for k, v in d.items()} for d in (params, state))
    xb = ops.asarray(x)

    def run(P: Any, S: Any, xb: Any) -> tuple[Any, Any]:
        parts = mdeq_parts(ops, model, P, S)
        inj = parts.inject(xb)
        z0 = tuple(ops.xp.zeros(s, dtype=inj.dtype) for s in equilibrium_shapes(model, xb.shape))
        sol = deqcore.solve(parts.layer, inj, z0, backend=backend, grad=None, **kw)
        return sol, parts.head(sol.z)

    if backend == "jax":
        import jax

        t0 = time.perf_counter()
        compiled = jax.jit(run).lower(P, S, xb).compile()
        return (lambda: jax.block_until_ready(compiled(P, S, xb))), time.perf_counter() - t0
    import torch

    def eager() -> tuple[Any, Any]:
        with torch.no_grad():
            return run(P, S, xb)

    return eager, 0.0


def solve_trained(backend: str, solver: str, model: Any, params: dict[str, np.ndarray],
                  state: dict[str, np.ndarray], x: np.ndarray, y: np.ndarray, tol: float,
                  max_iter: int) -> Run:
    """Solve the trained layer on ``x`` with ``solver`` on ``backend`` (JAX: compiled first)."""
    options = {"solver": solver, "tol": tol, "max_iter": max_iter, "stop_mode": "rel"}
    call, compile_seconds = _solver_call(backend, model, params, state, x, options)
    t0 = time.perf_counter()
    sol, logits = call()
    seconds = time.perf_counter() - t0
    be = deqcore.registry().backend(backend)

    def npy(a: Any) -> np.ndarray:
        return np.asarray(be.to_numpy(a))

    steps = int(npy(sol.steps))
    z = np.concatenate([npy(a).reshape(len(x), -1) for a in sol.z], axis=1).astype(np.float64)
    pred = npy(logits).argmax(axis=1)
    return Run(backend, solver, z, pred, int(npy(sol.converged).sum()), steps, int(npy(sol.nfe)),
               float(npy(sol.rel_residual).max()),
               npy(sol.rel_trace).astype(np.float64).max(axis=1)[: steps + 1],
               float((pred == y).mean()), 1e3 * seconds, 1e3 * compile_seconds)


def format_table(headers: Sequence[str], rows: Sequence[Sequence[str]], left: int = 2) -> str:
    """A plain-text table, the first ``left`` columns left-aligned and the others right-aligned."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    lines = [[h.ljust(w) for h, w in zip(headers, widths, strict=True)], ["-" * w for w in widths]]
    lines += [[c.ljust(w) if i < left else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))]
              for r in rows]
    return "\n".join("  ".join(line) for line in lines)


def agreement(runs: Sequence[Run]) -> list[dict[str, Any]]:
    """Per solver solved on both frameworks: the largest ``|z_torch - z_jax|`` (also relative to
    the largest ``|z|``) and the fraction of images with the same predicted class."""
    by = {(r.backend, r.solver): r for r in runs}
    out = []
    for solver in dict.fromkeys(r.solver for r in runs):
        a, b = by.get(("torch", solver)), by.get(("jax", solver))
        if a is None or b is None:
            continue
        diff = float(np.abs(a.z - b.z).max())
        out.append({"solver": solver, "max_abs_diff": diff, "max_rel_diff": diff / float(np.abs(a.z).max()),
                    "same_prediction": float((a.pred == b.pred).mean()), "steps": [a.steps, b.steps]})
    return out


def print_report(runs: Sequence[Run], agree: Sequence[dict[str, Any]]) -> None:
    headers = ["backend", "solver", "converged", "steps", "NFE", "max rel res", "accuracy", "time ms",
               "compile ms"]
    print(format_table(headers, [
        [r.backend, r.solver, f"{r.converged}/{r.z.shape[0]}", str(r.steps), str(r.nfe), f"{r.max_rel:.2e}",
         f"{100 * r.accuracy:.2f} %", f"{r.time_ms:.0f}", f"{r.compile_ms:.0f}" if r.compile_ms else "-"]
        for r in runs]))
    if agree:
        print("\ncross-backend agreement (the same checkpoint on torch and jax, float32)")
        print(format_table(
            ["solver", "max |z_torch - z_jax|", "relative to max |z|", "same prediction", "steps torch/jax"],
            [[a["solver"], f"{a['max_abs_diff']:.2e}", f"{a['max_rel_diff']:.2e}",
              f"{100 * a['same_prediction']:.2f} %", "{}/{}".format(*a["steps"])] for a in agree], left=1))


def save_plot(out: Path, runs: Sequence[Run], tol: float, title: str) -> Path | None:
    """demo.png: the training curve (steps.csv, epochs.csv) beside the worst relative residual per
    solver step of every run; None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    with open(out / "steps.csv", newline="") as fh:
        steps = list(csv.DictReader(fh))
    with open(out / "epochs.csv", newline="") as fh:
        epochs = list(csv.DictReader(fh))
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.4))
    left.plot([int(r["step"]) for r in steps], [float(r["loss"]) for r in steps], lw=0.7, label="train loss")
    left.set(xlabel="training step", ylabel="loss (batch)", title="training")
    acc = left.twinx()
    acc.plot([int(r["step"]) for r in epochs], [100 * float(r["test_acc"]) for r in epochs], "o",
             color="tab:red", label="test accuracy")
    for row in epochs:
        percent = 100 * float(row["test_acc"])
        acc.annotate(f"{percent:.2f} %", (int(row["step"]), percent), textcoords="offset points",
                     xytext=(-8, 6), ha="right", fontsize=8, color="tab:red")
    acc.set_ylabel("test accuracy %")
    left.legend(loc="upper right", fontsize=8)
    acc.legend(loc="upper center", fontsize=8)
    palette = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    colors = dict(zip(dict.fromkeys(r.solver for r in runs), palette, strict=False))
    for r in runs:
        torch_run = r.backend == "torch"
        right.semilogy(np.arange(r.worst_trace.size), np.maximum(r.worst_trace, 1e-12),
                       color=colors.get(r.solver, "black"), linestyle="-" if torch_run else "--",
                       marker="o" if torch_run else "", markersize=2.5, lw=1.2,
                       label=f"{r.solver} / {r.backend} ({r.steps} steps)")
    right.axhline(tol, color="grey", linestyle=":", lw=1, label=f"tol {tol:g}")
    right.set(xlabel="solver step", ylabel="worst relative residual", title="solving the trained layer")
    right.grid(True, which="both", alpha=0.3)
    right.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path = out / "demo.png"
    try:
        write_atomic(path, lambda fh: fig.savefig(fh, format="png", dpi=110))
    finally:
        plt.close(fig)
    return path


def demo(args: argparse.Namespace) -> int:
    """Train, solve with every solver on every framework, report; the exit status."""
    backends, solvers = check_args(args)
    cfg = train_config(args)
    check_out_dir(cfg.out, resume=args.resume, overwrite=args.overwrite)
    out = Path(cfg.out)
    print(f"deqcore {deqcore.__version__} demo: train MDEQ ({cfg.config}) on Fashion-MNIST with "
          f"{cfg.backend}, then solve the trained layer with {', '.join(solvers)} on {', '.join(backends)}",
          flush=True)
    trainer = Trainer(cfg)
    print(f"training: {trainer.work.describe()}, {trainer.total_steps} steps of batch {cfg.batch_size} "
          f"({cfg.pretrain_steps} unrolled), forward {cfg.solver} <= {cfg.max_iter} steps, backward "
          f"{cfg.grad}", flush=True)
    t0 = time.perf_counter()
    summary = trainer.run(resume=args.resume, overwrite=args.overwrite)
    wall = time.perf_counter() - t0
    if report_flags({"flags": summary.get("flags", [])}):  # non-finite test metrics: nothing to solve
        return 1
    test_acc = summary["final"]["test_acc"]
    train_seconds = sum(e["train_seconds"] for e in summary["epochs"])
    x, y, total = first_test_images(trainer.work, args.images)
    print(f"trained in {wall / 60:.1f} min ({train_seconds / 60:.1f} min of training steps): test "
          f"accuracy {100 * test_acc:.2f} % on {total} test images", flush=True)

    checkpoint = out / "checkpoint.npz"
    ck = load_checkpoint(checkpoint)
    print(f"\nsolving the trained layer ({checkpoint}) on {len(y)} test images from z = 0: stop at "
          f"relative residual {args.tol:g}, at most {args.max_iter} steps (JAX: compiled with jax.jit "
          f"first)", flush=True)
    runs = [solve_trained(b, s, trainer.model_cfg, ck.params, ck.state, x, y, args.tol, args.max_iter)
            for b in backends for s in solvers]
    agree = agreement(runs)
    print_report(runs, agree)
    results = {
        "train": {"config": summary["config"], "test_acc": test_acc, "train_seconds": train_seconds,
                  "wall_seconds": wall, "epochs": summary["epochs"]},
        "solve": {"images": len(y), "tol": args.tol, "max_iter": args.max_iter,
                  "runs": [r.record() for r in runs]},
        "agreement": agree}
    written = [out / "demo.json"]
    write_text(written[0], dumps_json(results, indent=1) + "\n")
    if not args.no_plot:
        title = f"MDEQ ({cfg.config}) on Fashion-MNIST, trained on {cfg.backend}: test accuracy " \
                f"{100 * test_acc:.2f} %"
        png = save_plot(out, runs, args.tol, title)
        if png is None:
            print("\nnote: matplotlib is not installed, no plot (pip install 'deqcore[demo]')")
        else:
            written.append(png)
    print("\nwrote " + ", ".join(str(p) for p in written) + f" (and the training run's files in {out})")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the demo with ``argv`` (default ``sys.argv[1:]``); the exit status (2: a bad flag, data
    or output folder, in one ``error:`` line)."""
    return run_command(PROG, lambda: demo(build_parser().parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
