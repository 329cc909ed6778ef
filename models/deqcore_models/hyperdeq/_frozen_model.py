"""A trained run's model, frozen and split around its equilibrium layer, and the hypersolvers
made or loaded for it."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from deqcore.hypersolvers import HyperAnderson, load_hypersolver

from .._ops import ops_for
from .._results_files import read_csv
from .._training_engines import require_framework
from ..checkpoint import check_checkpoint, load_checkpoint
from ..families import Family
from ..train import TrainConfig, checkpoint_step, config_from_checkpoint, make_workload, model_schema

#: The parameters of the equilibrium layer (the rest is the embedding, stem and head).
LAYER_PREFIX = "deq."


@dataclass
class FrozenModel:
    """A trained run's model, frozen, split around its equilibrium layer on one backend.

    ``inject(x)``, ``layer(z, inj)`` and ``head(z)`` as in :func:`deqcore_models.mdeq.mdeq_parts`
    (the parts ``rebuild(*arrays)`` gives);
    ``zeros(inj)`` the classic start; ``compression`` and ``initialiser(hidden)`` the
    family's hypersolver pieces; ``parameters`` the model's parameter count (and
    ``layer_parameters`` without the embedding/stem/head); ``train_seconds`` the run's DEQ
    training time (summed over its epochs, from ``epochs.csv``). ``arrays`` are the model's
    (params, state) as framework arrays and ``rebuild(params, state)`` gives the parts again
    over them: a compiled function that takes the arrays as arguments, instead of closing over
    them, is not constant-folded by XLA (which made the zero start's first ``f`` cheaper than
    any other start's, and compilation slow)."""

    run: Path
    backend: str
    cfg: TrainConfig
    work: Any
    ops: Any
    zeros: Callable[[Any], Any]
    compression: Any
    initialiser: Callable[[int], Any]
    parameters: int
    layer_parameters: int
    train_seconds: float
    step: int
    arrays: tuple[dict[str, Any], dict[str, Any]]
    rebuild: Callable[[dict[str, Any], dict[str, Any]], Any]

    @cached_property
    def parts(self) -> Any:
        return self.rebuild(*self.arrays)

    @property
    def inject(self) -> Callable[[Any], Any]:
        return self.parts.inject

    @property
    def layer(self) -> Callable[[Any, Any], Any]:
        return self.parts.layer

    @property
    def head(self) -> Callable[[Any], Any]:
        return self.parts.head

    @property
    def family(self) -> Family:
        return self.cfg.family

    @property
    def defaults(self) -> dict[str, int]:
        """:func:`make_hypersolver`'s sizes for this model (its family's
        ``hypersolver_sizes``). What they cost and gain on trained models:
        docs/experiments/hyperdeq-fmnist and hyperdeq-wt2."""
        return dict(self.family.hypersolver_sizes)


def load_frozen(run: str | Path, backend: str | None = None, data: str | None = None,
                test_limit: int | None = None) -> FrozenModel:
    """The model of ``run/checkpoint.npz`` with the run's data (``data`` overrides the folder;
    ``test_limit`` the number of test images or tokens; default the run's). The checkpoint is
    checked as every load is (:func:`~deqcore_models.checkpoint.check_checkpoint` against
    :func:`~deqcore_models.train.model_schema`): a mismatch, a corrupted file or NaN weights are
    a :class:`~deqcore_models.checkpoint.CheckpointError` listing every difference."""
    run = Path(run)
    source = run / "checkpoint.npz"
    ck = load_checkpoint(source)
    cfg = config_from_checkpoint(ck, str(source), backend=backend, data=data, test_limit=test_limit,
                                 out=str(run))
    require_framework(cfg.backend)
    work = make_workload(cfg)
    check_checkpoint(ck, model_schema(cfg, work), str(source))
    ops = ops_for(cfg.backend)
    P = {k: ops.asarray(v) for k, v in ck.params.items()}
    S = {k: ops.asarray(v) for k, v in ck.state.items()}
    pieces = cfg.family.pieces(ops, work.model_cfg)
    seconds = [_number(r.get("train_seconds")) for r in read_csv(run / "epochs.csv")]
    train_seconds = float(sum(seconds)) if seconds and all(math.isfinite(v) for v in seconds) else math.nan
    count = int(sum(np.asarray(v).size for v in ck.params.values()))
    layer_count = int(sum(np.asarray(v).size for k, v in ck.params.items() if k.startswith(LAYER_PREFIX)))
    return FrozenModel(run, cfg.backend, cfg, work, ops, pieces.zeros, pieces.compression, pieces.initialiser,
                       count, layer_count, train_seconds, checkpoint_step(ck, str(source)), (P, S),
                       pieces.rebuild)


def _number(v: Any) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.nan


_DEFAULT = -1  # make_hypersolver's "the model's default" (None already means no initialiser)


def make_hypersolver(model: FrozenModel, *, iterations: int | None = None, memory: int = 5,
                     width: int | None = None, hidden: int | None = _DEFAULT, prior: str = "anderson",
                     normalisation: str = "shift", seed: int = 0) -> HyperAnderson:
    """A fresh hypersolver for ``model``: the model's compression, its initialiser with ``hidden``
    channels (None: no initialiser, the zero start), a temporal-conv mixer of ``width``, trained
    for ``iterations`` = K. Sizes left out are ``model.defaults``."""
    d = model.defaults
    iterations = d["iterations"] if iterations is None else iterations
    width = d["width"] if width is None else width
    hidden = d["hidden"] if hidden == _DEFAULT else hidden
    init = None if hidden is None else model.initialiser(hidden)
    return HyperAnderson(model.compression, init, iterations=iterations, memory=memory, width=width,
                         prior=prior, normalisation=normalisation, seed=seed)


def load_for(model: FrozenModel, path: str | Path) -> HyperAnderson:
    """Hypersolver weights saved for ``model`` (the saved initialiser's width is read back). A
    file that is unreadable, not a hypersolver's, or made for another model (its compression or
    initialiser differs, a weight's name, shape or dtype does not match, a weight is NaN) is a
    ``ValueError`` naming the file (:func:`deqcore.hypersolvers.load_hypersolver` checks them)."""
    from deqcore.internal import load_arrays

    _, meta = load_arrays(path)
    cfg = meta.get("config")
    init_cfg = cfg.get("initialiser") if isinstance(cfg, dict) else None
    hidden = init_cfg.get("hidden") if isinstance(init_cfg, dict) else None
    if init_cfg is None:
        return load_hypersolver(path, model.compression, None)
    if isinstance(hidden, bool) or not isinstance(hidden, int) or hidden < 1:
        raise ValueError(f"{path}: its initialiser settings {init_cfg!r} have no valid 'hidden' width")
    return load_hypersolver(path, model.compression, model.initialiser(hidden))
