"""The MDEQ family: multiscale image classifiers on Fashion-MNIST and CIFAR-10.

Everything the command line, the training loop and the experiments need to know about MDEQ:
its configurations (:data:`~deqcore_models.mdeq.MDEQ_CONFIGS`), data sets, workload, task,
hypersolver pieces, default sizes and metric (test accuracy, higher is better).

Hypersolver pieces: the compression global-pools the lowest-resolution branch of a residual
(one value per channel); the initialiser is a small 3x3 convolution of the injection with ReLU,
average-pooled to each branch's resolution and mapped to the branch's channels by a 1x1
convolution. Both are written over the backend's ``xp`` (plus ``conv2d`` from the models'
framework glue), so one hypersolver runs on PyTorch and JAX (``docs/hypersolvers.md``).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from .. import data as D
from .._layers import cross_entropy, relu
from .._losses import ClassifierTask
from .._ops import ops_for
from ..mdeq import (
    MDEQ_CONFIGS,
    MDEQConfig,
    dropout_masks,
    equilibrium_shapes,
    init_mdeq,
    mdeq_apply,
    mdeq_parts,
)
from ._base import ACCURACY, Batch, Family, jacobian_probe, limited


def mdeq_task(cfg: MDEQConfig, bn_groups: int = 1) -> ClassifierTask:
    """The classification task of an MDEQ of configuration ``cfg``; BatchNorm's training
    statistics over ``bn_groups`` groups of the global batch
    (:func:`~deqcore_models.mdeq.batch_statistics`)."""

    def apply(ops, params, state, x, *, train, settings, masks, probe=None):
        return mdeq_apply(ops, cfg, params, state, x, train=train, settings=settings, masks=masks,
                          probe=probe, bn_groups=bn_groups)

    return ClassifierTask(apply)


class MDEQWorkload:
    """MDEQ classification. Targets are one-hot; the metric is accuracy. The state (BatchNorm
    running statistics) has no batch rows."""

    batch_state: tuple[str, ...] = ()

    def __init__(self, cfg: Any) -> None:
        self.cfg = cfg
        ds = DATASETS[cfg.dataset](D.data_dir(cfg.data))
        tx = limited(cfg, "train_limit", ds.train_x, "training images")
        ex = limited(cfg, "test_limit", ds.test_x, "test images")
        ty, ey = ds.train_y[:len(tx)], ds.test_y[:len(ex)]
        if len(tx) < cfg.batch_size:
            raise cfg.error("batch_size", f"must be at most the {len(tx)} training images"
                                          f"{' (after --train-limit)' if cfg.train_limit else ''}, "
                                          f"got {cfg.batch_size}")
        if not len(ex):
            raise cfg.error("test_limit", "leaves no test images")
        flat = ds.train_x.reshape(-1, ds.train_x.shape[-1]).astype(np.float64) / 255.0
        mean, std = flat.mean(axis=0), flat.std(axis=0)
        self.x_train, self.y_train = D.to_float_nchw(tx, mean, std), ty
        self.x_test, self.y_test = D.to_float_nchw(ex, mean, std), ey
        self.classes = ds.classes
        self.model_cfg = MDEQ_CONFIGS[cfg.config]
        self.params0, self.state0 = init_mdeq(self.model_cfg, self.x_train.shape[1], cfg.seed)
        self.task = mdeq_task(self.model_cfg, cfg.bn_groups or 1)
        self.steps_per_epoch = len(self.x_train) // cfg.batch_size
        self.eval_batch_size = cfg.eval_batch_size or 500
        self.train_samples = len(self.x_train)

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
        return Batch(x, self.onehot(self.y_train[idx]), masks, len(idx), probe, idx)

    def fresh_state(self, step: int) -> dict[str, np.ndarray] | None:
        return None

    def eval_state(self, state: dict[str, Any]) -> dict[str, Any] | None:
        """Evaluation runs on the trained BatchNorm statistics."""
        return None

    def eval_batches(self) -> Iterator[tuple[np.ndarray, np.ndarray, int]]:
        bs = self.eval_batch_size
        for start in range(0, len(self.x_test), bs):
            yb = self.y_test[start:start + bs]
            yield self.x_test[start:start + bs], self.onehot(yb), len(yb)


class MDEQCompression:
    """A residual (one array per branch, (B, C_i, H_i, W_i)) -> the channel means of the last,
    lowest-resolution branch (B, C_last)."""

    def __init__(self, channels: Sequence[int]) -> None:
        self.channels = tuple(int(c) for c in channels)
        self.features = self.channels[-1]

    def config(self) -> dict[str, Any]:
        return {"kind": "mdeq", "channels": list(self.channels)}

    def __call__(self, backend: Any, g: Any) -> Any:
        return backend.xp.mean(g[-1], axis=(2, 3))


class MDEQInitialiser:
    """``h_phi(inj)``: ``relu(conv3x3(inj) + b)`` with ``hidden`` channels, average-pooled by
    ``2^i`` and mapped to branch ``i``'s channels by a 1x1 convolution (weights start at zero, so
    an untrained initialiser gives the classic zero start)."""

    def __init__(self, inj_channels: int, channels: Sequence[int], hidden: int = 8) -> None:
        self.inj_channels, self.hidden = int(inj_channels), int(hidden)
        self.channels = tuple(int(c) for c in channels)
        self._ops: dict[str, Any] = {}

    def config(self) -> dict[str, Any]:
        return {"kind": "mdeq", "inj_channels": self.inj_channels, "channels": list(self.channels),
                "hidden": self.hidden}

    def init_params(self, rng: np.random.Generator) -> dict[str, np.ndarray]:
        fan_in = 9 * self.inj_channels
        shape = (self.hidden, self.inj_channels, 3, 3)
        params = {"conv.weight": rng.normal(0.0, math.sqrt(2.0 / fan_in), shape),
                  "conv.bias": np.zeros(self.hidden)}
        for i, c in enumerate(self.channels):
            params[f"out{i}.weight"] = np.zeros((c, self.hidden))
            params[f"out{i}.bias"] = np.zeros(c)
        return params

    def __call__(self, backend: Any, params: Mapping[str, Any], inj: Any) -> tuple[Any, ...]:
        if backend.name not in self._ops:
            self._ops[backend.name] = ops_for(backend.name)
        ops, xp = self._ops[backend.name], backend.xp
        h = ops.conv2d(inj, params["conv.weight"], padding=1)
        h = relu(xp, h + xp.reshape(params["conv.bias"], (1, -1, 1, 1)))
        b, p, height, width = h.shape
        out = []
        for i in range(len(self.channels)):
            k = 2 ** i
            pooled = xp.mean(xp.reshape(h, (b, p, height // k, k, width // k, k)), axis=(3, 5))
            w = xp.matrix_transpose(params[f"out{i}.weight"])
            y = xp.matmul(xp.permute_dims(pooled, (0, 2, 3, 1)), w)
            out.append(xp.permute_dims(y + params[f"out{i}.bias"], (0, 3, 1, 2)))
        return tuple(out)


def zeros(xp: Any, mc: MDEQConfig, inj: Any) -> tuple[Any, ...]:
    """The classic start: zeros of every branch, for the injection ``inj`` of a batch."""
    scale = 2 ** mc.downsample
    shape = (inj.shape[0], 1, inj.shape[2] * scale, inj.shape[3] * scale)
    return tuple(xp.zeros(s, dtype=inj.dtype) for s in equilibrium_shapes(mc, shape))


def score(xp: Any, logits: Any, y: Any) -> tuple[Any, Any]:
    """Summed cross-entropy and correct predictions of one-hot labels ``y``."""
    correct = xp.sum(xp.astype(xp.argmax(logits, axis=-1) == xp.argmax(y, axis=-1), xp.int32))
    return cross_entropy(xp, logits, y) * logits.shape[0], correct


def comparison_batch(work: Any, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, int]:
    return np.asarray(y, np.float32), int(y.shape[0])


DATASETS = {"fashion-mnist": D.fashion_mnist, "cifar10": D.cifar10}

#: K = 3 (the budgets where a learned solver can pay off; the loss unrolls 2K = 6), an
#: initialiser of 8 channels and a mixer of width 8 (a wider initialiser, paid for by a narrower
#: mixer, is what lifts the 1-step accuracy): docs/experiments/hyperdeq-fmnist.
MDEQ = Family(
    name="mdeq", summary="image classifier",
    configs=MDEQ_CONFIGS,
    config_help="tiny = the paper's MDEQ-small (159K parameters on CIFAR), cpu = a narrower model for CPU "
                "runs (53K), micro = for tests",
    datasets=DATASETS, dataset_help="fashion-mnist or cifar10",
    metric=ACCURACY, items="images",
    workload=MDEQWorkload, parts=mdeq_parts, start=zeros,
    compression=lambda mc: MDEQCompression(mc.channels),
    initialiser=lambda mc, hidden: MDEQInitialiser(mc.channels[0], mc.channels, hidden),
    score=score, comparison_batch=comparison_batch,
    hypersolver_sizes={"iterations": 3, "hidden": 8, "width": 8},
    settings=("bn_groups",),
)
