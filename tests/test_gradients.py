"""Gradient modes: exact math against dense float64 references, mode identities, memory.

The layer is f(z, x) = tanh(z W^T + x U^T + b) and the loss sum(c * z*). With
s = 1 - tanh(.)^2 at z*, the Jacobian of sample b is J_b = diag(s_b) W; an adjoint u gives
dL/dW = sum_b (u_b * s_b) z_b^T and dL/dx = (u * s) U (one VJP of f at z*).
"""

from __future__ import annotations

import dataclasses
import warnings

import numpy as np
import pytest
from problems import tanh_deq, tanh_fixed_point

import deqcore

MODES = [
    ("implicit", {"tol": 1e-12, "max_iter": 200}, "anderson"),
    ("implicit", {"solver": "broyden", "tol": 1e-12, "max_iter": 200}, "anderson"),
    ("implicit", {"solver": "fixed_point", "tol": 1e-12, "max_iter": 400}, "fixed_point"),
    ("jfb", {}, "anderson"),
    ("npg", {"k": 5, "lam": 0.5}, "anderson"),
    ("upg", {"k": 5, "lam": 0.5}, "anderson"),
    ("gdeq", {}, "broyden"),
    ("unroll", {}, "anderson"),
    ("unroll", {}, "broyden"),
    ("unroll", {}, "fixed_point"),
]


def grads(h, weights, grad, grad_options=None, solver="anderson", c=None, jit=True, **kw):
    """(dL/dW, dL/dx, solution) with L = sum(c * z*), through deqcore.solve on backend ``h``."""
    W, U, b, x = weights
    c = np.random.default_rng(99).standard_normal(x.shape) if c is None else c
    kw = {"tol": 1e-11, "max_iter": 100, **kw}
    if h.name == "torch":
        import torch

        Wt = torch.tensor(W, requires_grad=True)
        xt = torch.tensor(x, requires_grad=True)
        Ut, bt = torch.tensor(U), torch.tensor(b)
        sol = deqcore.solve(lambda z, x: torch.tanh(z @ Wt.T + x @ Ut.T + bt), xt, solver=solver,
                            grad=grad, grad_options=grad_options, **kw)
        gW, gx = torch.autograd.grad((sol.z * torch.tensor(c)).sum(), (Wt, xt))
        return gW.numpy(), gx.numpy(), sol
    import jax
    import jax.numpy as jnp

    box = {}

    def loss(W_, x_):
        sol = deqcore.solve(lambda z, x: jnp.tanh(z @ W_.T + x @ U.T + b), x_, solver=solver,
                            grad=grad, grad_options=grad_options, **kw)
        box["sol"] = sol
        return jnp.sum(sol.z * c), sol.solver_state

    fn = jax.grad(loss, argnums=(0, 1), has_aux=True)
    (gW, gx), state = (jax.jit(fn) if jit else fn)(jnp.asarray(W), jnp.asarray(x))
    # the report is filled at run time; the solver state comes back concrete as aux
    return np.asarray(gW), np.asarray(gx), dataclasses.replace(box["sol"], solver_state=state)


def dense_grads(weights, u_of):
    """Reference gradients from the adjoint ``u_of(g_b, J_b, b)`` of each sample, in float64."""
    W, U, b, x = weights
    c = np.random.default_rng(99).standard_normal(x.shape)
    z = tanh_fixed_point(W, U, b, x, iters=1000)
    s = 1.0 - np.tanh(z @ W.T + x @ U.T + b) ** 2
    u = np.stack([u_of(c[i], s[i][:, None] * W, i) for i in range(x.shape[0])])
    return (u * s).T @ z, (u * s) @ U


def exact(weights):
    d = weights[0].shape[0]
    return dense_grads(weights, lambda g, J, i: np.linalg.solve((np.eye(d) - J).T, g))


def rel(a, b):
    return np.linalg.norm(a - b) / np.linalg.norm(b)


def cosine(a, b):
    return float(np.sum(a * b) / (np.linalg.norm(a) * np.linalg.norm(b)))


def central_differences(weights, eps=1e-6):
    W, U, b, x = weights
    c = np.random.default_rng(99).standard_normal(x.shape)

    def loss(W_, x_):
        return float(np.sum(c * tanh_fixed_point(W_, U, b, x_, iters=1000)))

    gW, gx = np.zeros_like(W), np.zeros_like(x)
    for grad, arr, is_w in ((gW, W, True), (gx, x, False)):
        for idx in np.ndindex(arr.shape):
            E = np.zeros_like(arr)
            E[idx] = eps
            hi = loss(W + E, x) if is_w else loss(W, x + E)
            lo = loss(W - E, x) if is_w else loss(W, x - E)
            grad[idx] = (hi - lo) / (2 * eps)
    return gW, gx


@pytest.fixture(scope="module")
def d16():
    weights = tanh_deq(seed=11, d=16, batch=3, rho=0.9, sym=True)
    return weights, exact(weights), central_differences(weights)


@pytest.mark.parametrize("backward_solver", ["anderson", "broyden", "fixed_point"])
def test_implicit_matches_dense_solve_and_finite_differences(h, d16, backward_solver):
    weights, (gW_ref, gx_ref), (gW_fd, gx_fd) = d16
    opts = {"solver": backward_solver, "tol": 1e-12, "max_iter": 400}
    gW, gx, sol = grads(h, weights, "implicit", opts)
    assert rel(gW, gW_ref) <= 1e-6 and rel(gx, gx_ref) <= 1e-6
    assert rel(gW, gW_fd) <= 1e-6 and rel(gx, gx_fd) <= 1e-6
    report = sol.backward
    assert report.mode == "implicit" and report.calls == 1 and report.converged.all()
    assert report.residual.max() <= 1e-12 and report.vjps >= 2


def test_implicit_default_options_are_accurate(h, d16):
    weights, (gW_ref, _), _ = d16
    gW, _, sol = grads(h, weights, "implicit")
    assert rel(gW, gW_ref) <= 1e-5
    assert sol.grad == "implicit" and sol.backward.converged.all()


def test_phantom_and_jfb_identities(h, d16):
    weights = d16[0]
    jfb = grads(h, weights, "jfb")[:2]
    for mode in ("npg", "upg"):
        one = grads(h, weights, mode, {"k": 1, "lam": 1.0})[:2]
        for a, b in zip(one, jfb, strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-13, atol=1e-15)
    lam = 0.3
    npg1 = grads(h, weights, "npg", {"k": 1, "lam": lam})[:2]
    for a, b in zip(npg1, jfb, strict=True):
        np.testing.assert_allclose(a, lam * b, rtol=1e-13, atol=1e-15)
    implicit = grads(h, weights, "implicit", {"tol": 1e-12})[0]
    npg50 = grads(h, weights, "npg", {"k": 50, "lam": 0.5})[0]
    assert cosine(npg50, implicit) >= 0.9999
    assert cosine(jfb[0], implicit) < 0.9999  # the identity above is not vacuous


def test_jfb_is_one_vjp_at_the_fixed_point(h, d16):
    weights = d16[0]
    gW, gx, _ = grads(h, weights, "jfb")
    ref = dense_grads(weights, lambda g, J, i: g)
    np.testing.assert_allclose(gW, ref[0], atol=1e-10)
    np.testing.assert_allclose(gx, ref[1], atol=1e-10)


def test_upg_equals_npg_for_affine_f(h):
    rng = np.random.default_rng(5)
    d, batch = 8, 3
    A = 0.6 * np.linalg.qr(rng.standard_normal((d, d)))[0]
    x, c = rng.standard_normal((batch, d)), rng.standard_normal((batch, d))
    out = {}
    for mode in ("upg", "npg"):
        if h.name == "torch":
            import torch

            At, xt = torch.tensor(A, requires_grad=True), torch.tensor(x, requires_grad=True)
            sol = deqcore.solve(lambda z, x, At=At: z @ At.T + x, xt, tol=1e-12, max_iter=200, grad=mode,
                                grad_options={"k": 4, "lam": 0.7})
            gA, gx = torch.autograd.grad((sol.z * torch.tensor(c)).sum(), (At, xt))
            out[mode] = (gA.numpy(), gx.numpy())
        else:
            import jax
            import jax.numpy as jnp

            def loss(A_, x_, mode=mode):
                sol = deqcore.solve(lambda z, x: z @ A_.T + x, x_, tol=1e-12, max_iter=200, grad=mode,
                                    grad_options={"k": 4, "lam": 0.7})
                return jnp.sum(sol.z * c)

            out[mode] = tuple(np.asarray(a) for a in jax.grad(loss, (0, 1))(jnp.asarray(A), jnp.asarray(x)))
    for a, b in zip(out["upg"], out["npg"], strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)


def _dense_inverse(U, V):
    d = U.shape[-1]
    return -np.eye(d) + np.einsum("bmi,bmj->bij", U, V)


def test_gdeq_is_the_transposed_broyden_estimate(h):
    weights = tanh_deq(seed=12, d=16, batch=3, rho=0.9, sym=True)
    # a loose tol: Broyden stops with an informative (U, V); 8 pairs kept in the ring
    gW, gx, sol = grads(h, weights, "gdeq", solver="broyden", tol=1e-6, memory=8, jit=False)
    state = sol.solver_state
    Bs = _dense_inverse(h.numpy(state.U), h.numpy(state.V))
    ref = dense_grads(weights, lambda g, J, i: -Bs[i].T @ g)
    wrong = dense_grads(weights, lambda g, J, i: -Bs[i] @ g)  # B g instead of B^T g
    # z* differs from the float64 reference by the forward tolerance: compare at that level
    assert rel(gW, ref[0]) <= 1e-4 and rel(gx, ref[1]) <= 1e-4
    assert rel(gW, wrong[0]) > 1e-2
    jfb = grads(h, weights, "jfb", solver="broyden", tol=1e-6, memory=8, jit=False)[0]
    assert rel(gW, jfb) > 1e-2


def test_gdeq_with_memory_zero_is_jfb(h, d16):
    weights = d16[0]
    gdeq = grads(h, weights, "gdeq", solver="broyden", memory=0, tol=1e-10, max_iter=200)[:2]
    jfb = grads(h, weights, "jfb", solver="broyden", memory=0, tol=1e-10, max_iter=200)[:2]
    for a, b in zip(gdeq, jfb, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-13, atol=1e-15)


def _stacked_weight_grads(h, problems, grad, grad_options=None, **kw):
    """dL/dW of each of several tanh DEQs, with L = sum(c * z*), solved as one batch.

    Every sample carries its own problem's weights (``W[owner]``), and deqcore's solvers and
    backward modes treat samples independently, so this is one solve (on JAX: one compilation)
    of what would otherwise be a solve per problem."""
    W, U, b = (np.stack([p[i] for p in problems]) for i in range(3))
    x = np.concatenate([p[3] for p in problems])
    owner = np.repeat(np.arange(len(problems)), problems[0][3].shape[0])
    c = np.tile(np.random.default_rng(99).standard_normal(problems[0][3].shape), (len(problems), 1))
    if h.name == "torch":
        import torch

        Wt = torch.tensor(W, requires_grad=True)
        own = torch.from_numpy(owner)
        Ut, bt = torch.tensor(U)[own], torch.tensor(b)[own]
        f = lambda z, x: torch.tanh(torch.einsum("nij,nj->ni", Wt[own], z)  # noqa: E731
                                    + torch.einsum("nij,nj->ni", Ut, x) + bt)
        sol = deqcore.solve(f, torch.tensor(x), grad=grad, grad_options=grad_options, **kw)
        (gW,) = torch.autograd.grad((sol.z * torch.tensor(c)).sum(), (Wt,))
        return gW.numpy()
    import jax
    import jax.numpy as jnp

    def loss(W_):
        Wn, Un, bn = W_[owner], jnp.asarray(U)[owner], jnp.asarray(b)[owner]
        f = lambda z, x: jnp.tanh(jnp.einsum("nij,nj->ni", Wn, z)  # noqa: E731
                                  + jnp.einsum("nij,nj->ni", Un, x) + bn)
        sol = deqcore.solve(f, jnp.asarray(x), grad=grad, grad_options=grad_options, **kw)
        return jnp.sum(sol.z * c)

    return np.asarray(jax.jit(jax.grad(loss))(jnp.asarray(W)))


def test_stacked_problems_give_each_problem_its_own_gradient(h):
    """The stacking used below is exact: problem 1 of a stack of 3 gets the gradient it gets
    alone (same solver steps, samples independent). Six Broyden steps: later secant updates of
    a nearly converged solve are differences of nearly equal iterates, so XLA's batch-size-
    dependent float64 rounding grows about 100x per two steps in GDEQ's (U, V) (2e-7 after 12
    steps on JAX; torch stays exact); the quality test below averages cosines, which that does
    not move."""
    problems = [tanh_deq(seed=200 + s, d=8, batch=2, rho=0.8) for s in range(3)]
    kw = {"solver": "broyden", "tol": 1e-300, "max_iter": 6}
    stacked = _stacked_weight_grads(h, problems, "gdeq", **kw)
    alone = _stacked_weight_grads(h, problems[1:2], "gdeq", **kw)[0]
    np.testing.assert_allclose(stacked[1], alone, rtol=0, atol=1e-11)
    assert np.abs(stacked[0] - alone).max() > 1e-3


def test_gdeq_gradient_quality_over_random_deqs(h):
    """Seed paper's claim at small scale: over 20 random DEQs GDEQ is close to implicit, at least
    as close as JFB (per-problem cosines of dL/dW, averaged)."""
    problems = [tanh_deq(seed=100 + s, d=64, batch=2, rho=0.8) for s in range(20)]
    kw = {"solver": "broyden", "tol": 1e-300, "max_iter": 30}  # exactly 30 Broyden steps
    implicit = _stacked_weight_grads(h, problems, "implicit", {"tol": 1e-10}, **kw)
    gdeq = _stacked_weight_grads(h, problems, "gdeq", **kw)
    jfb = _stacked_weight_grads(h, problems, "jfb", **kw)
    cos_gdeq = [cosine(g, i) for g, i in zip(gdeq, implicit, strict=True)]
    cos_jfb = [cosine(g, i) for g, i in zip(jfb, implicit, strict=True)]
    assert np.mean(cos_gdeq) >= 0.94
    assert np.mean(cos_gdeq) >= np.mean(cos_jfb) - 0.01


@pytest.mark.parametrize(("mode", "opts", "solver"), MODES)
def test_every_mode_approximates_the_exact_gradient(h, d16, mode, opts, solver):
    weights, (gW_ref, gx_ref), _ = d16
    gW, gx, sol = grads(h, weights, mode, opts, solver=solver, max_iter=200)
    assert sol.grad == mode
    # approximate modes only have to point the right way here; exact ones must be exact
    floor = {"jfb": 0.8, "npg": 0.8, "upg": 0.8, "gdeq": 0.8}.get(mode, 1 - 1e-9)
    assert cosine(gW, gW_ref) >= floor and cosine(gx, gx_ref) >= floor


@pytest.mark.equivalence
@pytest.mark.parametrize(("mode", "opts", "solver"), MODES)
def test_torch_and_jax_give_the_same_gradients(both, mode, opts, solver):
    weights = tanh_deq(seed=13, d=12, batch=3, rho=0.8)
    (gW_t, gx_t, _), (gW_j, gx_j, _) = (grads(h, weights, mode, opts, solver=solver, tol=1e-8)
                                        for h in both)
    np.testing.assert_allclose(gW_t, gW_j, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(gx_t, gx_j, rtol=1e-6, atol=1e-9)


@pytest.mark.backend("torch")
def test_torch_module_parameters_and_backward(d16):
    import torch

    W, U, b, x = d16[0]
    layer = torch.nn.Linear(16, 16).double()
    with torch.no_grad():
        layer.weight.copy_(torch.tensor(W))
        layer.bias.copy_(torch.tensor(b))
    Ut = torch.tensor(U)
    xt = torch.tensor(x)
    sol = deqcore.solve(lambda z, x: torch.tanh(layer(z) + x @ Ut.T), xt, tol=1e-11,
                        grad_options={"tol": 1e-12})
    c = np.random.default_rng(99).standard_normal(x.shape)
    (sol.z * torch.tensor(c)).sum().backward()
    gW_ref, _ = d16[1]
    assert rel(layer.weight.grad.numpy(), gW_ref) <= 1e-6
    assert layer.bias.grad is not None
    with torch.no_grad():  # inference: nothing attached, no extra evaluation of f
        calls = []
        deqcore.solve(lambda z, x: calls.append(1) or torch.tanh(layer(z) + x), xt)
        sol_ng = deqcore.solve(lambda z, x: torch.tanh(layer(z) + x), xt)
    assert not sol_ng.z.requires_grad and len(calls) == int(sol_ng.nfe)


@pytest.mark.backend("jax")
def test_jax_gradients_under_vmap(d16):
    import jax
    import jax.numpy as jnp

    W, U, b, x = d16[0]
    c = np.random.default_rng(99).standard_normal(x.shape)

    def per_sample(W_, xi, ci):
        sol = deqcore.solve(lambda z, x: jnp.tanh(z @ W_.T + x @ U.T + b), xi, batched=False, tol=1e-11,
                            grad_options={"tol": 1e-12})
        return jnp.sum(sol.z * ci)

    gW = jax.jit(jax.vmap(jax.grad(per_sample), in_axes=(None, 0, 0)))(jnp.asarray(W), jnp.asarray(x), c)
    assert rel(np.asarray(gW).sum(axis=0), d16[1][0]) <= 1e-6


def test_gradient_options_are_validated(h):
    W, U, b, x = tanh_deq(seed=14, d=4, batch=2)
    f, xa = h.tanh_layer(W, U, b), h.asarray(x)
    with pytest.raises(TypeError, match="unknown option 'kk'.*Valid options: k, lam"):
        deqcore.solve(f, xa, grad="npg", grad_options={"kk": 3})
    with pytest.raises(ValueError, match="option 'lam' must be a float in"):
        deqcore.solve(f, xa, grad="upg", grad_options={"lam": 1.5})
    with pytest.raises(ValueError, match="needs solver='broyden'"):
        deqcore.solve(f, xa, grad="gdeq")
    with pytest.raises(TypeError, match="implicit backward solver 'broyden'.*'beta'"):
        deqcore.solve(f, xa, grad_options={"solver": "broyden", "solver_options": {"beta": 0.5}})
    with pytest.raises(ValueError, match="unknown gradient .no_such_mode.; available gradients: gdeq"):
        deqcore.solve(f, xa, grad="no_such_mode")
    with pytest.raises(TypeError, match="grad=None"):
        deqcore.solve(f, xa, grad=None, grad_options={"k": 1})
    assert {"implicit", "jfb", "npg", "upg", "gdeq", "unroll"} <= set(deqcore.available()["gradients"])


def test_implicit_backward_that_does_not_converge_is_flagged(h, d16):
    weights = d16[0]
    with pytest.warns(deqcore.BackwardWarning, match="did not reach rel tol 1e-14 in 2 steps"):
        _, _, sol = grads(h, weights, "implicit", {"tol": 1e-14, "max_iter": 2}, jit=False)
    assert not sol.backward.converged.any() and sol.backward.iterations.max() == 2
    with pytest.raises(Exception, match="did not reach rel tol 1e-14"):  # noqa: PT011 (jax wraps it)
        grads(h, weights, "implicit", {"tol": 1e-14, "max_iter": 2, "on_fail": "raise"}, jit=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        grads(h, weights, "implicit", {"tol": 1e-14, "max_iter": 2, "on_fail": "ignore"}, jit=False)


def test_no_gradient_mode_gives_a_constant(h):
    W, U, b, x = tanh_deq(seed=15, d=4, batch=2)
    if h.name == "torch":
        import torch

        Wt = torch.tensor(W, requires_grad=True)
        sol = deqcore.solve(lambda z, x: torch.tanh(z @ Wt.T + x), h.asarray(x), grad=None)
        assert not sol.z.requires_grad and sol.backward is None
    else:
        import jax
        import jax.numpy as jnp

        def loss(W_):
            return jnp.sum(deqcore.solve(lambda z, x: jnp.tanh(z @ W_.T + x), jnp.asarray(x), grad=None).z)

        assert not np.asarray(jax.grad(loss)(jnp.asarray(W))).any()
