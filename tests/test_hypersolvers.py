"""HyperAnderson (HyperDEQ's learned solver): the weight projection, the first step, the Anderson
oracle, training against a frozen layer, save/load, gradients and cross-backend agreement."""

from __future__ import annotations

import numpy as np
import pytest

import deqcore
from deqcore.hypersolvers import (
    AndersonMixer,
    DenseInitialiser,
    HyperAnderson,
    IdentityCompression,
    load_hypersolver,
    project_weights,
    train_hypersolver,
)

D, DX = 32, 8


def _layer(seed: int = 0):
    """A tanh DEQ whose Jacobian is close to a symmetric W with eigenvalues in [0, 0.98]: slow
    for fixed-point iteration, a few dozen steps for Anderson."""
    rng = np.random.default_rng(seed)
    Q, _ = np.linalg.qr(rng.standard_normal((D, D)))
    W = (Q * np.linspace(0.0, 0.98, D)) @ Q.T
    U = 0.2 * rng.standard_normal((D, DX))
    b = 0.1 * rng.standard_normal(D)
    return W, U, b


def _hyper(seed: int = 0, **kw) -> HyperAnderson:
    return HyperAnderson(IdentityCompression(D), DenseInitialiser(DX, D), seed=seed, **kw)


def _perturbed(hs: HyperAnderson, scale: float = 0.05) -> HyperAnderson:
    rng = np.random.default_rng(7)
    return hs.with_params({k: v + scale * rng.standard_normal(v.shape) for k, v in hs.params.items()})


def _batches(h, batch: int, seed: int = 1):
    rng = np.random.default_rng(seed)
    while True:
        yield h.asarray(rng.standard_normal((batch, DX)))


def test_projection_sums_to_one_and_is_idempotent(h):
    xp = h.xp
    rng = np.random.default_rng(0)
    W = 6
    for count in range(1, W + 1):
        valid = h.asarray(np.arange(W) >= W - count, dtype=bool)
        raw = rng.standard_normal((5, W))
        a = h.numpy(project_weights(xp, h.asarray(raw), valid))
        np.testing.assert_allclose(a.sum(axis=1), 1.0, atol=1e-14)
        assert np.all(a[:, : W - count] == 0.0)
        again = h.numpy(project_weights(xp, h.asarray(a), valid))
        np.testing.assert_allclose(again, a, atol=1e-15)
        # the Euclidean projection onto sum(a) = 1 moves every valid weight by the same amount
        moved = a[:, W - count:] - raw[:, W - count:]
        np.testing.assert_allclose(moved, moved[:, :1] * np.ones((1, count)), atol=1e-14)
        soft = h.numpy(project_weights(xp, h.asarray(raw), valid, "softmax"))
        np.testing.assert_allclose(soft.sum(axis=1), 1.0, atol=1e-14)
        assert np.all(soft[:, W - count:] > 0) and np.all(soft[:, : W - count] == 0)
    one = h.numpy(project_weights(xp, h.asarray(rng.standard_normal((3, W))),
                                  h.asarray(np.arange(W) == W - 1, dtype=bool)))
    np.testing.assert_allclose(one, np.tile(np.eye(W)[-1], (3, 1)), atol=1e-15)
    with pytest.raises(ValueError, match="unknown weight normalisation 'nope'"):
        project_weights(xp, h.asarray(raw), valid, "nope")


def test_first_step_is_z0_plus_beta_g0(h):
    W, U, b = _layer()
    f = h.tanh_layer(W, U, b)
    hs = _perturbed(_hyper())
    x = h.asarray(np.random.default_rng(2).standard_normal((4, DX)))
    be = h.backend
    z0 = hs.initial_state(be, x, x)
    structure = deqcore._structure.Structure.of(be, z0, True)
    solver = hs.bind(be, structure, z0, max_iter=3)
    problem = deqcore.extend.Problem(be, lambda z: f(z, x), 4, D, z0.dtype)
    fz0 = f(z0, x)
    state = solver.init(problem, z0, fz0)
    z1, _, state, nfe = solver.step(problem, state, h.xp.ones((4,), dtype=h.xp.bool))
    beta = h.numpy(state.beta)
    assert nfe == 1 and np.all((beta > 0) & (beta < 1))
    np.testing.assert_allclose(h.numpy(state.alpha), np.tile(np.eye(hs.memory + 1)[-1], (4, 1)), atol=1e-15)
    expect = h.numpy(z0) + beta[:, None] * (h.numpy(fz0) - h.numpy(z0))
    np.testing.assert_allclose(h.numpy(z1), expect, rtol=1e-14, atol=1e-15)


@pytest.mark.parametrize("memory", [1, 4])
def test_anderson_oracle_reproduces_anderson(h, memory):
    """With the least-squares mixer and beta = 1, HyperAnderson with window m + 1 is Anderson with
    memory m + 1, iterate by iterate (under jit on JAX)."""
    W, U, b = _layer(1)
    f = h.tanh_layer(W, U, b)
    x = h.asarray(np.random.default_rng(3).standard_normal((6, DX)))
    z0 = h.asarray(np.zeros((6, D)))
    oracle = HyperAnderson(IdentityCompression(D), None, AndersonMixer(lam=1e-4), memory=memory)
    hyper = h.solve(f, x, z0, jit=True, solver=oracle, max_iter=14, tol=1e-30)
    classic = h.solve(f, x, z0, jit=True, solver="anderson", memory=memory + 1, lam=1e-4, max_iter=14,
                      tol=1e-30)
    np.testing.assert_allclose(h.numpy(hyper.abs_trace), h.numpy(classic.abs_trace), rtol=1e-9, atol=1e-14)
    np.testing.assert_allclose(h.numpy(hyper.solver_state.z), h.numpy(classic.solver_state.z),
                               rtol=1e-10, atol=1e-13)
    assert int(h.numpy(hyper.nfe)) == int(h.numpy(classic.nfe)) == 15
    assert float(h.numpy(hyper.abs_trace)[-1].max()) < 1e-3 * float(h.numpy(hyper.abs_trace)[0].min())


def test_training_beats_anderson_at_equal_nfe_and_keeps_the_layer_frozen(h):
    """Acceptance check 14: after a short training (K = 5, 600 steps of batch 32) the held-out
    error ||z_K - z*|| / ||z*|| at equal NFE (6) is below Anderson's (m=5, lam=1e-4) from z0 = 0
    and from the trained initialiser; the layer's parameters get no gradient and no update."""
    W, U, b = _layer()
    f = h.tanh_layer(W, U, b)
    frozen = None
    if h.name == "torch":
        import torch

        Wt = torch.tensor(W, requires_grad=True)
        Ut, bt = torch.tensor(U.T), torch.tensor(b, requires_grad=True)

        def f(z, x):  # noqa: F811 - the same layer, with parameters that require grad
            return torch.tanh(z @ Wt.T + x @ Ut + bt)

        frozen = (Wt, bt)
    K = 5
    hs = _hyper(iterations=K)
    log: list[dict] = []
    trained, history = train_hypersolver(hs, f, _batches(h, 32), steps=600, progress=log.append,
                                         log_every=200)
    assert [r["step"] for r in log] == [200, 400, 600] and len(history) == 600
    assert all(r["target_unconverged"] == 0 for r in history)
    first, last = np.mean([r["conv"] for r in history[:20]]), np.mean([r["conv"] for r in history[-20:]])
    assert last < 0.7 * first
    if frozen is not None:
        np.testing.assert_array_equal(frozen[0].detach().numpy(), W)
        np.testing.assert_array_equal(frozen[1].detach().numpy(), b)
        assert frozen[0].grad is None and frozen[1].grad is None

    xt = h.asarray(np.random.default_rng(11).standard_normal((256, DX)))
    zeros = h.asarray(np.zeros((256, D)))
    z_star = h.numpy(h.solve(f, xt, zeros, solver="broyden", tol=1e-12, max_iter=200).z)

    def error(sol):
        z = h.numpy(sol.solver_state.z)  # the last iterate, z_K
        return float(np.mean(np.linalg.norm(z - z_star, axis=1) / np.linalg.norm(z_star, axis=1)))

    init = trained.initial_state(h.backend, xt, xt)
    hyper = deqcore.solve(f, xt, solver=trained, max_iter=K, tol=1e-30, grad=None)
    from_zero = deqcore.solve(f, xt, zeros, solver="anderson", max_iter=K, tol=1e-30, grad=None)
    from_init = deqcore.solve(f, xt, init, solver="anderson", max_iter=K, tol=1e-30, grad=None)
    assert int(h.numpy(hyper.nfe)) == int(h.numpy(from_zero.nfe)) == int(h.numpy(from_init.nfe)) == K + 1
    e_hyper, e_zero, e_init = error(hyper), error(from_zero), error(from_init)
    assert e_hyper < 0.85 * e_init < e_zero, (e_hyper, e_init, e_zero)
    # past its budget it keeps converging (the default loss unrolls 2K): ten times smaller at 2K,
    # and at 4K below Anderson from zeros
    longer = {k: error(deqcore.solve(f, xt, solver=trained, max_iter=k, tol=1e-30, grad=None))
              for k in (2 * K, 4 * K)}
    assert longer[2 * K] < 0.1 * e_hyper, (e_hyper, longer)
    e_zero_4k = error(deqcore.solve(f, xt, zeros, solver="anderson", max_iter=4 * K, tol=1e-30, grad=None))
    assert longer[4 * K] < e_zero_4k, (longer, e_zero_4k)


def test_save_load_and_validation(h, tmp_path):
    hs = _perturbed(_hyper(update="sum", normalisation="softmax"))
    path = hs.save(tmp_path / "hs", meta={"note": "test"})
    assert path.name == "hs.npz"
    loaded = load_hypersolver(path, IdentityCompression(D), DenseInitialiser(DX, D))
    assert loaded.config() == hs.config()
    assert all(np.array_equal(loaded.params[k], hs.params[k]) for k in hs.params)
    W, U, b = _layer()
    f = h.tanh_layer(W, U, b)
    x = h.asarray(np.random.default_rng(4).standard_normal((3, DX)))
    a = deqcore.solve(f, x, solver=hs, max_iter=7, tol=1e-30)
    c = deqcore.solve(f, x, solver=loaded, max_iter=7, tol=1e-30)
    np.testing.assert_array_equal(h.numpy(a.z), h.numpy(c.z))
    assert a.solver == "hyperanderson" and "hyperanderson" in deqcore.available()["hypersolvers"]

    with pytest.raises(ValueError, match="trained with compression"):
        load_hypersolver(path, IdentityCompression(D + 1), DenseInitialiser(DX, D))
    with pytest.raises(ValueError, match="trained with initialiser"):
        load_hypersolver(path, IdentityCompression(D), None)
    bad = dict(hs.params)
    bad["mixer.w1"] = bad["mixer.w1"][:, :-1]
    with pytest.raises(ValueError, match="'mixer.w1' has shape"):
        hs.with_params(bad)
    bad = dict(hs.params, **{"mixer.b1": np.full_like(hs.params["mixer.b1"], np.nan)})
    with pytest.raises(ValueError, match="contains NaN"):
        hs.with_params(bad)
    with pytest.raises(TypeError, match=r"solver options memory were given beside a solver instance "
                                        r"\(.hyperanderson.\)"):
        deqcore.solve(f, x, solver=hs, memory=3)
    with pytest.raises(TypeError, match="unknown option 'lambda1'"):
        train_hypersolver(hs, f, _batches(h, 4), steps=1, lambda1=0.1)
    with pytest.raises(ValueError, match="batches ran out after 2 of 3 steps"):
        train_hypersolver(hs, f, [x, x], steps=3)
    with pytest.raises(ValueError, match=r"^HyperAnderson: option 'memory' must be an int >= 1, got 0$"):
        _hyper(memory=0)
    with pytest.raises(ValueError, match="prior must be one of"):
        _hyper(prior="uniform")
    with pytest.raises(ValueError, match="IdentityCompression: the state has 31"):
        deqcore.solve(lambda z, x_: z * 0.5, x, h.asarray(np.zeros((3, D - 1))), solver=hs)


def test_gradient_modes_with_a_hypersolver(h):
    """The backward is independent of the forward solver: the implicit gradient through a
    hypersolver's solution equals the one through Anderson's; GDEQ asks for Broyden."""
    W, U, b = _layer(2)
    x = h.asarray(np.random.default_rng(5).standard_normal((4, DX)))
    hs = _hyper()

    def grad_W(**solve_kw):
        if h.name == "torch":
            import torch

            Wt = torch.tensor(W, requires_grad=True)
            Ut, bt = torch.tensor(U.T), torch.tensor(b)
            sol = deqcore.solve(lambda z, x_: torch.tanh(z @ Wt.T + x_ @ Ut + bt), x, tol=1e-11,
                                max_iter=300, grad="implicit", grad_options={"tol": 1e-12}, **solve_kw)
            (sol.z ** 2).sum().backward()
            return Wt.grad.numpy()
        import jax
        import jax.numpy as jnp

        def loss(Wj):
            sol = deqcore.solve(lambda z, x_: jnp.tanh(z @ Wj.T + x_ @ U.T + b), x, tol=1e-11, max_iter=300,
                                grad="implicit", grad_options={"tol": 1e-12}, **solve_kw)
            return jnp.sum(sol.z ** 2)

        return np.asarray(jax.grad(loss)(jnp.asarray(W)))

    zeros = h.asarray(np.zeros((4, D)))
    np.testing.assert_allclose(grad_W(solver=hs), grad_W(z0=zeros, solver="anderson"), rtol=1e-7, atol=1e-9)
    with pytest.raises(ValueError, match="broyden"):
        deqcore.solve(h.tanh_layer(W, U, b), x, solver=hs, grad="gdeq")


def test_same_weights_same_iterates_and_training_on_both_backends(both):
    """Cross-backend equivalence: the same weights give the same iterates (both mixers' priors,
    both update forms), and three training steps the same weights."""
    t, j = both
    W, U, b = _layer(3)
    X = np.random.default_rng(6).standard_normal((8, DX))
    for kw in ({}, {"prior": "anderson"}, {"update": "sum", "normalisation": "none"}):
        hs = _perturbed(_hyper(**kw))
        a = t.solve(t.tanh_layer(W, U, b), t.asarray(X), solver=hs, max_iter=9, tol=1e-30)
        c = j.solve(j.tanh_layer(W, U, b), j.asarray(X), jit=True, solver=hs, max_iter=9, tol=1e-30)
        np.testing.assert_allclose(t.numpy(a.abs_trace), j.numpy(c.abs_trace), rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(t.numpy(a.z), j.numpy(c.z), rtol=1e-12, atol=1e-14)
    hs = _hyper(iterations=4)
    trained = [train_hypersolver(hs, k.tanh_layer(W, U, b), _batches(k, 8), steps=3, conv_loss=loss)[0]
               for k in (t, j) for loss in ("norm", "log")]
    # mixer.b2[0], the bias of alpha_hat, has no gradient: the shift projection removes constants; Adam
    # turns its rounding-level gradient g into steps of lr * g / eps = 1e5 g, so after three steps
    # it holds noise of ~1e-10 that differs between the backends. Each must leave it within that
    # noise (3 steps * 1e5 * 1e-14) of its start; an entry with a gradient moves by ~lr = 1e-3.
    noise = 3 * 1e-3 / 1e-8 * 1e-14
    for k in hs.params:
        for torch_run, jax_run in ((trained[0], trained[2]), (trained[1], trained[3])):
            a, c = torch_run.params[k], jax_run.params[k]
            if k == "mixer.b2":
                for p in (a, c):
                    np.testing.assert_allclose(p[0], hs.params[k][0], rtol=0, atol=noise)
                a, c = a[1:], c[1:]
            np.testing.assert_allclose(a, c, rtol=1e-9, atol=1e-10)
        assert not np.array_equal(trained[0].params[k], hs.params[k])
