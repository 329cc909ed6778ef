"""The DEQ-Transformer family: language models on WikiText-2 (words) and tiny-shakespeare
(characters).

Everything the command line, the training loop and the experiments need to know about the
DEQ-Transformer: its configurations (:data:`~deqcore_models.transformer.TRANSFORMER_CONFIGS`),
data sets, workload, task, hypersolver pieces, default sizes and metric (test perplexity, lower
is better).

Hypersolver pieces: the compression keeps the last position of a residual (the one that attends
to the whole segment); the initialiser is a causal kernel-3 convolution of the injection with
ReLU and a linear map to ``d_model`` (causal, so a first guess never carries a later token into
an earlier position). See ``docs/hypersolvers.md``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

from .. import data as D
from .._layers import relu, token_cross_entropy
from .._losses import DEFAULT_SOFTMAX_CHUNK, LanguageModelTask
from ..transformer import (
    TRANSFORMER_CONFIGS,
    TransformerConfig,
    empty_memory,
    init_transformer,
    transformer_apply,
    transformer_masks,
    transformer_parts,
)
from ._base import PERPLEXITY, Batch, Family, jacobian_probe, limited


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


class TransformerWorkload:
    """DEQ-Transformer language modelling. The training stream is cut into ``batch_size``
    contiguous rows and read in order, ``tgt_len`` tokens per step (the segment memory needs the
    order; it is emptied at the start of every epoch). Targets are token ids; the accuracy is
    next-token accuracy, and perplexity is ``exp(loss)``. The segment memory holds a row per
    stream (:attr:`batch_state`)."""

    def __init__(self, cfg: Any) -> None:
        self.cfg = cfg
        corpus = DATASETS[cfg.dataset](D.data_dir(cfg.data))
        self.corpus = corpus
        train = limited(cfg, "train_limit", corpus.train, "training tokens")
        test = limited(cfg, "test_limit", corpus.test, "test tokens")
        self.model_cfg = TRANSFORMER_CONFIGS[cfg.config]
        self.length = self.model_cfg.tgt_len
        self.eval_batch_size = cfg.eval_batch_size or 10
        limited_note = " (after --train-limit)" if cfg.train_limit else ""
        if len(train) // cfg.batch_size < self.length + 1:
            raise cfg.error("batch_size", f"is too large: {len(train)} training tokens{limited_note} in "
                                          f"{cfg.batch_size} rows do not fill one segment of "
                                          f"{self.length} tokens (+1 target) per row; at most "
                                          f"{max(len(train) // (self.length + 1), 0)}")
        if len(test) // self.eval_batch_size < 2:
            raise cfg.error("eval_batch_size" if cfg.eval_batch_size else "test_limit",
                            f"leaves too few test tokens: {len(test)} in {self.eval_batch_size} rows "
                            f"of at least 2")
        self.rows = D.batchify(train, cfg.batch_size)
        self.test_rows = D.batchify(test, self.eval_batch_size)
        self.params0, self.state0 = init_transformer(self.model_cfg, corpus.vocab_size, cfg.seed,
                                                     batch_size=cfg.batch_size)
        chunk = DEFAULT_SOFTMAX_CHUNK if cfg.softmax_chunk is None else cfg.softmax_chunk or None
        self.task = transformer_task(self.model_cfg, chunk=chunk)
        self.steps_per_epoch = (self.rows.shape[1] - 1) // self.length
        self.batch_state: tuple[str, ...] = ("mem.z", "mem.u") if self.model_cfg.mem_len else ()

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
        """An empty memory at the start of every epoch."""
        if self.model_cfg.mem_len and step % self.steps_per_epoch == 0:
            return empty_memory(self.model_cfg, self.cfg.batch_size)
        return None

    def eval_state(self, state: dict[str, Any]) -> dict[str, Any] | None:
        """The test stream starts with an empty memory of its own (its rows differ from training)."""
        return empty_memory(self.model_cfg, self.eval_batch_size)

    def eval_batches(self) -> Iterator[tuple[np.ndarray, np.ndarray, int]]:
        for x, y in D.segments(self.test_rows, self.length):
            yield x, y, y.size


class TransformerCompression:
    """A residual (B, L, d_model) -> its last position (B, d_model)."""

    def __init__(self, d_model: int) -> None:
        self.features = int(d_model)

    def config(self) -> dict[str, Any]:
        return {"kind": "transformer", "d_model": self.features}

    def __call__(self, backend: Any, g: Any) -> Any:
        return g[:, -1, :]


class TransformerInitialiser:
    """``h_phi(u)`` for an injection ``u`` (B, L, F): ``relu(conv(u) + b) W + c`` where ``conv`` is
    causal with kernel 3 (position t sees t-2, t-1, t) into ``hidden`` channels, and ``W``
    (hidden, d_model) starts at zero, so an untrained initialiser gives the classic zero start."""

    def __init__(self, inj_features: int, d_model: int, hidden: int = 32) -> None:
        self.inj_features, self.d_model, self.hidden = int(inj_features), int(d_model), int(hidden)

    def config(self) -> dict[str, Any]:
        return {"kind": "transformer", "inj_features": self.inj_features, "d_model": self.d_model,
                "hidden": self.hidden}

    def init_params(self, rng: np.random.Generator) -> dict[str, np.ndarray]:
        fan_in = 3 * self.inj_features
        return {"conv.weight": rng.normal(0.0, math.sqrt(2.0 / fan_in), (3, self.inj_features, self.hidden)),
                "conv.bias": np.zeros(self.hidden),
                "out.weight": np.zeros((self.hidden, self.d_model)),
                "out.bias": np.zeros(self.d_model)}

    def __call__(self, backend: Any, params: Mapping[str, Any], u: Any) -> Any:
        xp = backend.xp
        w = params["conv.weight"]
        zero = xp.zeros_like(u[:, :1])
        back1 = xp.concat([zero, u[:, :-1]], axis=1)
        back2 = xp.concat([zero, back1[:, :-1]], axis=1)
        h = xp.matmul(back2, w[0]) + xp.matmul(back1, w[1]) + xp.matmul(u, w[2]) + params["conv.bias"]
        return xp.matmul(relu(xp, h), params["out.weight"]) + params["out.bias"]


def zeros(xp: Any, mc: TransformerConfig, u: Any) -> Any:
    """The classic start: zeros (B, L, d_model) for the injection ``u`` of a batch."""
    return xp.zeros((*u.shape[:2], mc.d_model), dtype=u.dtype)


def parts(ops: Any, mc: TransformerConfig, params: dict[str, Any], state: dict[str, Any]) -> Any:
    """The model split around its layer, for segments of the configuration's length."""
    return transformer_parts(ops, mc, params, mc.tgt_len)


def score(xp: Any, logits: Any, y: Any) -> tuple[Any, Any]:
    """Summed cross-entropy and correct next-token predictions of target tokens ``y``."""
    return token_cross_entropy(xp, logits, y)


def comparison_batch(work: Any, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, int] | None:
    """Target tokens; the stream's short last segment is left out (the parts are built for one
    length)."""
    if x.shape[1] != work.model_cfg.tgt_len:
        return None
    return np.asarray(y, np.int32), int(y.size)


DATASETS = {"wikitext2": D.wikitext2, "tiny-shakespeare": D.tiny_shakespeare}

#: K = 3, an initialiser of 16 channels and a mixer of width 16; the targets converge within
#: neither 30 nor 60 Broyden steps, so 30 steps, half the target solve, give targets that are as
#: useful (docs/experiments/hyperdeq-wt2 records the residual they reach).
TRANSFORMER = Family(
    name="transformer", summary="DEQ-Transformer language model",
    configs=TRANSFORMER_CONFIGS,
    config_help="small = d 64, 4 heads, d_inner 256, segments of 64 tokens; small-mem = the same with a "
                "64-token memory of the previous segment; micro = for tests",
    datasets=DATASETS, dataset_help="wikitext2 (words) or tiny-shakespeare (characters)",
    metric=PERPLEXITY, items="tokens",
    workload=TransformerWorkload, parts=parts, start=zeros,
    compression=lambda mc: TransformerCompression(mc.d_model),
    initialiser=lambda mc, hidden: TransformerInitialiser(3 * mc.d_model, mc.d_model, hidden),
    score=score, comparison_batch=comparison_batch,
    hypersolver_sizes={"iterations": 3, "hidden": 16, "width": 16},
    fit_defaults={"target_max_iter": 30},
    settings=("softmax_chunk",),
)
