"""Per-step cost of ``gdeq_refined`` against ``implicit`` and ``gdeq`` on MDEQ training (torch, CPU).

The MDEQ ``cpu`` config on Fashion-MNIST, Broyden forward (``--max-iter`` 18), batch 64, the
trainer's settings (``deqcore_models.train.TrainConfig``; implicit and gdeq_refined with the
trainer's backward budget of 20 steps). One run first pre-trains ``--pretrain`` unrolled steps
(or loads ``--checkpoint``); then each mode trains its own copy of those weights for ``--steps``
steps on the same batches, the modes of a step run in rotating order (interleaved, so that
outside load hits all of them alike).

Modes: implicit, gdeq_refined from GDEQ's estimate with a Broyden backward seeded by the forward's
ring (``seed_inverse=True, solver="broyden"``), gdeq_refined with its defaults (from GDEQ's
estimate, Anderson backward), gdeq.
Per mode: seconds per training step (``Engine.train_step``: forward, backward, Adam; median and
minimum), backward VJPs per step (the backward solves' ``vjps`` from ``solution.backward`` plus
the final VJP of each equilibrium solve; GDEQ: 1 per solve) and, every ``--cosine-every`` steps
(untimed), the cosine between the mode's gradient and the converged implicit gradient (the
trainer's cosine probe: implicit with tol 1e-6, up to 100 Anderson steps) at that mode's weights.

Run:  OMP_NUM_THREADS=1 python benchmarks/bench_gdeq_refined_mdeq.py [--pretrain 300] [--steps 40]
      python benchmarks/bench_gdeq_refined_mdeq.py --pretrain 2 --steps 2 --train-limit 256 \
          --json /tmp/mdeq.json                                     (a check of the script)
Data: ``$DEQCORE_DATA`` (the fashion-mnist folder). Results: ``--json`` (default
benchmarks/results/gdeq_refined_mdeq.json), kept unless ``--overwrite``.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

from deqcore.internal import dumps_json, write_text

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_solvers as fwd  # noqa: E402  (versions, git state)

#: label, gradient mode, options on top of the trainer's defaults for the mode
MODES = (("implicit", "implicit", {}),
         ("gdeq_refined (seeded broyden)", "gdeq_refined", {"seed_inverse": True, "solver": "broyden"}),
         ("gdeq_refined", "gdeq_refined", {}), ("gdeq", "gdeq", {}))
EVAL_LIMIT = 256  # the pre-training run's closing evaluation, which nothing here reads


def _cosine(a: dict, b: dict) -> float:
    dot = sum(float(np.vdot(a[k].astype(np.float64), b[k])) for k in a)
    na = np.sqrt(sum(float(np.vdot(a[k].astype(np.float64), a[k])) for k in a))
    nb = np.sqrt(sum(float(np.vdot(b[k].astype(np.float64), b[k])) for k in b))
    return dot / (na * nb)


def main(argv: list[str] | None = None) -> int:
    from deqcore_models._equilibrium_layer import collect_forward_solves
    from deqcore_models.train import TrainConfig, Trainer

    import deqcore

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pretrain", type=int, default=300, help="unrolled pre-training steps (default 300)")
    ap.add_argument("--checkpoint", default=None, help="start from this run folder's checkpoint.npz "
                                                       "instead of pre-training")
    ap.add_argument("--steps", type=int, default=40, help="timed training steps per mode (default 40)")
    ap.add_argument("--cosine-every", type=int, default=10, help="cosine probe period (default 10)")
    ap.add_argument("--max-iter", type=int, default=18, help="Broyden forward steps (default 18)")
    ap.add_argument("--train-limit", type=int, default=None, help="first N training images only")
    ap.add_argument("--data", default=None, help="data folder (default $DEQCORE_DATA)")
    ap.add_argument("--json", default=str(Path(__file__).parent / "results" / "gdeq_refined_mdeq.json"))
    ap.add_argument("--overwrite", action="store_true", help="replace an existing --json file")
    args = ap.parse_args(argv)
    out = Path(args.json)
    if out.exists() and not args.overwrite:
        raise SystemExit(f"bench_gdeq_refined_mdeq: {out} exists; pass --overwrite or --json PATH")
    if args.steps < 1 or args.pretrain < 0 or args.cosine_every < 1:
        raise SystemExit("bench_gdeq_refined_mdeq: --steps and --cosine-every must be >= 1, --pretrain >= 0")

    tmp = tempfile.TemporaryDirectory()
    base = TrainConfig(backend="torch", config="cpu", dataset="fashion-mnist", data=args.data,
                       train_limit=args.train_limit, test_limit=EVAL_LIMIT, solver="broyden",
                       max_iter=args.max_iter, grad="implicit", pretrain_steps=args.pretrain,
                       batch_size=64, epochs=1,
                       max_steps=max(args.pretrain, 1), out=str(Path(tmp.name) / "pretrain"))
    first = Trainer(base, progress=False)
    t0 = time.perf_counter()
    if args.checkpoint:
        from deqcore_models.checkpoint import load_checkpoint

        ck = load_checkpoint(Path(args.checkpoint) / "checkpoint.npz")
        first.engine.load(ck.params, ck.state, ck.extra)
        start = int(ck.meta["step"])
    else:
        first.run(overwrite=True)
        start = max(args.pretrain, 1)
    pretrain_s = time.perf_counter() - t0
    params, state, extra = first.engine.export()
    runs = {}
    for mode, grad, options in MODES:
        cfg = dataclasses.replace(base, grad=grad, grad_options=options, out=str(Path(tmp.name) / grad))
        tr = Trainer(cfg, progress=False, work=first.work)
        tr.engine.load(params, state, extra)
        runs[mode] = {"trainer": tr, "settings": cfg.deq_settings(), "ref": cfg.reference_settings(),
                      "seconds": [], "vjps": [], "cosine": [], "loss": []}
    print(f"MDEQ cpu, fashion-mnist, torch, batch 64, Broyden forward max_iter {args.max_iter}; start at "
          f"step {start} ({'checkpoint' if args.checkpoint else f'{args.pretrain} pre-training steps'}, "
          f"{pretrain_s:.0f} s); {args.steps} interleaved steps per mode", flush=True)
    for i in range(args.steps):
        step = start + i
        batch = first.work.train_batch(step)
        labels = [m[0] for m in MODES]
        for mode in labels[i % len(labels):] + labels[:i % len(labels)]:
            r = runs[mode]
            engine = r["trainer"].engine
            if i % args.cosine_every == 0:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", deqcore.BackwardWarning)
                    mine = engine.gradients(batch.x, batch.y, batch.masks, r["settings"])
                    ref = engine.gradients(batch.x, batch.y, batch.masks, r["ref"])
                r["cosine"].append(_cosine(mine, ref))
            with collect_forward_solves() as solves, warnings.catch_warnings():
                warnings.simplefilter("ignore", deqcore.BackwardWarning)
                t = time.perf_counter()
                res = engine.train_step(batch.x, batch.y, batch.masks, r["settings"], base.lr)
                r["seconds"].append(time.perf_counter() - t)
            # the backward report of each equilibrium solve is filled by the step's backward pass
            r["vjps"].append(sum(1 + (sol.backward.vjps or 0) for sol in solves))
            r["loss"].append(res["loss"])
    rows = []
    for mode, grad, _ in MODES:
        r = runs[mode]
        rows.append({"mode": mode, "grad": grad, "step_s_median": statistics.median(r["seconds"]),
                     "step_s_min": min(r["seconds"]), "vjps_median": statistics.median(r["vjps"]),
                     "vjps_mean": float(np.mean(r["vjps"])), "cosine_mean": float(np.mean(r["cosine"])),
                     "cosine": r["cosine"], "seconds": r["seconds"], "vjps": r["vjps"], "loss": r["loss"],
                     "grad_options": r["settings"].grad_options})
    implicit = rows[0]
    print(f"\n{'mode':<24} {'s/step med':>10} {'min':>8} {'vs implicit':>11} {'VJPs':>6} {'cos':>7}")
    for r in rows:
        r["speedup_median"] = implicit["step_s_median"] / r["step_s_median"]
        r["speedup_min"] = implicit["step_s_min"] / r["step_s_min"]
        print(f"{r['mode']:<24} {r['step_s_median']:10.3f} {r['step_s_min']:8.3f} "
              f"{r['speedup_median']:10.2f}x {r['vjps_median']:6.1f} {r['cosine_mean']:7.4f}")
    versions = {m: fwd._version(m) for m in ("numpy", "torch", "deqcore")}
    versions["deqcore git"] = fwd._git_state()
    write_text(out, dumps_json({"config": {"pretrain": args.pretrain, "checkpoint": args.checkpoint,
                                           "start_step": start, "steps": args.steps,
                                           "max_iter": args.max_iter, "batch": 64, "config": "cpu",
                                           "train_limit": args.train_limit,
                                           "cosine_every": args.cosine_every, "pretrain_s": pretrain_s},
                                "versions": versions, "rows": rows}, indent=1))
    print(f"\nwrote {out}")
    tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
