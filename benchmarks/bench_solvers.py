"""Forward-solve benchmark: deqcore against TorchDEQ (torch) and jaxopt / optimistix (JAX).

Problem: a tanh DEQ layer ``f(z, x) = tanh(z W^T + x U^T + b)``, batch 64, for ``d`` in
``--sizes`` and two weight matrices W:

* ``gaussian``:  a Gaussian matrix scaled to spectral norm 0.9;
* ``symmetric``: ``Q diag(linspace(-0.9, 0.9, d)) Q^T`` with a random orthogonal Q.

U is Gaussian / sqrt(d), x = s * standard normal, b = 0.1 * s * Gaussian, with the injection
scale s = ``--injection`` (default 0.1). A small injection keeps the pre-activations in tanh's
near-linear range, so the Jacobian's spectrum stays close to W's: on the symmetric problem plain
iteration then needs about 50 steps, which makes it "the problem where acceleration matters".
With s = 1 tanh saturates, the effective spectrum shrinks to about +-0.5 and every solver needs
10-18 steps (see docs/benchmarks.md for that run too). The weights are drawn once in
NumPy (float64, fixed seed), rounded to ``--dtype`` and shared by every method and framework.

Stop criterion: every sample's relative residual ``||f(z) - z|| / (||f(z)|| + 1e-9)`` <= 1e-4,
at most 50 iterations. Each method is then *judged by this script*, not by its own report: the
returned z is pushed through f in float64 NumPy (with the same rounded weights) and the worst
sample's relative residual is printed. A method counts as converged when that worst residual is
<= 1e-4 * (1 + JUDGE_SLACK) (a 1 % slack absorbs float32 rounding of the residual itself).

How the anchors are driven:

* TorchDEQ (``torchdeq.solver``): ``stop_mode='rel'``, ``tol=1e-4``, ``max_iter=50``. Its stop test
  is the batch maximum of the per-sample residual (``trace[-1].max() < tol``), i.e. the same
  per-sample criterion as deqcore, but it keeps iterating every sample until the worst one is
  done (no freezing). Anderson: ``m=5`` (deqcore's default memory), ``lam=1e-4``, ``tau=1``;
  Broyden: all 50 rank-one pairs kept (``LBFGS_thres=None``), no line search.
* jaxopt / optimistix have no relative, per-sample criterion: their tolerance is absolute and
  applies to the L2 norm of the whole (64, d) residual. We first compute a reference fixed point
  (float64) and ``t0 = 1e-4 * min_i ||z*_i||``: a whole-batch L2 tolerance of ``t0`` guarantees
  every sample's rel residual <= 1e-4. Because that is conservative (the whole-batch norm is up
  to sqrt(64) = 8x any one sample's), we *calibrate*: the loosest of ``t0 * 16, 8, 4, 2, 1`` for
  which the worst-sample rel residual still reaches 1e-4 on this very data is used (this favours
  the anchors). The chosen tolerance is printed in the ``note`` column.
  jaxopt: ``FixedPointIteration`` and ``AndersonAcceleration`` (history_size=5, ridge default
  1e-5, beta=1), maxiter=50. optimistix: ``optx.fixed_point`` with
  ``optx.FixedPointIteration(rtol=0, atol=tol, norm=optx.two_norm)``, max_steps=50, throw=False.
  Newton/Chord (dense Jacobians) are not comparable and are skipped.

Timing: every method is warmed up (JAX: compiled) first. Then, per problem and framework,
``--repeats`` rounds run over all its methods (round-robin, rotating order); each turn times the
solve (``time.perf_counter`` around the call; JAX: ``block_until_ready``) and, right after it,
``NFE`` bare evaluations of f on the same data (torch: a Python chain ``z = f(z, x)``; JAX: a
jitted ``lax.fori_loop`` of NFE evaluations, in which XLA may hoist the loop-invariant
``x U^T`` exactly as it does inside the solvers' loops). Reported times are medians (the minimum
is shown too); ``t/bare`` is median(solve) / median(bare), the overhead of the solver over its f
evaluations. ``vs anchor`` is the time over the fastest *converged* anchor of the same framework
on the same problem. With ``--wait-idle`` the script waits for a quiet machine before timing.

Run:  python benchmarks/bench_solvers.py [--sizes 256,1024] [--repeats 7] [--dtype float32]
      python benchmarks/bench_solvers.py --quick
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

BATCH = 64
TOL = 1e-4
MAX_ITER = 50
RHO = 0.9
INJECTION = 0.1  # set from --injection
SEED = 0
JUDGE_SLACK = 0.01
CALIBRATION_FACTORS = (16.0, 8.0, 4.0, 2.0, 1.0)
PROBLEMS = ("gaussian", "symmetric")
DEQCORE_SOLVERS = ("fixed_point", "anderson", "broyden")


# ----------------------------------------------------------------------------------------------
# Problem, reference and judge (NumPy, float64)
# ----------------------------------------------------------------------------------------------


def make_problem(kind: str, d: int, dtype: str) -> dict:
    """Weights and input in float64, already rounded to ``dtype`` (so every method sees them)."""
    rng = np.random.default_rng([SEED, d, PROBLEMS.index(kind)])
    if kind == "gaussian":
        W = rng.standard_normal((d, d))
        W = RHO * W / np.linalg.norm(W, 2)
    else:
        Q, _ = np.linalg.qr(rng.standard_normal((d, d)))
        W = (Q * np.linspace(-RHO, RHO, d)) @ Q.T
    U = rng.standard_normal((d, d)) / np.sqrt(d)
    b = 0.1 * INJECTION * rng.standard_normal(d)
    x = INJECTION * rng.standard_normal((BATCH, d))
    rnd = lambda a: np.ascontiguousarray(a.astype(dtype).astype(np.float64))  # noqa: E731
    return {"kind": kind, "d": d, "W": rnd(W), "U": rnd(U), "b": rnd(b), "x": rnd(x)}


def f_numpy(p: dict, z: np.ndarray) -> np.ndarray:
    return np.tanh(z @ p["W"].T + p["x"] @ p["U"].T + p["b"])


def judge(p: dict, z) -> np.ndarray:
    """Per-sample relative residual of ``z`` (any array type), computed in float64."""
    z = np.asarray(z.detach().cpu().numpy() if hasattr(z, "detach") else z, dtype=np.float64)
    fz = f_numpy(p, z)
    return np.linalg.norm(fz - z, axis=-1) / (np.linalg.norm(fz, axis=-1) + 1e-9)


def reference_fixed_point(p: dict) -> np.ndarray:
    """Plain float64 iteration to a tight tolerance (W is a contraction)."""
    z = np.zeros_like(p["x"])
    for _ in range(2000):
        fz = f_numpy(p, z)
        if np.max(np.linalg.norm(fz - z, axis=-1) / np.linalg.norm(fz, axis=-1)) < 1e-12:
            return fz
        z = fz
    return z


def converged(worst: float) -> bool:
    return bool(np.isfinite(worst) and worst <= TOL * (1.0 + JUDGE_SLACK))


# ----------------------------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------------------------


class Case:
    """One method on one problem, already warmed up: ``call`` solves, ``bare`` runs NFE f's."""

    def __init__(self, framework, p, method, library, steps, nfe, worst, call, bare, note=""):
        self.meta = (framework, p, method, library, steps, nfe, worst, note)
        self.call, self.bare = call, bare
        self.ts: list[float] = []
        self.tb: list[float] = []


def time_round_robin(cases: list[Case], repeats: int) -> None:
    """Time every case ``repeats`` times, one round over all cases at a time.

    A round times each case's solve and, right after it, its bare f evaluations; the order of the
    cases rotates from round to round. On a shared machine a burst of outside load then hits all
    methods of a problem alike instead of whichever method happened to be timed at that moment.
    """
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
                case.bare()
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
    framework, p, method, library, steps, nfe, worst, note = case.meta
    ts, tb = case.ts, case.tb
    t, b = statistics.median(ts), statistics.median(tb)
    tmin, bmin = min(ts), min(tb)
    return {
        "backend": framework, "problem": p["kind"], "d": p["d"], "method": method,
        "library": library, "steps": int(steps), "nfe": int(nfe), "worst_rel": float(worst),
        "converged": converged(worst), "time_ms": 1e3 * t, "bare_ms": 1e3 * b,
        "ratio_bare": t / b if b > 0 else float("nan"), "min_ms": 1e3 * tmin,
        "bare_min_ms": 1e3 * bmin, "ratio_bare_min": tmin / bmin if bmin > 0 else float("nan"),
        "times_ms": [1e3 * v for v in ts],
        "bare_times_ms": [1e3 * v for v in tb], "note": note,
    }


# ----------------------------------------------------------------------------------------------
# torch
# ----------------------------------------------------------------------------------------------


def torch_cases(p: dict, dtype: str) -> list[Case]:
    import torch
    from torchdeq.solver import get_solver

    import deqcore

    tdt = getattr(torch, dtype)
    Wt = torch.tensor(p["W"].T.copy(), dtype=tdt)
    Ut = torch.tensor(p["U"].T.copy(), dtype=tdt)
    b = torch.tensor(p["b"], dtype=tdt)
    x = torch.tensor(p["x"], dtype=tdt)

    def f(z, x):
        return torch.tanh(z @ Wt + x @ Ut + b)

    def bare(n):
        def run():
            with torch.no_grad():
                z = torch.zeros_like(x)
                for _ in range(n):
                    z = f(z, x)
            return z
        run()
        return run

    cases = []
    for s in DEQCORE_SOLVERS:
        call = functools.partial(deqcore.solve, f, x, solver=s, tol=TOL, max_iter=MAX_ITER,
                                 stop_mode="rel")
        sol = call()
        nfe, steps = int(sol.nfe), int(sol.steps)
        worst = float(judge(p, sol.z).max())
        cases.append(Case("torch", p, s, "deqcore", steps, nfe, worst, call, bare(nfe)))

    anchors = {
        "fixed_point_iter": {},
        "anderson": {"m": 5, "lam": 1e-4, "tau": 1.0},
        "broyden": {"LBFGS_thres": None, "ls": False},
    }
    for name, kw in anchors.items():
        solver = get_solver(name)
        counter = [0]

        def counted(z, counter=counter):
            counter[0] += 1
            return f(z, x)

        def call(solver=solver, kw=kw):
            with torch.no_grad():
                return solver(lambda z: f(z, x), torch.zeros_like(x), max_iter=MAX_ITER, tol=TOL,
                              stop_mode="rel", **kw)

        with torch.no_grad():
            z_star, _, _ = solver(counted, torch.zeros_like(x), max_iter=MAX_ITER, tol=TOL,
                                  stop_mode="rel", **kw)
        nfe = counter[0]
        # TorchDEQ's fixed-point iteration evaluates f once per step (no separate f(z0));
        # Anderson (f(z0), f(f(z0)), then one per step) and Broyden (f(z0), then one per
        # step) spend one evaluation on z0, as deqcore does.
        steps = nfe if name == "fixed_point_iter" else nfe - 1
        worst = float(judge(p, z_star).max())
        call()
        cases.append(Case("torch", p, name, "torchdeq", steps, nfe, worst, call, bare(nfe),
                          note="stop: batch max of per-sample rel"))
    return cases


# ----------------------------------------------------------------------------------------------
# JAX
# ----------------------------------------------------------------------------------------------


def jax_cases(p: dict, dtype: str) -> list[Case]:
    import jax
    import jax.numpy as jnp
    import jaxopt
    import optimistix as optx

    import deqcore

    jdt = jnp.dtype(dtype)
    params = (jnp.asarray(p["W"].T, dtype=jdt), jnp.asarray(p["U"].T, dtype=jdt),
              jnp.asarray(p["b"], dtype=jdt))
    x = jnp.asarray(p["x"], dtype=jdt)

    def f(prm, z, x):
        Wt, Ut, b = prm
        return jnp.tanh(z @ Wt + x @ Ut + b)

    @functools.partial(jax.jit, static_argnums=0)
    def bare_loop(n, prm, x):
        return jax.lax.fori_loop(0, n, lambda i, z: f(prm, z, x), jnp.zeros_like(x))

    def bare(n):
        bare_loop(n, params, x).block_until_ready()  # compile
        return lambda: bare_loop(n, params, x).block_until_ready()

    cases = []
    for s in DEQCORE_SOLVERS:
        solve = jax.jit(lambda prm, x, s=s: deqcore.solve(
            lambda z, x: f(prm, z, x), x, solver=s, tol=TOL, max_iter=MAX_ITER, stop_mode="rel"))
        sol = jax.block_until_ready(solve(params, x))
        nfe, steps = int(sol.nfe), int(sol.steps)
        worst = float(judge(p, sol.z).max())
        call = lambda solve=solve: jax.block_until_ready(solve(params, x))  # noqa: E731
        cases.append(Case("jax", p, s, "deqcore", steps, nfe, worst, call, bare(nfe)))

    # Anchors with an absolute whole-batch tolerance, calibrated (see the module docstring).
    zref = reference_fixed_point(p)
    t0 = TOL * float(np.min(np.linalg.norm(zref, axis=-1)))

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
        # num_fun_eval; the iterations do one f each, so we report NFE = iterations.
        return z, state.iter_num, state.iter_num

    def optx_fp(prm, x, tol):
        solver = optx.FixedPointIteration(rtol=0.0, atol=tol, norm=optx.two_norm)
        sol = optx.fixed_point(lambda z, args: f(args[0], z, args[1]), solver, jnp.zeros_like(x),
                               args=(prm, x), max_steps=MAX_ITER, throw=False)
        n = sol.stats["num_steps"]
        return sol.value, n, n

    anchors = [
        ("FixedPointIteration", "jaxopt", jaxopt_fp),
        ("AndersonAcceleration", "jaxopt", jaxopt_aa),
        ("FixedPointIteration", "optimistix", optx_fp),
    ]
    for name, lib, fn in anchors:
        solve = jax.jit(fn)
        chosen = None
        for fac in CALIBRATION_FACTORS:
            tol = jnp.asarray(t0 * fac, dtype=jdt)
            z, steps, nfe = jax.block_until_ready(solve(params, x, tol))
            worst = float(judge(p, z).max())
            chosen = (fac, tol, int(steps), int(nfe), worst)
            if converged(worst):
                break
        fac, tol, steps, nfe, worst = chosen
        call = lambda solve=solve, tol=tol: jax.block_until_ready(solve(params, x, tol))  # noqa: E731
        note = f"tol={float(tol):.2e} ({fac:g}x t0) whole-batch L2 abs"
        cases.append(Case("jax", p, name, lib, steps, nfe, worst, call, bare(max(nfe, 1)),
                          note=note))
    return cases


# ----------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------

HEADER = (f"{'problem':<9} {'d':>5} {'backend':<6} {'library':<10} {'method':<21} {'iters':>5} "
          f"{'NFE':>4} {'worst rel':>9} {'conv':<4} {'time ms':>8} {'min ms':>8} {'bare ms':>8} "
          f"{'t/bare':>6} {'(min)':>6} {'vs anchor':>9}  note")


def fmt_row(r: dict) -> str:
    va = r.get("vs_anchor")
    va_s = f"{va:9.2f}" if va is not None and math.isfinite(va) else f"{'-':>9}"
    conv = "yes" if r["converged"] else "NO"
    return (f"{r['problem']:<9} {r['d']:>5} {r['backend']:<6} {r['library']:<10} {r['method']:<21} "
            f"{r['steps']:>5} {r['nfe']:>4} {r['worst_rel']:9.2e} {conv:<4} {r['time_ms']:8.2f} "
            f"{r['min_ms']:8.2f} {r['bare_ms']:8.2f} {r['ratio_bare']:6.2f} {r['ratio_bare_min']:6.2f} "
            f"{va_s}  {r['note']}")


def annotate_anchor(rows: list[dict]) -> list[dict]:
    """Per (problem, d, backend): fastest converged anchor and fastest anchor regardless."""
    groups = {}
    for r in rows:
        groups.setdefault((r["problem"], r["d"], r["backend"]), []).append(r)
    summary = []
    for (kind, d, be), rs in groups.items():
        anchors = [r for r in rs if r["library"] != "deqcore"]
        conv = [r for r in anchors if r["converged"]]
        best_conv = min(conv, key=lambda r: r["time_ms"]) if conv else None
        best_any = min(anchors, key=lambda r: r["time_ms"]) if anchors else None
        for r in rs:
            r["vs_anchor"] = r["time_ms"] / best_conv["time_ms"] if best_conv else None
        summary.append({
            "problem": kind, "d": d, "backend": be,
            "fastest_converged_anchor": (f"{best_conv['library']} {best_conv['method']}"
                                         if best_conv else None),
            "fastest_converged_anchor_ms": best_conv["time_ms"] if best_conv else None,
            "fastest_anchor_any": (f"{best_any['library']} {best_any['method']}"
                                   if best_any else None),
            "fastest_anchor_any_ms": best_any["time_ms"] if best_any else None,
            "fastest_anchor_any_converged": best_any["converged"] if best_any else None,
        })
    return summary


def goals(rows: list[dict], sizes: list[int]) -> list[dict]:
    out = []

    def best(rs):
        rs = [r for r in rs if r["converged"]]
        return min(rs, key=lambda r: r["time_ms"]) if rs else None

    for goal, be, limit, anchor_name in (("1", "torch", 0.5, "TorchDEQ"),
                                         ("2", "jax", 0.8, "jaxopt/optimistix")):
        for d in sizes:
            rs = [r for r in rows if r["problem"] == "symmetric" and r["d"] == d and r["backend"] == be]
            if not rs:
                continue
            ours = best([r for r in rs if r["library"] == "deqcore"])
            theirs = best([r for r in rs if r["library"] != "deqcore"])
            if ours is None or theirs is None:
                # deqcore converging where no anchor did counts as a pass
                ok, ratio = ours is not None, float("nan")
                text = (f"deqcore best {'none converged' if ours is None else ours['method']}, "
                        f"anchor {'none converged' if theirs is None else theirs['method']}")
            else:
                ratio = ours["time_ms"] / theirs["time_ms"]
                ok = ratio <= limit
                conv = lambda rs: [r for r in rs if r["converged"]]  # noqa: E731
                ours_min = min(r["min_ms"] for r in conv(rs) if r["library"] == "deqcore")
                theirs_min = min(r["min_ms"] for r in conv(rs) if r["library"] != "deqcore")
                text = (f"deqcore {ours['method']} {ours['time_ms']:.2f} ms vs {theirs['library']} "
                        f"{theirs['method']} {theirs['time_ms']:.2f} ms: {ratio:.3f}x (limit {limit}x; "
                        f"on min times {ours_min / theirs_min:.2f}x)")
            out.append({"goal": goal, "pass": ok, "ratio": ratio, "d": d, "backend": be,
                        "line": f"[{'PASS' if ok else 'FAIL'}] goal {goal} ({be}, symmetric, d={d}, "
                                f"vs {anchor_name}): {text}"})
    dmax = 1024 if 1024 in sizes else None
    if dmax is None:
        out.append({"goal": "3", "pass": None, "line": "[SKIP] goal 3: d=1024 not in --sizes"})
    else:
        for r in rows:
            if r["library"] != "deqcore" or r["d"] != dmax:
                continue
            ok = r["ratio_bare"] <= 1.15
            out.append({"goal": "3", "pass": ok, "ratio": r["ratio_bare"], "d": dmax,
                        "backend": r["backend"], "problem": r["problem"], "method": r["method"],
                        "line": f"[{'PASS' if ok else 'FAIL'}] goal 3 ({r['backend']}, {r['problem']}, "
                                f"d={dmax}, {r['method']}): {r['time_ms']:.2f} ms vs {r['nfe']} bare f "
                                f"{r['bare_ms']:.2f} ms = {r['ratio_bare']:.3f}x (limit 1.15x; on min "
                                f"times {r['ratio_bare_min']:.2f}x)"})
    return out


def _git_state() -> str | None:
    """The repository commit and whether the solver sources differ from it (None outside git)."""
    import subprocess

    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True,
                              text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "deqcore", "backends"], cwd=root,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    changed = [line[3:] for line in dirty.splitlines()]
    return head + (f" (uncommitted changes: {', '.join(changed)})" if changed else "")


def _version(mod: str):
    from importlib import metadata

    try:
        return metadata.version(mod)
    except metadata.PackageNotFoundError:
        return getattr(__import__(mod), "__version__", None)


def print_grouped(header: str, rows: list[dict], fmt) -> None:
    """The table: ``header``, then ``fmt(row)`` per row, a blank line between (d, problem, backend)."""
    print(header)
    last = None
    for r in rows:
        key = (r["d"], r["problem"], r["backend"])
        if last is not None and key != last:
            print()
        last = key
        print(fmt(r))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="256,1024", help="comma-separated d values (default 256,1024)")
    ap.add_argument("--repeats", type=int, default=7, help="timed repeats after warm-up (median)")
    ap.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    ap.add_argument("--frameworks", default="torch,jax", help="torch,jax (default both)")
    ap.add_argument("--problems", default=",".join(PROBLEMS))
    ap.add_argument("--injection", type=float, default=0.1,
                    help="scale s of the input injection x and bias b (default 0.1: tanh near-linear)")
    ap.add_argument("--quick", action="store_true", help="d=256 only, 3 repeats (a smoke run)")
    ap.add_argument("--wait-idle", type=float, default=10.0, metavar="S",
                    help="before timing each problem, wait up to S seconds for the CPUs to be >= 85%% "
                         "idle (a shared machine); 0 disables (default 10)")
    ap.add_argument("--json", default=str(Path(__file__).parent / "results" / "solvers.json"))
    args = ap.parse_args(argv)
    global INJECTION
    INJECTION = args.injection

    sizes = [256] if args.quick else [int(s) for s in args.sizes.split(",") if s]
    repeats = 3 if args.quick else args.repeats
    frameworks = [s for s in args.frameworks.split(",") if s]
    problems = [s for s in args.problems.split(",") if s]

    if "jax" in frameworks and args.dtype == "float64":
        import jax
        jax.config.update("jax_enable_x64", True)

    versions = {"python": platform.python_version(), "machine": platform.machine(),
                "cpus": os.cpu_count()}
    for mod in ("numpy", "torch", "torchdeq", "jax", "jaxopt", "optimistix", "deqcore"):
        try:
            versions[mod] = _version(mod)
        except Exception:  # noqa: BLE001
            versions[mod] = None
    versions["deqcore git"] = _git_state()
    print(f"deqcore solver benchmark: tanh DEQ, batch {BATCH}, dtype {args.dtype}, tol {TOL:g} "
          f"(worst-sample rel), max_iter {MAX_ITER}, repeats {repeats} (median)")
    print("versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()))
    print(HEADER, flush=True)

    start = time.perf_counter()
    load_start = os.getloadavg()
    rows = []

    def log(r):
        print(fmt_row(r), flush=True)

    idle_seen = []
    for d in sizes:
        for kind in problems:
            p = make_problem(kind, d, args.dtype)
            for fw, make in (("torch", torch_cases), ("jax", jax_cases)):
                if fw not in frameworks:
                    continue
                cases = make(p, args.dtype)
                idle = wait_idle(args.wait_idle)
                if idle is not None:
                    idle_seen.append(idle)
                time_round_robin(cases, repeats)
                for case in cases:
                    rows.append(row(case))
                    log(rows[-1])

    anchors = annotate_anchor(rows)
    elapsed = time.perf_counter() - start
    load_end = os.getloadavg()
    print(f"\nResults ({elapsed:.0f} s). iters: solver steps; NFE: batched f evaluations; worst rel: "
          f"max over samples of ||f(z)-z||/||f(z)|| at the returned z, computed here in float64; "
          f"conv: worst rel <= {TOL:g}; t/bare: time / time of NFE bare f evaluations; "
          f"vs anchor: time / fastest converged anchor (same backend, same problem)\n")
    print_grouped(HEADER, rows, fmt_row)
    idle_s = (f"; CPU idle before timing: min {min(idle_seen):.0%}, median "
              f"{statistics.median(idle_seen):.0%}" if idle_seen else "")
    print(f"\nload average (1/5/15 min) at start {tuple(round(v, 2) for v in load_start)}, at end "
          f"{tuple(round(v, 2) for v in load_end)} on {os.cpu_count()} CPUs{idle_s}. Other processes "
          "on the machine make timings noisy, torch's most of all (its 2 intra-op threads wait for "
          "each other).")
    print("\nFastest anchors (same backend and problem):")
    for a in anchors:
        conv = a["fastest_converged_anchor"]
        conv_s = f"{conv} {a['fastest_converged_anchor_ms']:.2f} ms" if conv else "none"
        line = (f"  {a['problem']:<9} d={a['d']:<5} {a['backend']:<6} converged: {conv_s}; "
                f"any: {a['fastest_anchor_any']} {a['fastest_anchor_any_ms']:.2f} ms"
                f"{'' if a['fastest_anchor_any_converged'] else ' (did NOT reach tol)'}")
        print(line)
    gl = goals(rows, sizes)
    print()
    for g in gl:
        print(g["line"])

    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "config": {"batch": BATCH, "tol": TOL, "max_iter": MAX_ITER, "dtype": args.dtype,
                   "sizes": sizes, "repeats": repeats, "problems": problems, "rho": RHO,
                   "seed": SEED, "judge_slack": JUDGE_SLACK, "frameworks": frameworks,
                   "timing": "round-robin over the methods of a problem, solve then bare f per turn"},
        "versions": versions, "elapsed_s": elapsed,
        "loadavg_start": load_start, "loadavg_end": load_end, "idle_before_timing": idle_seen,
        "rows": rows, "anchors": anchors,
        "goals": gl,
    }, indent=1))
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
