"""``deqcore eval``: a run's checkpoint on its test set."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from deqcore.internal import dumps_json

from .._command_line import report_flags
from .._training_engines import require_framework
from ..checkpoint import load_checkpoint
from ..train import Trainer, checkpoint_step, config_from_checkpoint, result_flags


def add_parser(sub: Any) -> None:
    ev = sub.add_parser("eval", help="evaluate a run's checkpoint on the test set",
                        description="Evaluate OUT/checkpoint.npz of a training run on its test set.")
    ev.add_argument("--run", required=True, help="the run folder (its --out)")
    ev.add_argument("--backend", choices=["torch", "jax"], default=None,
                    help="evaluate on this backend (default: the run's); checkpoints are framework-neutral")
    ev.add_argument("--data", default=None, help="data folder (default: the run's, else $DEQCORE_DATA)")
    ev.add_argument("--max-iter", type=int, default=None, help="override the forward solver steps (>= 1)")
    ev.add_argument("--solver", default=None,
                    help="evaluate with this forward solver at its default options (default: the run's)")


def run(args: argparse.Namespace) -> int:
    path = Path(args.run) / "checkpoint.npz"
    ck = load_checkpoint(path)
    overrides: dict[str, Any] = {"backend": args.backend, "data": args.data, "max_iter": args.max_iter,
                                 "out": args.run}
    saved = ck.meta.get("train_config")
    if args.solver is not None and isinstance(saved, dict) and args.solver != saved.get("solver"):
        # evaluation never differentiates, and the run's solver options are another solver's
        overrides.update(solver=args.solver, solver_options={}, grad="jfb", grad_options={})
    cfg = config_from_checkpoint(ck, str(path), **overrides)
    require_framework(cfg.backend)
    step = checkpoint_step(ck, str(path))
    trainer = Trainer(cfg, progress=False)
    trainer.load(ck, str(path))
    result: dict[str, Any] = {**trainer.evaluate(), "step": step}
    result["flags"], result["warnings"] = result_flags([result], cfg)
    print(dumps_json(result, indent=2))
    return report_flags(result)
