"""``deqcore bench``: time a few training steps of a configuration."""

from __future__ import annotations

import argparse
import dataclasses
import math
import time
from typing import Any

import numpy as np

from deqcore.internal import dumps_json

from .._command_line import UsageError, report_flags
from .._training_engines import require_framework
from ..train import Trainer
from ._run_flags import add_run_flags, train_config


def add_parser(sub: Any) -> None:
    be = sub.add_parser("bench", help="time training steps (forward + backward) and report NFE",
                        description="Time a few training steps of a configuration; writes no file.")
    add_run_flags(be, output=False)
    be.add_argument("--steps", type=int, default=5,
                    help="timed steps (>= 1) after one warm-up step (default 5)")


def run(args: argparse.Namespace) -> int:
    if args.steps < 1:
        raise UsageError(f"--steps must be an int >= 1, got {args.steps}")
    cfg = train_config(args)
    require_framework(cfg.backend)
    trainer = Trainer(cfg, progress=False)
    times, nfes, losses = [], [], []
    settings = cfg.deq_settings()
    for i in range(args.steps + 1):
        batch = trainer.work.train_batch(i % trainer.steps_per_epoch)
        t0 = time.perf_counter()
        r = trainer.engine.train_step(batch.x, batch.y, batch.masks, settings, cfg.lr, batch.probe)
        if i:
            times.append(time.perf_counter() - t0)
            nfes.append(r["nfe"])
            losses.append(r["loss"])
    bad = [i + 1 for i, v in enumerate(losses) if not math.isfinite(v)]
    flags = [f"timed steps {bad} had a non-finite loss: the steps timed did not train"] if bad else []
    result = {"backend": cfg.backend, "config": dataclasses.asdict(cfg),
              "median_step_s": float(np.median(times)), "min_step_s": float(np.min(times)), "nfe": nfes,
              "loss": losses, "flags": flags}
    print(dumps_json(result, indent=2))
    return report_flags(result)
