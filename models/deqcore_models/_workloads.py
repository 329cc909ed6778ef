"""What the training loop trains on: a model, its data, batches, dropout masks and evaluation.

:class:`ImageWorkload` (MDEQ on Fashion-MNIST / CIFAR-10) and :class:`TextWorkload`
(DEQ-Transformer on WikiText-2 / tiny-shakespeare) give :class:`~deqcore_models.train.Trainer`
the same interface, so one loop (checkpoints, resume, CSVs, progress) serves both. Batches and
masks are NumPy, drawn from seeds derived from ``(seed, epoch)`` and ``(seed, step)``, so both
backends and a resumed run see exactly the same ones.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import data as D
from ._task import DEFAULT_SOFTMAX_CHUNK, ClassifierTask, LanguageModelTask
from .mdeq import MDEQ_CONFIGS, MDEQConfig, dropout_masks, equilibrium_shapes, init_mdeq, mdeq_apply
from .transformer import (
    TRANSFORMER_CONFIGS,
    TransformerConfig,
    empty_memory,
    init_transformer,
    transformer_apply,
    transformer_masks,
)

#: model -> (its named configurations, the data sets it trains on)
MODELS: dict[str, tuple[dict[str, Any], tuple[str, ...]]] = {
    "mdeq": (MDEQ_CONFIGS, ("fashion-mnist", "cifar10")),
    "transformer": (TRANSFORMER_CONFIGS, ("wikitext2", "tiny-shakespeare")),
}


@dataclass
class Batch:
    """One training batch: inputs, targets, dropout masks (NumPy, or None), how many items
    (images or predicted tokens) it holds, and the Hutchinson probe of the Jacobian penalty (a
    list of standard-normal arrays shaped like the equilibrium state, or None on steps without it)."""

    x: np.ndarray
    y: np.ndarray
    masks: Any
    count: int
    probe: list[np.ndarray] | None = None


def mdeq_task(cfg: MDEQConfig) -> ClassifierTask:
    """The classification task of an MDEQ of configuration ``cfg``."""

    def apply(ops, params, state, x, *, train, settings, masks, probe=None):
        return mdeq_apply(ops, cfg, params, state, x, train=train, settings=settings, masks=masks,
                          probe=probe)

    return ClassifierTask(apply)


def transformer_task(cfg: TransformerConfig, chunk: int | None = DEFAULT_SOFTMAX_CHUNK) -> LanguageModelTask:
    """The language-model task of a DEQ-Transformer of configuration ``cfg``. The softmax is
    computed ``chunk`` positions at a time and never kept for backward
    (:func:`~deqcore_models._layers.output_cross_entropy`); ``chunk=None`` forms all the
    logits at once, as a plain output layer does (the loss's aux then holds the logits)."""

    def apply(ops, params, state, x, *, train, settings, masks, probe=None):
        return transformer_apply(ops, cfg, params, state, x, train=train, settings=settings, masks=masks,
                                 probe=probe, logits=chunk is None)

    if chunk is None:
        return LanguageModelTask(apply)
    return LanguageModelTask(apply, output=("embed.weight", "out.bias"), chunk=chunk)


class ImageWorkload:
    """MDEQ classification. Targets are one-hot; ``metric`` is accuracy."""

    text = False

    def __init__(self, cfg: Any) -> None:
        self.cfg = cfg
        root = D.data_dir(cfg.data)
        ds = D.fashion_mnist(root) if cfg.dataset == "fashion-mnist" else D.cifar10(root)
        tx, ty, ex, ey = ds.train_x, ds.train_y, ds.test_x, ds.test_y
        _check_limit("train_limit", cfg.train_limit, len(tx), "training images")
        _check_limit("test_limit", cfg.test_limit, len(ex), "test images")
        if cfg.train_limit is not None:
            tx, ty = tx[: cfg.train_limit], ty[: cfg.train_limit]
        if cfg.test_limit is not None:
            ex, ey = ex[: cfg.test_limit], ey[: cfg.test_limit]
        if len(tx) < cfg.batch_size:
            raise _config_error("batch_size", f"must be at most the {len(tx)} training images"
                                              f"{' (after --train-limit)' if cfg.train_limit else ''}, "
                                              f"got {cfg.batch_size}")
        if not len(ex):
            raise _config_error("test_limit", "leaves no test images")
        flat = ds.train_x.reshape(-1, ds.train_x.shape[-1]).astype(np.float64) / 255.0
        mean, std = flat.mean(axis=0), flat.std(axis=0)
        self.x_train, self.y_train = D.to_float_nchw(tx, mean, std), ty
        self.x_test, self.y_test = D.to_float_nchw(ex, mean, std), ey
        self.classes = ds.classes
        self.model_cfg = MDEQ_CONFIGS[cfg.config]
        self.params0, self.state0 = init_mdeq(self.model_cfg, self.x_train.shape[1], cfg.seed)
        self.task = mdeq_task(self.model_cfg)
        self.steps_per_epoch = len(self.x_train) // cfg.batch_size
        self.eval_batch_size = cfg.eval_batch_size or 500

    def describe(self) -> str:
        return f"{len(self.x_train)} train, {len(self.x_test)} test images"

    def onehot(self, y: np.ndarray) -> np.ndarray:
        return np.eye(len(self.classes), dtype=np.float32)[y]

    def train_batch(self, step: int) -> Batch:
        epoch, pos = divmod(step, self.steps_per_epoch)
        bs = self.cfg.batch_size
        order = np.random.default_rng([self.cfg.seed, epoch]).permutation(len(self.x_train))
        idx = order[pos * bs:(pos + 1) * bs]
        masks = dropout_masks(self.model_cfg, len(idx), np.random.default_rng([self.cfg.seed, 1, step]))
        x = self.x_train[idx]
        probe = jacobian_probe(self.cfg, step, equilibrium_shapes(self.model_cfg, x.shape))
        return Batch(x, self.onehot(self.y_train[idx]), masks, len(idx), probe)

    def fresh_state(self, step: int) -> dict[str, np.ndarray] | None:
        """Model state to start ``step`` from, when it must be reset (never for images)."""
        return None

    def eval_state(self, state: dict[str, Any]) -> dict[str, Any] | None:
        """Evaluation runs on the trained BatchNorm statistics."""
        return None

    def eval_batches(self) -> Iterator[tuple[np.ndarray, np.ndarray, int]]:
        bs = self.eval_batch_size
        for start in range(0, len(self.x_test), bs):
            yb = self.y_test[start:start + bs]
            yield self.x_test[start:start + bs], self.onehot(yb), len(yb)


class TextWorkload:
    """DEQ-Transformer language modelling. The training stream is cut into ``batch_size``
    contiguous rows and read in order, ``tgt_len`` tokens per step (the segment memory needs the
    order; it is emptied at the start of every epoch). Targets are token ids; ``metric`` is
    next-token accuracy, and perplexity is ``exp(loss)``."""

    text = True

    def __init__(self, cfg: Any) -> None:
        self.cfg = cfg
        root = D.data_dir(cfg.data)
        corpus = D.wikitext2(root) if cfg.dataset == "wikitext2" else D.tiny_shakespeare(root)
        self.corpus = corpus
        train, test = corpus.train, corpus.test
        _check_limit("train_limit", cfg.train_limit, len(train), "training tokens")
        _check_limit("test_limit", cfg.test_limit, len(test), "test tokens")
        if cfg.train_limit is not None:
            train = train[: cfg.train_limit]
        if cfg.test_limit is not None:
            test = test[: cfg.test_limit]
        self.model_cfg = TRANSFORMER_CONFIGS[cfg.config]
        self.length = self.model_cfg.tgt_len
        self.eval_batch_size = cfg.eval_batch_size or 10
        limited = " (after --train-limit)" if cfg.train_limit else ""
        if len(train) // cfg.batch_size < self.length + 1:
            raise _config_error("batch_size", f"is too large: {len(train)} training tokens{limited} in "
                                              f"{cfg.batch_size} rows do not fill one segment of "
                                              f"{self.length} tokens (+1 target) per row; at most "
                                              f"{max(len(train) // (self.length + 1), 0)}")
        if len(test) // self.eval_batch_size < 2:
            raise _config_error("eval_batch_size" if cfg.eval_batch_size else "test_limit",
                                f"leaves too few test tokens: {len(test)} in {self.eval_batch_size} rows "
                                f"of at least 2")
        self.rows = D.batchify(train, cfg.batch_size)
        self.test_rows = D.batchify(test, self.eval_batch_size)
        self.params0, self.state0 = init_transformer(self.model_cfg, corpus.vocab_size, cfg.seed,
                                                     batch_size=cfg.batch_size)
        chunk = DEFAULT_SOFTMAX_CHUNK if cfg.softmax_chunk is None else cfg.softmax_chunk or None
        self.task = transformer_task(self.model_cfg, chunk=chunk)
        self.steps_per_epoch = (self.rows.shape[1] - 1) // self.length

    def describe(self) -> str:
        return (f"{self.rows.size} train, {self.test_rows.size} test tokens, vocabulary "
                f"{self.corpus.vocab_size}")

    def train_batch(self, step: int) -> Batch:
        pos = step % self.steps_per_epoch
        a = pos * self.length
        x, y = self.rows[:, a:a + self.length], self.rows[:, a + 1:a + 1 + self.length]
        masks = transformer_masks(self.model_cfg, x.shape[0], x.shape[1],
                                  np.random.default_rng([self.cfg.seed, 1, step]))
        probe = jacobian_probe(self.cfg, step, [(*x.shape, self.model_cfg.d_model)])
        return Batch(x, y, masks, y.size, probe)

    def fresh_state(self, step: int) -> dict[str, np.ndarray] | None:
        if self.model_cfg.mem_len and step % self.steps_per_epoch == 0:
            return empty_memory(self.model_cfg, self.cfg.batch_size)
        return None

    def eval_state(self, state: dict[str, Any]) -> dict[str, Any] | None:
        """The test stream starts with an empty memory of its own (its rows differ from training)."""
        return empty_memory(self.model_cfg, self.eval_batch_size)

    def eval_batches(self) -> Iterator[tuple[np.ndarray, np.ndarray, int]]:
        for x, y in D.segments(self.test_rows, self.length):
            yield x, y, y.size


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


def make_workload(cfg: Any) -> ImageWorkload | TextWorkload:
    """The workload of a :class:`~deqcore_models.train.TrainConfig`: its data loaded and checked
    against the settings that depend on its size (a limit beyond the data, a batch larger than
    it: the :class:`~deqcore_models.train.ConfigError` of the flag at fault)."""
    return TextWorkload(cfg) if cfg.model == "transformer" else ImageWorkload(cfg)


def _config_error(setting: str, problem: str) -> Exception:
    from .train import ConfigError  # train imports this module

    return ConfigError(setting, problem)


def _check_limit(setting: str, limit: int | None, size: int, what: str) -> None:
    if limit is not None and limit > size:
        raise _config_error(setting, f"is {limit}, more than the {size} {what} of the data set "
                                     f"(leave it out to use all of them)")
