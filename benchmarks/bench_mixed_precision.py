"""Speed and memory of an MDEQ training step in float32 against bfloat16 (torch.autocast), torch.

One step is the trainer's (:class:`deqcore_models._training_engines.TorchEngine`): forward solve
(Broyden, the trainer's settings), implicit backward and the Adam update, on a batch of
Fashion-MNIST. The two precisions run interleaved (float32, bfloat16, float32, ...) after a warm-up
step each, so drifts of the machine hit both alike; the table gives medians and minima. Memory is
what the step keeps for its backward pass: the bytes of every tensor autograd saves
(``torch.autograd.graph.saved_tensors_hooks``), the part of the peak that a precision changes.
CPU only: the trainer's torch engine runs on the CPU (float16 needs a GPU, and none was measured).

Run:  python benchmarks/bench_mixed_precision.py [--repeats 7] [--config cpu] [--batch 32]
Results: benchmarks/results/mixed_precision.json (``--json``).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from deqcore_models._equilibrium_layer import DEQSettings
from deqcore_models._training_engines import make_engine
from deqcore_models.data import data_dir, fashion_mnist, to_float_nchw
from deqcore_models.families.mdeq import mdeq_task
from deqcore_models.mdeq import MDEQ_CONFIGS, dropout_masks, init_mdeq
from deqcore_models.train import IMPLICIT_BACKWARD

from deqcore.internal import dumps_json, write_text


def _saved_bytes(step) -> int:
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step()
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=7, help="interleaved timed steps per precision")
    ap.add_argument("--config", default="cpu", choices=sorted(MDEQ_CONFIGS))
    ap.add_argument("--batch", type=int, default=32, help="images per step")
    ap.add_argument("--json", default=str(Path(__file__).parent / "results" / "mixed_precision.json"))
    args = ap.parse_args()
    if args.repeats < 1 or args.batch < 1:
        raise SystemExit(f"bench_mixed_precision: --repeats and --batch must be >= 1 (got {args.repeats}, "
                         f"{args.batch})")
    torch.set_num_threads(1)
    cfg = MDEQ_CONFIGS[args.config]
    data = fashion_mnist(data_dir(None), limit=args.batch)
    x = to_float_nchw(data.train_x[:args.batch], np.array([0.286], np.float32), np.array([0.353], np.float32))
    y = np.eye(10, dtype=np.float32)[data.train_y[:args.batch]]
    masks = dropout_masks(cfg, args.batch, np.random.default_rng(0))
    params, state = init_mdeq(cfg, 1, 0)
    precisions = ["float32", "bfloat16"]
    engines = {p: make_engine("torch", mdeq_task(cfg), params, state, 0.0) for p in precisions}
    settings = {p: DEQSettings(grad_options=IMPLICIT_BACKWARD, precision=p) for p in precisions}

    def step(p):
        return lambda: engines[p].train_step(x, y, masks, settings[p], 1e-4)

    memory = {p: _saved_bytes(step(p)) for p in precisions}  # also the warm-up
    times: dict[str, list[float]] = {p: [] for p in precisions}
    for _ in range(args.repeats):
        for p in precisions:
            t = time.perf_counter()
            step(p)()
            times[p].append(time.perf_counter() - t)
    rows = [{"device": "cpu", "precision": p, "median_s": statistics.median(times[p]), "min_s": min(times[p]),
             "saved_mb": memory[p] / 2**20, "times_s": times[p]} for p in precisions]
    base = rows[0]
    for r in rows:
        r["median_ratio"] = r["median_s"] / base["median_s"]
        r["saved_ratio"] = r["saved_mb"] / base["saved_mb"]
        print(f"{r['precision']:>9}: median {r['median_s']:.3f} s  min {r['min_s']:.3f} s  "
              f"saved for backward {r['saved_mb']:.1f} MB")
    write_text(Path(args.json), dumps_json({
        "what": "MDEQ training step (trainer settings, Broyden, implicit backward, Adam), float32 vs "
                "bfloat16 under torch.autocast, interleaved",
        "config": args.config, "batch": args.batch, "repeats": args.repeats, "threads": 1,
        "machine": platform.processor() or platform.machine(), "torch": torch.__version__, "rows": rows}))


if __name__ == "__main__":
    main()
