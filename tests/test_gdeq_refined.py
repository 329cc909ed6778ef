"""The ``gdeq_refined`` gradient mode and the seeded Broyden solver it runs backward.

``gdeq_refined`` solves implicit's adjoint equation from GDEQ's estimate, by a Broyden solve seeded
with the forward's inverse-Jacobian ring: its gradient must be implicit's (float64, tight
tolerance, both backends, torch == JAX), and where the forward's estimate is good it must need
fewer backward VJPs than implicit (counted).
"""

from __future__ import annotations

import numpy as np
import pytest
from problems import tanh_deq, tanh_layer, two_scale_deq, two_scale_layer
from test_gradients import grads, rel

import deqcore
from deqcore.solvers import SeededBroyden
from deqcore.solvers._base import Problem

TIGHT = {"tol": 1e-12, "max_iter": 200}
VARIANTS = [{}, {"start": "g"}, {"seed_inverse": True, "solver": "broyden"}]


@pytest.mark.parametrize("options", VARIANTS)
def test_gradient_is_implicits(h, options):
    weights = tanh_deq(seed=31, d=16, batch=3, rho=0.9, sym=True)
    kw = {"solver": "broyden", "tol": 1e-11, "max_iter": 100}
    ref = grads(h, weights, "implicit", TIGHT, **kw)
    out = grads(h, weights, "gdeq_refined", {**TIGHT, **options}, **kw)
    assert out[2].grad == "gdeq_refined" and out[2].backward.converged.all()
    for a, b in zip(out[:2], ref[:2], strict=True):
        assert rel(a, b) <= 1e-10


@pytest.mark.equivalence
def test_torch_and_jax_agree(both):
    weights = tanh_deq(seed=32, d=12, batch=3, rho=0.8)
    (gW_t, gx_t, _), (gW_j, gx_j, _) = (grads(h, weights, "gdeq_refined", TIGHT, solver="broyden",
                                              tol=1e-10) for h in both)
    np.testing.assert_allclose(gW_t, gW_j, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(gx_t, gx_j, rtol=1e-9, atol=1e-12)


def _affine_backward_vjps(h, grad, grad_options):
    """Backward VJPs on a linear layer ``z A^T + x`` after a forward Broyden run to 1e-13: on a
    linear problem Broyden's ring then holds the inverse Jacobian on the directions it explored."""
    rng = np.random.default_rng(33)
    d = 10
    A = 0.8 * rng.standard_normal((d, d)) / np.sqrt(d)
    x, c = rng.standard_normal((2, d)), rng.standard_normal((2, d))
    W, U, b = A, np.eye(d), np.zeros(d)
    out = grads(h, (W, U, b, x), grad, {"tol": 1e-10, "max_iter": 100, **grad_options},
                solver="broyden", c=c, tol=1e-13, max_iter=60, jit=False)
    return out, out[2].backward.vjps


def test_fewer_backward_vjps_than_implicit_where_broyden_is_good(h):
    (ref, implicit) = _affine_backward_vjps(h, "implicit", {"solver": "broyden"})
    seeded = {"seed_inverse": True, "solver": "broyden"}
    (out, refined) = _affine_backward_vjps(h, "gdeq_refined", seeded)
    _, from_g = _affine_backward_vjps(h, "gdeq_refined", {**seeded, "start": "g"})
    # torch: 9 and 11 VJPs against implicit's 16 with the same (Broyden) backward solver
    assert refined <= 0.6 * implicit and from_g < implicit, (refined, from_g, implicit)
    assert rel(out[0], ref[0]) <= 1e-8


def test_seeded_broyden_applies_the_seeded_inverse(h):
    """``B_0 = -I + sum_i U_i V_i^T``: the first direction is ``-B_0 g(z_0)``; seeded with the exact
    ``(J - I)^-1`` of a linear map, one step lands on the fixed point."""
    rng = np.random.default_rng(34)
    batch, d, k = 2, 6, 3
    U, V = rng.standard_normal((2, batch, k, d))
    A = 0.5 * rng.standard_normal((batch, d, d)) / np.sqrt(d)
    x = rng.standard_normal((batch, d))
    fn = lambda z: h.xp.einsum("bij,bj->bi", h.asarray(A), z) + h.asarray(x)  # noqa: E731
    problem = Problem(h.backend, fn, batch, d, h.asarray(x).dtype)
    z0 = h.asarray(rng.standard_normal((batch, d)))
    solver = SeededBroyden(h.asarray(U), h.asarray(V), max_iter=5)
    state = solver.init(problem, z0, fn(z0))
    B0 = -np.eye(d) + np.einsum("bki,bkj->bij", U, V)
    g0 = h.numpy(fn(z0) - z0)
    np.testing.assert_allclose(h.numpy(state.Bg), np.einsum("bij,bj->bi", B0, g0), rtol=1e-12, atol=1e-12)
    assert state.count == k and solver.m == k + 5 and state.UV.shape[2] == k + 5

    inverse = np.linalg.inv(A - np.eye(d))  # (J - I)^-1 = -I + (inverse + I) I
    exact_u, exact_v = inverse + np.eye(d), np.broadcast_to(np.eye(d), (batch, d, d))
    solver = SeededBroyden(h.asarray(np.swapaxes(exact_u, 1, 2)), h.asarray(exact_v), max_iter=5)
    sol = deqcore.solve(lambda z, x: fn(z), h.asarray(x), z0, solver=solver, tol=1e-10, max_iter=5)
    z_star = np.linalg.solve(np.eye(d) - A, x[..., None])[..., 0]
    np.testing.assert_allclose(h.numpy(sol.z), z_star, rtol=1e-10, atol=1e-12)
    assert int(sol.steps) == 1


def test_bounded_memory_overwrites_the_seed_first(h):
    rng = np.random.default_rng(35)
    A = 0.6 * rng.standard_normal((8, 8)) / np.sqrt(8)
    x = rng.standard_normal((2, 8))
    seed = h.asarray(np.zeros((2, 2, 8)))  # zero pairs: B_0 = -I, plain Broyden's start
    f = h.affine_layer(A, np.zeros(8))
    seeded = h.solve(f, h.asarray(x), solver=SeededBroyden(seed, seed, memory=2), tol=1e-300, max_iter=6)
    plain = h.solve(f, h.asarray(x), solver="broyden", memory=4, tol=1e-300, max_iter=6)
    # the ring of 2 seed + 2 new slots behaves as a plain ring of 4 once the zero seeds are gone
    np.testing.assert_allclose(h.numpy(seeded.z), h.numpy(plain.z), rtol=1e-12, atol=1e-14)
    # unbounded: the seed stays in front of the new slots as they grow in stages (JAX: 8, 16, 40)
    W, U, b, x = tanh_deq(seed=36, d=12, batch=3, rho=0.95, sym=True)
    f, xa = h.tanh_layer(W, U, b), h.asarray(x)
    seed = h.asarray(np.zeros((3, 3, 12)))
    seeded = h.solve(f, xa, solver=SeededBroyden(seed, seed), tol=1e-9, max_iter=40)
    plain = h.solve(f, xa, solver="broyden", tol=1e-9, max_iter=40)
    assert int(seeded.steps) == int(plain.steps) > 16
    np.testing.assert_allclose(h.numpy(seeded.z), h.numpy(plain.z), rtol=1e-9, atol=1e-11)


def test_errors(h):
    W, U, b, x = tanh_deq(seed=36, d=4, batch=2)
    f, xa = h.tanh_layer(W, U, b), h.asarray(x)
    with pytest.raises(ValueError, match="'gdeq_refined'.*needs solver='broyden', got solver='anderson'"):
        deqcore.solve(f, xa, solver="anderson", grad="gdeq_refined")
    with pytest.raises(ValueError, match="seed_inverse=True.*needs solver='broyden'"):
        deqcore.solve(f, xa, solver="broyden", grad="gdeq_refined", grad_options={"seed_inverse": True})
    with pytest.raises(ValueError, match="option 'start' must be one of 'gdeq', 'g'"):
        deqcore.solve(f, xa, solver="broyden", grad="gdeq_refined", grad_options={"start": "zero"})
    with pytest.raises(ValueError, match="option 'seed_inverse' must be True or False"):
        deqcore.solve(f, xa, solver="broyden", grad="gdeq_refined", grad_options={"seed_inverse": 1})
    with pytest.raises(TypeError, match="unknown option 'seed'"):
        deqcore.solve(f, xa, solver="broyden", grad="gdeq_refined", grad_options={"seed": True})
    with pytest.raises(TypeError, match="implicit backward"):
        deqcore.solve(f, xa, solver="broyden", grad="gdeq_refined",
                      grad_options={"solver_options": {"bogus": 1}})
    with pytest.raises(ValueError, match=r"SeededBroyden: U and V must be \(B, k, n\)"):
        SeededBroyden(h.asarray(np.zeros((2, 3, 4))), h.asarray(np.zeros((2, 2, 4))))
    solver = SeededBroyden(h.asarray(np.zeros((3, 1, 4))), h.asarray(np.zeros((3, 1, 4))))
    with pytest.raises(ValueError, match="seed pairs .* do not match the state"):
        deqcore.solve(f, xa, solver=solver)


def test_tuple_state(h):
    params, x, z0 = two_scale_deq(seed=37)
    c = [np.random.default_rng(38).standard_normal(a.shape) for a in z0]

    def gradient(grad, opts):
        if h.name == "torch":
            import torch

            P = {k: torch.tensor(v, requires_grad=k == "W1") for k, v in params.items()}
            sol = deqcore.solve(lambda z, x: two_scale_layer(torch.tanh, P, z, x), torch.tensor(x),
                                tuple(torch.tensor(a) for a in z0), solver="broyden", tol=1e-11,
                                grad=grad, grad_options=opts)
            loss = sum((zi * torch.tensor(ci)).sum() for zi, ci in zip(sol.z, c, strict=True))
            return torch.autograd.grad(loss, P["W1"])[0].numpy()
        import jax
        import jax.numpy as jnp

        def loss(W1):
            P = {**{k: jnp.asarray(v) for k, v in params.items()}, "W1": W1}
            sol = deqcore.solve(lambda z, x: two_scale_layer(jnp.tanh, P, z, x), jnp.asarray(x),
                                tuple(jnp.asarray(a) for a in z0), solver="broyden", tol=1e-11,
                                grad=grad, grad_options=opts)
            return sum(jnp.sum(zi * ci) for zi, ci in zip(sol.z, c, strict=True))

        return np.asarray(jax.jit(jax.grad(loss))(jnp.asarray(params["W1"])))

    assert rel(gradient("gdeq_refined", TIGHT), gradient("implicit", TIGHT)) <= 1e-10


@pytest.mark.backend("jax")
def test_jax_vmap():
    import jax
    import jax.numpy as jnp

    W, U, b, x = tanh_deq(seed=39, d=8, batch=3, rho=0.8)
    c = np.random.default_rng(40).standard_normal(x.shape)

    def per_sample(W_, xi, ci, grad):
        sol = deqcore.solve(lambda z, x: tanh_layer(jnp.tanh, {"W": W_, "U": U, "b": b}, z, x), xi,
                            batched=False, solver="broyden", tol=1e-11, grad=grad, grad_options=TIGHT)
        return jnp.sum(sol.z * ci)

    out = {g: np.asarray(jax.jit(jax.vmap(jax.grad(per_sample), in_axes=(None, 0, 0, None)),
                                 static_argnums=3)(jnp.asarray(W), jnp.asarray(x), c, g))
           for g in ("implicit", "gdeq_refined")}
    assert rel(out["gdeq_refined"], out["implicit"]) <= 1e-10
