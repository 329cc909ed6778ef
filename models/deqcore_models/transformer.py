"""DEQ-Transformer: a weight-tied Transformer-XL layer solved to its fixed point, written once.

Like :mod:`deqcore_models.mdeq`, parameters are a flat ``{name: array}`` dict with identical names
and shapes on both backends. The layer (SPEC d) is ``f(z; u, memory)``: QKV projection of
``[z_mem; z]`` plus the input injection ``u`` (a projection of the word embeddings), relative
multi-head attention (Transformer-XL: content and position terms with the learned biases
``r_w_bias``/``r_r_bias``, sinusoidal relative positions projected by ``r_net``, causal mask that
lets every query see the memory), output projection, variational dropout, post-LayerNorm residual,
a ReLU feed-forward block with its own residual and LayerNorm. Weight norm on every projection;
``z`` starts at 0. The output embedding is tied to the input one.

Memory (``mem_len > 0``) keeps the fixed point ``z*`` and the injection ``u`` of the previous
segment in the model state (``mem.z``, ``mem.u``, ``mem.valid`` = how many memory positions hold
real tokens), with fixed shapes so JAX compiles one step; the memory is never differentiated.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ._equilibrium_layer import DEQSettings, LayerStats, run_layer
from ._layers import ParamBuilder, conv_weight, layer_norm, linear, relu, softmax


@dataclass(frozen=True)
class TransformerConfig:
    """Architecture of a DEQ-Transformer. ``d_model = n_head * d_head`` is required (the
    injection is added to the QKV projection, both ``3 * d_model`` wide). ``tgt_len`` is the
    segment length the model trains on, ``mem_len`` the memory (0: none). ``dropout`` is the
    variational hidden dropout inside the layer (one mask per forward, shared by every solver
    iteration and every position); ``emb_dropout`` ordinary dropout on the embeddings."""

    d_model: int = 64
    n_head: int = 4
    d_head: int = 16
    d_inner: int = 256
    tgt_len: int = 64
    mem_len: int = 0
    dropout: float = 0.05
    emb_dropout: float = 0.05
    weight_norm: bool = True

    def __post_init__(self) -> None:
        if self.n_head * self.d_head != self.d_model:
            raise ValueError(f"n_head * d_head must equal d_model, got {self.n_head} * {self.d_head} "
                             f"!= {self.d_model}")
        if self.d_model % 2:
            raise ValueError(f"d_model must be even (sinusoidal positions), got {self.d_model}")
        for name in ("d_model", "n_head", "d_head", "d_inner", "tgt_len"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.mem_len < 0:
            raise ValueError(f"mem_len must be >= 0, got {self.mem_len}")
        for name in ("dropout", "emb_dropout"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")


#: Named configurations. ``small`` is SPEC d's test model (d=64, H=4, d_h=16, d_inner=256);
#: ``small-mem`` the same with a 64-token memory; ``micro`` and ``micro-mem`` for tests.
TRANSFORMER_CONFIGS: dict[str, TransformerConfig] = {
    "small": TransformerConfig(),
    "small-mem": TransformerConfig(mem_len=64),
    "micro": TransformerConfig(d_model=16, n_head=2, d_head=8, d_inner=32, tgt_len=8, mem_len=0,
                               dropout=0.0, emb_dropout=0.0),
    "micro-mem": TransformerConfig(d_model=16, n_head=2, d_head=8, d_inner=32, tgt_len=8, mem_len=8,
                                   dropout=0.1, emb_dropout=0.1),
}


def init_transformer(cfg: TransformerConfig, vocab: int, seed: int, batch_size: int = 1
                     ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(params, state) in float32 NumPy from ``seed``. ``state`` is the empty memory of a
    ``batch_size``-row stream (no entries when ``mem_len`` is 0)."""
    pb = ParamBuilder(seed)
    d, wn = cfg.d_model, cfg.weight_norm
    pb.embedding("embed", vocab, d, std=0.02)
    pb.params["out.bias"] = np.zeros(vocab, np.float32)
    pb.linear("inject", d, 3 * d, wnorm=wn)
    pb.linear("deq.qkv", d, 3 * d, bias=False, wnorm=wn)
    pb.linear("deq.r_net", d, d, bias=False, wnorm=wn)
    pb.params["deq.r_w_bias"] = (0.02 * pb.rng.standard_normal((cfg.n_head, cfg.d_head))).astype(np.float32)
    pb.params["deq.r_r_bias"] = (0.02 * pb.rng.standard_normal((cfg.n_head, cfg.d_head))).astype(np.float32)
    pb.linear("deq.o_net", d, d, bias=False, wnorm=wn)
    pb.norm("deq.ln1", d)
    pb.linear("deq.ff1", d, cfg.d_inner, wnorm=wn)
    pb.linear("deq.ff2", cfg.d_inner, d, wnorm=wn)
    pb.norm("deq.ln2", d)
    return pb.params, empty_memory(cfg, batch_size)


def empty_memory(cfg: TransformerConfig, batch_size: int) -> dict[str, np.ndarray]:
    """The state of a stream with nothing remembered yet (``{}`` without memory)."""
    if not cfg.mem_len:
        return {}
    return {"mem.z": np.zeros((batch_size, cfg.mem_len, cfg.d_model), np.float32),
            "mem.u": np.zeros((batch_size, cfg.mem_len, 3 * cfg.d_model), np.float32),
            "mem.valid": np.zeros((), np.float32)}


def transformer_masks(cfg: TransformerConfig, batch: int, length: int,
                      rng: np.random.Generator) -> dict[str, np.ndarray] | None:
    """Dropout masks of one forward pass (entries 0 or 1/(1-p)), drawn in NumPy so both backends
    see the same ones: ``emb`` (B, L, d) for the embeddings, and the variational masks ``attn``
    and ``ff_out`` (B, 1, d) and ``ff_hidden`` (B, 1, d_inner), shared by every position and every
    solver iteration. None when both dropout rates are 0."""
    if cfg.dropout == 0 and cfg.emb_dropout == 0:
        return None

    def mask(shape: tuple[int, ...], p: float) -> np.ndarray:
        return (rng.random(shape) >= p).astype(np.float32) / np.float32(1 - p)

    d = cfg.d_model
    return {"emb": mask((batch, length, d), cfg.emb_dropout),
            "attn": mask((batch, 1, d), cfg.dropout),
            "ff_hidden": mask((batch, 1, cfg.d_inner), cfg.dropout),
            "ff_out": mask((batch, 1, d), cfg.dropout)}


def sinusoid_positions(klen: int, d: int) -> np.ndarray:
    """(klen, d) float64 sinusoidal encodings of the relative distances klen-1 down to 0."""
    pos = np.arange(klen - 1, -1, -1, dtype=np.float64)
    inv_freq = 1.0 / (10000 ** (np.arange(0, d, 2, dtype=np.float64) / d))
    angles = np.outer(pos, inv_freq)
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)


def rel_shift(xp: Any, x: Any) -> Any:
    """Transformer-XL's shift of (..., L, K) position scores: row i moves left by L-1-i, so that
    column j holds the score of distance ``i + (K-L) - j`` (entries above that diagonal are
    garbage; the causal mask removes them). Pad-and-reshape, no gather."""
    *lead, q, k = x.shape
    padded = xp.concat([xp.zeros((*lead, q, 1), dtype=x.dtype), x], axis=-1)
    padded = xp.reshape(padded, (*lead, k + 1, q))
    return xp.reshape(padded[..., 1:, :], (*lead, q, k))


def _weights(xp: Any, params: dict[str, Any], names: tuple[str, ...]) -> dict[str, Any]:
    return {n: conv_weight(xp, params, n) for n in names}


def _layer(ops: Any, cfg: TransformerConfig, params: dict[str, Any], masks: dict[str, Any] | None,
           length: int, dtype: Any, z_mem: Any, u_mem: Any, valid: Any):
    """f(z, u) of one ``length``-token segment (z, u: (B, L, d), (B, L, 3d)); weight norm, the
    projected relative positions, the attention mask and the memory's keys and values are
    computed once for all calls.
    ``z_mem``/``u_mem`` (B, M, .) or None, ``valid`` how many memory slots hold real tokens."""
    xp = ops.xp
    W = _weights(xp, params, ("deq.qkv", "deq.r_net", "deq.o_net", "deq.ff1", "deq.ff2"))
    H, dh, d, L = cfg.n_head, cfg.d_head, cfg.d_model, length
    M = 0 if z_mem is None else z_mem.shape[1]
    K = M + L
    scale = 1.0 / float(np.sqrt(dh))
    pos = xp.astype(ops.asarray(sinusoid_positions(K, d)), dtype)
    r = xp.permute_dims(xp.reshape(linear(xp, pos, W["deq.r_net"]), (K, H, dh)), (1, 2, 0))
    r_w = xp.reshape(params["deq.r_w_bias"], (1, H, 1, dh))
    r_r = xp.reshape(params["deq.r_r_bias"], (1, H, 1, dh))
    qi = xp.reshape(xp.arange(L), (L, 1))
    kj = xp.reshape(xp.arange(K), (1, K))
    hidden = kj > qi + M
    if z_mem is not None:
        hidden = hidden | (xp.astype(kj, dtype) < M - valid)
    zeros = xp.zeros((L, K), dtype=dtype)
    mask = xp.where(hidden, zeros - 1e9, zeros)  # additive: built once, not per solver iteration
    # the memory is constant during the solve: its keys and values are projected once
    mem_kv = None if z_mem is None else (linear(xp, z_mem, W["deq.qkv"]) + u_mem)[:, :, d:]

    def f(z: Any, u: Any) -> Any:
        b = z.shape[0]
        qkv = linear(xp, z, W["deq.qkv"]) + u
        kv = qkv[:, :, d:] if mem_kv is None else xp.concat([mem_kv, qkv[:, :, d:]], axis=1)
        q = xp.permute_dims(xp.reshape(qkv[:, :, :d], (b, L, H, dh)), (0, 2, 1, 3))
        k = xp.permute_dims(xp.reshape(kv[:, :, :d], (b, K, H, dh)), (0, 2, 3, 1))
        v = xp.permute_dims(xp.reshape(kv[:, :, d:], (b, K, H, dh)), (0, 2, 1, 3))
        score = (xp.matmul(q + r_w, k) + rel_shift(xp, xp.matmul(q + r_r, r))) * scale + mask
        attn = xp.matmul(softmax(xp, score), v)
        attn = xp.reshape(xp.permute_dims(attn, (0, 2, 1, 3)), (b, L, d))
        out = linear(xp, attn, W["deq.o_net"])
        if masks is not None:
            out = out * masks["attn"]
        z1 = layer_norm(xp, z + out, params["deq.ln1.weight"], params["deq.ln1.bias"])
        ff = relu(xp, linear(xp, z1, W["deq.ff1"], params["deq.ff1.bias"]))
        if masks is not None:
            ff = ff * masks["ff_hidden"]
        ff = linear(xp, ff, W["deq.ff2"], params["deq.ff2.bias"])
        if masks is not None:
            ff = ff * masks["ff_out"]
        return layer_norm(xp, z1 + ff, params["deq.ln2.weight"], params["deq.ln2.bias"])

    return f


def _inject(xp: Any, cfg: TransformerConfig, params: dict[str, Any], tokens: Any,
            masks: dict[str, Any] | None) -> Any:
    """The injection ``u`` (B, L, 3 d_model) of integer ``tokens`` (B, L)."""
    b, L = tokens.shape
    emb = xp.take(params["embed.weight"], xp.reshape(xp.astype(tokens, xp.int32), (-1,)), axis=0)
    emb = xp.reshape(emb, (b, L, cfg.d_model))
    if masks is not None:
        emb = emb * masks["emb"]
    return linear(xp, emb, conv_weight(xp, params, "inject"), params["inject.bias"])


def _logits(xp: Any, params: dict[str, Any], z: Any) -> Any:
    """The tied output layer: logits (B, L, vocab) of hidden states ``z``."""
    return xp.matmul(z, xp.matrix_transpose(params["embed.weight"])) + params["out.bias"]


def transformer_apply(ops: Any, cfg: TransformerConfig, params: dict[str, Any], state: dict[str, Any],
                      tokens: Any, *, train: bool, settings: DEQSettings,
                      masks: dict[str, Any] | None = None, probe: Any = None, logits: bool = True
                      ) -> tuple[Any, dict[str, Any], LayerStats]:
    """Next-token logits (B, L, V) of integer ``tokens`` (B, L); returns (logits, new_state,
    stats). With ``logits=False`` the first item is the hidden states (B, L, d_model) the tied
    output layer (``embed.weight``, ``out.bias``) maps to logits instead: a loss that computes
    the softmax chunk by chunk (:func:`output_cross_entropy`) never forms all the logits.
    ``state`` holds the memory (see the module docstring); ``new_state`` the memory after this
    segment (``z*`` and ``u`` of its last ``mem_len`` positions, detached).
    ``masks`` are :func:`transformer_masks` as framework arrays, or None (no dropout).
    ``train`` is accepted for a uniform model signature; dropout is decided by ``masks``.
    ``probe``: ``[noise]`` with ``noise`` of shape (B, L, d_model), for the Jacobian penalty in
    the stats (or None)."""
    del train
    xp = ops.xp
    b, L = tokens.shape
    u = _inject(xp, cfg, params, tokens, masks)
    z_mem = u_mem = valid = None
    if cfg.mem_len:
        z_mem, u_mem, valid = state["mem.z"], state["mem.u"], state["mem.valid"]
        if z_mem.shape[0] != b:
            raise ValueError(f"the memory holds {z_mem.shape[0]} streams but the batch has {b} rows; "
                             "start each stream with empty_memory(cfg, batch_size)")
    f = _layer(ops, cfg, params, masks, L, u.dtype, z_mem, u_mem, valid)
    z0 = xp.zeros((b, L, cfg.d_model), dtype=u.dtype)
    z, stats = run_layer(ops.name, f, u, z0, settings, xp, probe)
    out = _logits(xp, params, z) if logits else z
    stats.correction_outputs = tuple(_logits(xp, params, s) if logits else s for s in stats.correction_states)
    new_state = dict(state)
    if cfg.mem_len:
        stop = ops.stop_gradient
        M = cfg.mem_len
        new_state["mem.z"] = stop(xp.concat([z_mem, z], axis=1)[:, -M:])
        new_state["mem.u"] = stop(xp.concat([u_mem, u], axis=1)[:, -M:])
        new_state["mem.valid"] = stop(xp.minimum(valid + L, xp.full_like(valid, M)))
    return out, new_state, stats


@dataclass(frozen=True)
class TransformerParts:
    """A trained DEQ-Transformer (without memory) split around its equilibrium layer, for
    segments of one length, without dropout: ``inject(tokens)`` gives the injection ``u``
    (B, L, 3 d_model), ``layer(z, u)`` is ``f``, ``head(z)`` the logits (B, L, vocab). The
    classic start is zeros (B, L, d_model). For solving the layer by other means (a hypersolver)
    and timing the solve alone."""

    inject: Any
    layer: Any
    head: Any


def transformer_parts(ops: Any, cfg: TransformerConfig, params: dict[str, Any],
                      length: int) -> TransformerParts:
    """The pieces of a DEQ-Transformer for ``length``-token segments (see :class:`TransformerParts`).
    Models with a segment memory (``mem_len > 0``) are refused: their layer changes with every
    segment's memory."""
    if cfg.mem_len:
        raise ValueError(f"transformer_parts: a model with a segment memory (mem_len={cfg.mem_len}) has a "
                         "different layer for every segment; only mem_len=0 models are supported")
    xp = ops.xp
    dtype = params["embed.weight"].dtype

    def inject(tokens: Any) -> Any:
        if tokens.shape[1] != length:
            raise ValueError(f"these parts are for {length}-token segments, got {tokens.shape[1]}")
        return _inject(xp, cfg, params, tokens, None)

    def head(z: Any) -> Any:
        return _logits(xp, params, z)

    return TransformerParts(inject, _layer(ops, cfg, params, None, length, dtype, None, None, None), head)
