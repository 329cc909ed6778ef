"""MDEQ: shapes, parameter count, dropout, checkpoints, and torch == JAX (forward and gradients)."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import SELECTED
from deqcore_models import data as D
from deqcore_models._equilibrium_layer import DEQSettings
from deqcore_models._ops import ops_for
from deqcore_models.checkpoint import (
    Checkpoint,
    CheckpointError,
    Schema,
    array_specs,
    check_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from deqcore_models.mdeq import MDEQ_CONFIGS, MDEQConfig, _layer, dropout_masks, init_mdeq
from models_helpers import GRAD_MODES, grad_rel_diff, mdeq_run

MICRO = MDEQ_CONFIGS["micro"]


@pytest.fixture(scope="module")
def batch(data_root):
    ds = D.fashion_mnist(data_root, limit=6)
    x = D.to_float_nchw(ds.test_x, [0.286], [0.353])
    return x, np.eye(10, dtype=np.float32)[ds.test_y]


def test_tiny_parameter_count_matches_the_paper_model():
    params, state = init_mdeq(MDEQ_CONFIGS["tiny"], in_channels=3, seed=0)
    count = sum(v.size for v in params.values())
    # SPEC d: TINY (MDEQ-small) ~159K parameters counted (the paper says 170K)
    assert count == 159178
    assert all(v.dtype == np.float32 for v in params.values())
    assert {k.rsplit(".", 1)[1] for k in state} == {"running_mean", "running_var"}
    # weight norm on the DEQ convs: v and g, w = v at init
    assert "deq.block0.conv1.v" in params and "deq.block0.conv1.weight" not in params
    v = params["deq.block0.conv1.v"]
    np.testing.assert_allclose(params["deq.block0.conv1.g"], np.sqrt((v ** 2).sum(axis=(1, 2, 3))), rtol=1e-6)


def test_config_validation():
    with pytest.raises(ValueError, match="width 20 is not divisible by groups=8"):
        MDEQConfig(channels=(20, 24))
    with pytest.raises(ValueError, match="one per branch"):
        MDEQConfig(channels=(24, 24), head_channels=(8,))
    with pytest.raises(ValueError, match="dropout must be in"):
        MDEQConfig(dropout=1.0)


@pytest.mark.parametrize("name", SELECTED)
def test_forward_shapes_and_image_size_check(name, batch):
    x, y = batch
    params, state = init_mdeq(MICRO, 1, seed=0)
    out = mdeq_run(name, MICRO, params, state, x, y, DEQSettings(max_iter=4), grad=False)
    assert out["logits"].shape == (6, 10)
    assert [z.shape for z in out["z"]] == [(6, 8, 28, 28), (6, 8, 14, 14)]
    assert out["nfe"] == 5
    with pytest.raises(ValueError, match=r"image size 27x27 must be divisible by 2\^1"):
        mdeq_run(name, MICRO, params, state, x[:, :, :27, :27], y, DEQSettings(max_iter=2), grad=False)


def test_dropout_masks_are_variational():
    cfg = MDEQ_CONFIGS["tiny"]
    masks = dropout_masks(cfg, 512, np.random.default_rng(0))
    assert [m.shape for m in masks] == [(512, 24, 1, 1), (512, 24, 1, 1)]
    for m in masks:
        np.testing.assert_allclose(np.unique(m), [0.0, 1 / 0.75], rtol=1e-6)
        assert abs(m.mean() - 1.0) < 0.02
    again = dropout_masks(cfg, 512, np.random.default_rng(1))
    assert not np.array_equal(masks[0], again[0])
    assert dropout_masks(MICRO, 4, np.random.default_rng(0)) is None


@pytest.mark.parametrize("name", SELECTED)
def test_one_dropout_mask_per_forward_pass(name):
    """The layer closes over the masks drawn for this forward pass: every solver iteration
    applies the same mask (f is a fixed function), and the mask does change the layer."""
    cfg = MDEQ_CONFIGS["cpu"]
    ops = ops_for(name)
    params, _ = init_mdeq(cfg, 1, seed=0)
    P = {k: ops.asarray(v) for k, v in params.items()}
    rng = np.random.default_rng(0)
    z = tuple(ops.asarray(rng.standard_normal((2, c, 8 // 2 ** i, 8 // 2 ** i)).astype(np.float32))
              for i, c in enumerate(cfg.channels))
    inj = ops.asarray(rng.standard_normal((2, 16, 8, 8)).astype(np.float32))
    masks = [ops.asarray(m) for m in dropout_masks(cfg, 2, np.random.default_rng(1))]
    f = _layer(ops, cfg, P, masks)
    first, second = f(z, inj), f(z, inj)
    for a, b in zip(first, second, strict=True):
        np.testing.assert_array_equal(ops.to_numpy(a), ops.to_numpy(b))
    redrawn = [ops.asarray(m) for m in dropout_masks(cfg, 2, np.random.default_rng(2))]
    other = _layer(ops, cfg, P, redrawn)(z, inj)
    assert not np.allclose(ops.to_numpy(other[0]), ops.to_numpy(first[0]))


def test_checkpoint_round_trip_and_schema_errors(tmp_path):
    params, state = init_mdeq(MICRO, 1, seed=3)
    path = save_checkpoint(tmp_path / "m", Checkpoint({"model": "mdeq", "step": 7}, params, state,
                                                      {"rng": np.arange(3)}))
    assert path.name == "m.npz" and not (tmp_path / "m.npz.tmp").exists()
    ck = load_checkpoint(path)
    assert ck.meta["model"] == "mdeq" and ck.meta["step"] == 7 and ck.meta["format"] == "deqcore-checkpoint"
    for k in params:
        np.testing.assert_array_equal(ck.params[k], params[k])
    def check(model, got):
        check_checkpoint(Checkpoint({}, got), Schema({"params": array_specs(model)}))

    check(params, ck.params)
    model = dict(params, **{"head.classifier.weight": np.zeros((3, 4), np.float32),
                            "head.classifier.bias": np.zeros(10, np.float64)})
    with pytest.raises(CheckpointError, match=r"checkpoint does not match the model: parameters mismatched "
                                              r"2: head.classifier.bias: \(10,\) float32 where the model has "
                                              r"\(10,\) float64, head.classifier.weight: \(10, 16\) float32 "
                                              r"where the model has \(3, 4\) float32$"):
        check(model, ck.params)
    partial = dict(params)
    partial.pop("head.classifier.bias")
    partial["extra.weight"] = np.zeros(2, np.float32)
    with pytest.raises(CheckpointError,
                       match=r"parameters missing 1: head.classifier.bias \| "
                             r"parameters unexpected 1: extra.weight$"):
        check(params, partial)
    (tmp_path / "bad.npz").write_bytes(b"PK\x03\x04garbage")
    with pytest.raises(CheckpointError, match="bad.npz: not a readable .npz file"):
        load_checkpoint(tmp_path / "bad.npz")
    np.savez(tmp_path / "foreign.npz", a=np.zeros(2))
    with pytest.raises(CheckpointError, match="no __meta__ entry"):
        load_checkpoint(tmp_path / "foreign.npz")
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "none.npz")


# ------------------------------------------------------------------------ torch == JAX


@pytest.mark.equivalence
@pytest.mark.parametrize("dtype,tol", [("float32", 1e-4), ("float64", 1e-9)])
def test_forward_equivalence(batch, dtype, tol):
    x, y = batch
    cfg = MDEQ_CONFIGS["cpu"]
    params, state = init_mdeq(cfg, 1, seed=1)
    masks = dropout_masks(cfg, len(x), np.random.default_rng(4))
    settings = DEQSettings(solver="broyden", max_iter=10)
    t, j = (mdeq_run(b, cfg, params, state, x, y, settings, masks, dtype=dtype, grad=False)
            for b in ("torch", "jax"))
    assert t["nfe"] == j["nfe"] == 11
    for a, b in zip(t["z"], j["z"], strict=True):
        np.testing.assert_allclose(a, b, atol=tol * max(1.0, np.abs(a).max()))
    np.testing.assert_allclose(t["logits"], j["logits"], atol=tol)
    for k in t["state"]:  # BatchNorm running statistics after a training-mode pass
        np.testing.assert_allclose(t["state"][k], j["state"][k], atol=tol, rtol=tol)


@pytest.mark.equivalence
@pytest.mark.parametrize("solver,grad,grad_options", GRAD_MODES)
def test_gradient_equivalence(batch, solver, grad, grad_options):
    x, y = batch
    params, state = init_mdeq(MICRO, 1, seed=2)
    settings = DEQSettings(solver=solver, max_iter=8, grad=grad, grad_options=grad_options)
    t, j = (mdeq_run(b, MICRO, params, state, x, y, settings, dtype="float64") for b in ("torch", "jax"))
    assert abs(t["loss"] - j["loss"]) < 1e-9
    assert grad_rel_diff(t["grads"], j["grads"]) < 1e-6
    assert set(t["grads"]) == set(params)


@pytest.mark.backend("jax")
@pytest.mark.parametrize("size,k,stride,pad", [((14, 14), 3, 1, 1), ((14, 14), 3, 2, 1),
                                                ((15, 13), 3, 2, 1), ((7, 7), 1, 1, 0),
                                                ((28, 28), 3, 2, 1)])
def test_jax_conv2d_and_its_custom_gradient_equal_lax(size, k, stride, pad):
    """The NHWC-routed conv (fast inside solver loops) equals lax's NCHW conv, value and VJP."""
    import jax
    import jax.numpy as jnp

    ops = ops_for("jax")
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((2, 5, *size)))
    w = jnp.asarray(rng.standard_normal((4, 5, k, k)))

    def ref(x, w):
        return jax.lax.conv_general_dilated(x, w, (stride, stride), ((pad, pad), (pad, pad)),
                                            dimension_numbers=("NCHW", "OIHW", "NCHW"))

    y_ref, pull_ref = jax.vjp(ref, x, w)
    y, pull = jax.vjp(lambda x, w: ops.conv2d(x, w, stride, pad), x, w)
    g = jnp.asarray(rng.standard_normal(y_ref.shape))
    np.testing.assert_allclose(y, y_ref, rtol=1e-12, atol=1e-12)
    for a, b in zip(pull(g), pull_ref(g), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)
