"""Training memory of the DEQ-Transformer against an explicit weight-tied transformer of the same
effective depth (the DEQ paper's memory claim: over 80 %, up to 88 %, less).

Both models are the same parameters and layer (deqcore_models.transformer, config ``--config``)
on the same WikiText-2 batch. The DEQ solves for the fixed point (``--solver``, ``--max-iter``) and
differentiates implicitly; the explicit model applies the layer as many times as the DEQ's
forward evaluated it (its measured NFE: "same effective depth") with ordinary backpropagation.

Measured with PyTorch (eager autograd keeps exactly what backward needs):

* ``saved bytes``: every tensor autograd packs for backward during one training forward
  (``torch.autograd.graph.saved_tensors_hooks``), unique storages, parameters excluded; split into
  vocabulary-sized tensors (last axis = vocabulary: logits and softmax of the output layer, the
  same in both models) and the rest (the layer stack, where a DEQ differs);
* both with the output layer deqcore_models trains with (``chunked``: the softmax computed
  ``--chunk`` positions at a time and recomputed in backward, nothing vocabulary-sized kept) and
  with a plain one (``full``: all logits formed and kept, as the paper's models keep their
  adaptive softmax's), so the layer stack's share is visible either way;
* ``peak RSS``: the peak resident memory (Linux ``VmHWM``, reset after setup) of a fresh process
  that builds the model and runs ``--steps`` + 1 training steps, and its growth over the process
  after setup (model, data and framework loaded; the growth is what training adds: activations,
  gradients and Adam's moments, the last two equal for both models, and the framework's one-time
  costs of a first step: code pages, kernel caches, thread pools);
* ``step peak``: the growth of the peak over the resident memory after one untimed warm-up step
  (``VmHWM`` reset again), i.e. what a training step needs on top of the persistent state: the
  activations kept for backward and the temporaries;
* ``step s``: the median training-step time in a second such process, with glibc's default
  allocator settings (the first one maps every large tensor separately; see ``run_child``); a
  ratio: the paper reports DEQ training 2.82x slower than the layer-based model.

    python benchmarks/bench_transformer_memory.py --data ../shared/data \
        [--out docs/experiments/transformer-wt2]

It writes ``memory.json`` and ``memory.md`` (rendered from it by ``render_docs.py``) to ``--out``
(default: a new temporary folder, printed), and prints the report.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from deqcore.internal import dumps_json, write_text


def _setup(args, mode: str, depth: int, output: str):
    import torch  # noqa: F401  (the process's baseline includes the framework)
    from deqcore_models import data as D
    from deqcore_models._equilibrium_layer import DEQSettings
    from deqcore_models._training_engines import make_engine
    from deqcore_models.families.transformer import transformer_task
    from deqcore_models.transformer import TRANSFORMER_CONFIGS, init_transformer

    cfg = TRANSFORMER_CONFIGS[args.config]
    corpus = D.wikitext2(D.data_dir(args.data))
    rows = D.batchify(corpus.train, args.batch_size)
    x, y = rows[:, : cfg.tgt_len], rows[:, 1: cfg.tgt_len + 1]
    params, state = init_transformer(cfg, corpus.vocab_size, seed=0, batch_size=args.batch_size)
    task = transformer_task(cfg, chunk=args.chunk if output == "chunked" else None)
    engine = make_engine("torch", task, params, state, weight_decay=0.0)
    if mode == "deq":
        settings = DEQSettings(solver=args.solver, tol=args.tol, max_iter=args.max_iter, grad="implicit",
                               grad_options={"max_iter": args.max_iter})
    else:
        settings = DEQSettings(unrolled=depth)
    return engine, task, settings, x, y, corpus.vocab_size


def saved_bytes(args, mode: str, depth: int, output: str) -> dict:
    import torch

    engine, task, settings, x, y, vocab = _setup(args, mode, depth, output)
    ops = engine.ops
    skip = {p.untyped_storage().data_ptr() for p in engine.params.values()}
    seen: dict[int, tuple[int, bool]] = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in skip:
            seen[st.data_ptr()] = (st.nbytes(), t.ndim > 0 and t.shape[-1] == vocab)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss, (_, _, nfe, res, _, _) = task.loss(ops, engine.params, engine.state, ops.asarray(x),
                                              ops.asarray(y), None, settings, True)
    vocab_bytes = sum(n for n, v in seen.values() if v)
    total = sum(n for n, _ in seen.values())
    return {"saved_total": total, "saved_vocab": vocab_bytes, "saved_layers": total - vocab_bytes,
            "nfe": int(nfe), "residual": float(res), "loss": float(loss.detach()), "tokens": int(x.shape[1])}


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field} (Linux only)")


def child(args) -> None:
    """One fresh process: setup, then ``--steps`` training steps; prints JSON."""
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    engine, task, settings, x, y, _ = _setup(args, args.child, args.depth, args.output_layer)
    gc.collect()
    # reset the high-water mark (VmHWM) so the data loading's peak does not hide training's
    Path("/proc/self/clear_refs").write_text("5")
    setup = _status_kb("VmRSS")
    times = []
    engine.train_step(x, y, None, settings, 1e-4)  # untimed: first-call costs
    gc.collect()
    first_peak = _status_kb("VmHWM")
    Path("/proc/self/clear_refs").write_text("5")
    warm = _status_kb("VmRSS")
    for _ in range(args.steps):
        t0 = time.perf_counter()
        engine.train_step(x, y, None, settings, 1e-4)
        times.append(time.perf_counter() - t0)
    peak = _status_kb("VmHWM")
    print(json.dumps({"peak_rss_mb": max(peak, first_peak) / 1024, "rss_before_mb": base / 1024,
                      "rss_after_setup_mb": setup / 1024, "step_peak_mb": (peak - warm) / 1024,
                      "step_s": float(np.median(times))}))


def run_child(args, mode: str, depth: int, output: str, exact_rss: bool) -> dict:
    cmd = [sys.executable, __file__, "--child", mode, "--depth", str(depth), "--output-layer", output,
           "--chunk", str(args.chunk), "--data", args.data,
           "--config", args.config, "--batch-size", str(args.batch_size), "--solver", args.solver,
           "--tol", str(args.tol), "--max-iter", str(args.max_iter), "--steps", str(args.steps)]
    # glibc keeps freed blocks below its (growing) mmap threshold in the heap, so a step that
    # reuses the warm-up step's freed memory would not raise the resident size: a fixed 128 KiB
    # threshold maps every large tensor separately and returns it on free, so RSS follows the
    # live tensors. It also makes every large allocation a fresh mmap (page faults), so step
    # times come from a second process with glibc's defaults.
    env = dict(os.environ)
    if exact_rss:
        env.update(MALLOC_MMAP_THRESHOLD_="131072", MALLOC_TRIM_THRESHOLD_="131072")
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="data folder holding wikitext-2/")
    p.add_argument("--config", default="small", help="transformer config (default small)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--solver", default="anderson")
    p.add_argument("--tol", type=float, default=1e-3)
    p.add_argument("--max-iter", type=int, default=16)
    p.add_argument("--steps", type=int, default=3, help="timed training steps per process (default 3)")
    p.add_argument("--chunk", type=int, default=32,
                   help="positions per softmax chunk of the chunked output layer (default 32, the "
                        "trainer's)")
    p.add_argument("--output-layer", default="chunked", help=argparse.SUPPRESS)
    p.add_argument("--out", default=None,
                   help="where memory.json and memory.md go (default: a new temporary folder)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--depth", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        child(args)
        return
    deq = saved_bytes(args, "deq", 0, "chunked")
    depth = deq["nfe"]
    rows = {}
    for output in ("chunked", "full"):
        rows[f"deq, {output}"] = deq if output == "chunked" else saved_bytes(args, "deq", 0, output)
        rows[f"explicit-{depth}, {output}"] = saved_bytes(args, "explicit", depth, output)
    for name, r in rows.items():
        mode, output = ("deq" if name.startswith("deq") else "explicit"), name.split(", ")[1]
        r.update(run_child(args, mode, depth, output, exact_rss=True))
        r["step_s"] = run_child(args, mode, depth, output, exact_rss=False)["step_s"]

    from render_docs import docs_numbers, memory_summary  # the report's renderer (benchmarks/)

    summary: dict = {"config": vars(args), "depth": depth, "rows": rows, **memory_summary(rows, depth)}
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="deq-memory-"))
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / "memory.json", dumps_json(summary, indent=2))
    docs_numbers.write_page(out / "memory.md", "memory.report", "memory.json")
    print((out / "memory.md").read_text())


if __name__ == "__main__":
    main()
