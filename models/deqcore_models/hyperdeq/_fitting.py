"""Fitting a hypersolver to a frozen model, and what the fit cost."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from deqcore.hypersolvers import HyperAnderson, train_hypersolver

from .._results_files import write_csv
from ._frozen_model import FrozenModel


def training_inputs(model: FrozenModel, batch_size: int, seed: int = 0) -> Iterator[Any]:
    """Injections of training batches (``batch_size`` images, or rows of ``tgt_len`` tokens),
    endlessly, in the run's data order shifted by ``seed``."""
    work = model.work
    step = seed * 7919
    while True:
        x = work.train_batch(step).x[:batch_size]
        step += 1
        yield model.inject(model.ops.asarray(x))


def fit(model: FrozenModel, hs: HyperAnderson, *, steps: int, batch_size: int = 16, seed: int = 0,
        progress: Callable[[dict[str, float]], None] | None = None,
        **options: Any) -> tuple[HyperAnderson, list[dict[str, float]]]:
    """Train ``hs`` for ``steps`` on the frozen model (see :func:`deqcore.train_hypersolver` for
    ``options``). Unless ``options`` say otherwise, targets come from Broyden at 60 steps
    (the family's ``fit_defaults`` may lower that), relative tolerance 1e-4, and Adam's learning rate is
    1e-2. Why: on the Fashion-MNIST MDEQ, 1e-3 barely moved L_conv in 300 steps; targets to 1e-5
    made a training step slower and the hypersolver no better in our runs (its residual after
    2K steps is far above 1e-4, so a 1e-4 target is exact enough: the residual table of
    docs/experiments/hyperdeq-fmnist)."""
    opts = {"target_max_iter": 60, "target_tol": 1e-4, "lr": 1e-2, **model.family.fit_defaults, **options}
    return train_hypersolver(hs, model.layer, training_inputs(model, batch_size, seed), steps=steps,
                             backend=model.backend, start=model.zeros, progress=progress, **opts)


def training_cost(model: FrozenModel, hs: HyperAnderson,
                  history: Sequence[Mapping[str, float]]) -> dict[str, Any]:
    """The cost figures of a trained hypersolver: parameters (and their share of the
    model's and of the equilibrium layer's) and training seconds (and their share of the DEQ's
    training time; None when the run has no ``epochs.csv``)."""
    seconds = float(history[-1]["seconds"])
    known = math.isfinite(model.train_seconds) and model.train_seconds > 0
    return {"parameters": hs.parameter_count(), "model_parameters": model.parameters,
            "parameter_ratio": hs.parameter_count() / model.parameters,
            "layer_parameter_ratio": hs.parameter_count() / model.layer_parameters,
            "seconds": seconds, "model_train_seconds": model.train_seconds if known else None,
            "time_ratio": seconds / model.train_seconds if known else None}


#: ``train_hypersolver``'s per-step records as CSV, written atomically.
save_history = write_csv
