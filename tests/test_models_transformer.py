"""DEQ-Transformer: attention maths, causality, memory, dropout, training on real text, and torch
== JAX (forward, gradients per mode, one training step)."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import SELECTED
from deqcore_models import data as D
from deqcore_models._equilibrium_layer import DEQSettings
from deqcore_models._layers import token_cross_entropy
from deqcore_models._ops import ops_for
from deqcore_models._training_engines import make_engine
from deqcore_models.families.transformer import transformer_task
from deqcore_models.transformer import (
    TRANSFORMER_CONFIGS,
    TransformerConfig,
    _layer,
    empty_memory,
    init_transformer,
    rel_shift,
    transformer_masks,
)
from models_helpers import GRAD_MODES, grad_rel_diff

MICRO = TRANSFORMER_CONFIGS["micro"]
MICRO_MEM = TransformerConfig(d_model=16, n_head=2, d_head=8, d_inner=32, tgt_len=6, mem_len=4,
                              dropout=0.1, emb_dropout=0.1)
V = 40


_task = transformer_task


def run(backend, cfg, params, state, tokens, targets, settings, masks=None, dtype="float32", grad=True,
        chunk=None):
    """Loss, correct count, logits (``chunk=None``; with a chunked softmax: hidden states), new
    state and parameter gradients as NumPy."""
    ops = ops_for(backend)
    P = {k: ops.asarray(v, dtype) for k, v in params.items()}
    S = {k: ops.asarray(v, dtype) for k, v in state.items()}
    M = None if masks is None else {k: ops.asarray(v, dtype) for k, v in masks.items()}
    X, Y = ops.asarray(tokens), ops.asarray(targets)
    task = _task(cfg, chunk=chunk)
    if backend == "torch":
        import torch

        for v in P.values():
            v.requires_grad_(grad)
        with torch.set_grad_enabled(grad):
            loss, (new_state, correct, nfe, _, _, logits) = task.loss(ops, P, S, X, Y, M, settings, True)
        grads = None
        if grad:
            loss.backward()
            grads = {k: v.grad.numpy().copy() for k, v in P.items()}
        return {"loss": float(loss), "logits": ops.to_numpy(logits), "grads": grads, "nfe": int(nfe),
                "correct": int(correct),
                "state": {k: ops.to_numpy(v) for k, v in new_state.items()}}
    import jax

    def lossf(P):
        loss, (new_state, correct, nfe, _, _, logits) = task.loss(ops, P, S, X, Y, M, settings, True)
        return loss, (logits, new_state, nfe, correct)

    (loss, (logits, new_state, nfe, correct)), g = jax.jit(jax.value_and_grad(lossf, has_aux=True))(P)
    return {"loss": float(loss), "logits": np.asarray(logits), "nfe": int(nfe), "correct": int(correct),
            "grads": {k: np.asarray(v) for k, v in g.items()} if grad else None,
            "state": {k: np.asarray(v) for k, v in new_state.items()}}


@pytest.fixture(scope="module")
def tokens():
    rng = np.random.default_rng(0)
    seq = rng.integers(0, V, (3, 2 * MICRO.tgt_len + 1))
    return seq


def test_parameters_and_config_validation():
    params, state = init_transformer(TRANSFORMER_CONFIGS["small"], vocab=1000, seed=0, batch_size=2)
    # SPEC d's test model: d=64, H=4, d_h=16, d_inner=256, vocabulary 1k
    d, inner = 64, 256
    layer = 3 * d * d + d * d + 2 * 4 * 16 + d * d + 2 * d + (inner * d + inner) + (d * inner + d) + 2 * d
    wnorm_gains = 3 * d + d + d + inner + d
    embedding = 1000 * d + 1000 + (3 * d * d + 3 * d) + 3 * d  # tied output; injection (+ its gain)
    assert sum(v.size for v in params.values()) == layer + wnorm_gains + embedding
    assert state == {}
    mem_state = init_transformer(TRANSFORMER_CONFIGS["small-mem"], 1000, 0, batch_size=2)[1]
    assert {k: v.shape for k, v in mem_state.items()} == {"mem.z": (2, 64, 64), "mem.u": (2, 64, 192),
                                                          "mem.valid": ()}
    with pytest.raises(ValueError, match="n_head \\* d_head must equal d_model"):
        TransformerConfig(d_model=64, n_head=3, d_head=16)
    with pytest.raises(ValueError, match="mem_len must be >= 0"):
        TransformerConfig(mem_len=-1)
    with pytest.raises(ValueError, match="dropout must be in"):
        TransformerConfig(dropout=1.0)


@pytest.mark.parametrize("name", SELECTED)
def test_rel_shift_aligns_relative_distances(name):
    """After the shift, column j of query row i holds the score for distance i + M - j, i.e.
    column K-1-(i+M-j) of the unshifted (distance-ordered) scores, for every visible key."""
    ops = ops_for(name)
    L, K = 5, 9
    M = K - L
    x = np.random.default_rng(1).standard_normal((2, 3, L, K))
    y = ops.to_numpy(rel_shift(ops.xp, ops.asarray(x)))
    for i in range(L):
        for j in range(i + M + 1):
            np.testing.assert_array_equal(y[..., i, j], x[..., i, K - 1 - (i + M - j)])


def _attention_reference(cfg, params, z, u):
    """The layer's attention written directly in NumPy float64 with explicit relative distances
    (no shift trick), followed by the rest of the layer; no memory, no dropout."""
    d, H, dh = cfg.d_model, cfg.n_head, cfg.d_head

    def w(name):
        if f"{name}.v" in params:
            v = params[f"{name}.v"].astype(np.float64)
            return params[f"{name}.g"][:, None] * v / np.linalg.norm(v, axis=1, keepdims=True)
        return params[f"{name}.weight"].astype(np.float64)

    def ln(x, name):
        m, s = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
        return (x - m) / np.sqrt(s + 1e-5) * params[f"{name}.weight"] + params[f"{name}.bias"]

    B, L, _ = z.shape
    qkv = z @ w("deq.qkv").T + u
    q, k, v = (qkv[..., i * d:(i + 1) * d].reshape(B, L, H, dh) for i in range(3))
    inv = 1.0 / (10000 ** (np.arange(0, d, 2) / d))
    out = np.zeros((B, L, H, dh))
    for i in range(L):
        for h in range(H):
            scores = []
            for j in range(i + 1):
                dist = i - j
                pe = np.concatenate([np.sin(dist * inv), np.cos(dist * inv)])
                r = (pe @ w("deq.r_net").T).reshape(H, dh)[h]
                scores.append((q[:, i, h] + params["deq.r_w_bias"][h]) @ k[:, j, h].T
                              + (q[:, i, h] + params["deq.r_r_bias"][h]) @ r)
            s = np.stack([np.diag(sc) if np.ndim(sc) == 2 else sc for sc in scores], axis=-1) / np.sqrt(dh)
            p = np.exp(s - s.max(-1, keepdims=True))
            p /= p.sum(-1, keepdims=True)
            out[:, i, h] = np.einsum("bj,bjd->bd", p, v[:, : i + 1, h])
    z1 = ln(z + out.reshape(B, L, d) @ w("deq.o_net").T, "deq.ln1")
    ff = np.maximum(z1 @ w("deq.ff1").T + params["deq.ff1.bias"], 0) @ w("deq.ff2").T + params["deq.ff2.bias"]
    return ln(z1 + ff, "deq.ln2")


@pytest.mark.parametrize("name", SELECTED)
def test_layer_equals_a_direct_float64_reference(name):
    ops = ops_for(name)
    params, _ = init_transformer(MICRO, V, seed=3)
    rng = np.random.default_rng(2)
    z = rng.standard_normal((2, MICRO.tgt_len, MICRO.d_model))
    u = rng.standard_normal((2, MICRO.tgt_len, 3 * MICRO.d_model))
    P = {k: ops.asarray(v, "float64") for k, v in params.items()}
    f = _layer(ops, MICRO, P, None, MICRO.tgt_len, P["deq.qkv.v"].dtype, None, None, None)
    got = ops.to_numpy(f(ops.asarray(z), ops.asarray(u)))
    want = _attention_reference(MICRO, {k: v.astype(np.float64) for k, v in params.items()}, z, u)
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name", SELECTED)
def test_predictions_are_causal(name, tokens):
    """Changing token t changes no logit before position t. Fixed-point iteration keeps every
    iterate causal (f is); Anderson and Broyden mix all positions of a sample, so before
    convergence they leak later tokens into earlier positions (docs/models.md)."""
    params, state = init_transformer(MICRO, V, seed=0)
    settings = DEQSettings(solver="fixed_point", tol=1e-12, max_iter=30, grad=None)
    x = tokens[:, : MICRO.tgt_len]
    x2 = x.copy()
    x2[:, 5] = (x2[:, 5] + 1) % V
    a, b = (run(name, MICRO, params, state, t, t, settings, dtype="float64", grad=False)["logits"]
            for t in (x, x2))
    np.testing.assert_allclose(a[:, :5], b[:, :5], rtol=0, atol=1e-12)
    assert np.abs(a[:, 5:] - b[:, 5:]).max() > 1e-5


@pytest.mark.parametrize("name", SELECTED)
def test_memory_carries_context_and_starts_empty(name, tokens):
    """With memory, the second segment's predictions depend on the first segment; an empty memory
    (valid = 0) is the same as no memory at all."""
    cfg = TransformerConfig(**{**MICRO_MEM.__dict__, "dropout": 0.0, "emb_dropout": 0.0})
    nomem = TransformerConfig(**{**cfg.__dict__, "mem_len": 0})
    params, state = init_transformer(cfg, V, seed=0, batch_size=3)
    settings = DEQSettings(solver="fixed_point", tol=1e-12, max_iter=30, grad=None)
    L = cfg.tgt_len
    seg1, seg2 = tokens[:, :L], tokens[:, L:2 * L]
    first = run(name, cfg, params, state, seg1, seg1, settings, dtype="float64", grad=False)
    plain = run(name, nomem, params, {}, seg1, seg1, settings, dtype="float64", grad=False)
    np.testing.assert_allclose(first["logits"], plain["logits"], atol=1e-12)
    assert float(first["state"]["mem.valid"]) == cfg.mem_len
    second = run(name, cfg, params, first["state"], seg2, seg2, settings, dtype="float64", grad=False)
    alone = run(name, cfg, params, state, seg2, seg2, settings, dtype="float64", grad=False)
    assert np.abs(second["logits"] - alone["logits"]).max() > 1e-5
    other = seg1.copy()
    other[:, -1] = (other[:, -1] + 1) % V
    after_other = run(name, cfg, params, state, other, other, settings, dtype="float64", grad=False)["state"]
    changed = run(name, cfg, params, after_other, seg2, seg2, settings, dtype="float64", grad=False)
    assert np.abs(changed["logits"] - second["logits"]).max() > 1e-6
    with pytest.raises(ValueError, match="the memory holds 3 streams but the batch has 2 rows"):
        run(name, cfg, params, state, seg1[:2], seg1[:2], settings, grad=False)


@pytest.mark.parametrize("name", SELECTED)
def test_one_dropout_mask_per_forward_pass(name):
    cfg = TRANSFORMER_CONFIGS["small"]
    ops = ops_for(name)
    params, _ = init_transformer(cfg, V, seed=0)
    P = {k: ops.asarray(v) for k, v in params.items()}
    masks = transformer_masks(cfg, 2, 8, np.random.default_rng(0))
    assert {k: v.shape for k, v in masks.items()} == {"emb": (2, 8, 64), "attn": (2, 1, 64),
                                                      "ff_hidden": (2, 1, 256), "ff_out": (2, 1, 64)}
    np.testing.assert_allclose(np.unique(masks["ff_hidden"]), [0.0, 1 / 0.95], rtol=1e-6)
    rng = np.random.default_rng(1)
    z = ops.asarray(rng.standard_normal((2, 8, 64)).astype(np.float32))
    u = ops.asarray(rng.standard_normal((2, 8, 192)).astype(np.float32))
    M = {k: ops.asarray(v) for k, v in masks.items()}
    f = _layer(ops, cfg, P, M, 8, z.dtype, None, None, None)
    np.testing.assert_array_equal(ops.to_numpy(f(z, u)), ops.to_numpy(f(z, u)))
    M2 = {k: ops.asarray(v) for k, v in transformer_masks(cfg, 2, 8, np.random.default_rng(2)).items()}
    other = _layer(ops, cfg, P, M2, 8, z.dtype, None, None, None)(z, u)
    assert not np.allclose(ops.to_numpy(other), ops.to_numpy(f(z, u)))
    assert transformer_masks(MICRO, 2, 8, np.random.default_rng(0)) is None


@pytest.mark.parametrize("name", SELECTED)
def test_token_cross_entropy_matches_numpy(name):
    ops = ops_for(name)
    rng = np.random.default_rng(5)
    logits = rng.standard_normal((2, 3, 7)) * 3
    targets = rng.integers(0, 7, (2, 3))
    total, correct = token_cross_entropy(ops.xp, ops.asarray(logits), ops.asarray(targets))
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    want = -np.take_along_axis(logp, targets[..., None], -1).sum()
    assert abs(float(total) - want) < 1e-12
    assert int(correct) == int((logits.argmax(-1) == targets).sum())


@pytest.mark.parametrize("name", SELECTED)
def test_chunked_softmax_matches_the_full_output_layer(tokens, name):
    """The chunked output layer (4 uneven chunks of 5, 5, 5 and 3 positions) gives the loss,
    correct count and every parameter gradient of the full softmax, in float64."""
    cfg = MICRO_MEM
    params, state = init_transformer(cfg, V, seed=7, batch_size=3)
    masks = transformer_masks(cfg, 3, cfg.tgt_len, np.random.default_rng(8))
    settings = DEQSettings(solver="anderson", max_iter=8, grad="implicit", grad_options={"max_iter": 8})
    L = cfg.tgt_len
    full, chunked = (run(name, cfg, params, state, tokens[:, :L], tokens[:, 1:L + 1], settings, masks,
                         "float64", chunk=c) for c in (None, 5))
    assert chunked["logits"].shape == (3, L, cfg.d_model)
    assert abs(full["loss"] - chunked["loss"]) < 1e-12
    assert full["correct"] == chunked["correct"]
    assert grad_rel_diff(full["grads"], chunked["grads"]) < 1e-10
    assert np.abs(full["grads"]["out.bias"]).max() > 1e-3


@pytest.mark.parametrize("name", SELECTED)
def test_chunked_softmax_rejects_a_bad_chunk(name):
    from deqcore_models._layers import output_cross_entropy

    ops = ops_for(name)
    h, w, b = (ops.asarray(np.ones(s)) for s in ((2, 3), (5, 3), (5,)))
    with pytest.raises(ValueError, match="chunk must be positive"):
        output_cross_entropy(ops, h, w, b, ops.asarray(np.zeros(2, np.int64)), 0)


@pytest.mark.parametrize("backend", SELECTED)
@pytest.mark.parametrize("grad,grad_options", [("implicit", {"max_iter": 10}), ("jfb", {}),
                                               ("npg", {"k": 5, "lam": 0.5})])
def test_training_on_wikitext2_reduces_the_loss(backend, grad, grad_options, data_root):
    corpus = D.wikitext2(data_root, limit=4000)
    rows = D.batchify(corpus.train, 4)
    cfg = TransformerConfig(d_model=32, n_head=4, d_head=8, d_inner=64, tgt_len=16, mem_len=16,
                            dropout=0.0, emb_dropout=0.0)
    params, state = init_transformer(cfg, corpus.vocab_size, seed=0, batch_size=4)
    engine = make_engine(backend, _task(cfg), params, state, weight_decay=0.0)
    settings = DEQSettings(solver="anderson", max_iter=8, grad=grad, grad_options=grad_options)
    x, y = rows[:, :16], rows[:, 1:17]
    losses = []
    for _ in range(8):
        engine.set_state(empty_memory(cfg, 4))
        losses.append(engine.train_step(x, y, None, settings, 3e-3)["loss"])
    assert all(np.isfinite(losses))
    assert losses[-1] < 0.9 * losses[0], losses


# ------------------------------------------------------------------------ torch == JAX


@pytest.mark.equivalence
@pytest.mark.parametrize("solver,dtype,tol", [("fixed_point", "float32", 1e-4), ("anderson", "float64", 1e-9),
                                              ("broyden", "float64", 1e-9)])
def test_forward_equivalence_with_memory_and_dropout(tokens, solver, dtype, tol):
    """Two segments (the second attends to the first's memory). Anderson and Broyden are checked
    in float64: on the untrained post-LN layer (z -> LN(z + ...) is close to the identity, not a
    contraction) ten float32 Anderson or Broyden steps amplify rounding differences to 2-4e-4."""
    cfg = MICRO_MEM
    params, state = init_transformer(cfg, V, seed=1, batch_size=3)
    masks = transformer_masks(cfg, 3, cfg.tgt_len, np.random.default_rng(4))
    settings = DEQSettings(solver=solver, max_iter=10, grad=None)
    L = cfg.tgt_len
    outs = {}
    for b in ("torch", "jax"):
        first = run(b, cfg, params, state, tokens[:, :L], tokens[:, 1:L + 1], settings, masks, dtype,
                    grad=False)
        outs[b] = run(b, cfg, params, first["state"], tokens[:, L:2 * L], tokens[:, L + 1:2 * L + 1],
                      settings, masks, dtype, grad=False)
    t, j = outs["torch"], outs["jax"]
    assert t["nfe"] == j["nfe"] == 11
    np.testing.assert_allclose(t["logits"], j["logits"], atol=tol)
    for k in t["state"]:
        np.testing.assert_allclose(t["state"][k], j["state"][k], atol=tol)


@pytest.mark.equivalence
@pytest.mark.parametrize("solver,grad,grad_options", GRAD_MODES)
def test_gradient_equivalence(tokens, solver, grad, grad_options):
    cfg = MICRO_MEM
    params, state = init_transformer(cfg, V, seed=2, batch_size=3)
    masks = transformer_masks(cfg, 3, cfg.tgt_len, np.random.default_rng(5))
    settings = DEQSettings(solver=solver, max_iter=8, grad=grad, grad_options=grad_options)
    L = cfg.tgt_len
    t, j = (run(b, cfg, params, state, tokens[:, :L], tokens[:, 1:L + 1], settings, masks, "float64",
                chunk=5) for b in ("torch", "jax"))
    assert abs(t["loss"] - j["loss"]) < 1e-9
    assert grad_rel_diff(t["grads"], j["grads"]) < 1e-6
    assert set(t["grads"]) == set(params)


@pytest.mark.equivalence
def test_one_training_step_gives_the_same_weights(tokens):
    """From the same weights and memory (a first segment's), one Adam step on the second segment
    gives the same moments and weights on both backends (float32; fixed-point forward, see the
    forward test for why, implicit backward)."""
    cfg = MICRO_MEM
    params, state = init_transformer(cfg, V, seed=3, batch_size=3)
    masks = transformer_masks(cfg, 3, cfg.tgt_len, np.random.default_rng(6))
    settings = DEQSettings(solver="fixed_point", max_iter=10, grad="implicit", grad_options={"max_iter": 10})
    L = cfg.tgt_len
    out = {}
    for b in ("torch", "jax"):
        engine = make_engine(b, _task(cfg, chunk=5), params, state, weight_decay=1e-4)
        first = engine.evaluate(tokens[:, :L], tokens[:, 1:L + 1], settings)
        engine.set_state({k: np.asarray(engine.ops.to_numpy(v)) for k, v in first["state"].items()})
        r = engine.train_step(tokens[:, L:2 * L], tokens[:, L + 1:2 * L + 1], masks, settings, 1e-3)
        out[b] = (r, *engine.export())
    (rt, pt, st, et), (rj, pj, sj, ej) = out["torch"], out["jax"]
    assert rt["nfe"] == rj["nfe"] and abs(rt["loss"] - rj["loss"]) < 1e-5
    m_t = {k: et[f"opt.m/{k}"] for k in params}
    assert grad_rel_diff(m_t, {k: ej[f"opt.m/{k}"] for k in params}) < 1e-3
    # Adam's first step is lr * g / (|g| + eps): where the gradient is at rounding level (words
    # absent from the batch: weight decay and softmax tails only) it is lr * sign(noise). Every
    # weight whose gradient is clearly above that level moves the same to a tenth of lr.
    top = max(np.abs(m).max() for m in m_t.values())
    for k in params:
        clear = np.abs(et[f"opt.m/{k}"]) > 1e-4 * top
        assert clear.any() or k == "out.bias", k
        np.testing.assert_allclose(pt[k][clear], pj[k][clear], atol=1e-4, rtol=0, err_msg=k)
    for k in st:
        np.testing.assert_allclose(st[k], sj[k], atol=1e-5, err_msg=k)
