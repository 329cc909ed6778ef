"""Weak scaling of data-parallel training: samples per second of 1 and 2 workers at equal per-worker batch.

PyTorch: ``deqcore train`` in one process against the same command under torchrun with 2 gloo
workers (DistributedDataParallel), each process one thread. JAX: ``deqcore train --backend jax``
on one device against ``--devices 2`` on 2 host devices (``XLA_FLAGS=
--xla_force_host_platform_device_count=2``), in one process. The 2-worker runs train on a global
batch of twice the per-worker batch, so each worker does the work of the 1-worker run (weak
scaling); the efficiency is ``throughput(2) / (2 * throughput(1))`` (goal: >= 85 % for the MDEQ
``cpu`` configuration). Step times are the trainer's own (steps.csv ``seconds``: forward solve,
backward, all-reduces, Adam), the first ``--warmup`` steps left out (JAX compiles its step in
the first); beside them, two independent 1-worker runs started at once (no communication: the floor,
what this machine gives two workers); the runs alternate framework and variant, ``--repeats``
times, and each figure
is the median over all timed steps of all repeats (the minimum over repeats of the per-run
medians is printed beside it). Communication: the median time of one all-reduce of the whole
gradient (every parameter, float32) between the 2 workers, on gloo for torch and as a jitted
cross-device sum for JAX, and its share of the 2-worker step. The forward NFE per step is printed
too: the solve of a batch runs until its slowest sample converges, so a larger global batch can
need more iterations.

    python benchmarks/bench_distributed.py --data ../shared/data
    python benchmarks/bench_distributed.py --data ../shared/data --frameworks torch --steps 20 --repeats 3

Results go to ``--out`` (default benchmarks/results/distributed.json; an existing file is kept
unless ``--overwrite``).
"""

from __future__ import annotations

import argparse
import csv
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from deqcore.internal import dumps_json, write_text

GOAL = 0.85
FRAMEWORKS = ("torch", "jax")
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
# one XLA CPU thread per host device: the device count and Eigen's pool off, so a device is a thread
XLA = "--xla_force_host_platform_device_count=2 --xla_cpu_multi_thread_eigen=false"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def train_command(framework: str, workers: int, args: argparse.Namespace,
                  out: Path) -> tuple[list[str], dict]:
    """The command and environment of one timed run."""
    flags = ["train", "--model", "mdeq", "--config", args.config, "--dataset", "fashion-mnist",
             "--batch-size", str(args.batch * workers), "--max-steps", str(args.steps + args.warmup),
             "--test-limit", str(args.batch * workers), "--solver", "broyden", "--max-iter", "18",
             "--grad", args.grad, "--out", str(out), "--no-progress", "--backend", framework]
    if args.data:
        flags += ["--data", args.data]
    env = {**os.environ, **ONE_THREAD}
    if framework == "torch" and workers > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(workers),
               "--master-addr", "127.0.0.1", "--master-port", str(_free_port()),
               "-m", "deqcore_models.cli", *flags]
    else:
        cmd = [sys.executable, "-m", "deqcore_models.cli", *flags]
    if framework == "jax":
        cmd += ["--devices", str(workers)]
        env["XLA_FLAGS"] = XLA
    return cmd, env


def timed_run(framework: str, workers: int, args: argparse.Namespace, copies: int = 1) -> dict:
    """Step times (s) and NFE of one run's timed steps, from its steps.csv; ``copies`` > 1 starts
    that many independent runs of the command at once (their steps pooled): what the machine
    gives two workers that never communicate."""
    with tempfile.TemporaryDirectory() as tmp:
        outs = [Path(tmp) / f"run{i}" for i in range(copies)]
        started = []
        for out in outs:
            cmd, env = train_command(framework, workers, args, out)
            proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                    text=True)
            started.append((cmd, proc))
        for cmd, proc in started:
            _, err = proc.communicate(timeout=args.timeout)
            if proc.returncode:
                raise RuntimeError(f"{framework} with {workers} worker(s) failed ({' '.join(cmd)}):\n"
                                   f"{err[-3000:]}")
        rows = []
        for out in outs:
            with open(out / "steps.csv", newline="") as fh:
                rows += [r for r in csv.DictReader(fh) if int(r["step"]) > args.warmup]
    return {"seconds": [float(r["seconds"]) for r in rows], "nfe": [int(r["nfe"]) for r in rows]}


def _torch_allreduce_worker(rank: int, port: int, numel: int, repeats: int, queue) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    t = torch.ones(numel)
    times = []
    for _ in range(repeats + 3):
        dist.barrier()
        t0 = time.perf_counter()
        dist.all_reduce(t)
        times.append(time.perf_counter() - t0)
    dist.destroy_process_group()
    if rank == 0:
        queue.put(statistics.median(times[3:]))


def torch_allreduce_seconds(numel: int, repeats: int = 30) -> float:
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_torch_allreduce_worker, args=(r, port, numel, repeats, queue))
             for r in range(2)]
    for p in procs:
        p.start()
    result = queue.get(timeout=300)
    for p in procs:
        p.join(timeout=60)
    return float(result)


def jax_allreduce_seconds(numel: int, repeats: int = 30) -> float:
    """Run in a subprocess with 2 host devices: a jitted sum of a (2, numel) array sharded by row."""
    code = f"""
import statistics, time, numpy as np, jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
mesh = Mesh(np.array(jax.devices()[:2]), ("batch",))
a = jax.device_put(np.ones((2, {numel}), np.float32), NamedSharding(mesh, P("batch")))
total = jax.jit(lambda a: a.sum(axis=0), out_shardings=NamedSharding(mesh, P()))
total(a).block_until_ready()
times = []
for _ in range({repeats}):
    t0 = time.perf_counter(); total(a).block_until_ready(); times.append(time.perf_counter() - t0)
print(statistics.median(times))
"""
    proc = subprocess.run([sys.executable, "-c", code], env={**os.environ, **ONE_THREAD, "XLA_FLAGS": XLA},
                          capture_output=True, text=True, timeout=300, check=True)
    return float(proc.stdout.strip().splitlines()[-1])


def parameter_count(config: str) -> int:
    from deqcore_models.mdeq import MDEQ_CONFIGS, init_mdeq

    params, _ = init_mdeq(MDEQ_CONFIGS[config], 1, 0)
    return int(sum(v.size for v in params.values()))


#: The timed variants: (name, workers of the command, independent copies run at once, samples per step).
VARIANTS = (("1", 1, 1), ("2", 2, 1), ("pair", 1, 2))


def summarise(framework: str, runs: dict[str, list[dict]], batch: int, comm_s: float) -> dict:
    row: dict = {"framework": framework, "per_worker_batch": batch, "allreduce_s": comm_s}
    for name, workers, copies in VARIANTS:
        rs = runs[name]
        step = statistics.median(s for r in rs for s in r["seconds"])
        row[name] = {"step_s": step,
                     "step_s_min_of_medians": min(statistics.median(r["seconds"]) for r in rs),
                     "samples_per_s": workers * copies * batch / step,
                     "nfe": statistics.mean(n for r in rs for n in r["nfe"])}
    row["efficiency"] = row["2"]["samples_per_s"] / (2 * row["1"]["samples_per_s"])
    row["machine_efficiency"] = row["pair"]["samples_per_s"] / (2 * row["1"]["samples_per_s"])
    row["of_machine"] = row["2"]["samples_per_s"] / row["pair"]["samples_per_s"]
    row["communication_share"] = comm_s / row["2"]["step_s"]
    row["pass"] = row["efficiency"] >= GOAL
    return row


def main() -> int:
    p = argparse.ArgumentParser(prog="bench_distributed", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=None, help="data folder (default $DEQCORE_DATA)")
    p.add_argument("--frameworks", default="torch,jax", help="comma-separated: torch, jax (default both)")
    p.add_argument("--config", default="cpu", help="MDEQ configuration (default cpu)")
    p.add_argument("--grad", default="implicit", help="gradient mode (default implicit)")
    p.add_argument("--batch", type=int, default=64, help="per-worker batch (default 64)")
    p.add_argument("--steps", type=int, default=10, help="timed steps per run (default 10)")
    p.add_argument("--warmup", type=int, default=3, help="untimed first steps per run (default 3)")
    p.add_argument("--repeats", type=int, default=2, help="runs per framework and worker count (default 2)")
    p.add_argument("--timeout", type=float, default=1200, help="seconds one run may take (default 1200)")
    p.add_argument("--out", default="benchmarks/results/distributed.json")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    args = p.parse_args()
    frameworks = [f.strip() for f in args.frameworks.split(",") if f.strip()]
    bad = [f for f in frameworks if f not in FRAMEWORKS]
    if bad or not frameworks:
        p.error(f"--frameworks takes torch and/or jax, got {args.frameworks!r}")
    for name in ("batch", "steps", "repeats"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.warmup < 1:
        p.error(f"--warmup must be >= 1 (the first step compiles or warms caches), got {args.warmup}")
    if Path(args.out).exists() and not args.overwrite:
        p.error(f"--out {args.out} exists: pass --overwrite to replace it, or choose another --out")

    runs: dict[str, dict[str, list[dict]]] = {f: {v[0]: [] for v in VARIANTS} for f in frameworks}
    for rep in range(args.repeats):
        for framework in frameworks:
            for name, workers, copies in VARIANTS:
                r = timed_run(framework, workers, args, copies)
                runs[framework][name].append(r)
                print(f"  repeat {rep + 1} {framework} {name}: "
                      f"{statistics.median(r['seconds']):.3f} s/step, "
                      f"NFE {statistics.mean(r['nfe']):.1f}", flush=True)
    numel = parameter_count(args.config)
    comm = {"torch": torch_allreduce_seconds, "jax": jax_allreduce_seconds}
    rows = [summarise(f, runs[f], args.batch, comm[f](numel)) for f in frameworks]

    print(f"\nMDEQ {args.config} ({numel} parameters), {args.grad}, per-worker batch {args.batch}, "
          f"{args.steps} timed steps x {args.repeats} runs")
    print(f"{'framework':9} {'workers':>24} {'step s':>8} {'samples/s':>10} {'NFE':>6}")
    shown = {"1": "1", "2": "2", "pair": "2 independent (floor)"}
    for r in rows:
        for name, _, _ in VARIANTS:
            m = r[name]
            print(f"{r['framework']:9} {shown[name]:>24} {m['step_s']:8.3f} {m['samples_per_s']:10.1f} "
                  f"{m['nfe']:6.1f}")
    print()
    for r in rows:
        verdict = "PASS" if r["pass"] else "FAIL"
        print(f"[{verdict}] {r['framework']}: weak-scaling efficiency {100 * r['efficiency']:.1f} % (goal >= "
              f"{100 * GOAL:.0f} %); two independent 1-worker runs at once reach "
              f"{100 * r['machine_efficiency']:.1f} % (this machine's limit), the 2-worker run "
              f"{100 * r['of_machine']:.1f} % of that; one gradient all-reduce "
              f"{1000 * r['allreduce_s']:.2f} ms = {100 * r['communication_share']:.1f} % of the "
              f"2-worker step")
    settings = {k: getattr(args, k) for k in ("config", "grad", "batch", "steps", "warmup", "repeats")}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    record = {"settings": settings, "parameters": numel, "results": rows, "runs": runs}
    write_text(args.out, dumps_json(record, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
