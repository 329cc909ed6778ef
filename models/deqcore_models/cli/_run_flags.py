"""The :class:`~deqcore_models.train.TrainConfig` flags that ``deqcore train`` and ``deqcore
bench`` share, and the config they give."""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

from .._command_line import key_values
from .._equilibrium_layer import PRECISIONS
from ..families import FAMILIES
from ..train import TrainConfig


def _default(name: str) -> Any:
    f = TrainConfig.__dataclass_fields__[name]
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def _devices(text: str) -> int | str:
    """``--devices``: an int, or the word ``all`` (TrainConfig checks the value)."""
    try:
        return int(text)
    except ValueError:
        return text


def add_run_flags(p: argparse.ArgumentParser, *, output: bool = True) -> None:
    """The :class:`~deqcore_models.train.TrainConfig` flags. Every default is left out of the
    namespace (``SUPPRESS``), so the one default of each setting is the TrainConfig field's;
    ``output=False`` leaves out the flags of a run's files and schedule (``bench``)."""
    d = _default
    g = p.add_argument_group("model and data")
    g.add_argument("--backend", choices=["torch", "jax"],
                   help=f"framework to train on (default {d('backend')})")
    g.add_argument("--devices", type=_devices, metavar="N",
                   help="JAX only: train data-parallel on N local devices, or 'all' (default "
                        f"{d('devices')}); on CPU, N host devices need "
                        "XLA_FLAGS=--xla_force_host_platform_device_count=N set before JAX starts. "
                        "PyTorch: launch N processes with torchrun instead")
    families = FAMILIES.values()
    g.add_argument("--model", choices=list(FAMILIES),
                   help="model family: " + " or ".join(f"{f.name} ({f.summary})" for f in families)
                        + f" (default {d('model')})")
    g.add_argument("--config", choices=sorted({c for f in families for c in f.configs}),
                   help="model size. " + " ".join(f"{f.name}: {f.config_help}." for f in families)
                        + f" (default {d('config')})")
    g.add_argument("--dataset", choices=[name for f in families for name in f.datasets],
                   help="data set: " + ", ".join(f"{f.dataset_help} for {f.name}" for f in families)
                        + f" (default {d('dataset')})")
    g.add_argument("--data",
                   help="data folder holding fashion-mnist/, cifar-10/, wikitext-2/, tiny-shakespeare/ "
                        "(default: $DEQCORE_DATA); never downloaded")
    g.add_argument("--train-limit", type=int, metavar="N",
                   help="use only the first N training items ("
                        + ", ".join(f"{f.items} for {f.name}" for f in families) + "), N >= 1 and at most "
                        "the data set's size (default: all)")
    g.add_argument("--test-limit", type=int, metavar="N",
                   help="use only the first N test items (default: all)")
    s = p.add_argument_group("solver and gradient")
    s.add_argument("--solver",
                   help=f"forward solver: broyden (default {d('solver')}), anderson, fixed_point or a "
                        "plugin's")
    s.add_argument("--tol", type=float, help=f"relative residual tolerance, > 0 (default {d('tol'):g})")
    s.add_argument("--max-iter", type=int, help=f"forward solver steps at most (default {d('max_iter')})")
    s.add_argument("--solver-option", action="append", metavar="KEY=VALUE",
                   help="a solver option, repeatable (e.g. memory=8, line_search=True); unknown keys are "
                        "errors listing the valid ones")
    s.add_argument("--grad",
                   help=f"gradient mode (default {d('grad')}): implicit, jfb, npg, upg, gdeq, "
                        "gdeq_refined (both need broyden), unroll, or a plugin's")
    s.add_argument("--grad-option", action="append", metavar="KEY=VALUE",
                   help="a gradient-mode option, repeatable (e.g. k=5, lam=0.5 for npg; max_iter=20 for "
                        "implicit)")
    s.add_argument("--correction-states", type=int, metavar="K",
                   help="fixed-point correction (DEQ-Flow): add to the loss on z* the losses on K - 1 "
                        "earlier states of the solve, evenly spaced over --max-iter and weighted "
                        "0.8^(K - i), each with a phantom gradient (default "
                        f"{d('correction_states')}: off; 1 is the same)")
    s.add_argument("--pretrain-steps", type=int,
                   help="first N steps run the layer unrolled (weight-tied) with ordinary backprop "
                        f"(default {d('pretrain_steps')})")
    s.add_argument("--unrolled-layers", type=int,
                   help=f"layers of the unrolled pre-training (default {d('unrolled_layers')})")
    s.add_argument("--jac-weight", type=float,
                   help="Jacobian regularisation: add this weight times the Hutchinson estimate of "
                        "||df/dz||_F^2 / numel at the layer's output to the training loss (default "
                        f"{d('jac_weight'):g}: off)")
    s.add_argument("--jac-freq", type=float,
                   help="probability in (0, 1] that a training step carries the Jacobian penalty (default "
                        f"{d('jac_freq'):g}; the JR paper's regularised MDEQ used weight 0.4, frequency "
                        "0.02)")
    s.add_argument("--softmax-chunk", type=int,
                   help="transformer only: compute the output softmax over N positions at a time, in the "
                        "forward pass and again in backward, so no vocabulary-sized tensor is kept for "
                        "backward (default 32); 0: the whole softmax at once, all logits kept")
    s.add_argument("--bn-groups", type=int, metavar="K",
                   help="mdeq only: BatchNorm's training statistics over K groups of batch/K consecutive "
                        "samples of the global batch, K dividing --batch-size (default 1: the whole batch, "
                        "synchronised over the workers of a torchrun launch; K = the number of workers: "
                        "per-worker statistics, no communication; K must be 1 or a multiple of it)")
    s.add_argument("--precision", choices=PRECISIONS,
                   help="dtype of the model's convolutions and matrix products (torch: torch.autocast; "
                        "JAX: mdeq's convolutions); parameters, gradients, the equilibrium state and the "
                        "solver's arithmetic stay float32. float16 needs a GPU (default "
                        f"{d('precision')})")
    if output:
        s.add_argument("--warm-start", action="store_true",
                       help="start each training sample's forward solve from the fixed point it reached "
                            "when last seen (mdeq; kept on the device for the converged samples, not in "
                            "checkpoints: a resumed run starts cold)")
        s.add_argument("--warm-start-max-age", type=int, metavar="N",
                       help="with --warm-start: a cached fixed point expires N optimiser steps after it "
                            "was stored (default: no limit)")
        s.add_argument("--warm-start-keep", choices=["converged", "best"],
                       help="with --warm-start: which fixed points are kept: those of converged solves "
                            "(default), or also the lowest-residual iterate of solves stopped by --max-iter")
    t = p.add_argument_group("optimisation and output")
    if output:
        t.add_argument("--epochs", type=int, help=f"epochs (default {d('epochs')})")
        t.add_argument("--max-steps", type=int, help="stop after N >= 1 optimiser steps in total")
    t.add_argument("--batch-size", type=int,
                   help="training batch size: images, or rows of the token stream for text (default "
                        f"{d('batch_size')}); under torchrun the global batch, split equally among the "
                        "workers")
    t.add_argument("--lr", type=float,
                   help=f"Adam learning rate, cosine-annealed per step to --min-lr (default {d('lr'):g})")
    t.add_argument("--min-lr", type=float, help=f"final learning rate, <= --lr (default {d('min_lr'):g})")
    t.add_argument("--weight-decay", type=float, help=f"L2 weight decay (default {d('weight_decay'):g})")
    t.add_argument("--clip-norm", type=float,
                   help="clip the gradient's global norm to this before the Adam step (default: no "
                        "clipping; the DEQ-Transformer paper used 0.25)")
    t.add_argument("--seed", type=int,
                   help=f"seed (>= 0) of weights, data order and dropout (default {d('seed')})")
    if output:
        t.add_argument("--out",
                       help="output folder: steps.csv, epochs.csv, summary.json, checkpoint.npz, curves.png "
                            f"(default {d('out')}); must be empty or missing unless --resume or --overwrite")
        t.add_argument("--checkpoint-every", type=int,
                       help=f"checkpoint every N steps (default {d('checkpoint_every')})")
    t.add_argument("--eval-batch-size", type=int,
                   help="evaluation batch size (default 500 images, or 10 rows of the test stream for text)")
    if output:
        t.add_argument("--no-progress", action="store_true",
                       help="no progress bar; one status line on stderr per checkpoint instead")
        t.add_argument("--cosine-every", type=int,
                       help="every N DEQ steps, log to cosine.csv the cosine between this mode's gradient "
                            "and the implicit gradient (backward max_iter 40) on the same batch (default 0: "
                            "off)")
    for action in p._actions:
        if action.dest not in ("help", "no_progress"):
            action.default = argparse.SUPPRESS


def train_config(args: argparse.Namespace, **fixed: Any) -> TrainConfig:
    """The TrainConfig of the flags given (the others at TrainConfig's defaults); a bad value is
    the :class:`~deqcore_models.train.ConfigError` of its flag."""
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    kw = {k: v for k, v in vars(args).items() if k in names}
    kw["solver_options"] = key_values(getattr(args, "solver_option", None), "--solver-option")
    kw["grad_options"] = key_values(getattr(args, "grad_option", None), "--grad-option")
    kw.pop("solver_option", None)
    kw.pop("grad_option", None)
    return TrainConfig(**kw, **fixed)


