"""Functional layers over an :class:`~deqcore_models._ops.Ops`: pure functions of arrays and
parameter dicts, identical on PyTorch and JAX (only ``ops.conv2d`` is framework code)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

Params = dict[str, Any]


def relu(xp: Any, x: Any) -> Any:
    return xp.maximum(x, xp.zeros_like(x))


def weight_norm(xp: Any, v: Any, g: Any) -> Any:
    """``w = g * v / ||v||`` with the norm over every axis but 0 (torch's ``weight_norm(dim=0)``)."""
    axes = tuple(range(1, v.ndim))
    norm = xp.sqrt(xp.sum(v * v, axis=axes, keepdims=True))
    return xp.reshape(g, (-1,) + (1,) * (v.ndim - 1)) * v / norm


def conv_weight(xp: Any, params: Params, name: str) -> Any:
    """The weight of conv ``name``: ``name.weight``, or weight-normed from ``name.v`` and ``name.g``."""
    if f"{name}.v" in params:
        return weight_norm(xp, params[f"{name}.v"], params[f"{name}.g"])
    return params[f"{name}.weight"]


def conv(ops: Any, x: Any, w: Any, bias: Any = None, stride: int = 1) -> Any:
    """Same-padded convolution (odd kernels), optional per-channel bias."""
    out = ops.conv2d(x, w, stride=stride, padding=w.shape[-1] // 2)
    if bias is not None:
        out = out + ops.xp.reshape(bias, (1, -1, 1, 1))
    return out


def group_norm(xp: Any, x: Any, groups: int, weight: Any = None, bias: Any = None,
               eps: float = 1e-5) -> Any:
    """GroupNorm over (C/groups, H, W) per sample and group, optional affine per channel."""
    b, c, h, w = x.shape
    xg = xp.reshape(x, (b, groups, c // groups, h, w))
    mean = xp.mean(xg, axis=(2, 3, 4), keepdims=True)
    var = xp.mean((xg - mean) ** 2, axis=(2, 3, 4), keepdims=True)
    out = xp.reshape((xg - mean) / xp.sqrt(var + eps), (b, c, h, w))
    if weight is not None:
        out = out * xp.reshape(weight, (1, -1, 1, 1)) + xp.reshape(bias, (1, -1, 1, 1))
    return out


@dataclass(frozen=True)
class BatchStatistics:
    """Which samples BatchNorm takes its training statistics over: ``groups`` groups of
    consecutive samples of the batch, each normalised by its own statistics (1: the whole batch);
    with ``replica_sum`` (a differentiable sum over ``replicas`` data-parallel processes) the one
    group spans every process's batch, as torch's ``SyncBatchNorm``."""

    groups: int = 1
    replicas: int = 1
    replica_sum: Callable[[Any], Any] | None = None


def batch_norm(xp: Any, x: Any, params: Params, state: Params, name: str, train: bool,
               new_state: Params, momentum: float = 0.1, eps: float = 1e-5,
               over: BatchStatistics = BatchStatistics()) -> Any:
    """BatchNorm2d with torch's semantics. In training it normalises by the batch statistics of
    ``over`` and writes the running mean/var updated with the groups' mean statistics (unbiased
    variance, with the count of a group) to ``new_state``; in evaluation it uses the running
    statistics from ``state``."""
    b, c, h, w = x.shape
    g = over.groups
    if train:
        if b % g:
            raise ValueError(f"BatchNorm {name}: a batch of {b} does not split into {g} groups")
        xg = xp.reshape(x, (g, b // g, c, h, w))
        n = (b // g) * h * w * over.replicas
        if over.replica_sum is None:
            mean = xp.mean(xg, axis=(1, 3, 4))
            var = xp.mean((xg - xp.reshape(mean, (g, 1, c, 1, 1))) ** 2, axis=(1, 3, 4))
        else:  # one collective: sums about the running mean (the same on every process, near the mean)
            shift = state[f"{name}.running_mean"]
            d = xg - xp.reshape(shift, (1, 1, c, 1, 1))
            sums = over.replica_sum(xp.stack([xp.sum(d, axis=(1, 3, 4)), xp.sum(d * d, axis=(1, 3, 4))])) / n
            mean = shift + sums[0]
            var = sums[1] - sums[0] * sums[0]
        batch_stats = {"running_mean": xp.mean(mean, axis=0),
                       "running_var": xp.mean(var, axis=0) * (n / max(n - 1, 1))}
        for key, value in batch_stats.items():
            new_state[f"{name}.{key}"] = (1 - momentum) * state[f"{name}.{key}"] + momentum * value
    else:
        mean, var = state[f"{name}.running_mean"][None], state[f"{name}.running_var"][None]
        g, xg = 1, x[None]
    scale = params[f"{name}.weight"] / xp.sqrt(var + eps)
    shift = params[f"{name}.bias"] - mean * scale
    out = xg * xp.reshape(scale, (g, 1, c, 1, 1)) + xp.reshape(shift, (g, 1, c, 1, 1))
    return xp.reshape(out, (b, c, h, w))


def upsample_nearest(xp: Any, x: Any, factor: int) -> Any:
    b, c, h, w = x.shape
    big = xp.broadcast_to(xp.reshape(x, (b, c, h, 1, w, 1)), (b, c, h, factor, w, factor))
    return xp.reshape(big, (b, c, h * factor, w * factor))


def linear(xp: Any, x: Any, w: Any, bias: Any = None) -> Any:
    """``x @ w.T + bias`` over the last axis of ``x`` (torch's ``Linear`` weight layout)."""
    out = xp.matmul(x, xp.matrix_transpose(w))
    return out if bias is None else out + bias


def layer_norm(xp: Any, x: Any, weight: Any, bias: Any, eps: float = 1e-5) -> Any:
    """LayerNorm over the last axis with a per-feature affine map."""
    mean = xp.mean(x, axis=-1, keepdims=True)
    var = xp.mean((x - mean) ** 2, axis=-1, keepdims=True)
    return (x - mean) / xp.sqrt(var + eps) * weight + bias


def softmax(xp: Any, x: Any, axis: int = -1) -> Any:
    e = xp.exp(x - xp.max(x, axis=axis, keepdims=True))
    return e / xp.sum(e, axis=axis, keepdims=True)


def token_cross_entropy(xp: Any, logits: Any, targets: Any,
                        stop_gradient: Any = None) -> tuple[Any, Any]:
    """(sum of the cross-entropies, number of correct argmax predictions) of (..., V) logits
    against integer ``targets`` (...). ``stop_gradient`` (the backend's), when given, detaches
    the stabilising max (the loss does not depend on it). Memory for backward, which dominates a
    large-vocabulary model: the softmax numerator and a boolean target mask, both vocabulary-
    sized; a gather (``take_along_axis``) would keep a float copy of the logits instead."""
    top = xp.max(logits if stop_gradient is None else stop_gradient(logits), axis=-1, keepdims=True)
    logz = xp.log(xp.sum(xp.exp(logits - top), axis=-1))
    hit = targets[..., None] == xp.reshape(xp.arange(logits.shape[-1], dtype=targets.dtype),
                                           (1,) * targets.ndim + (-1,))
    picked = xp.sum(xp.where(hit, logits, xp.zeros_like(logits)), axis=-1) - top[..., 0]
    correct = xp.sum(xp.astype(xp.argmax(logits, axis=-1) == targets, xp.int32))
    return xp.sum(logz - picked), correct


def output_cross_entropy(ops: Any, hidden: Any, weight: Any, bias: Any, targets: Any,
                         chunk: int) -> tuple[Any, Any]:
    """:func:`token_cross_entropy` of the output layer's logits ``hidden @ weight.T + bias``
    ((..., d) hidden states, (V, d) weight, (V,) bias, integer (...) targets) without ever
    forming all of them: the logits are computed ``chunk`` positions at a time, in the forward
    pass and again in the backward pass, which keeps only ``hidden``, the targets and one
    log-normaliser per position (the vocabulary-sized softmax would otherwise dominate a
    language model's training memory). Returns (sum of the cross-entropies, number of correct
    argmax predictions); the gradient reaches ``hidden``, ``weight`` and ``bias`` (first order)."""
    if chunk <= 0:
        raise ValueError(f"chunk must be positive, got {chunk}")
    xp = ops.xp
    d = hidden.shape[-1]
    h2 = xp.reshape(hidden, (-1, d))
    t1 = xp.reshape(targets, (-1,))
    n = h2.shape[0]
    spans = [(s, min(s + chunk, n)) for s in range(0, n, chunk)]

    def logits_of(h, w, b, s, e):
        return xp.matmul(h[s:e], xp.matrix_transpose(w)) + b

    def fwd(h, w, b, t):
        logz, picked, correct = [], [], []
        for s, e in spans:
            logits = logits_of(h, w, b, s, e)
            top = xp.max(logits, axis=-1)
            logz.append(xp.log(xp.sum(xp.exp(logits - top[:, None]), axis=-1)) + top)
            picked.append(xp.sum(h[s:e] * xp.take(w, t[s:e], axis=0), axis=-1) + xp.take(b, t[s:e]))
            correct.append(xp.sum(xp.astype(xp.argmax(logits, axis=-1) == t[s:e], xp.int32)))
        lz = xp.concat(logz)
        return xp.sum(lz - xp.concat(picked)), sum(correct[1:], correct[0]), (h, w, b, t, lz)

    def bwd(residuals, g):
        h, w, b, t, lz = residuals
        vocab = xp.reshape(xp.arange(w.shape[0], dtype=t.dtype), (1, -1))
        gh, gw, gb = [], xp.zeros_like(w), xp.zeros_like(b)
        for s, e in spans:
            probs = xp.exp(logits_of(h, w, b, s, e) - lz[s:e, None])
            dlogits = (probs - xp.astype(t[s:e, None] == vocab, probs.dtype)) * g
            gh.append(xp.matmul(dlogits, w))
            gw = gw + xp.matmul(xp.matrix_transpose(dlogits), h[s:e])
            gb = gb + xp.sum(dlogits, axis=0)
        return xp.concat(gh), gw, gb, None

    return ops.custom_gradient(fwd, bwd)(h2, weight, bias, t1)


def cross_entropy(xp: Any, logits: Any, labels_onehot: Any) -> Any:
    """Mean cross-entropy of (B, K) logits against one-hot (B, K) labels (log-sum-exp stabilised)."""
    top = xp.max(logits, axis=-1, keepdims=True)
    shifted = logits - top
    logz = xp.log(xp.sum(xp.exp(shifted), axis=-1, keepdims=True))
    return -xp.mean(xp.sum(labels_onehot * (shifted - logz), axis=-1))


# ---------------------------------------------------------------------------- parameter creation


class ParamBuilder:
    """Creates a model's parameters in NumPy (float32) in a fixed order from one seed, so both
    backends start from identical weights. ``params`` are trained; ``state`` holds buffers."""

    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.params: dict[str, np.ndarray] = {}
        self.state: dict[str, np.ndarray] = {}

    def _uniform(self, shape: tuple[int, ...], bound: float) -> np.ndarray:
        return self.rng.uniform(-bound, bound, size=shape).astype(np.float32)

    def conv(self, name: str, c_in: int, c_out: int, k: int, *, bias: bool = False,
             wnorm: bool = False, scale: float = 1.0) -> None:
        """A conv with torch's default init (uniform, bound 1/sqrt(fan_in)) times ``scale``;
        weight-normed convs store ``v`` and ``g = ||v||`` (so ``w = v`` at init)."""
        fan_in = c_in * k * k
        w = self._uniform((c_out, c_in, k, k), scale / np.sqrt(fan_in))
        if wnorm:
            self.params[f"{name}.v"] = w
            norm = np.sqrt((w.astype(np.float64) ** 2).sum(axis=(1, 2, 3)))
            self.params[f"{name}.g"] = norm.astype(np.float32)
        else:
            self.params[f"{name}.weight"] = w
        if bias:
            self.params[f"{name}.bias"] = self._uniform((c_out,), 1 / np.sqrt(fan_in))

    def norm(self, name: str, c: int, *, batch: bool = False) -> None:
        self.params[f"{name}.weight"] = np.ones(c, np.float32)
        self.params[f"{name}.bias"] = np.zeros(c, np.float32)
        if batch:
            self.state[f"{name}.running_mean"] = np.zeros(c, np.float32)
            self.state[f"{name}.running_var"] = np.ones(c, np.float32)

    def linear(self, name: str, n_in: int, n_out: int, *, bias: bool = True, wnorm: bool = False,
               scale: float = 1.0) -> None:
        """A linear layer (weight (n_out, n_in)) with torch's default init times ``scale``;
        weight-normed ones store ``v`` and ``g`` like :meth:`conv`."""
        w = self._uniform((n_out, n_in), scale / np.sqrt(n_in))
        if wnorm:
            self.params[f"{name}.v"] = w
            self.params[f"{name}.g"] = np.sqrt((w.astype(np.float64) ** 2).sum(axis=1)).astype(np.float32)
        else:
            self.params[f"{name}.weight"] = w
        if bias:
            self.params[f"{name}.bias"] = self._uniform((n_out,), 1 / np.sqrt(n_in))

    def embedding(self, name: str, n: int, d: int, std: float = 0.02) -> None:
        self.params[f"{name}.weight"] = (std * self.rng.standard_normal((n, d))).astype(np.float32)
