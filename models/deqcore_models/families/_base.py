"""What a model family provides, and the pieces every family's workload shares.

A :class:`Family` is the one place that knows a model family: its named configurations, its
data sets, the workload the training loop runs (:class:`Batch` es, dropout masks, evaluation
batches), the hypersolver pieces fitted to a frozen model, the default sizes, and the metric it
is judged by (:class:`Metric`: name and direction). The table of families is
:mod:`deqcore_models.families`; the command line, the training loop and the experiments read it
and branch on nothing else.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np


@dataclass(frozen=True)
class Metric:
    """How a family's results are judged: ``name`` (as tables say it), ``key`` (the field of a
    run's ``epochs.csv`` and ``summary.json`` that holds it on the test set), ``short`` (in a
    progress line), ``higher_is_better``, ``percent`` (shown times 100 with a ``%``) and
    ``slack``, the tolerance of "equal quality" when costs are compared: absolute for a metric
    where higher is better (accuracy points), relative where lower is (a share of perplexity);
    ``of_pass(mean_loss, accuracy)`` its value for a pass with this mean cross-entropy and
    accuracy."""

    name: str
    key: str
    short: str
    higher_is_better: bool
    percent: bool
    slack: float
    of_pass: Callable[[float, float], float]

    def value(self, mean_loss: float, accuracy: float) -> float:
        """The metric of a pass with this mean cross-entropy and accuracy."""
        return self.of_pass(mean_loss, accuracy)

    @property
    def beside_accuracy(self) -> bool:
        """Whether it is a number of its own beside the accuracy every run records (and shows)."""
        return self.key != ACCURACY_KEY

    def shown(self, value: float) -> float:
        """``value`` as tables print it (percent or as is)."""
        return 100 * value if self.percent else value

    def label(self) -> str:
        return f"{self.name} %" if self.percent else self.name

    def at_least(self, value: float, target: float) -> bool:
        """Whether ``value`` is as good as ``target`` or better."""
        return value >= target if self.higher_is_better else value <= target

    def best(self, values: Iterable[float]) -> float:
        return max(values) if self.higher_is_better else min(values)

    def loosened(self, best: float, slack: float | None = None) -> float:
        """The quality target ``slack`` (default :attr:`slack`) short of ``best``."""
        slack = self.slack if slack is None else slack
        return best - slack if self.higher_is_better else best * (1 + slack)


ACCURACY_KEY = "test_acc"
ACCURACY = Metric("accuracy", ACCURACY_KEY, "acc", higher_is_better=True, percent=True, slack=0.005,
                  of_pass=lambda mean_loss, accuracy: accuracy)
PERPLEXITY = Metric("perplexity", "test_ppl", "ppl", higher_is_better=False, percent=False, slack=0.02,
                    of_pass=lambda mean_loss, accuracy: math.exp(min(mean_loss, 700.0)))


@dataclass
class Batch:
    """One training batch: inputs, targets, dropout masks (NumPy, or None), how many items
    (images or predicted tokens) it holds, the Hutchinson probe of the Jacobian penalty (a
    list of standard-normal arrays shaped like the equilibrium state, or None on steps without it)
    and the training-set indices of its rows (the keys of a warm-start cache; None for a
    workload whose samples do not come back)."""

    x: np.ndarray
    y: np.ndarray
    masks: Any
    count: int
    probe: list[np.ndarray] | None = None
    indices: np.ndarray | None = None


class Workload(Protocol):
    """What the training loop trains on (one per run): the model's initial ``params0`` and
    ``state0``, its ``task`` (:mod:`deqcore_models._losses`), ``model_cfg``, ``steps_per_epoch``,
    and per step a :class:`Batch`. Batches and masks are NumPy, drawn from seeds derived from
    ``(seed, epoch)`` and ``(seed, step)``, so both backends and a resumed run see the same ones.
    ``batch_state`` names the state arrays with one row per batch row (axis 0): data-parallel
    processes each hold their rows of them, and a checkpoint the whole batch's (a workload
    without the attribute has none). ``train_samples``, where present, is the number of
    training samples, whose indices its batches carry (:attr:`Batch.indices`): the samples a
    warm-start cache keeps; a workload without it cannot warm-start."""

    cfg: Any
    model_cfg: Any
    params0: dict[str, np.ndarray]
    state0: dict[str, np.ndarray]
    batch_state: tuple[str, ...]
    task: Any
    steps_per_epoch: int

    def describe(self) -> str: ...

    def train_batch(self, step: int) -> Batch: ...

    def fresh_state(self, step: int) -> dict[str, np.ndarray] | None:
        """Model state to start ``step`` from when it must be reset (None: keep the current)."""

    def eval_state(self, state: dict[str, Any]) -> dict[str, Any] | None:
        """The state evaluation starts from (None: the engine's)."""

    def eval_batches(self) -> Iterator[tuple[np.ndarray, np.ndarray, int]]:
        """``(x, y, items)`` of the test set."""


@dataclass(frozen=True)
class FrozenPieces:
    """A frozen model's hypersolver pieces on one backend: ``rebuild(params, state)`` gives its
    parts (``inject``, ``layer``, ``head``), ``zeros(inj)`` the classic start, ``compression``
    the residual's summary the mixer sees and ``initialiser(hidden)`` a learned first guess of
    ``hidden`` channels."""

    rebuild: Callable[[dict[str, Any], dict[str, Any]], Any]
    zeros: Callable[[Any], Any]
    compression: Any
    initialiser: Callable[[int], Any]


@dataclass(frozen=True)
class Family:
    """A model family (see the module docstring). ``configs`` maps names to architectures;
    ``datasets`` names to loaders of a data folder; ``workload(cfg)`` makes the workload of a
    :class:`~deqcore_models.train.TrainConfig`; ``parts(ops, model_cfg, params, state)`` splits a
    model around its equilibrium layer (``inject``, ``layer``, ``head``, evaluation mode),
    ``start(xp, model_cfg, inj)`` is the classic start, ``compression(model_cfg)`` and
    ``initialiser(model_cfg, hidden)`` the hypersolver pieces (together: :meth:`pieces`);
    ``score(xp, logits, y)`` the summed cross-entropy and correct predictions of a test batch;
    ``comparison_batch(work, x, y)`` a test batch as the solver comparison takes it (targets and
    item count; None to leave it out). ``settings`` are the TrainConfig settings only this
    family reads; ``hypersolver_sizes`` and ``fit_defaults`` the defaults of
    :func:`~deqcore_models.hyperdeq.make_hypersolver` and :func:`~deqcore_models.hyperdeq.fit`;
    ``items`` what a test item is (images, tokens)."""

    name: str
    summary: str
    configs: Mapping[str, Any]
    config_help: str
    datasets: Mapping[str, Callable[[Any], Any]]
    dataset_help: str
    metric: Metric
    items: str
    workload: Callable[[Any], Workload]
    parts: Callable[[Any, Any, dict[str, Any], dict[str, Any]], Any]
    start: Callable[[Any, Any, Any], Any]
    compression: Callable[[Any], Any]
    initialiser: Callable[[Any, int], Any]
    score: Callable[[Any, Any, Any], tuple[Any, Any]]
    comparison_batch: Callable[[Any, np.ndarray, np.ndarray], tuple[np.ndarray, int] | None]
    hypersolver_sizes: Mapping[str, int]
    fit_defaults: Mapping[str, Any] = field(default_factory=dict)
    settings: tuple[str, ...] = ()

    def pieces(self, ops: Any, model_cfg: Any) -> FrozenPieces:
        """The :class:`FrozenPieces` of a model of configuration ``model_cfg`` on ``ops``."""
        return FrozenPieces(lambda params, state: self.parts(ops, model_cfg, params, state),
                            lambda inj: self.start(ops.xp, model_cfg, inj), self.compression(model_cfg),
                            lambda hidden: self.initialiser(model_cfg, hidden))


def jacobian_probe(cfg: Any, step: int, shapes: Sequence[tuple[int, ...]]) -> list[np.ndarray] | None:
    """The Hutchinson noise of ``step`` (float32 standard normal, one array per shape), or None
    when the run has no Jacobian penalty or this step's draw (probability ``cfg.jac_freq``)
    skips it. Seeded by ``(seed, 2, step)``: the same on both backends and after a resume."""
    if not cfg.jac_weight:
        return None
    rng = np.random.default_rng([cfg.seed, 2, step])
    if rng.random() >= cfg.jac_freq:
        return None
    return [rng.standard_normal(s, dtype=np.float32) for s in shapes]


def limited(cfg: Any, setting: str, items: Any, what: str) -> Any:
    """``items`` cut to ``cfg``'s ``setting`` (a limit, or None for all); a limit beyond the data
    is the :class:`~deqcore_models.train.ConfigError` of the setting."""
    limit = getattr(cfg, setting)
    if limit is None:
        return items
    if limit > len(items):
        raise cfg.error(setting, f"is {limit}, more than the {len(items)} {what} of the data set "
                                 f"(leave it out to use all of them)")
    return items[:limit]
