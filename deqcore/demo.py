"""Demo: solve a real DEQ layer on real data with every solver on PyTorch and JAX.

Run ``python -m deqcore.demo --help``. The demo loads a batch of Fashion-MNIST test images (IDX
format, gzip, read from a local folder; nothing is ever downloaded), builds the layer
``f(z, x) = tanh(z W^T + x U^T + b)`` with the same NumPy-made weights on both frameworks, solves
``z* = f(z*, x)`` with every registered solver, and prints a convergence table, the cross-backend
agreement and a residual-vs-iteration summary. With matplotlib installed (``pip install -e
'.[demo]'``) it also saves a plot of the worst-sample relative residual per iteration.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from deqcore_models.data import DataError, read_idx

import deqcore
from deqcore._arrays_io import dumps_json, write_text

IMAGES = Path("fashion-mnist") / "t10k-images-idx3-ubyte.gz"
DEFAULT_DATA = Path("..") / "shared" / "data"
BACKENDS = ("torch", "jax")


# --------------------------------------------------------------------------------------- data


def default_data_dir() -> Path:
    """``$DEQCORE_DATA`` if set, else ``../shared/data`` (relative to the working directory, then to
    the repository root when deqcore is installed from a checkout)."""
    env = os.environ.get("DEQCORE_DATA", "").strip()
    if env:
        return Path(env)
    if (DEFAULT_DATA / IMAGES).exists():
        return DEFAULT_DATA
    repo_relative = Path(__file__).resolve().parents[1] / DEFAULT_DATA
    if (repo_relative / IMAGES).exists():
        return repo_relative
    return DEFAULT_DATA


def load_idx_images(path: Path, count: int | None = None) -> np.ndarray:
    """Read an IDX3 unsigned-byte image file (optionally gzip-compressed) as a ``(N, rows, cols)``
    uint8 array, keeping the first ``count`` images."""
    return read_idx(path, 3, count)


# --------------------------------------------------------------------------------------- problem


@dataclass
class Problem:
    x: np.ndarray  # (B, 784) in [0, 1]
    W: np.ndarray  # (d, d)
    U: np.ndarray  # (d, 784)
    b: np.ndarray  # (d,)
    description: str


def make_problem(images: np.ndarray, hidden: int, kind: str, rho: float, seed: int) -> Problem:
    """Weights in float64 NumPy from a fixed seed: the same numbers go to every backend."""
    rng = np.random.default_rng(seed)
    x = images.reshape(images.shape[0], -1).astype(np.float64) / 255.0
    n_in = x.shape[1]
    if kind == "gaussian":
        W = rng.standard_normal((hidden, hidden))
        W *= rho / np.linalg.norm(W, 2)
        desc = f"W Gaussian, spectral norm {rho:g}"
    elif kind == "symmetric":
        Q, _ = np.linalg.qr(rng.standard_normal((hidden, hidden)))
        W = (Q * np.linspace(-rho, rho, hidden)) @ Q.T
        desc = f"W symmetric, eigenvalues evenly spread over [-{rho:g}, {rho:g}]"
    else:
        raise ValueError(f"unknown problem {kind!r}")
    U = rng.standard_normal((hidden, n_in)) / np.sqrt(n_in)
    b = 0.1 * rng.standard_normal(hidden)
    return Problem(x, W, U, b, desc)


def reference_fixed_point(p: Problem, tol: float = 1e-12, max_iter: int = 5000) -> tuple[np.ndarray, int]:
    """``z*`` by plain float64 iteration (``||W|| < 1`` and ``|tanh'| <= 1`` make f a contraction)."""
    inj = p.x @ p.U.T + p.b
    z = np.zeros((p.x.shape[0], p.W.shape[0]))
    for k in range(1, max_iter + 1):
        fz = np.tanh(z @ p.W.T + inj)
        if np.max(np.abs(fz - z)) <= tol:
            return fz, k
        z = fz
    return z, max_iter


# --------------------------------------------------------------------------------------- backends


@dataclass
class Run:
    backend: str
    solver: str
    z: np.ndarray | None = None
    converged: int = 0
    total: int = 0
    steps: int = 0
    nfe: int = 0
    max_rel: float = float("nan")
    worst_trace: np.ndarray | None = None  # (max_iter + 1,) worst-sample relative residual
    time_ms: float = float("nan")
    first_ms: float = float("nan")
    status: str = ""
    error: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def _timed(fn: Callable[[], Any], sync: Callable[[Any], Any], repeats: int) -> tuple[Any, float, float]:
    """Run ``fn`` once (warm-up; for JAX the compile), then ``repeats`` times; best time in ms."""
    t0 = time.perf_counter()
    out = sync(fn())
    first = (time.perf_counter() - t0) * 1e3
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = sync(fn())
        best = min(best, (time.perf_counter() - t0) * 1e3)
    return out, (first if repeats == 0 else best), first


def _torch_solver(p: Problem, dtype: str, solver: str, kw: dict[str, Any]) -> tuple[Callable[[], Any], Any]:
    import torch

    tdt = getattr(torch, dtype)
    W, U, b, x = (torch.from_numpy(np.ascontiguousarray(a)).to(tdt) for a in (p.W, p.U, p.b, p.x))

    def f(z: Any, x: Any) -> Any:
        return torch.tanh(z @ W.T + x @ U.T + b)

    z0 = torch.zeros((x.shape[0], W.shape[0]), dtype=tdt)
    return (lambda: deqcore.solve(f, x, z0, solver=solver, **kw)), (lambda sol: sol)


def _jax_solver(p: Problem, dtype: str, solver: str, kw: dict[str, Any]) -> tuple[Callable[[], Any], Any]:
    import jax
    import jax.numpy as jnp

    if dtype == "float64":
        jax.config.update("jax_enable_x64", True)
    jdt = getattr(jnp, dtype)
    W, U, b, x = (jnp.asarray(a, dtype=jdt) for a in (p.W, p.U, p.b, p.x))

    @jax.jit
    def run(W: Any, U: Any, b: Any, x: Any) -> Any:
        def f(z: Any, x: Any) -> Any:
            return jnp.tanh(z @ W.T + x @ U.T + b)

        z0 = jnp.zeros((x.shape[0], W.shape[0]), dtype=jdt)
        return deqcore.solve(f, x, z0, solver=solver, **kw)

    return (lambda: run(W, U, b, x)), jax.block_until_ready


MAKERS = {"torch": _torch_solver, "jax": _jax_solver}


def solve_one(backend: str, solver: str, p: Problem, dtype: str, kw: dict[str, Any], repeats: int) -> Run:
    r = Run(backend, solver)
    try:
        call, sync = MAKERS[backend](p, dtype, solver, kw)
        sol, r.time_ms, r.first_ms = _timed(call, sync, repeats)
        be = deqcore.registry().backend(backend)

        def npy(a: Any) -> np.ndarray:
            return np.asarray(be.to_numpy(a))

        conv = npy(sol.converged)
        rel = npy(sol.rel_residual).astype(np.float64)
        r.z = npy(sol.z).astype(np.float64)
        r.converged, r.total = int(conv.sum()), int(conv.size)
        r.steps, r.nfe = int(npy(sol.steps)), int(npy(sol.nfe))
        r.max_rel = float(rel.max())
        r.worst_trace = npy(sol.rel_trace).astype(np.float64).max(axis=1)
        r.status = sol.result.name
    except Exception as exc:  # report and go on with the other solvers
        r.error = f"{type(exc).__name__}: {exc}"
        r.extra["traceback"] = traceback.format_exc()
    return r


def missing_frameworks(names: Sequence[str]) -> dict[str, str]:
    """Backends whose framework cannot be imported, with the reason."""
    out = {}
    registered = deqcore.available()["backends"]
    for name in names:
        if name not in registered:
            out[name] = "backend not registered"
        elif importlib.util.find_spec(name) is None:
            hint = "pip install 'torch==2.13.0'" if name == "torch" else f"pip install -e '.[{name}]'"
            out[name] = f"{name} is not installed ({hint})"
    return out


# --------------------------------------------------------------------------------------- report


def format_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    line = "  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))
    sep = "  ".join("-" * w for w in widths)
    body = ["  ".join(c.rjust(w) if i > 1 else c.ljust(w)
                      for i, (c, w) in enumerate(zip(r, widths, strict=True))) for r in rows]
    return "\n".join([line, sep, *body])


def first_below(trace: np.ndarray, tol: float) -> int | None:
    hits = np.flatnonzero(trace <= tol)
    return int(hits[0]) if hits.size else None


def checkpoints(max_iter: int) -> list[int]:
    pts = [0, 1, 2, 5, 10, 20, 30, 50, 100, 200, 500, 1000]
    return [k for k in pts if k < max_iter] + [max_iter]


def make_out_dir(out: Path) -> None:
    """Create the output folder; one the demo creates ignores itself in git (like .pytest_cache)."""
    if not out.exists():
        out.mkdir(parents=True)
        (out / ".gitignore").write_text("# created by python -m deqcore.demo\n*\n")


def save_plot(runs: Sequence[Run], tol: float, title: str, out: Path) -> Path | None:
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    backends = list(dict.fromkeys(r.backend for r in runs if r.worst_trace is not None))
    if not backends:
        return None
    fig, axes = plt.subplots(1, len(backends), figsize=(5.2 * len(backends), 4.6), dpi=120, sharey=True,
                             squeeze=False)
    colors = {"anderson": "tab:blue", "broyden": "tab:orange", "fixed_point": "tab:green"}
    palette = iter(["tab:red", "tab:purple", "tab:brown", "tab:pink", "tab:olive", "tab:cyan"])
    for ax, backend in zip(axes[0], backends, strict=True):
        for r in runs:
            if r.worst_trace is None or r.backend != backend:
                continue
            if r.solver not in colors:
                colors[r.solver] = next(palette, "black")
            # The trace repeats the final value once every sample is frozen: plot only the steps run.
            trace = r.worst_trace[: r.steps + 1]
            ax.semilogy(np.arange(trace.size), np.maximum(trace, 1e-300), color=colors[r.solver],
                        marker="o", markersize=3, linewidth=1.4,
                        label=f"{r.solver} ({r.steps} steps, {r.converged}/{r.total})")
        ax.axhline(tol, color="grey", linestyle=":", linewidth=1, label=f"tol {tol:g}")
        ax.set_title(backend)
        ax.set_xlabel("solver step")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    axes[0][0].set_ylabel("worst-sample relative residual ||f(z)-z|| / ||f(z)||", fontsize=9)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    make_out_dir(out)
    path = out / "residuals.png"
    fig.savefig(path)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------------------- main


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows ``(default: ...)`` except where the default is None (those helps describe it)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or isinstance(action.default, bool):
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m deqcore.demo",
        description="Solve a tanh DEQ layer f(z, x) = tanh(z W^T + x U^T + b) on a batch of Fashion-MNIST "
                    "test images with every registered solver on PyTorch and JAX (same weights on both), "
                    "and print a convergence table, the cross-backend agreement and a residual summary.",
        formatter_class=_HelpFormatter,
    )
    ap.add_argument("--data", type=Path, default=None,
                    help=f"folder holding {IMAGES} (IDX, gzip); default: $DEQCORE_DATA, else {DEFAULT_DATA}. "
                         "Nothing is downloaded.")
    ap.add_argument("--batch", type=int, default=256, help="number of test images (samples) to solve at once")
    ap.add_argument("--hidden", type=int, default=256, help="hidden size d of the DEQ state z")
    ap.add_argument("--problem", choices=("gaussian", "symmetric"), default="symmetric",
                    help="W: 'symmetric' (eigenvalues spread evenly over [-rho, rho]; slow for plain "
                         "iteration, where acceleration pays) or 'gaussian' (Gaussian scaled to spectral "
                         "norm --rho; an easy problem where all solvers take about the same steps)")
    ap.add_argument("--rho", type=float, default=0.9, help="spectral norm of W (< 1 makes f a contraction)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the NumPy generator that makes the weights")
    ap.add_argument("--tol", type=float, default=1e-4, help="stop tolerance on the relative residual")
    ap.add_argument("--max-iter", type=int, default=50, help="maximum solver steps")
    ap.add_argument("--dtype", choices=("float32", "float64"), default="float32",
                    help="floating dtype of the arrays (float64 enables jax_enable_x64)")
    ap.add_argument("--backends", default=",".join(BACKENDS),
                    help="comma-separated backends to run; one whose framework is missing is skipped")
    ap.add_argument("--solvers", default=None,
                    help="comma-separated solvers; default: all of deqcore.available()['solvers']")
    ap.add_argument("--repeats", type=int, default=3,
                    help="timed runs after one warm-up run (JAX: the compile); the best is reported")
    ap.add_argument("--out", type=Path, default=Path("demo-output"),
                    help="folder for residuals.png (needs matplotlib) and results.json")
    ap.add_argument("--no-plot", action="store_true", help="do not write the plot")
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    for name in ("batch", "hidden", "max_iter"):
        if getattr(args, name) < 1:
            print(f"error: --{name.replace('_', '-')} must be >= 1", file=sys.stderr)
            return 2
    if not args.tol > 0 or not 0 < args.rho:
        print("error: --tol and --rho must be > 0", file=sys.stderr)
        return 2
    if args.repeats < 0:
        print("error: --repeats must be >= 0", file=sys.stderr)
        return 2

    data = args.data if args.data is not None else default_data_dir()
    try:
        images = load_idx_images(data / IMAGES, args.batch)
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if images.shape[0] < args.batch:
        print(f"note: {data / IMAGES} holds only {images.shape[0]} images; using all of them")

    problem = make_problem(images, args.hidden, args.problem, args.rho, args.seed)
    solvers = ([s.strip() for s in args.solvers.split(",") if s.strip()] if args.solvers
               else deqcore.available()["solvers"])
    wanted = [b.strip() for b in args.backends.split(",") if b.strip()]
    unknown = [b for b in wanted if b not in MAKERS]
    if unknown:
        print(f"error: unknown backend(s) {unknown}; the demo knows {list(MAKERS)}", file=sys.stderr)
        return 2
    skipped = missing_frameworks(wanted)
    backends = [b for b in wanted if b not in skipped]

    B, n_in = problem.x.shape
    print(f"deqcore {deqcore.__version__} demo: tanh DEQ layer f(z, x) = tanh(z W^T + x U^T + b)")
    print(f"  data   : {data / IMAGES} -> x of shape ({B}, {n_in}), pixels scaled to [0, 1]")
    print(f"  layer  : hidden d={args.hidden}, {problem.description}, U Gaussian/sqrt({n_in}), "
          f"seed {args.seed}")
    print(f"  solve  : tol {args.tol:g} (relative residual), max_iter {args.max_iter}, {args.dtype}, "
          f"solvers {', '.join(solvers)}")
    print("  timing : best of", args.repeats, "runs after a warm-up; JAX runs the whole solve under jax.jit "
          "('first' = warm-up incl. compile)")
    for name, why in skipped.items():
        print(f"  note   : skipping backend {name}: {why}")
    if not backends:
        print("error: no backend to run (install torch and/or jax: pip install 'torch==2.13.0' -e '.[jax]')",
              file=sys.stderr)
        return 1

    t_ref = time.perf_counter()
    z_ref, ref_iters = reference_fixed_point(problem)
    t_ref = (time.perf_counter() - t_ref) * 1e3
    print(f"  check  : float64 NumPy reference z* by plain iteration ({ref_iters} iterations, "
          f"{t_ref:.0f} ms)")
    print()

    kw = {"tol": args.tol, "max_iter": args.max_iter, "stop_mode": "rel"}
    runs = [solve_one(be, s, problem, args.dtype, kw, args.repeats) for be in backends for s in solvers]

    headers = ["backend", "solver", "converged", "steps", "NFE", "max rel res", "|z - z*|max",
               "time ms", "first ms"]
    rows = []
    for r in runs:
        if r.error:
            rows.append([r.backend, r.solver, "ERROR", "-", "-", "-", "-", "-", "-"])
            continue
        assert r.z is not None
        err = float(np.abs(r.z - z_ref).max())
        rows.append([r.backend, r.solver, f"{r.converged}/{r.total}", str(r.steps), str(r.nfe),
                     f"{r.max_rel:.2e}", f"{err:.1e}", f"{r.time_ms:.1f}", f"{r.first_ms:.0f}"])
    print("Convergence (per-sample stop on the relative residual; |z - z*| vs the float64 reference)")
    print(format_table(headers, rows))
    errors = [r for r in runs if r.error]
    for r in errors:
        print(f"\n{r.backend}/{r.solver} failed: {r.error}")
        print(r.extra.get("traceback", ""), end="")

    by = {(r.backend, r.solver): r for r in runs if not r.error}
    if {"torch", "jax"} <= set(backends):
        print("\nCross-backend agreement (same weights, same data)")
        agree = []
        for s in solvers:
            a, c = by.get(("torch", s)), by.get(("jax", s))
            if a is None or c is None or a.z is None or c.z is None:
                agree.append([s, "n/a", "n/a"])
                continue
            agree.append([s, f"{np.abs(a.z - c.z).max():.2e}", f"{a.steps} / {c.steps}"])
        print(format_table(["solver", "max |z_torch - z_jax|", "steps torch / jax"], agree))

    pts = checkpoints(max((r.steps for r in runs if r.worst_trace is not None), default=args.max_iter))
    print("\nResidual vs iteration (worst sample's relative residual after k steps)")
    summary_rows = []
    for r in runs:
        if r.worst_trace is None:
            continue
        hit = first_below(r.worst_trace, args.tol)
        # After the last step every sample is frozen and the trace repeats its final value: show "-".
        summary_rows.append([r.backend, r.solver, *(f"{r.worst_trace[k]:.1e}" if k <= r.steps else "-"
                                                    for k in pts),
                             "never" if hit is None else str(hit)])
    print(format_table(["backend", "solver", *(f"k={k}" for k in pts), "all <= tol at k"], summary_rows))

    if args.problem == "gaussian":
        print("\nnote: with a Gaussian W the Jacobian's eigenvalues fill a disk around 0, where plain\n"
              "      iteration is already the best polynomial method, so Anderson and Broyden gain little\n"
              "      here; try --problem symmetric (a real spectrum up to rho) to see them accelerate.")

    out_files = []
    if not args.no_plot:
        title = (f"tanh DEQ on {B} Fashion-MNIST images, d={args.hidden}, {problem.description}, "
                 f"{args.dtype}")
        png = save_plot(runs, args.tol, title, args.out)
        if png is None:
            print("\nnote: matplotlib is not installed, no plot (pip install -e '.[demo]')")
        else:
            out_files.append(png)
    make_out_dir(args.out)
    results = {
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "data": str(data / IMAGES),
        "runs": [{"backend": r.backend, "solver": r.solver, "converged": r.converged, "total": r.total,
                  "steps": r.steps, "nfe": r.nfe, "max_rel_residual": r.max_rel, "time_ms": r.time_ms,
                  "first_ms": r.first_ms, "status": r.status, "error": r.error,
                  "max_abs_err_vs_reference": None if r.z is None else float(np.abs(r.z - z_ref).max()),
                  "worst_rel_trace": None if r.worst_trace is None else r.worst_trace[: r.steps + 1].tolist()}
                 for r in runs],
        "skipped_backends": skipped,
    }
    json_path = args.out / "results.json"
    write_text(json_path, dumps_json(results, indent=1) + "\n")
    out_files.append(json_path)
    print("\nwrote " + ", ".join(str(p) for p in out_files))
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
