"""Forward-solve benchmark: deqcore against TorchDEQ (torch) and jaxopt / optimistix (JAX), and
every method against the time of its own f-evaluations.

Problems (weights drawn once in NumPy float64 from a fixed seed, rounded to ``--dtype`` and shared
by every method and framework):

* ``gaussian``, ``symmetric``: a dense tanh layer ``f(z, x) = tanh(z W^T + x U^T + b)`` with W a
  Gaussian matrix scaled to spectral norm 0.9, or ``Q diag(linspace(-0.9, 0.9, d)) Q^T``;
  ``--dense`` sets the (state size d, batch B) pairs, default 256x256 and 1024x64.
* ``conv``: a small convolutional layer ``f(z, x) = tanh(conv3x3(z, K) + x + b)`` on a
  (B, C, H, W) feature map (``--conv``, default 64x16x14x14), the kernel scaled so that the
  convolution (zero padding) has operator norm 0.9. torch runs it NCHW, JAX NHWC (the layout
  XLA:CPU convolves fastest).

x = s * standard normal and b = 0.1 * s * standard normal with s = ``--injection`` (default 0.1:
tanh stays near-linear, the Jacobian's spectrum is W's, and plain iteration needs ~50 steps on the
symmetric problem, where acceleration matters).

Stop criterion: every sample's relative residual ``||f(z) - z|| / (||f(z)|| + 1e-9) <= 1e-4``,
at most 50 iterations. This script judges every method itself: the returned z is pushed through
f in float64 NumPy and the worst sample's relative residual is printed; a method counts as
converged when it is <= 1e-4 * 1.01 (the slack absorbs float32 rounding of the residual).

Methods:

* deqcore's ``fixed_point``, ``anderson`` and ``broyden`` with default options, on torch eager,
  on torch with ``compile=True`` (library ``deqcore-compiled``) and on JAX under ``jax.jit``.
* TorchDEQ (``torchdeq.solver``): ``stop_mode='rel'``, ``tol=1e-4``, ``max_iter=50``; Anderson with
  ``m=5, lam=1e-4, tau=1``, Broyden keeping all pairs, no line search. Its stop test is the batch
  maximum of the per-sample residual, so it iterates every sample until the worst one is done.
* jaxopt ``FixedPointIteration``/``AndersonAcceleration`` (history 5) and optimistix
  ``FixedPointIteration``: their tolerance is absolute on the whole batch's L2 norm, so it is
  calibrated on this data (the loosest of 16, 8, 4, 2, 1 times ``1e-4 * min_i ||z*_i||`` that still
  reaches the per-sample criterion; this favours the anchors) and shown in the note column.

The floor of a method is NFE evaluations of the f it runs, timed right after it: torch eager, a
Python chain of eager calls; torch compiled, a chain of ``torch.compile(f)`` calls; JAX, a jitted
``lax.fori_loop`` chaining f (XLA hoists the loop-invariant ``x U^T`` there exactly as inside a
solver's loop). ``t/floor`` is the solve's time over its floor's: 1.0 is a solver that costs
nothing but f.

Timing: every method is warmed up (compiled) first; then ``--repeats`` rounds run over all methods
of a problem and framework, round-robin with a rotating start, each turn timing the solve and
then its floor. Times are medians, minima shown too. torch runs ``--torch-threads`` intra-op
threads (default 1); JAX its defaults.

Goals printed at the end (see docs/benchmarks.md): 1. every deqcore solver within 1.3x of its
floor (1.15x at d=1024); 2. Broyden's time per evaluation within 1.2x Anderson's; 3. the fastest
deqcore solver at most 0.5x TorchDEQ's fastest and 0.8x the fastest of jaxopt/optimistix, on the
symmetric problem at d=1024 and on the convolutional layer.

Run:  python benchmarks/bench_solvers.py [--repeats 7] [--dtype float32] [--problems symmetric,conv]
      python benchmarks/bench_solvers.py --quick          (smoke run: d=256 dense and conv, 3 repeats)
The anchors need ``torchdeq`` (torch) and ``jaxopt``, ``optimistix`` (JAX): a missing one stops the
script at the start, with the command that installs it.
Results go to ``--json`` (default benchmarks/results/solvers.json); an existing file is kept
unless ``--overwrite`` is given. The documentation's blocks generated from that file
(docs/benchmarks.md) are rendered again (``render_docs.py``).
"""

from __future__ import annotations

import argparse
import functools
import gc
import importlib.util
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from deqcore.internal import dumps_json, write_text

TOL = 1e-4
MAX_ITER = 50
RHO = 0.9
SEED = 0
JUDGE_SLACK = 0.01
CALIBRATION_FACTORS = (16.0, 8.0, 4.0, 2.0, 1.0)
PROBLEMS = ("gaussian", "symmetric", "conv")
DEQCORE_SOLVERS = ("fixed_point", "anderson", "broyden")


# ----------------------------------------------------------------------------------------------
# Problems, reference and judge (NumPy, float64)
# ----------------------------------------------------------------------------------------------


def conv_numpy(z: np.ndarray, K: np.ndarray) -> np.ndarray:
    """3x3 convolution with zero padding, NCHW, float64: ``out[b, o] = sum_c K[o, c] * z[b, c]``."""
    pad = np.pad(z, ((0, 0), (0, 0), (1, 1), (1, 1)))
    win = np.lib.stride_tricks.sliding_window_view(pad, (3, 3), axis=(2, 3))  # (B, C, H, W, 3, 3)
    return np.einsum("bchwij,ocij->bohw", win, K, optimize=True)


def conv_operator_norm(K: np.ndarray, h: int, w: int, iters: int = 200) -> float:
    """Spectral norm of the zero-padded convolution on (C, h, w), by power iteration."""
    flipped = np.ascontiguousarray(K.transpose(1, 0, 2, 3)[:, :, ::-1, ::-1])  # the adjoint's kernel
    v = np.random.default_rng(1).standard_normal((1, K.shape[1], h, w))
    for _ in range(iters):
        v = conv_numpy(conv_numpy(v, K), flipped)
        v /= np.linalg.norm(v)
    return float(np.sqrt(np.linalg.norm(conv_numpy(conv_numpy(v, K), flipped))))


@dataclass
class BenchLayer:
    kind: str
    label: str  # e.g. "d=1024 B=64" or "C=16 14x14 B=64"
    batch: int
    n: int  # state size per sample
    arrays: dict
    injection: float
    extra: dict = field(default_factory=dict)

    def f_numpy(self, z: np.ndarray) -> np.ndarray:
        a = self.arrays
        if self.kind == "conv":
            return np.tanh(conv_numpy(z, a["K"]) + a["x"] + a["b"][None, :, None, None])
        return np.tanh(z @ a["W"].T + a["x"] @ a["U"].T + a["b"])

    def judge(self, z) -> np.ndarray:
        """Per-sample relative residual of ``z`` (torch NCHW or JAX NHWC arrays), in float64."""
        z = np.asarray(z.detach().cpu().numpy() if hasattr(z, "detach") else z, dtype=np.float64)
        if self.kind == "conv" and z.shape[1] != self.arrays["x"].shape[1]:
            z = z.transpose(0, 3, 1, 2)  # NHWC -> NCHW
        fz = self.f_numpy(z)
        axes = tuple(range(1, z.ndim))
        return np.sqrt(((fz - z) ** 2).sum(axes)) / (np.sqrt((fz ** 2).sum(axes)) + 1e-9)

    def torch_layer(self, dtype: str = "float32", device: str = "cpu"):
        """``(f, x)`` on torch: ``f(z, x)`` NCHW for the conv layer, ``(B, d)`` for dense ones."""
        import torch
        import torch.nn.functional as F

        a = {k: torch.tensor(v, dtype=getattr(torch, dtype), device=device) for k, v in self.arrays.items()}
        x = a["x"]
        if self.kind == "conv":
            K, b = a["K"], a["b"][None, :, None, None]
            return (lambda z, x: torch.tanh(F.conv2d(z, K, padding=1) + x + b)), x
        Wt, Ut, b = a["W"].T.contiguous(), a["U"].T.contiguous(), a["b"]
        return (lambda z, x: torch.tanh(z @ Wt + x @ Ut + b)), x

    def reference(self) -> np.ndarray:
        z = np.zeros_like(self.arrays["x"])
        for _ in range(3000):
            fz = self.f_numpy(z)
            if self.judge(fz).max() < 1e-12:
                return fz
            z = fz
        return z


def make_problem(kind: str, shape: tuple[int, ...], dtype: str, injection: float) -> BenchLayer:
    rnd = lambda a: np.ascontiguousarray(np.asarray(a).astype(dtype).astype(np.float64))  # noqa: E731
    if kind == "conv":
        B, C, H, W_ = shape
        rng = np.random.default_rng([SEED, C, H, 7])
        K = rng.standard_normal((C, C, 3, 3))
        K *= RHO / conv_operator_norm(K, H, W_)
        arrays = {"K": rnd(K), "x": rnd(injection * rng.standard_normal((B, C, H, W_))),
                  "b": rnd(0.1 * injection * rng.standard_normal(C))}
        return BenchLayer(kind, f"C={C} {H}x{W_} B={B}", B, C * H * W_, arrays, injection)
    d, B = shape
    rng = np.random.default_rng([SEED, d, PROBLEMS.index(kind)])
    if kind == "gaussian":
        W = rng.standard_normal((d, d))
        W = RHO * W / np.linalg.norm(W, 2)
    else:
        Q, _ = np.linalg.qr(rng.standard_normal((d, d)))
        W = (Q * np.linspace(-RHO, RHO, d)) @ Q.T
    arrays = {"W": rnd(W), "U": rnd(rng.standard_normal((d, d)) / np.sqrt(d)),
              "b": rnd(0.1 * injection * rng.standard_normal(d)),
              "x": rnd(injection * rng.standard_normal((B, d)))}
    return BenchLayer(kind, f"d={d} B={B}", B, d, arrays, injection, {"d": d})


#: The anchor libraries per framework, by import name (also the name pip installs).
ANCHOR_PACKAGES = {"torch": ("torchdeq",), "jax": ("jaxopt", "optimistix")}


def require_packages(script: str, packages: Iterable[str], alternative: str = "") -> None:
    """Exit, before any work, with a message naming every package of ``packages`` that is not
    installed and how to install it (``alternative``: another way out, e.g. a flag)."""
    missing = [name for name in dict.fromkeys(packages) if importlib.util.find_spec(name) is None]
    if missing:
        raise SystemExit(f"{script}: the anchor package{'s' if len(missing) > 1 else ''} "
                         f"{', '.join(missing)} {'are' if len(missing) > 1 else 'is'} not installed; "
                         f"pip install {' '.join(missing)}{alternative}")


def converged(worst: float) -> bool:
    return bool(np.isfinite(worst) and worst <= TOL * (1.0 + JUDGE_SLACK))


# ----------------------------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------------------------


class Case:
    """One method on one problem, already warmed up: ``call`` solves, ``floor`` runs NFE f's."""

    def __init__(self, backend, p, method, library, steps, nfe, worst, call, floor, note=""):
        self.meta = (backend, p, method, library, steps, nfe, worst, note)
        self.call, self.floor = call, floor
        self.ts: list[float] = []
        self.tb: list[float] = []


def time_round_robin(cases: list[Case], repeats: int) -> None:
    """Time every case ``repeats`` times, one round over all cases at a time, rotating the start:
    a burst of outside load then hits all methods of a problem alike."""
    gc_was = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        for r in range(repeats):
            k = r % len(cases)
            for case in cases[k:] + cases[:k]:
                t0 = time.perf_counter()
                case.call()
                t1 = time.perf_counter()
                case.floor()
                t2 = time.perf_counter()
                case.ts.append(t1 - t0)
                case.tb.append(t2 - t1)
    finally:
        if gc_was:
            gc.enable()


def wait_idle(max_wait: float, threshold: float = 0.85) -> float | None:
    """Wait (up to ``max_wait`` s) until the CPUs are >= ``threshold`` idle; return the idle share."""
    if max_wait <= 0 or not os.path.exists("/proc/stat"):
        return None

    def snap():
        with open("/proc/stat") as fh:
            v = [int(a) for a in fh.readline().split()[1:]]
        return sum(v), v[3] + v[4]

    deadline = time.monotonic() + max_wait
    while True:
        t0, i0 = snap()
        time.sleep(0.5)
        t1, i1 = snap()
        idle = (i1 - i0) / max(t1 - t0, 1)
        if idle >= threshold or time.monotonic() >= deadline:
            return idle


def row(case: Case) -> dict:
    backend, p, method, library, steps, nfe, worst, note = case.meta
    t, b = statistics.median(case.ts), statistics.median(case.tb)
    tmin, bmin = min(case.ts), min(case.tb)
    return {
        "backend": backend, "problem": p.kind, "config": p.label, "d": p.extra.get("d"),
        "batch": p.batch, "n": p.n, "method": method, "library": library, "steps": int(steps),
        "nfe": int(nfe), "worst_rel": float(worst), "converged": converged(worst),
        "time_ms": 1e3 * t, "floor_ms": 1e3 * b, "ratio_floor": t / b if b > 0 else float("nan"),
        "min_ms": 1e3 * tmin, "floor_min_ms": 1e3 * bmin,
        "ratio_floor_min": tmin / bmin if bmin > 0 else float("nan"),
        "per_eval_ms": 1e3 * t / max(int(nfe), 1),
        "times_ms": [1e3 * v for v in case.ts], "floor_times_ms": [1e3 * v for v in case.tb],
        "note": note,
    }


# ----------------------------------------------------------------------------------------------
# torch
# ----------------------------------------------------------------------------------------------


def torch_cases(p: BenchLayer, dtype: str, compiled: bool) -> list[Case]:
    import torch

    import deqcore

    f, x = p.torch_layer(dtype)

    def chain(fn):
        def make(n):
            def run():
                with torch.no_grad():
                    z = torch.zeros_like(x)
                    for _ in range(n):
                        z = fn(z, x)
                return z
            run()
            return run
        return make

    eager_floor = chain(f)
    compiled_floor = chain(torch.compile(f, dynamic=False)) if compiled else None

    cases = []
    paths = [("deqcore", False, eager_floor)]
    if compiled:
        paths.append(("deqcore-compiled", True, compiled_floor))
    for library, comp, floor in paths:
        for s in DEQCORE_SOLVERS:
            call = functools.partial(deqcore.solve, f, x, solver=s, tol=TOL, max_iter=MAX_ITER,
                                     stop_mode="rel", grad=None, compile=comp)
            sol = call()
            nfe, steps = int(sol.nfe), int(sol.steps)
            worst = float(p.judge(sol.z).max())
            cases.append(Case("torch", p, s, library, steps, nfe, worst, call, floor(nfe)))

    for name, nfe, z_star, call in torchdeq_runs(f, x):
        # TorchDEQ's fixed-point iteration evaluates f once per step (no separate f(z0));
        # Anderson and Broyden spend one evaluation on z0, as deqcore does.
        steps = nfe if name == "fixed_point_iter" else nfe - 1
        cases.append(Case("torch", p, name, "torchdeq", steps, nfe, float(p.judge(z_star).max()), call,
                          eager_floor(nfe), note="stop: batch max of per-sample rel"))
    return cases


#: TorchDEQ's solvers as the anchors run them: Anderson with deqcore's memory 5 and its lam, Broyden
#: keeping every pair, no line search.
TORCHDEQ = {"fixed_point_iter": {}, "anderson": {"m": 5, "lam": 1e-4, "tau": 1.0},
            "broyden": {"LBFGS_thres": None, "ls": False}}


def torchdeq_runs(f, x, sync=lambda: None):
    """``(name, nfe, z_star, call)`` per TorchDEQ solver on ``f(., x)``, each run once (and its
    evaluations counted); ``call()`` solves again (then ``sync()``, for an accelerator)."""
    import torch
    from torchdeq.solver import get_solver

    runs = []
    for name, kw in TORCHDEQ.items():
        solver = get_solver(name)
        counter = [0]

        def counted(z, counter=counter):
            counter[0] += 1
            return f(z, x)

        def call(solver=solver, kw=kw):
            with torch.no_grad():
                out = solver(lambda z: f(z, x), torch.zeros_like(x), max_iter=MAX_ITER, tol=TOL,
                             stop_mode="rel", **kw)
            sync()
            return out

        with torch.no_grad():
            z_star, _, _ = solver(counted, torch.zeros_like(x), max_iter=MAX_ITER, tol=TOL,
                                  stop_mode="rel", **kw)
        call()
        runs.append((name, counter[0], z_star, call))
    return runs


# ----------------------------------------------------------------------------------------------
# JAX
# ----------------------------------------------------------------------------------------------


def jax_cases(p: BenchLayer, dtype: str) -> list[Case]:
    import jax
    import jax.numpy as jnp
    import jaxopt
    import optimistix as optx

    import deqcore

    jdt = jnp.dtype(dtype)
    if p.kind == "conv":
        params = (jnp.asarray(p.arrays["K"].transpose(2, 3, 1, 0), dtype=jdt),  # OIHW -> HWIO
                  jnp.asarray(p.arrays["b"], dtype=jdt))
        x = jnp.asarray(p.arrays["x"].transpose(0, 2, 3, 1), dtype=jdt)  # NCHW -> NHWC

        def f(prm, z, x):
            K, b = prm
            conv = jax.lax.conv_general_dilated(z, K, (1, 1), "SAME",
                                                dimension_numbers=("NHWC", "HWIO", "NHWC"))
            return jnp.tanh(conv + x + b)
    else:
        params = (jnp.asarray(p.arrays["W"].T, dtype=jdt), jnp.asarray(p.arrays["U"].T, dtype=jdt),
                  jnp.asarray(p.arrays["b"], dtype=jdt))
        x = jnp.asarray(p.arrays["x"], dtype=jdt)

        def f(prm, z, x):
            Wt, Ut, b = prm
            return jnp.tanh(z @ Wt + x @ Ut + b)

    @functools.partial(jax.jit, static_argnums=0)
    def floor_loop(n, prm, x):
        return jax.lax.fori_loop(0, n, lambda i, z: f(prm, z, x), jnp.zeros_like(x))

    def floor(n):
        floor_loop(n, params, x).block_until_ready()  # compile
        return lambda: floor_loop(n, params, x).block_until_ready()

    cases = []
    for s in DEQCORE_SOLVERS:
        solve = jax.jit(lambda prm, x, s=s: deqcore.solve(
            lambda z, x: f(prm, z, x), x, solver=s, tol=TOL, max_iter=MAX_ITER, stop_mode="rel",
            grad=None))
        sol = jax.block_until_ready(solve(params, x))
        nfe, steps = int(sol.nfe), int(sol.steps)
        worst = float(p.judge(sol.z).max())
        call = lambda solve=solve: jax.block_until_ready(solve(params, x))  # noqa: E731
        cases.append(Case("jax", p, s, "deqcore", steps, nfe, worst, call, floor(nfe)))

    # Anchors with an absolute whole-batch tolerance, calibrated (see the module docstring).
    zref = p.reference()
    axes = tuple(range(1, zref.ndim))
    t0 = TOL * float(np.min(np.sqrt((zref ** 2).sum(axes))))

    def jaxopt_fp(prm, x, tol):
        solver = jaxopt.FixedPointIteration(fixed_point_fun=lambda z, prm, x: f(prm, z, x),
                                            maxiter=MAX_ITER, tol=tol)
        z, state = solver.run(jnp.zeros_like(x), prm, x)
        return z, state.iter_num, state.num_fun_eval

    def jaxopt_aa(prm, x, tol):
        solver = jaxopt.AndersonAcceleration(fixed_point_fun=lambda z, prm, x: f(prm, z, x),
                                             history_size=5, maxiter=MAX_ITER, tol=tol)
        z, state = solver.run(jnp.zeros_like(x), prm, x)
        # init_state evaluates f(z0) only for its (unused) aux output and counts it in
        # num_fun_eval; the iterations do one f each, so NFE = iterations.
        return z, state.iter_num, state.iter_num

    def optx_fp(prm, x, tol):
        solver = optx.FixedPointIteration(rtol=0.0, atol=tol, norm=optx.two_norm)
        sol = optx.fixed_point(lambda z, args: f(args[0], z, args[1]), solver, jnp.zeros_like(x),
                               args=(prm, x), max_steps=MAX_ITER, throw=False)
        n = sol.stats["num_steps"]
        return sol.value, n, n

    for name, lib, fn in (("FixedPointIteration", "jaxopt", jaxopt_fp),
                          ("AndersonAcceleration", "jaxopt", jaxopt_aa),
                          ("FixedPointIteration", "optimistix", optx_fp)):
        solve = jax.jit(fn)
        chosen = None
        for fac in CALIBRATION_FACTORS:
            tol = jnp.asarray(t0 * fac, dtype=jdt)
            z, steps, nfe = jax.block_until_ready(solve(params, x, tol))
            worst = float(p.judge(z).max())
            chosen = (fac, tol, int(steps), int(nfe), worst)
            if converged(worst):
                break
        fac, tol, steps, nfe, worst = chosen
        call = lambda solve=solve, tol=tol: jax.block_until_ready(solve(params, x, tol))  # noqa: E731
        cases.append(Case("jax", p, name, lib, steps, nfe, worst, call, floor(max(nfe, 1)),
                          note=f"tol={float(tol):.2e} ({fac:g}x t0) whole-batch L2 abs"))
    return cases


# ----------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------

HEADER = (f"{'problem':<9} {'config':<16} {'backend':<6} {'library':<16} {'method':<20} {'iters':>5} "
          f"{'NFE':>4} {'worst rel':>9} {'conv':<4} {'time ms':>8} {'min ms':>8} {'floor ms':>8} "
          f"{'t/floor':>7} {'(min)':>6} {'ms/eval':>7} {'vs anchor':>9}  note")


def fmt_row(r: dict) -> str:
    va = r.get("vs_anchor")
    va_s = f"{va:9.2f}" if va is not None and math.isfinite(va) else f"{'-':>9}"
    return (f"{r['problem']:<9} {r['config']:<16} {r['backend']:<6} {r['library']:<16} {r['method']:<20} "
            f"{r['steps']:>5} {r['nfe']:>4} {r['worst_rel']:9.2e} {'yes' if r['converged'] else 'NO':<4} "
            f"{r['time_ms']:8.2f} {r['min_ms']:8.2f} {r['floor_ms']:8.2f} {r['ratio_floor']:7.2f} "
            f"{r['ratio_floor_min']:6.2f} {r['per_eval_ms']:7.3f} {va_s}  {r['note']}")


def print_grouped(rows: list[dict], fmt, keys: tuple[str, ...] = ("problem", "config", "backend")) -> None:
    """``fmt(row)`` per row, a blank line wherever the values of ``keys`` change."""
    last = None
    for r in rows:
        key = tuple(r[k] for k in keys)
        if last is not None and key != last:
            print()
        last = key
        print(fmt(r))


def _group(rows, *keys):
    out: dict = {}
    for r in rows:
        out.setdefault(tuple(r[k] for k in keys), []).append(r)
    return out


def annotate_anchor(rows: list[dict]) -> None:
    """``vs_anchor``: time over the fastest converged anchor of the same backend and problem."""
    for rs in _group(rows, "problem", "config", "backend").values():
        conv = [r for r in rs if r["library"] not in ("deqcore", "deqcore-compiled") and r["converged"]]
        best = min(conv, key=lambda r: r["time_ms"]) if conv else None
        for r in rs:
            r["vs_anchor"] = r["time_ms"] / best["time_ms"] if best else None


def goals(rows: list[dict]) -> list[dict]:
    out = []
    ours = ("deqcore", "deqcore-compiled")
    for r in rows:
        if r["library"] not in ours:
            continue
        limit = 1.15 if r["d"] == 1024 else 1.3
        ok = r["converged"] and r["ratio_floor"] <= limit
        out.append({"goal": "1", "pass": ok, "ratio": r["ratio_floor"], **_where(r), "line": (
            f"[{'PASS' if ok else 'FAIL'}] goal 1 ({r['backend']} {r['library']}, {r['problem']} "
            f"{r['config']}, {r['method']}): {r['time_ms']:.2f} ms vs {r['nfe']} f {r['floor_ms']:.2f} ms"
            f" = {r['ratio_floor']:.3f}x (limit {limit}x; on min times {r['ratio_floor_min']:.2f}x)")})
    for (kind, config, be, lib), rs in _group(rows, "problem", "config", "backend", "library").items():
        if lib not in ours:
            continue
        by = {r["method"]: r for r in rs}
        if "broyden" in by and "anderson" in by:
            ratio = by["broyden"]["per_eval_ms"] / by["anderson"]["per_eval_ms"]
            ok = ratio <= 1.2
            out.append({"goal": "2", "pass": ok, "ratio": ratio, "problem": kind, "config": config,
                        "backend": be, "library": lib, "line": (
                            f"[{'PASS' if ok else 'FAIL'}] goal 2 ({be} {lib}, {kind} {config}): broyden "
                            f"{by['broyden']['per_eval_ms']:.3f} ms/eval vs anderson "
                            f"{by['anderson']['per_eval_ms']:.3f} = {ratio:.3f}x (limit 1.2x)")})
    for (kind, config, be), rs in _group(rows, "problem", "config", "backend").items():
        if not (kind == "conv" or (kind == "symmetric" and rs[0]["d"] == 1024)):
            continue
        limit, anchor = (0.5, "TorchDEQ") if be == "torch" else (0.8, "jaxopt/optimistix")
        theirs = [r for r in rs if r["library"] not in ours and r["converged"]]
        best_theirs = min(theirs, key=lambda r: r["time_ms"]) if theirs else None
        for lib in ours:
            mine = [r for r in rs if r["library"] == lib and r["converged"]]
            if not mine:
                continue
            best = min(mine, key=lambda r: r["time_ms"])
            if best_theirs is None:
                ok, ratio, text = True, float("nan"), f"{lib} {best['method']} converged, no anchor did"
            else:
                ratio = best["time_ms"] / best_theirs["time_ms"]
                ok = ratio <= limit
                text = (f"{lib} {best['method']} {best['time_ms']:.2f} ms vs {best_theirs['library']} "
                        f"{best_theirs['method']} {best_theirs['time_ms']:.2f} ms = {ratio:.3f}x "
                        f"(limit {limit}x; on min times {best['min_ms'] / best_theirs['min_ms']:.2f}x)")
            line = f"[{'PASS' if ok else 'FAIL'}] goal 3 ({be}, {kind} {config}, vs {anchor}): {text}"
            out.append({"goal": "3", "pass": ok, "ratio": ratio, "problem": kind, "config": config,
                        "backend": be, "library": lib, "line": line})
    return out


def _where(r: dict) -> dict:
    return {k: r[k] for k in ("problem", "config", "backend", "library", "method")}


def _git_state() -> str | None:
    import subprocess

    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True,
                              text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "deqcore", "backends"], cwd=root,
                               capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    changed = [line[3:] for line in dirty.splitlines() if line.strip()]
    return head + (f" (uncommitted changes: {', '.join(changed)})" if changed else "")


def _version(mod: str):
    from importlib import metadata

    try:
        return metadata.version(mod)
    except metadata.PackageNotFoundError:
        return getattr(__import__(mod), "__version__", None)


def _shapes(text: str, n: int, what: str, prog: str = "bench_solvers") -> list[tuple[int, ...]]:
    """The comma-separated ``N1xN2x...`` items of flag ``what`` (``n`` numbers each, all >= 1); a
    malformed item exits with a message that starts with the script's name ``prog``."""
    out = []
    for item in (s for s in text.split(",") if s):
        try:
            shape = tuple(int(v) for v in item.lower().split("x"))
        except ValueError:
            shape = ()
        if len(shape) != n or min(shape) < 1:
            raise SystemExit(f"{prog}: {what} wants items like {'x'.join(['N'] * n)}, got {item!r}")
        out.append(shape)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dense", default="256x256,1024x64", help="dense problems' d x batch pairs")
    ap.add_argument("--conv", default="64x16x14x14", help="conv problems' batch x channels x height x width")
    ap.add_argument("--problems", default=",".join(PROBLEMS), help="gaussian,symmetric,conv (default all)")
    ap.add_argument("--repeats", type=int, default=7, help="timed rounds after the warm-up (median)")
    ap.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    ap.add_argument("--frameworks", default="torch,jax", help="torch,jax (default both)")
    ap.add_argument("--no-compile", action="store_true", help="skip deqcore's compiled torch path")
    ap.add_argument("--torch-threads", type=int, default=1, help="torch intra-op threads (default 1)")
    ap.add_argument("--injection", type=float, default=0.1, help="scale s of the injection x and bias b")
    ap.add_argument("--quick", action="store_true", help="d=256 dense and the conv layer, 3 repeats")
    ap.add_argument("--wait-idle", type=float, default=10.0, metavar="S",
                    help="before timing each problem, wait up to S seconds for >= 85%% idle CPUs (0: off)")
    ap.add_argument("--json", default=str(Path(__file__).parent / "results" / "solvers.json"))
    ap.add_argument("--overwrite", action="store_true", help="replace an existing --json file")
    args = ap.parse_args(argv)

    out = Path(args.json)
    if out.exists() and not args.overwrite:
        raise SystemExit(f"bench_solvers: {out} exists; pass --overwrite to replace it or --json PATH")
    problems = [s for s in args.problems.split(",") if s]
    unknown = sorted(set(problems) - set(PROBLEMS))
    if unknown:
        raise SystemExit(f"bench_solvers: unknown problems {unknown}; choose from {', '.join(PROBLEMS)}")
    frameworks = [s for s in args.frameworks.split(",") if s]
    if set(frameworks) - {"torch", "jax"} or args.repeats < 1 or args.torch_threads < 1:
        raise SystemExit("bench_solvers: --frameworks takes torch,jax; --repeats and --torch-threads >= 1")
    dense = _shapes("256x256" if args.quick else args.dense, 2, "--dense")
    convs = _shapes(args.conv, 4, "--conv")
    repeats = 3 if args.quick else args.repeats
    require_packages("bench_solvers", [m for fw in frameworks for m in ANCHOR_PACKAGES[fw]])

    if "torch" in frameworks:
        import torch

        torch.set_num_threads(args.torch_threads)
    if "jax" in frameworks and args.dtype == "float64":
        import jax

        jax.config.update("jax_enable_x64", True)

    versions = {"python": platform.python_version(), "machine": platform.machine(), "cpus": os.cpu_count()}
    for mod in ("numpy", "torch", "torchdeq", "jax", "jaxopt", "optimistix", "deqcore"):
        try:
            versions[mod] = _version(mod)
        except Exception:  # noqa: BLE001
            versions[mod] = None
    versions["deqcore git"] = _git_state()
    print(f"deqcore solver benchmark: dtype {args.dtype}, tol {TOL:g} (worst-sample rel), max_iter "
          f"{MAX_ITER}, repeats {repeats} (median), torch threads {args.torch_threads}")
    print("versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()))
    print(HEADER, flush=True)

    specs = [(k, s) for k in problems if k != "conv" for s in dense]
    specs += [("conv", s) for s in convs] if "conv" in problems else []
    start, load_start = time.perf_counter(), os.getloadavg()
    rows, idle_seen = [], []
    for kind, shape in specs:
        p = make_problem(kind, shape, args.dtype, args.injection)
        for fw in frameworks:
            cases = (torch_cases(p, args.dtype, not args.no_compile) if fw == "torch"
                     else jax_cases(p, args.dtype))
            idle = wait_idle(args.wait_idle)
            if idle is not None:
                idle_seen.append(idle)
            time_round_robin(cases, repeats)
            for case in cases:
                rows.append(row(case))
                print(fmt_row(rows[-1]), flush=True)

    annotate_anchor(rows)
    elapsed, load_end = time.perf_counter() - start, os.getloadavg()
    print(f"\nResults ({elapsed:.0f} s). NFE: batched f evaluations; worst rel: max over samples of "
          f"||f(z)-z||/||f(z)|| at the returned z, in float64; t/floor: time over NFE evaluations of "
          f"the method's own f; vs anchor: time over the fastest converged anchor (same backend, "
          f"same problem)\n")
    print_grouped(rows, fmt_row)
    idle_s = (f"; CPU idle before timing: min {min(idle_seen):.0%}, median "
              f"{statistics.median(idle_seen):.0%}" if idle_seen else "")
    print(f"\nload average (1/5/15 min) at start {tuple(round(v, 2) for v in load_start)}, at end "
          f"{tuple(round(v, 2) for v in load_end)} on {os.cpu_count()} CPUs{idle_s}")
    gl = goals(rows)
    print()
    for g in gl:
        print(g["line"])
    out.parent.mkdir(parents=True, exist_ok=True)
    write_text(out, dumps_json({
        "config": {"tol": TOL, "max_iter": MAX_ITER, "dtype": args.dtype, "dense": dense, "conv": convs,
                   "repeats": repeats, "problems": problems, "rho": RHO, "seed": SEED,
                   "judge_slack": JUDGE_SLACK, "frameworks": frameworks, "injection": args.injection,
                   "torch_threads": args.torch_threads, "compiled": not args.no_compile,
                   "timing": "round-robin over the methods of a problem, solve then its floor per turn"},
        "versions": versions, "elapsed_s": elapsed, "loadavg_start": load_start, "loadavg_end": load_end,
        "idle_before_timing": idle_seen, "rows": rows, "goals": gl,
    }, indent=1))
    print(f"\nwrote {out}")
    from render_docs import refresh_pages_of

    for page in refresh_pages_of(out):  # the pages whose generated blocks quote this file
        print(f"rendered {page}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
