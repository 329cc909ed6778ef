"""One solver loop over a sharded batch against one loop per shard, on JAX host devices.

A jitted ``deqcore.solve`` with the batch sharded over a device mesh (``NamedSharding(mesh,
P("batch"))``, parameters replicated) runs one ``while_loop`` for the whole batch: its stop test
reduces over every device each iteration, and every device steps until the slowest sample
anywhere has stopped. ``deqcore_jax.solve_per_shard`` runs one loop per device on its shard, with
no communication inside the loop. Both give the same z* and gradients (tests/test_distributed_jax.py);
this measures what each costs.

Problem: ``f(z, (x, s)) = s * tanh(z W^T) + x U^T``, W of spectral norm 1, float64, batch
``--batch`` per device, state size ``--dim``, Anderson to a relative residual of ``--tol``. The
contraction factor ``s`` is per sample: ``equal`` gives every sample ``s = 0.9`` (the shards
converge at the same speed); ``uneven`` gives device 0's samples 0.3 and device 1's 0.95. Timed:
the forward solve (``z*``) and forward + backward (the gradient of ``sum(z*^2)`` w.r.t. W,
``grad="implicit"``), each jitted once before timing. The variants run interleaved, ``--repeats``
rounds in rotating order, each timing ``block_until_ready`` on one call; median and minimum in ms
and the ratio global / per-shard (above 1: per-shard is faster).

The host devices are forced with ``--xla_force_host_platform_device_count`` and XLA's CPU
runtime is limited to one thread per device (``--xla_cpu_multi_thread_eigen=false
intra_op_parallelism_threads=1``), set before jax is imported; run with ``OMP_NUM_THREADS=1``.

    OMP_NUM_THREADS=1 python benchmarks/bench_sharded_solve.py --repeats 30
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=2, help="host devices in the mesh (default 2)")
    parser.add_argument("--batch", type=int, default=64, help="samples per device (default 64)")
    parser.add_argument("--dim", type=int, default=256, help="state size (default 256)")
    parser.add_argument("--tol", type=float, default=1e-8, help="relative tolerance (default 1e-8)")
    parser.add_argument("--repeats", type=int, default=20, help="interleaved rounds (default 20)")
    parser.add_argument("--out", help="write the results as JSON to this file "
                                      "(benchmarks/results/sharded_solve.json for the docs)")
    args = parser.parse_args()
    os.environ["XLA_FLAGS"] = (f"--xla_force_host_platform_device_count={args.devices} "
                               "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1")
    os.environ["JAX_ENABLE_X64"] = "1"

    import deqcore_jax
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    import deqcore

    mesh = Mesh(np.array(jax.devices()[:args.devices]), ("batch",))
    batch, replicated = NamedSharding(mesh, P("batch")), NamedSharding(mesh, P())
    rng = np.random.default_rng(0)
    W = rng.normal(size=(args.dim, args.dim))
    W /= np.linalg.norm(W, 2)
    U = rng.normal(size=(args.dim, args.dim)) / np.sqrt(args.dim)
    B = args.batch * args.devices
    x = rng.normal(size=(B, args.dim))
    W, U, x = (jax.device_put(a, s) for a, s in ((W, replicated), (U, replicated), (x, batch)))
    scales = {"equal": np.full(B, 0.9), "uneven": np.repeat([0.3] + [0.95] * (args.devices - 1),
                                                           args.batch)}
    kw = {"solver": "anderson", "tol": args.tol, "max_iter": 500}

    def solvers():
        def global_loop(f, x, z0, **kw):
            return deqcore.solve(f, x, z0, **kw)

        def per_shard(f, x, z0, **kw):
            return deqcore_jax.solve_per_shard(f, x, z0, mesh=mesh, **kw)

        return {"global": global_loop, "per-shard": per_shard}

    def programs(solve):
        def layer(W):
            return lambda z, xs: xs[1][:, None] * jnp.tanh(z @ W.T) + xs[0] @ U.T

        def forward(W, xs):
            sol = solve(layer(W), xs, jnp.zeros_like(xs[0]), grad=None, **kw)
            return sol.z, getattr(sol, "shard_nfe", sol.nfe)  # per shard where there are shards

        def loss(W, xs):
            sol = solve(layer(W), xs, jnp.zeros_like(xs[0]), grad="implicit", **kw)
            return jnp.sum(sol.z ** 2)

        return {"fwd": jax.jit(forward), "fwd+bwd": jax.jit(jax.grad(loss))}

    print(f"{jax.device_count()} host devices, batch {args.batch} per device, dim {args.dim}, "
          f"anderson tol {args.tol:g}, float64, {args.repeats} interleaved rounds")
    print(f"{'problem':8} {'pass':8} {'loop':10} {'nfe':>10} {'median ms':>10} {'min ms':>8}")
    rows = []
    load = os.getloadavg()[0]
    for problem, s in scales.items():
        xs = (x, jax.device_put(s, batch))
        runs = {(name, pass_): fn for name, solve in solvers().items()
                for pass_, fn in programs(solve).items()}
        nfe = {name: np.atleast_1d(runs[name, "fwd"](W, xs)[1]).tolist() for name in solvers()}
        for fn in runs.values():  # compile (the forwards ran above)
            jax.block_until_ready(fn(W, xs))
        times: dict[tuple[str, str], list[float]] = {key: [] for key in runs}
        keys = list(runs)
        for r in range(args.repeats):
            for key in keys[r % len(keys):] + keys[:r % len(keys)]:
                start = time.perf_counter()
                jax.block_until_ready(runs[key](W, xs))
                times[key].append(1e3 * (time.perf_counter() - start))
        for pass_ in ("fwd", "fwd+bwd"):
            row: dict[str, object] = {"problem": problem, "pass": pass_, "global_nfe": nfe["global"][0],
                                      "shard_nfe": nfe["per-shard"]}
            for name, key in (("global", "global"), ("per-shard", "per_shard")):
                t = times[name, pass_]
                row |= {f"{key}_median_ms": statistics.median(t), f"{key}_min_ms": min(t),
                        f"{key}_times_ms": t}
                print(f"{problem:8} {pass_:8} {name:10} {'/'.join(map(str, nfe[name])):>10} "
                      f"{statistics.median(t):10.2f} {min(t):8.2f}")
            row["ratio_median"] = row["global_median_ms"] / row["per_shard_median_ms"]
            row["ratio_min"] = row["global_min_ms"] / row["per_shard_min_ms"]
            print(f"{problem:8} {pass_:8} {'ratio':10} {'':>10} {row['ratio_median']:10.2f} "
                  f"{row['ratio_min']:8.2f}   global / per-shard")
            rows.append(row)
    if args.out:
        result = {"config": {k: getattr(args, k) for k in ("devices", "batch", "dim", "tol", "repeats")},
                  "versions": {"python": platform.python_version(), "jax": jax.__version__,
                               "cpus": os.cpu_count(), "machine": platform.machine()},
                  "loadavg_start": load, "loadavg_end": os.getloadavg()[0], "rows": rows}
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
