"""The MDEQ hypersolver pieces: compression, initialiser, and a hypersolver trained on a frozen
(micro) MDEQ layer, on each backend and across backends."""

from __future__ import annotations

import numpy as np
from deqcore_models._hyper import MDEQCompression, MDEQInitialiser
from deqcore_models._ops import ops_for
from deqcore_models.mdeq import MDEQ_CONFIGS, equilibrium_shapes, init_mdeq, mdeq_parts

import deqcore
from deqcore.hypersolvers import HyperAnderson, train_hypersolver

MICRO = MDEQ_CONFIGS["micro"]


def _model(h, dtype="float64"):
    params, state = init_mdeq(MICRO, in_channels=1, seed=0)
    ops = ops_for(h.name)
    P = {k: h.asarray(v, dtype) for k, v in params.items()}
    S = {k: h.asarray(v, dtype) for k, v in state.items()}
    return params, P, mdeq_parts(ops, MICRO, P, S)


def _images(h, n, seed):
    return h.asarray(np.random.default_rng(seed).standard_normal((n, 1, 28, 28)))


def _hyper(seed=0):
    return HyperAnderson(MDEQCompression(MICRO.channels), MDEQInitialiser(MICRO.channels[0], MICRO.channels),
                         iterations=4, width=16, seed=seed)


def test_pieces_shapes_and_meaning(h):
    _, _, parts = _model(h)
    inj = parts.inject(_images(h, 3, 0))
    hs = _hyper()
    rng = np.random.default_rng(1)
    hs = hs.with_params({k: rng.standard_normal(v.shape) for k, v in hs.params.items()})
    z0 = hs.initial_state(h.backend, inj, inj)
    shapes = [tuple(s) for s in equilibrium_shapes(MICRO, (3, 1, 28, 28))]
    assert [tuple(a.shape) for a in z0] == shapes
    # branch 1 is branch 0's hidden map pooled by 2 before the 1x1 map: check one pixel by hand
    P = {k[5:]: h.numpy(v) for k, v in hs.arrays(h.backend, inj).items() if k.startswith("init.")}
    x = h.numpy(inj)
    pad = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    conv = np.zeros((3, P["conv.weight"].shape[0], x.shape[2], x.shape[3]))
    for i in range(x.shape[2]):
        for j in range(x.shape[3]):
            conv[:, :, i, j] = np.einsum("bcuv,ocuv->bo", pad[:, :, i:i + 3, j:j + 3], P["conv.weight"])
    hidden = np.maximum(conv + P["conv.bias"][None, :, None, None], 0)
    pooled = hidden.reshape(3, hidden.shape[1], x.shape[2] // 2, 2, x.shape[3] // 2, 2).mean(axis=(3, 5))
    expect = np.einsum("bphw,cp->bchw", pooled, P["out1.weight"]) + P["out1.bias"][None, :, None, None]
    np.testing.assert_allclose(h.numpy(z0[1]), expect, rtol=1e-10, atol=1e-12)
    g = tuple(h.asarray(np.random.default_rng(2).standard_normal(s)) for s in shapes)
    np.testing.assert_allclose(h.numpy(MDEQCompression(MICRO.channels)(h.backend, g)),
                               h.numpy(g[-1]).mean(axis=(2, 3)), rtol=1e-13)


def test_training_runs_on_a_frozen_mdeq_layer(h):
    params, P, parts = _model(h)

    def batches():
        seed = 10
        while True:
            seed += 1
            yield parts.inject(_images(h, 4, seed))

    hs = _hyper()
    # a randomly initialised MDEQ layer has no fixed point to speak of (its targets stay at rel
    # residual ~0.4), so this checks the mechanics on the real model; the quality of a hypersolver
    # for a trained MDEQ is measured by the experiment in docs/hypersolvers.md
    trained, history = train_hypersolver(hs, parts.layer, batches(), steps=6, target_max_iter=20)
    assert len(history) == 6 and all(np.isfinite(r["loss"]) for r in history)
    assert all(not np.array_equal(trained.params[k], hs.params[k]) for k in hs.params if k != "mixer.b2")
    for k, v in params.items():  # the model is frozen
        np.testing.assert_array_equal(h.numpy(P[k]), v.astype(np.float64))
    inj = parts.inject(_images(h, 4, 99))
    sol = deqcore.solve(parts.layer, inj, solver=trained, max_iter=4, tol=1e-30)
    assert isinstance(sol.z, tuple) and int(h.numpy(sol.nfe)) == 5
    assert h.numpy(parts.head(sol.z)).shape == (4, 10)


def test_pieces_agree_across_backends(both):
    t, j = both
    hs = _hyper()
    rng = np.random.default_rng(3)
    hs = hs.with_params({k: 0.3 * rng.standard_normal(v.shape) for k, v in hs.params.items()})
    out = []
    for k in (t, j):
        _, _, parts = _model(k)
        inj = parts.inject(_images(k, 2, 5))
        sol = deqcore.solve(parts.layer, inj, solver=hs, max_iter=5, tol=1e-30)
        out.append((k.numpy(sol.abs_trace), [k.numpy(a) for a in sol.z]))
    np.testing.assert_allclose(out[0][0], out[1][0], rtol=1e-9)
    for a, b in zip(out[0][1], out[1][1], strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-11)
