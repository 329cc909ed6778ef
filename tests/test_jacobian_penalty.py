"""Jacobian regularisation: ``deqcore.jacobian_penalty`` exactly (float64, finite differences,
the Hutchinson identity) on each backend, torch == JAX on MDEQ and the DEQ-Transformer, and that
training with it shrinks the Jacobian."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import SELECTED
from deqcore_models import data as D
from deqcore_models._equilibrium_layer import DEQSettings
from deqcore_models._training_engines import make_engine
from deqcore_models.families import jacobian_probe
from deqcore_models.families.mdeq import mdeq_task
from deqcore_models.families.transformer import transformer_task
from deqcore_models.mdeq import MDEQ_CONFIGS, dropout_masks, equilibrium_shapes, init_mdeq
from deqcore_models.train import TrainConfig
from deqcore_models.transformer import TRANSFORMER_CONFIGS, init_transformer, transformer_masks
from models_helpers import grad_rel_diff, task_run

import deqcore

RNG = np.random.default_rng(7)
W0 = RNG.standard_normal((5, 5)) * 0.4
X0, Z0, V0 = (RNG.standard_normal((3, 5)) for _ in range(3))


def _penalty_numpy(W, Z=Z0, X=X0, V=V0):
    """f(z) = tanh(z W^T + x): per sample J = diag(1 - tanh^2) W, so v^T J = (v * d) W."""
    d = 1 - np.tanh(Z @ W.T + X) ** 2
    return float((((V * d) @ W) ** 2).sum() / V.size)


def _penalty_and_grad(h, W, Z=Z0, X=X0, V=V0):
    """The penalty of the tanh layer and its gradient with respect to W, on harness ``h``."""
    if h.name == "torch":
        import torch

        Wt = torch.tensor(W, requires_grad=True)
        p = deqcore.jacobian_penalty(lambda z, x: torch.tanh(z @ Wt.T + x), h.asarray(Z), h.asarray(X),
                                     h.asarray(V), backend="torch")
        p.backward()
        return float(p.detach()), Wt.grad.numpy()
    import jax
    import jax.numpy as jnp

    def pen(W):
        return deqcore.jacobian_penalty(lambda z, x: jnp.tanh(z @ W.T + x), h.asarray(Z), h.asarray(X),
                                        h.asarray(V), backend="jax")

    p, g = jax.jit(jax.value_and_grad(pen))(jnp.asarray(W))
    return float(p), np.asarray(g)


def test_penalty_value_and_its_gradient_are_exact(h):
    p, g = _penalty_and_grad(h, W0)
    assert p == pytest.approx(_penalty_numpy(W0), rel=1e-13)
    fd = np.zeros_like(W0)
    for idx in np.ndindex(*W0.shape):
        e = np.zeros_like(W0)
        e[idx] = 1e-6
        fd[idx] = (_penalty_numpy(W0 + e) - _penalty_numpy(W0 - e)) / 2e-6
    np.testing.assert_allclose(g, fd, atol=1e-8)


def test_basis_probes_sum_to_the_frobenius_norm(h):
    """sum over the unit vectors e_k of numel * penalty(e_k) is exactly ||J||_F^2 (summed over
    the batch): the identity the Hutchinson estimate is unbiased for."""
    total = 0.0
    for k in range(Z0.size):
        e = np.zeros(Z0.size)
        e[k] = 1.0
        total += Z0.size * _penalty_and_grad(h, W0, V=e.reshape(Z0.shape))[0]
    d = 1 - np.tanh(Z0 @ W0.T + X0) ** 2
    frob = sum(float(np.sum((d[b][:, None] * W0) ** 2)) for b in range(len(Z0)))
    assert total == pytest.approx(frob, rel=1e-12)


def test_tuple_state_and_no_gradient_into_z(h):
    """A two-array state (as in MDEQ) flattens like deqcore.solve's; z is a constant."""
    A, B = RNG.standard_normal((4, 4)) * 0.3, RNG.standard_normal((2, 4)) * 0.3
    za, zb = RNG.standard_normal((3, 4)), RNG.standard_normal((3, 2))
    va, vb = RNG.standard_normal((3, 4)), RNG.standard_normal((3, 2))
    x = RNG.standard_normal((3, 4))
    # f(za, zb) = (za A^T + x, za B^T): d f/d za = [A; B], d f/d zb = 0, so v^T J = (va A + vb B, 0)
    expected = float(((va @ A + vb @ B) ** 2).sum() / (va.size + vb.size))
    Ab, Bb = h.asarray(A), h.asarray(B)
    za_b = h.asarray(za)
    if h.name == "torch":
        za_b.requires_grad_(True)
        Ab.requires_grad_(True)
    got = deqcore.jacobian_penalty(lambda z, x: (z[0] @ Ab.T + x, z[0] @ Bb.T), (za_b, h.asarray(zb)),
                                   h.asarray(x), (h.asarray(va), h.asarray(vb)), backend=h.name)
    assert float(h.numpy(got)) == pytest.approx(expected, rel=1e-13)
    if h.name == "torch":
        got.backward()
        assert za_b.grad is None and Ab.grad is not None


def test_noise_must_match_the_state(h):
    f = h.affine_layer(np.eye(5) * 0.5, np.zeros(5))
    with pytest.raises(ValueError, match=r"noise has shapes \(\(3, 4\),\).*draw the noise like z"):
        deqcore.jacobian_penalty(f, h.asarray(Z0), h.asarray(X0), h.asarray(np.ones((3, 4))), backend=h.name)
    with pytest.raises(ValueError, match="noise has shapes"):
        deqcore.jacobian_penalty(f, h.asarray(Z0), h.asarray(X0), h.asarray(V0, "float32"), backend=h.name)


# ------------------------------------------------------------------ models: torch == JAX


@pytest.fixture(scope="module")
def images(data_root):
    ds = D.fashion_mnist(data_root, limit=6)
    return D.to_float_nchw(ds.test_x, [0.286], [0.353]), np.eye(10, dtype=np.float32)[ds.test_y]


def _probe(shapes, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(s) for s in shapes]


@pytest.mark.equivalence
@pytest.mark.parametrize("settings", [
    DEQSettings(solver="broyden", max_iter=8, grad="implicit", grad_options={"max_iter": 8}, jac_weight=0.7),
    DEQSettings(solver="broyden", max_iter=8, grad="gdeq", jac_weight=0.7),
    DEQSettings(unrolled=3, jac_weight=0.7),
], ids=["implicit", "gdeq", "unrolled"])
def test_mdeq_regularised_gradients_agree_across_backends(images, settings):
    x, y = images
    cfg = MDEQ_CONFIGS["micro"]
    params, state = init_mdeq(cfg, 1, seed=3)
    masks = dropout_masks(cfg, len(x), np.random.default_rng(1))
    probe = _probe(equilibrium_shapes(cfg, x.shape))
    task = mdeq_task(cfg)
    t, j = (task_run(b, task, params, state, x, y, settings, masks, probe) for b in ("torch", "jax"))
    plain = task_run("torch", task, params, state, x, y, settings, masks, None)
    assert np.isnan(plain["jac"]) and t["jac"] > 0
    assert t["loss"] == pytest.approx(plain["loss"] + 0.7 * t["jac"], rel=1e-12)
    assert abs(t["jac"] - j["jac"]) < 1e-9 * t["jac"] and abs(t["loss"] - j["loss"]) < 1e-9
    assert grad_rel_diff(t["grads"], j["grads"]) < 1e-6
    # the penalty moves the gradient (of the layer and stem weights; the head does not reach it)
    moved = max(grad_rel_diff({k: t["grads"][k]}, {k: plain["grads"][k]}) for k in params)
    assert moved > 1e-2


@pytest.mark.equivalence
def test_transformer_regularised_gradients_agree_across_backends():
    cfg = TRANSFORMER_CONFIGS["micro-mem"]
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 30, (2, cfg.tgt_len + 1))
    params, state = init_transformer(cfg, 30, seed=1, batch_size=2)
    masks = transformer_masks(cfg, 2, cfg.tgt_len, np.random.default_rng(2))
    probe = _probe([(2, cfg.tgt_len, cfg.d_model)])
    settings = DEQSettings(solver="anderson", max_iter=6, grad="implicit", grad_options={"max_iter": 6},
                           jac_weight=1.5)
    task = transformer_task(cfg)
    x, y = tokens[:, :-1], tokens[:, 1:]
    t, j = (task_run(b, task, params, state, x, y, settings, masks, probe) for b in ("torch", "jax"))
    assert t["jac"] > 0 and abs(t["jac"] - j["jac"]) < 1e-9 * t["jac"]
    assert grad_rel_diff(t["grads"], j["grads"]) < 1e-6


# ------------------------------------------------------------------ training with the penalty


@pytest.mark.parametrize("backend", SELECTED)
def test_training_with_the_penalty_shrinks_the_jacobian(backend, data_root):
    """Steps on the penalty (weight large, so it dominates) cut the Hutchinson estimate on a fixed
    held-out probe, and make the layer contract: 20 fixed-point steps then get much closer to z*."""
    ds = D.fashion_mnist(data_root, limit=32)
    x = D.to_float_nchw(ds.train_x, [0.286], [0.353])
    y = np.eye(10, dtype=np.float32)[ds.train_y]
    cfg = MDEQ_CONFIGS["micro"]
    params, state = init_mdeq(cfg, 1, seed=0)
    train = DEQSettings(solver="broyden", max_iter=20, grad="jfb", jac_weight=20.0)
    measure = DEQSettings(solver="fixed_point", max_iter=20, tol=1e-6, grad="jfb", jac_weight=20.0)
    probe = _probe(equilibrium_shapes(cfg, x.shape), seed=1)
    before = task_run(backend, mdeq_task(cfg), params, state, x, y, measure, None, probe, "float32",
                      grad=False)
    engine = make_engine(backend, mdeq_task(cfg), params, state, weight_decay=0.0)
    for step in range(12):
        noise = _probe(equilibrium_shapes(cfg, x.shape), seed=100 + step)
        engine.train_step(x, y, None, train, 1e-2, [n.astype(np.float32) for n in noise])
    trained, _, _ = engine.export()
    after = task_run(backend, mdeq_task(cfg), trained, state, x, y, measure, None, probe, "float32",
                     grad=False)
    assert after["jac"] < 0.1 * before["jac"], (before["jac"], after["jac"])
    assert after["residual"] < 0.1 * before["residual"], (before["residual"], after["residual"])


def test_probe_schedule_is_seeded_and_follows_the_frequency():
    cfg = TrainConfig(jac_weight=0.4, jac_freq=0.25, seed=3)
    drawn = [jacobian_probe(cfg, s, [(2, 3)]) for s in range(400)]
    hits = [s for s, p in enumerate(drawn) if p is not None]
    assert 70 < len(hits) < 130  # Binomial(400, 0.25): mean 100, sd 8.7
    again = jacobian_probe(cfg, hits[0], [(2, 3)])
    np.testing.assert_array_equal(again[0], drawn[hits[0]][0])
    assert drawn[hits[0]][0].dtype == np.float32 and drawn[hits[0]][0].shape == (2, 3)
    assert all(jacobian_probe(TrainConfig(), s, [(2, 3)]) is None for s in range(20))
    for bad in ({"jac_weight": -1.0}, {"jac_freq": 0.0}, {"jac_freq": 1.5}):
        with pytest.raises(ValueError, match="jac_"):
            TrainConfig(**bad)
