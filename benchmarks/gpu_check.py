"""The accelerator checks of the solver loop, in one script: host synchronisations per solve,
eager against compiled (CUDA graphs) timings beside TorchDEQ, and torch == JAX on the device.

1. **Host synchronisations.** ``torch.cuda.set_sync_debug_mode("warn")`` makes every
   synchronising CUDA call warn; the warnings of one solve are counted for ``check_every`` 1, 4
   and 16, with the steps the solve ran. The loop's only synchronisation is its stop test, so the
   count should be at most ``ceil(steps / k) + 1`` (the last test, and the status derivation).
2. **Timings.** Every deqcore solver eager, compiled (``compile=True``) and compiled with CUDA
   graphs (``compile="reduce-overhead"``), and TorchDEQ's three solvers, on bench_solvers.py's
   symmetric layer at d=1024/B=64 and its conv layer, float32, with the floor of each method
   (NFE evaluations of its own f), medians of interleaved rounds.
3. **torch == JAX.** The symmetric layer in float64 solved by every solver on both frameworks on
   the device; the largest ``|z_torch - z_jax|`` and equal iteration counts.

Results go to ``--out`` (default ``$OUT`` or ``gpu-results``): ``gpu_check.json`` and
``gpu_check.md`` (a table ready for docs/benchmarks.md). ``--device cpu`` runs the same code on
the CPU (no synchronisation counts there) to check the script itself.

Run:  python benchmarks/gpu_check.py [--device cuda] [--repeats 7] [--out DIR]
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

import numpy as np

from deqcore.internal import dumps_json, write_text

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_solvers as bs  # noqa: E402

SOLVERS = ("fixed_point", "anderson", "broyden")


def _sync(device):
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def count_syncs(device) -> list[dict]:
    import torch

    import deqcore

    p = bs.make_problem("symmetric", (1024, 64), "float32", 0.1)
    f, x = p.torch_layer("float32", device)
    out = []
    for k in (1, 4, 16):
        deqcore.solve(f, x, solver="anderson", grad=None, check_every=k)  # warm-up
        _sync(device)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                sol = deqcore.solve(f, x, solver="anderson", grad=None, check_every=k)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        syncs = sum("synchroniz" in str(w.message).lower() for w in caught)
        steps = int(sol.steps)
        out.append({"check_every": k, "steps": steps, "nfe": int(sol.nfe), "syncs": syncs,
                    "bound": math.ceil(steps / k) + 2, "ok": syncs <= math.ceil(steps / k) + 2})
    return out


def time_methods(p, device, repeats: int) -> list[dict]:
    import torch

    import deqcore

    f, x = p.torch_layer("float32", device)
    cf = torch.compile(f, dynamic=False)

    def floor(fn, n):
        def run():
            with torch.no_grad():
                z = torch.zeros_like(x)
                for _ in range(n):
                    z = fn(z, x)
            _sync(device)
        run()
        return run

    methods = []
    for path, comp in (("eager", False), ("compiled", True), ("cuda graphs", "reduce-overhead")):
        if comp == "reduce-overhead" and device.type != "cuda":
            continue
        for s in SOLVERS:
            def call(s=s, comp=comp):
                sol = deqcore.solve(f, x, solver=s, grad=None, compile=comp)
                _sync(device)
                return sol
            sol = call()
            nfe = int(sol.nfe)
            methods.append({"library": "deqcore", "path": path, "method": s, "nfe": nfe,
                            "worst": float(p.judge(sol.z).max()), "call": call,
                            "floor": floor(f if comp is False else cf, nfe), "ts": [], "tb": []})
    for name, nfe, z_star, call in bs.torchdeq_runs(f, x, sync=lambda: _sync(device)):
        methods.append({"library": "torchdeq", "path": "eager", "method": name, "nfe": nfe,
                        "worst": float(p.judge(z_star).max()), "call": call, "floor": floor(f, nfe),
                        "ts": [], "tb": []})
    for r in range(repeats):
        k = r % len(methods)
        for m in methods[k:] + methods[:k]:
            t0 = time.perf_counter()
            m["call"]()
            t1 = time.perf_counter()
            m["floor"]()
            t2 = time.perf_counter()
            m["ts"].append(t1 - t0)
            m["tb"].append(t2 - t1)
    rows = []
    for m in methods:
        t, b = statistics.median(m["ts"]), statistics.median(m["tb"])
        rows.append({"problem": f"{p.kind} {p.label}", "library": m["library"], "path": m["path"],
                     "method": m["method"], "nfe": m["nfe"], "converged": bs.converged(m["worst"]),
                     "time_ms": 1e3 * t, "min_ms": 1e3 * min(m["ts"]), "floor_ms": 1e3 * b,
                     "ratio_floor": t / b})
    best_anchor = min((r for r in rows if r["library"] == "torchdeq" and r["converged"]),
                      key=lambda r: r["time_ms"], default=None)
    for r in rows:
        r["vs_torchdeq"] = r["time_ms"] / best_anchor["time_ms"] if best_anchor else float("nan")
    return rows


def torch_equals_jax(device) -> list[dict]:
    import jax
    import jax.numpy as jnp

    import deqcore

    jax.config.update("jax_enable_x64", True)
    p = bs.make_problem("symmetric", (256, 16), "float64", 0.1)
    f, x = p.torch_layer("float64", device)
    Wt, Ut, b = (jnp.asarray(p.arrays[k].T if k != "b" else p.arrays[k]) for k in ("W", "U", "b"))
    xj = jnp.asarray(p.arrays["x"])
    out = []
    for s in SOLVERS:
        st = deqcore.solve(f, x, solver=s, grad=None, tol=1e-10, max_iter=100)
        sj = jax.jit(lambda x, s=s: deqcore.solve(lambda z, x: jnp.tanh(z @ Wt + x @ Ut + b), x, solver=s,
                                                  grad=None, tol=1e-10, max_iter=100))(xj)
        diff = float(np.abs(st.z.cpu().numpy() - np.asarray(sj.z)).max())
        same = bool(np.array_equal(st.iterations.cpu().numpy(), np.asarray(sj.iterations)))
        out.append({"solver": s, "max_abs_diff": diff, "same_iterations": same,
                    "jax_device": str(next(iter(sj.z.devices()))), "ok": diff <= 1e-6 and same})
    return out


def markdown(report: dict) -> str:
    v = report["versions"]
    lines = [f"Device: {report['device']} (torch {v['torch']}, jax {v['jax']})", ""]
    if report["syncs"]:
        lines += ["| check_every | steps | NFE | host syncs | bound ceil(steps/k)+2 |",
                  "|---|---|---|---|---|"]
        lines += [f"| {r['check_every']} | {r['steps']} | {r['nfe']} | {r['syncs']} | {r['bound']} |"
                  for r in report["syncs"]]
        lines.append("")
    lines += ["| problem | library | path | method | NFE | conv | time ms | t/floor | vs TorchDEQ |",
              "|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['problem']} | {r['library']} | {r['path']} | {r['method']} | {r['nfe']} | "
              f"{'yes' if r['converged'] else 'NO'} | {r['time_ms']:.2f} | {r['ratio_floor']:.2f} | "
              f"{r['vs_torchdeq']:.2f} |" for r in report["timings"]]
    lines += ["", "| solver | max abs(z_torch - z_jax) | same iterations |", "|---|---|---|"]
    lines += [f"| {r['solver']} | {r['max_abs_diff']:.1e} | {r['same_iterations']} |"
              for r in report["equivalence"]]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--out", default=os.environ.get("OUT", "gpu-results"))
    ap.add_argument("--overwrite", action="store_true", help="replace results already in --out")
    args = ap.parse_args(argv)
    bs.require_packages("gpu_check", bs.ANCHOR_PACKAGES["torch"])
    import jax
    import torch

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu_check: no CUDA device is visible (pass --device cpu to check the script)")
    out = Path(args.out)
    if (out / "gpu_check.json").exists() and not args.overwrite:
        raise SystemExit(f"gpu_check: {out / 'gpu_check.json'} exists; pass --overwrite or another --out")
    out.mkdir(parents=True, exist_ok=True)
    report = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "versions": {"torch": torch.__version__, "jax": jax.__version__,
                           "jax devices": [str(d) for d in jax.devices()]}}
    report["syncs"] = count_syncs(device) if device.type == "cuda" else []
    print("syncs:", report["syncs"], flush=True)
    report["timings"] = []
    for kind, shape in (("symmetric", (1024, 64)), ("conv", (64, 16, 14, 14))):
        report["timings"] += time_methods(bs.make_problem(kind, shape, "float32", 0.1), device, args.repeats)
        print(f"timed {kind}", flush=True)
    report["equivalence"] = torch_equals_jax(device)
    write_text(out / "gpu_check.json", dumps_json(report, indent=1))
    (out / "gpu_check.md").write_text(markdown(report))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
