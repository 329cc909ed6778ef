"""MDEQ: the multiscale deep equilibrium model, written once over :mod:`deqcore_models._ops`.

Parameters are a flat ``{name: array}`` dict with the same names and shapes on both backends
(PyTorch module-style dotted names), so a checkpoint from one backend loads in the other.
Architecture (SPEC d): a two-conv stem whose output is injected into branch 0; per branch a
residual block conv3x3(C->eC) -> GN -> ReLU -> conv3x3(eC->C) -> variational dropout -> + injection
-> GN -> + z -> ReLU -> GN, with weight norm on both convs; multi-resolution fusion; and the HRNet-
style classification head.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from ._equilibrium_layer import DEQSettings, LayerStats, run_layer
from ._layers import (
    BatchStatistics,
    ParamBuilder,
    batch_norm,
    conv,
    conv_weight,
    group_norm,
    relu,
    upsample_nearest,
)


@dataclass(frozen=True)
class MDEQConfig:
    """Architecture of an MDEQ. ``channels[i]`` is branch i's width (resolution H / 2^i);
    ``head_channels[i]`` the bottleneck width of its head (output 4x that); ``expansion`` the
    residual block's inner width factor; ``groups`` the GroupNorm groups (every width must divide
    by it); ``fuse_groups`` those of the affine-free GN after fusion; ``downsample`` (0-2) makes
    the first ``downsample`` stem convs stride 2 (the ImageNet setting; 4x cheaper per level)."""

    channels: tuple[int, ...] = (24, 24)
    head_channels: tuple[int, ...] = (8, 16)
    final_channels: int = 200
    expansion: int = 5
    groups: int = 8
    fuse_groups: int = 4
    dropout: float = 0.25
    weight_norm: bool = True
    num_classes: int = 10
    downsample: int = 0

    def __post_init__(self) -> None:
        if len(self.channels) != len(self.head_channels) or not self.channels:
            raise ValueError(f"channels {self.channels} and head_channels {self.head_channels} must be "
                             "non-empty and of equal length (one per branch)")
        for c in self.channels:
            for width, g, what in ((c, self.groups, "groups"), (c * self.expansion, self.groups, "groups"),
                                   (c, self.fuse_groups, "fuse_groups")):
                if width % g:
                    raise ValueError(f"width {width} is not divisible by {what}={g}")
        if self.downsample not in (0, 1, 2):
            raise ValueError(f"downsample must be 0, 1 or 2, got {self.downsample}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")

    @property
    def branches(self) -> int:
        return len(self.channels)


#: Named configurations. ``tiny`` is the paper's MDEQ-small for CIFAR-10 (SPEC d: ~159K
#: parameters with 3 input channels); ``cpu`` a narrower one for quick CPU experiments.
MDEQ_CONFIGS: dict[str, MDEQConfig] = {
    "tiny": MDEQConfig(),
    "cpu": MDEQConfig(channels=(16, 16), head_channels=(4, 8), final_channels=64, expansion=4,
                      dropout=0.1, downsample=1),
    "micro": MDEQConfig(channels=(8, 8), head_channels=(2, 4), final_channels=16, expansion=2,
                        groups=4, fuse_groups=4, dropout=0.0),
}


def init_mdeq(cfg: MDEQConfig, in_channels: int,
              seed: int) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(params, state) in float32 NumPy from ``seed``; ``state`` holds BatchNorm running stats."""
    pb = ParamBuilder(seed)
    c0 = cfg.channels[0]
    pb.conv("stem.conv1", in_channels, c0, 3)
    pb.norm("stem.bn1", c0, batch=True)
    pb.conv("stem.conv2", c0, c0, 3)
    pb.norm("stem.bn2", c0, batch=True)
    if cfg.branches > 2 or cfg.downsample:
        pb.conv("stem.stage0.conv", c0, c0, 1)
        pb.norm("stem.stage0.bn", c0, batch=True)
    wn = cfg.weight_norm
    for i, c in enumerate(cfg.channels):
        inner = c * cfg.expansion
        pb.conv(f"deq.block{i}.conv1", c, inner, 3, wnorm=wn)
        pb.norm(f"deq.block{i}.gn1", inner)
        pb.conv(f"deq.block{i}.conv2", inner, c, 3, wnorm=wn)
        pb.norm(f"deq.block{i}.gn2", c)
        pb.norm(f"deq.block{i}.gn3", c)
    for i, ci in enumerate(cfg.channels):
        for j, cj in enumerate(cfg.channels):
            if j > i:
                pb.conv(f"deq.fuse{i}.from{j}.conv", cj, ci, 1)
                pb.norm(f"deq.fuse{i}.from{j}.gn", ci)
            elif j < i:
                for k in range(i - j):
                    out = ci if k == i - j - 1 else cj
                    pb.conv(f"deq.fuse{i}.from{j}.step{k}.conv", cj, out, 3)
                    pb.norm(f"deq.fuse{i}.from{j}.step{k}.gn", out)
        pb.conv(f"deq.post{i}.conv", ci, ci, 1, wnorm=wn)
    for i, (c, h) in enumerate(zip(cfg.channels, cfg.head_channels, strict=True)):
        p = f"head.incre{i}"
        pb.conv(f"{p}.conv1", c, h, 1)
        pb.norm(f"{p}.bn1", h, batch=True)
        pb.conv(f"{p}.conv2", h, h, 3)
        pb.norm(f"{p}.bn2", h, batch=True)
        pb.conv(f"{p}.conv3", h, 4 * h, 1)
        pb.norm(f"{p}.bn3", 4 * h, batch=True)
        pb.conv(f"{p}.down.conv", c, 4 * h, 1)
        pb.norm(f"{p}.down.bn", 4 * h, batch=True)
    for i in range(cfg.branches - 1):
        pb.conv(f"head.down{i}.conv", 4 * cfg.head_channels[i], 4 * cfg.head_channels[i + 1], 3, bias=True)
        pb.norm(f"head.down{i}.bn", 4 * cfg.head_channels[i + 1], batch=True)
    pb.conv("head.final.conv", 4 * cfg.head_channels[-1], cfg.final_channels, 1, bias=True)
    pb.norm("head.final.bn", cfg.final_channels, batch=True)
    pb.linear("head.classifier", cfg.final_channels, cfg.num_classes)
    return pb.params, pb.state


def dropout_masks(cfg: MDEQConfig, batch: int, rng: np.random.Generator) -> list[np.ndarray] | None:
    """Variational dropout masks, one (B, C_i, 1, 1) array per branch with entries 0 or 1/(1-p),
    drawn once per forward call and shared by every solver iteration. None when dropout is 0.
    Drawn in NumPy so that both backends see the same masks from the same seed."""
    if cfg.dropout == 0:
        return None
    keep = 1.0 - cfg.dropout
    return [(rng.random((batch, c, 1, 1)) < keep).astype(np.float32) / np.float32(keep)
            for c in cfg.channels]


def _layer(ops: Any, cfg: MDEQConfig, params: dict[str, Any], masks: list[Any] | None):
    """f(z, inj) over the tuple of branch states, with weight norm applied once for all calls."""
    xp = ops.xp
    convs = {name.rsplit(".", 1)[0] for name in params if name.startswith("deq.")
             and name.rsplit(".", 2)[-2].startswith("conv")}
    W = {name: conv_weight(xp, params, name) for name in convs}
    g = cfg.groups

    def block(i: int, z: Any, inj: Any) -> Any:
        p = f"deq.block{i}"
        out = relu(xp, group_norm(xp, conv(ops, z, W[f"{p}.conv1"]), g, params[f"{p}.gn1.weight"],
                                  params[f"{p}.gn1.bias"]))
        out = conv(ops, out, W[f"{p}.conv2"])
        if masks is not None:
            out = out * masks[i]
        if inj is not None:
            out = out + inj
        out = group_norm(xp, out, g, params[f"{p}.gn2.weight"], params[f"{p}.gn2.bias"]) + z
        return group_norm(xp, relu(xp, out), g, params[f"{p}.gn3.weight"], params[f"{p}.gn3.bias"])

    def f(z: tuple[Any, ...], inj: Any) -> tuple[Any, ...]:
        ys = [block(i, zi, inj if i == 0 else None) for i, zi in enumerate(z)]
        outs = []
        for i in range(cfg.branches):
            acc = ys[i]
            for j in range(cfg.branches):
                p = f"deq.fuse{i}.from{j}"
                if j > i:
                    t = group_norm(xp, conv(ops, ys[j], W[f"{p}.conv"]), g, params[f"{p}.gn.weight"],
                                   params[f"{p}.gn.bias"])
                    acc = acc + upsample_nearest(xp, t, 2 ** (j - i))
                elif j < i:
                    t = ys[j]
                    for k in range(i - j):
                        t = group_norm(xp, conv(ops, t, W[f"{p}.step{k}.conv"], stride=2), g,
                                       params[f"{p}.step{k}.gn.weight"], params[f"{p}.step{k}.gn.bias"])
                        if k < i - j - 1:
                            t = relu(xp, t)
                    acc = acc + t
            outs.append(group_norm(xp, conv(ops, relu(xp, acc), W[f"deq.post{i}.conv"]), cfg.fuse_groups))
        return tuple(outs)

    return f


def _bottleneck(ops, params, norm, p, x):
    xp = ops.xp
    out = relu(xp, norm(conv(ops, x, params[f"{p}.conv1.weight"]), f"{p}.bn1"))
    out = relu(xp, norm(conv(ops, out, params[f"{p}.conv2.weight"]), f"{p}.bn2"))
    out = norm(conv(ops, out, params[f"{p}.conv3.weight"]), f"{p}.bn3")
    skip = norm(conv(ops, x, params[f"{p}.down.conv.weight"]), f"{p}.down.bn")
    return relu(xp, out + skip)


def _norms(ops: Any, params: dict[str, Any], state: dict[str, Any], new_state: dict[str, Any], train: bool,
           bn_groups: int = 1) -> Callable[[Any, str], Any]:
    """``norm(x, name)``: BatchNorm ``name`` of the model, its training statistics over
    ``bn_groups`` groups of the global batch (:func:`batch_statistics`)."""
    over = batch_statistics(ops, bn_groups) if train else BatchStatistics()

    def norm(x: Any, name: str) -> Any:
        return batch_norm(ops.xp, x, params, state, name, train, new_state, over=over)

    return norm


def batch_statistics(ops: Any, bn_groups: int) -> BatchStatistics:
    """What ``bn_groups`` groups of the global batch are on this process, whose share of the
    batch is one of ``ops.replicas`` equal ones: one group synchronised over every replica
    (``ops.replica_sum``), or ``bn_groups / replicas`` groups of its own (no communication).
    ``bn_groups`` must be 1 or a multiple of the replicas (a ``ValueError``)."""
    replicas = ops.replicas
    if bn_groups == 1 and replicas > 1:
        return BatchStatistics(1, replicas, ops.replica_sum)
    if bn_groups % replicas:
        raise ValueError(f"BatchNorm groups {bn_groups} must be 1 or a multiple of the {replicas} replicas")
    return BatchStatistics(bn_groups // replicas)


def equilibrium_shapes(cfg: MDEQConfig, image_shape: tuple[int, ...]) -> list[tuple[int, int, int, int]]:
    """Shapes of the equilibrium state ``z`` (one array per branch) for images of shape (B, C, H, W):
    branch ``i`` has ``channels[i]`` channels at resolution ``(H, W) / 2^(downsample + i)``."""
    b, _, h, w = image_shape
    return [(b, c, h // 2 ** (cfg.downsample + i), w // 2 ** (cfg.downsample + i))
            for i, c in enumerate(cfg.channels)]


def mdeq_apply(ops: Any, cfg: MDEQConfig, params: dict[str, Any], state: dict[str, Any], x: Any, *,
               train: bool, settings: DEQSettings, masks: list[Any] | None = None, probe: Any = None,
               bn_groups: int = 1) -> tuple[Any, dict[str, Any], LayerStats]:
    """Logits (B, classes) of images ``x`` (B, C, H, W); returns (logits, new_state, stats).

    ``train`` selects batch statistics for BatchNorm (and returns updated running stats in
    ``new_state``); ``masks`` are the dropout masks of :func:`dropout_masks` (as framework arrays)
    or None for no dropout (evaluation). ``settings`` chooses DEQ or unrolled mode, the solver
    and the gradient mode. ``probe``: Hutchinson noise, one array per branch with the shapes of
    :func:`equilibrium_shapes`, for the Jacobian penalty in the stats (or None). ``bn_groups``:
    BatchNorm's training statistics over that many groups of consecutive samples of the global
    batch (:func:`batch_statistics`).
    """
    new_state = dict(state)
    norm = _norms(ops, params, state, new_state, train, bn_groups)
    inj = _stem(ops, cfg, params, norm, x)
    f = _layer(ops, cfg, params, masks)
    z0 = tuple(ops.xp.zeros(s, dtype=inj.dtype) for s in equilibrium_shapes(cfg, x.shape))
    z, stats = run_layer(ops.name, f, inj, z0, settings, ops.xp, probe)
    # before z's: the head's BatchNorm running statistics are those of the last call
    stats.correction_outputs = tuple(_head(ops, cfg, params, norm, s) for s in stats.correction_states)
    logits = _head(ops, cfg, params, norm, z)
    return logits, new_state, stats


def _stem(ops: Any, cfg: MDEQConfig, params: dict[str, Any], norm: Callable[[Any, str], Any], x: Any) -> Any:
    """The input injection (B, channels[0], H', W') of images ``x``."""
    xp = ops.xp
    _, _, h, w = x.shape
    levels = cfg.branches - 1 + cfg.downsample
    if h % 2 ** levels or w % 2 ** levels:
        raise ValueError(f"image size {h}x{w} must be divisible by 2^{levels} for {cfg.branches} "
                         f"branches and downsample={cfg.downsample}")
    out = conv(ops, x, params["stem.conv1.weight"], stride=2 if cfg.downsample >= 1 else 1)
    out = relu(xp, norm(out, "stem.bn1"))
    inj = conv(ops, out, params["stem.conv2.weight"], stride=2 if cfg.downsample >= 2 else 1)
    inj = relu(xp, norm(inj, "stem.bn2"))
    if "stem.stage0.conv.weight" in params:
        inj = conv(ops, inj, params["stem.stage0.conv.weight"])
        inj = relu(xp, norm(inj, "stem.stage0.bn"))
    return inj


def _head(ops: Any, cfg: MDEQConfig, params: dict[str, Any], norm: Callable[[Any, str], Any],
          z: tuple[Any, ...]) -> Any:
    """Class logits (B, classes) from the equilibrium state ``z``."""
    xp = ops.xp
    y = _bottleneck(ops, params, norm, "head.incre0", z[0])
    for i in range(cfg.branches - 1):
        down = conv(ops, y, params[f"head.down{i}.conv.weight"], params[f"head.down{i}.conv.bias"], stride=2)
        down = relu(xp, norm(down, f"head.down{i}.bn"))
        y = _bottleneck(ops, params, norm, f"head.incre{i + 1}", z[i + 1]) + down
    y = conv(ops, y, params["head.final.conv.weight"], params["head.final.conv.bias"])
    y = relu(xp, norm(y, "head.final.bn"))
    pooled = xp.mean(y, axis=(2, 3))
    return (xp.matmul(pooled, xp.matrix_transpose(params["head.classifier.weight"]))
            + params["head.classifier.bias"])


@dataclass(frozen=True)
class MDEQParts:
    """A trained MDEQ split around its equilibrium layer, in evaluation mode (BatchNorm running
    statistics, no dropout): ``inject(x)`` gives the injection, ``layer(z, inj)`` is ``f``,
    ``head(z)`` the logits (the classic start is zeros of :func:`equilibrium_shapes`). For solving
    the layer by other means (a hypersolver) and timing the solve alone."""

    inject: Any
    layer: Any
    head: Any


def mdeq_parts(ops: Any, cfg: MDEQConfig, params: dict[str, Any], state: dict[str, Any]) -> MDEQParts:
    """The evaluation-mode pieces of an MDEQ with these parameters (see :class:`MDEQParts`)."""
    norm = _norms(ops, params, state, {}, False)

    def inject(x: Any) -> Any:
        return _stem(ops, cfg, params, norm, x)

    def head(z: tuple[Any, ...]) -> Any:
        return _head(ops, cfg, params, norm, z)

    return MDEQParts(inject, _layer(ops, cfg, params, None), head)
