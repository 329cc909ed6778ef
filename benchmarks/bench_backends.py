"""Training-step and forward-solve time of the same model on PyTorch and JAX, side by side.

Whether the two backends train the same model at comparable speed on CPU: the goal is a step
time within 1.5x of each other's, either way. Each backend runs in
its own subprocess (in one process, XLA's and PyTorch's thread pools spin against each other and
torch steps became many times slower and erratic), from the same NumPy weights on the same batches.
The first ``--warmup`` steps (JAX compiles, PyTorch's first steps are also slow) are excluded, and
the blocks alternate torch, jax, torch, jax so that slow machine phases hit both; each backend's
figure is the better of its two blocks' medians. Reported per workload and backend: training step
(forward solve + backward + Adam), forward-only evaluation of the same batch (no dropout, no
gradient), the backward share (step minus forward), NFE, and the JAX/torch ratios.

    python benchmarks/bench_backends.py --data ../shared/data            # MDEQ and Transformer
    python benchmarks/bench_backends.py --data ../shared/data --workload mdeq --steps 20

Results go to ``--out`` (default benchmarks/results/backends.json); the documentation's blocks
generated from that file (docs/benchmarks.md) are rendered again (``render_docs.py``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from deqcore.internal import dumps_json, write_text

WORKLOADS = {
    "mdeq": dict(model="mdeq", config="cpu", dataset="fashion-mnist", batch_size=64, solver="broyden",
                 max_iter=18, grad="implicit"),
    "mdeq-gdeq": dict(model="mdeq", config="cpu", dataset="fashion-mnist", batch_size=64, solver="broyden",
                      max_iter=18, grad="gdeq"),
    "transformer": dict(model="transformer", config="small", dataset="wikitext2", batch_size=16,
                        solver="anderson", max_iter=16, grad="implicit"),
}
GOAL = 1.5
# implicit workloads use the trainer's default backward (train.IMPLICIT_BACKWARD: 20 steps)


def worker(name: str, backend: str, data: str | None, steps: int, warmup: int) -> dict:
    """Time ``steps`` training steps and forward passes of one backend (run in a subprocess)."""
    from deqcore_models._training_engines import make_engine
    from deqcore_models.train import TrainConfig, make_workload

    cfg = TrainConfig(data=data, **WORKLOADS[name])
    work = make_workload(cfg)
    settings, ev_settings = cfg.deq_settings(), cfg.eval_settings()
    eng = make_engine(backend, work.task, work.params0, work.state0, 0.0)
    step_t, fwd_t, nfe = [], [], []
    for i in range(steps + warmup):
        batch = work.train_batch(i)
        t0 = time.perf_counter()
        r = eng.train_step(batch.x, batch.y, batch.masks, settings, cfg.lr)
        dt = time.perf_counter() - t0
        t0 = time.perf_counter()
        eng.evaluate(batch.x, batch.y, ev_settings)
        df = time.perf_counter() - t0
        if i >= warmup:
            step_t.append(dt)
            fwd_t.append(df)
            nfe.append(r["nfe"])
    s, f = statistics.median(step_t), statistics.median(fwd_t)
    return {"step_s": s, "forward_s": f, "backward_s": s - f, "nfe": statistics.median(nfe),
            "steps_s": step_t}


def bench(name: str, data: str | None, steps: int, warmup: int) -> dict:
    runs: dict[str, list[dict]] = {"torch": [], "jax": []}
    for block in range(2):
        for b in ("torch", "jax"):
            cmd = [sys.executable, __file__, "--worker", b, "--workload", name, "--steps", str(steps),
                   "--warmup", str(warmup)] + (["--data", data] if data else [])
            proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if proc.returncode:
                raise RuntimeError(f"{name}/{b} failed:\n{proc.stderr[-2000:]}")
            runs[b].append(json.loads(proc.stdout.strip().splitlines()[-1]))
            print(f"  {name} {b} block {block + 1}: {runs[b][-1]['step_s']:.3f} s/step", flush=True)
    out: dict = {"workload": name, "settings": WORKLOADS[name], "steps": steps, "warmup": warmup}
    for b, rs in runs.items():
        out[b] = min(rs, key=lambda r: r["step_s"])
        out[b]["blocks_step_s"] = [r["step_s"] for r in rs]
    out["ratio_step"] = out["jax"]["step_s"] / out["torch"]["step_s"]
    out["ratio_forward"] = out["jax"]["forward_s"] / out["torch"]["forward_s"]
    out["ratio_backward"] = out["jax"]["backward_s"] / out["torch"]["backward_s"]
    out["pass"] = 1 / GOAL <= out["ratio_step"] <= GOAL
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=None, help="data folder (default $DEQCORE_DATA)")
    p.add_argument("--workload", action="append", choices=sorted(WORKLOADS),
                   help="repeatable (default: mdeq, mdeq-gdeq and transformer)")
    p.add_argument("--steps", type=int, default=10, help="timed steps per backend (default 10)")
    p.add_argument("--warmup", type=int, default=3, help="untimed first steps (default 3)")
    p.add_argument("--out", default="benchmarks/results/backends.json")
    p.add_argument("--worker", choices=["torch", "jax"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(args.workload[0], args.worker, args.data, args.steps, args.warmup)))
        return 0
    rows = [bench(w, args.data, args.steps, args.warmup) for w in (args.workload or list(WORKLOADS))]
    print(f"\n{'workload':12} {'backend':7} {'step s':>8} {'fwd s':>8} {'bwd s':>8} {'NFE':>5}")
    for r in rows:
        for b in ("torch", "jax"):
            m = r[b]
            print(f"{r['workload']:12} {b:7} {m['step_s']:8.3f} {m['forward_s']:8.3f} {m['backward_s']:8.3f} "
                  f"{m['nfe']:5.0f}")
    print()
    for r in rows:
        verdict = "PASS" if r["pass"] else "FAIL"
        print(f"[{verdict}] {r['workload']}: jax/torch step {r['ratio_step']:.2f}x (goal within {GOAL}x "
              f"either way); forward {r['ratio_forward']:.2f}x, backward {r['ratio_backward']:.2f}x")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    write_text(args.out, dumps_json(rows, indent=2))
    print(f"wrote {args.out}")
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from render_docs import refresh_pages_of

    for page in refresh_pages_of(Path(args.out)):  # the pages whose generated blocks quote this file
        print(f"rendered {page}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
