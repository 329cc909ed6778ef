"""Higher-order derivatives through ``deqcore.solve``: exact for ``unroll`` and ``implicit``, an
error for every other mode.

The layer is f(z, x) = tanh(z W^T + x U^T + b) (W closed over by f, x the solve's input) and the
loss L = sum(c * sin(z*)), or the linear L = sum(c * z*). ``unroll`` differentiates the recorded
forward iterations, so its Hessian-vector product H V = d/de grad L(W + e V) must equal central
finite differences of its own gradient, on both backends and between them. ``implicit`` applies
the implicit function theorem again: converged, its H V equals central differences of its exact
gradient and unroll's H V at convergence, with respect to W and to x, to third order. The modes
whose first derivative is approximate (jfb, npg, upg, gdeq) give it unchanged (also with
``create_graph=True``), and any derivative of that gradient raises ``deqcore.HigherOrderError``
naming the mode, whatever it is taken with respect to.
"""

from __future__ import annotations

import functools
import warnings

import numpy as np
import pytest
from conftest import Harness
from problems import tanh_deq

import deqcore

D, B = 6, 3
W0, U0, B0, X0 = tanh_deq(seed=61, d=D, batch=B, rho=0.7)
C0 = np.random.default_rng(62).standard_normal((B, D))
V0 = np.random.default_rng(63).standard_normal((D, D))

#: (grad, grad_options, solver) of every first-order mode
FIRST_ORDER = [
    ("jfb", {}, "anderson"),
    ("npg", {"k": 5, "lam": 0.5}, "anderson"),
    ("upg", {"k": 5, "lam": 0.5}, "anderson"),
    ("gdeq", {}, "broyden"),
]
#: forward solves with a fixed number of steps (tol below reach): the unrolled map is one smooth
#: function of W, so finite differences of its gradient are exact to O(eps^2); (solver, steps, linear)
UNROLLED = [("anderson", 10, False), ("broyden", 12, False), ("fixed_point", 30, False),
            ("fixed_point", 30, True)]


def loss_fn(h, grad, grad_options=None, solver="anderson", linear=False, **kw):
    """``L(W, x, c)`` on backend ``h``: one ``deqcore.solve`` and a loss of ``z*``."""
    xp = h.xp
    U, b = h.asarray(U0), h.asarray(B0)
    kw = {"tol": 1e-12, "max_iter": 200, **kw}

    def L(W, x, c):
        sol = deqcore.solve(lambda z, x_: xp.tanh(z @ W.T + x_ @ U.T + b), x, solver=solver, grad=grad,
                            grad_options=grad_options or None, **kw)
        return xp.sum(c * (sol.z if linear else xp.sin(sol.z)))

    return L


def torch_leaves(*arrays, requires_grad=(True, True, False)):
    import torch

    return tuple(torch.tensor(a, requires_grad=r) for a, r in zip(arrays, requires_grad, strict=True))


def gradient(h, L, create_graph=False):
    """``W -> dL/dW`` for NumPy W (NumPy out); torch with or without ``create_graph``, JAX compiled once."""
    if h.name == "torch":
        import torch

        def grad_torch(W):
            Wt, xt, ct = torch_leaves(W, X0, C0)
            (gW,) = torch.autograd.grad(L(Wt, xt, ct), Wt, create_graph=create_graph)
            assert gW.requires_grad == create_graph
            return gW.detach().numpy()

        return grad_torch
    import jax

    compiled = jax.jit(jax.grad(L))
    return lambda W: np.asarray(compiled(*(h.asarray(a) for a in (W, X0, C0))))


def hvp(h, L, forward=True):
    """H V at W0, by differentiating the gradient (torch: create_graph; JAX: reverse over reverse
    and, with ``forward``, forward over reverse, under jax.jit)."""
    if h.name == "torch":
        import torch

        Wt, xt, ct = torch_leaves(W0, X0, C0)
        (gW,) = torch.autograd.grad(L(Wt, xt, ct), Wt, create_graph=True)
        (hv,) = torch.autograd.grad((gW * torch.tensor(V0)).sum(), Wt)
        return [hv.numpy()]
    import jax
    import jax.numpy as jnp

    W, x, c, V = (jnp.asarray(a) for a in (W0, X0, C0, V0))
    grad_L = jax.grad(L)
    out = [jax.jit(jax.grad(lambda W_: jnp.sum(grad_L(W_, x, c) * V)))(W)]
    if forward:
        out.append(jax.jit(lambda W_: jax.jvp(lambda w: grad_L(w, x, c), (W_,), (V,))[1])(W))
    return [np.asarray(a) for a in out]


def finite_difference(h, L, eps=1e-5):
    grad_L = gradient(h, L)
    return (grad_L(W0 + eps * V0) - grad_L(W0 - eps * V0)) / (2 * eps)


@functools.cache
def unrolled(name, solver, steps, linear):
    """(H V list, central differences of the gradient) of unroll with a fixed number of steps on
    backend ``name`` (cached: the equivalence test reuses them; JAX compiles are slow)."""
    h = Harness(name)
    L = loss_fn(h, "unroll", solver=solver, linear=linear, tol=1e-300, max_iter=steps)
    return hvp(h, L), finite_difference(h, L)


def rel(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.mark.parametrize(("solver", "steps", "linear"), UNROLLED)
def test_unroll_hessian_vector_product_matches_finite_differences(h, solver, steps, linear):
    hvps, fd = unrolled(h.name, solver, steps, linear)
    assert np.linalg.norm(fd) > 1e-2  # a real second derivative, not a vanishing one
    for hv in hvps:  # measured ~3e-9: the O(eps^2) truncation of the differences
        assert rel(hv, fd) <= 1e-7, rel(hv, fd)


@pytest.mark.parametrize(("solver", "steps", "linear"), UNROLLED)
@pytest.mark.backend("torch")
@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")  # torch.func's own
def test_unroll_under_torch_func_forward_mode(solver, steps, linear):
    """torch.func's compositions that involve forward mode (hessian = jacfwd of jacrev, jvp of
    grad, grad of jvp, jvp of jvp) give the same H V. Anderson's small linear solve needs the LU
    path here: torch.linalg.solve's forward-mode rule is wrong once differentiated again."""
    import torch

    L = loss_fn(Harness("torch"), "unroll", solver=solver, linear=linear, tol=1e-300, max_iter=steps)
    _, fd = unrolled("torch", solver, steps, linear)
    W, x, c, V = (torch.tensor(a) for a in (W0, X0, C0, V0))

    def jvp(W_):
        return torch.func.jvp(lambda w: L(w, x, c), (W_,), (V,))[1]

    hessian = torch.func.hessian(L)(W, x, c).reshape(D * D, D * D)
    hvps = {
        "hessian": (hessian @ V.reshape(-1)).reshape(D, D),
        "jvp of grad": torch.func.jvp(lambda w: torch.func.grad(L)(w, x, c), (W,), (V,))[1],
        "grad of jvp": torch.func.grad(jvp)(W),
    }
    for name, hv in hvps.items():
        assert rel(hv.numpy(), fd) <= 1e-7, (name, rel(hv.numpy(), fd))
    vhv = torch.func.jvp(jvp, (W,), (V,))[1]  # V^T H V
    assert abs(float(vhv) - float(np.sum(fd * V0))) <= 1e-7 * abs(float(np.sum(fd * V0)))


def test_unroll_gives_the_second_derivative_of_the_equilibrium(h):
    """Converged, unroll's H V is the true one of L(z*(W)): central differences of the implicit
    (exact first-order) gradient agree to the backward solves' accuracy."""
    fd = finite_difference(h, loss_fn(h, "implicit", {"tol": 1e-13, "max_iter": 300}, tol=1e-13,
                                      max_iter=300))
    for hv in hvp(h, loss_fn(h, "unroll", solver="fixed_point", tol=1e-13, max_iter=300), forward=False):
        assert rel(hv, fd) <= 1e-6, rel(hv, fd)


#: the implicit mode's backward options in the exactness tests: converged to rounding
IMPLICIT = {"tol": 1e-13, "max_iter": 300}


@functools.cache
def implicit_hvp(name, linear):
    """(H V list, central differences of the gradient) of converged implicit on backend ``name``."""
    h = Harness(name)
    L = loss_fn(h, "implicit", IMPLICIT, linear=linear, tol=1e-13, max_iter=300)
    return hvp(h, L), finite_difference(h, L)


@pytest.mark.parametrize("linear", [False, True])
def test_implicit_hessian_vector_product_is_exact(h, linear):
    """implicit's H V (torch: create_graph; JAX: reverse over reverse and forward over reverse,
    jitted) equals central differences of its own exact gradient and unroll's H V at convergence."""
    hvps, fd = implicit_hvp(h.name, linear)
    assert np.linalg.norm(fd) > 1e-2
    reference = hvp(h, loss_fn(h, "unroll", solver="fixed_point", linear=linear, tol=1e-13, max_iter=300),
                    forward=False)[0]
    for hv in hvps:  # measured ~2e-9 (differences), ~6e-11 (unroll)
        assert rel(hv, fd) <= 1e-6, rel(hv, fd)
        assert rel(hv, reference) <= 1e-6, rel(hv, reference)


def contracted_gradient(h, L, argnum):
    """``(p, V) -> sum(dL/dp * V)`` at (W0, X0, C0) with p the ``argnum``-th argument of L,
    differentiable again (torch: create_graph)."""
    if h.name == "torch":
        import torch

        def of(p, V):
            args = [torch.tensor(a) for a in (W0, X0, C0)]
            args[argnum] = p
            (g,) = torch.autograd.grad(L(*args), p, create_graph=True)
            return (g * V).sum()

        return of
    import jax

    def of_jax(p, V):
        args = [h.asarray(a) for a in (W0, X0, C0)]
        args[argnum] = p
        return (jax.grad(lambda p_: L(*args[:argnum], p_, *args[argnum + 1:]))(p) * V).sum()

    return of_jax


def derivative(h, fn, p):
    """``d fn / d p`` at p (NumPy in and out)."""
    if h.name == "torch":
        import torch

        pt = torch.tensor(p, requires_grad=True)
        return torch.autograd.grad(fn(pt), pt)[0].numpy()
    import jax

    return np.asarray(jax.jit(jax.grad(fn))(h.asarray(p)))


def test_implicit_second_and_third_derivatives(h):
    """With respect to x, H V equals central differences of the gradient; with respect to W, the
    third derivative d/dW (V . H V) . V equals central differences of V . H V."""
    L = loss_fn(h, "implicit", IMPLICIT, tol=1e-13, max_iter=300)
    Vx = np.random.default_rng(64).standard_normal(X0.shape)
    of_x = contracted_gradient(h, L, 1)
    def loss_x(p):
        return L(h.asarray(W0), p, h.asarray(C0))

    if h.name == "torch":
        def grad_x(x_):
            return derivative(h, loss_x, x_)
    else:
        import jax

        compiled = jax.jit(jax.grad(loss_x))

        def grad_x(x_):
            return np.asarray(compiled(h.asarray(x_)))

    hx = derivative(h, lambda p: of_x(p, h.asarray(Vx)), X0)
    eps = 1e-5
    fd = (grad_x(X0 + eps * Vx) - grad_x(X0 - eps * Vx)) / (2 * eps)
    assert rel(hx, fd) <= 1e-6, rel(hx, fd)

    of_w = contracted_gradient(h, L, 0)
    V = h.asarray(V0)

    def vhv(W):  # V . H V, differentiable in W
        p = W
        if h.name == "torch":
            import torch

            (hv,) = torch.autograd.grad(of_w(p, V), p, create_graph=True)
            return (hv * V).sum()
        import jax

        return (jax.grad(lambda w: of_w(w, V))(p) * V).sum()

    third = float(np.sum(derivative(h, vhv, W0) * V0))
    if h.name == "torch":
        import torch

        at = lambda W: float(vhv(torch.tensor(W, requires_grad=True)).detach())  # noqa: E731
    else:
        import jax

        at = lambda W: float(jax.jit(vhv)(h.asarray(W)))  # noqa: E731
    fd3 = (at(W0 + eps * V0) - at(W0 - eps * V0)) / (2 * eps)
    assert abs(third - fd3) <= 1e-6 * abs(fd3), (third, fd3)


@pytest.mark.equivalence
def test_implicit_hessian_vector_product_torch_equals_jax(both):
    for linear in (False, True):
        (ht,), _ = implicit_hvp("torch", linear)
        for hj in implicit_hvp("jax", linear)[0]:
            np.testing.assert_allclose(ht, hj, rtol=1e-8, atol=1e-12)


@pytest.mark.equivalence
@pytest.mark.parametrize(("solver", "steps", "linear"), UNROLLED)
def test_unroll_hessian_vector_product_torch_equals_jax(both, solver, steps, linear):
    (ht,), _ = unrolled("torch", solver, steps, linear)
    for hj in unrolled("jax", solver, steps, linear)[0]:
        np.testing.assert_allclose(ht, hj, rtol=1e-10, atol=1e-12)


def raises_higher_order(mode):
    return pytest.raises(deqcore.HigherOrderError, match=rf"gradient mode '{mode}' gives first derivatives "
                         rf"only(.|\n)*approximate(.|\n)*exact to every order are (.|\n)*'implicit'"
                         rf"(.|\n)*grad='unroll'(.|\n)*finite differences")


@pytest.mark.parametrize(("grad", "opts", "solver"), FIRST_ORDER + [
    ("implicit", {"tol": 1e-12, "max_iter": 200}, "anderson"),
    ("implicit", {"solver": "broyden", "tol": 1e-12, "max_iter": 200}, "fixed_point")])
@pytest.mark.backend("torch")
def test_first_derivative_with_create_graph_is_unchanged(grad, opts, solver):
    """create_graph=True gives the same gradient, and no warning (the adjoint never sees a
    cotangent that requires grad; implicit's recorded backward gives the same values). JAX's
    first derivatives pass the check's identity untouched; tests/test_gradients.py holds them to
    the dense references."""
    h = Harness("torch")
    L = loss_fn(h, grad, opts, solver)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plain = gradient(h, L)(W0)
        np.testing.assert_array_equal(gradient(h, L, create_graph=True)(W0), plain)
    assert np.linalg.norm(plain) > 1e-2


@pytest.mark.parametrize(("grad", "opts", "solver"), FIRST_ORDER)
@pytest.mark.parametrize("linear", [False, True])
@pytest.mark.backend("torch")
def test_torch_second_derivative_raises(grad, opts, solver, linear):
    """Every way of differentiating the gradient again: backward(), autograd.grad restricted to
    the weights, with respect to x only, and with respect to the loss's own weights c (which f
    does not use)."""
    import torch

    L = loss_fn(Harness("torch"), grad, opts, solver, linear=linear)
    V = torch.tensor(V0)

    def first(requires_grad):
        W, x, c = torch_leaves(W0, X0, C0, requires_grad=requires_grad)
        (gW,) = torch.autograd.grad(L(W, x, c), W, create_graph=True)
        return (gW * V).sum(), W, x, c

    with raises_higher_order(grad):
        first((True, False, False))[0].backward()
    with raises_higher_order(grad):
        s, W, _, _ = first((True, True, False))
        torch.autograd.grad(s, inputs=[W])
    with raises_higher_order(grad):
        s, _, x, _ = first((True, True, False))
        torch.autograd.grad(s, inputs=[x])
    with raises_higher_order(grad):
        s, _, _, c = first((True, False, True))
        torch.autograd.grad(s, inputs=[c])
    # loss.backward(create_graph=True) then a penalty on the accumulated .grad
    W, x, c = torch_leaves(W0, X0, C0)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Using backward\\(\\) with create_graph=True", UserWarning)
        L(W, x, c).backward(create_graph=True)
    with raises_higher_order(grad):
        (W.grad ** 2).sum().backward()
    W.grad = None  # the parameter-gradient reference cycle torch warns about
    # torch.autograd.functional asks for the graph itself
    with raises_higher_order(grad):
        torch.autograd.functional.hvp(lambda W_: L(W_, torch.tensor(X0), torch.tensor(C0)),
                                      torch.tensor(W0), V)


@pytest.mark.backend("torch")
@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")  # torch.func's own
def test_torch_func_and_forward_mode_for_upg():
    """torch.func: UPG (no custom adjoint) is differentiable once in reverse mode (torch.func.grad,
    torch.func.jacrev) and raises on a second derivative and on forward mode (torch.func.jvp,
    torch.func.hessian, torch.autograd.forward_ad); the adjoint modes are not supported by
    torch.func at all (torch says so)."""
    import torch
    import torch.autograd.forward_ad as forward_ad

    W, x, c, V = (torch.tensor(a) for a in (W0, X0, C0, V0))
    L = loss_fn(Harness("torch"), "upg", {"k": 5, "lam": 0.5})
    plain = gradient(Harness("torch"), L)(W0)
    np.testing.assert_allclose(torch.func.grad(L)(W, x, c).numpy(), plain, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(torch.func.jacrev(L)(W, x, c).numpy(), plain, rtol=1e-12, atol=1e-14)
    attempts = {
        "grad of grad": lambda: torch.func.grad(lambda W_: (torch.func.grad(L)(W_, x, c) * V).sum())(W),
        "hessian": lambda: torch.func.hessian(L)(W, x, c),
        "jvp of grad": lambda: torch.func.jvp(lambda W_: torch.func.grad(L)(W_, x, c), (W,), (V,)),
        "jvp": lambda: torch.func.jvp(lambda W_: L(W_, x, c), (W,), (V,)),
    }
    for name, attempt in attempts.items():
        with raises_higher_order("upg"):
            attempt()
            pytest.fail(f"{name} did not raise")
    with forward_ad.dual_level(), raises_higher_order("upg"):
        L(forward_ad.make_dual(W, V), x, c)
    with pytest.raises(RuntimeError, match="requires_grad_"):
        torch.func.grad(loss_fn(Harness("torch"), "jfb"))(W, x, c)


@pytest.mark.parametrize(("grad", "opts", "solver"), FIRST_ORDER)
@pytest.mark.parametrize("linear", [False, True])
@pytest.mark.backend("jax")
def test_jax_second_derivative_raises(grad, opts, solver, linear):
    """jax.grad of jax.grad (under jax.jit and eager), jax.hessian, jax.jacfwd and jax.jvp of
    jax.grad, and derivatives of the gradient with respect to x only and to the loss's weights c
    only."""
    import jax
    import jax.numpy as jnp

    L = loss_fn(Harness("jax"), grad, opts, solver, linear=linear)
    W, x, c, V = (jnp.asarray(a) for a in (W0, X0, C0, V0))

    def contracted(W_, x_, c_):
        return jnp.sum(jax.grad(L)(W_, x_, c_) * V)

    attempts = {  # traced only: the error comes before anything is compiled
        "jit(grad of grad)": lambda: jax.jit(jax.grad(contracted))(W, x, c),
        "jit(hessian)": lambda: jax.jit(jax.hessian(L))(W, x, c),
        "jit(jacfwd of grad)": lambda: jax.jit(jax.jacfwd(jax.grad(L)))(W, x, c),
        "jit(jvp of grad)": lambda: jax.jit(lambda w: jax.jvp(lambda w_: jax.grad(L)(w_, x, c), (w,),
                                                               (V,)))(W),
        "jit(grad of grad), w.r.t. x": lambda: jax.jit(jax.grad(contracted, argnums=1))(W, x, c),
        "jit(grad of grad), w.r.t. c": lambda: jax.jit(jax.grad(contracted, argnums=2))(W, x, c),
    }
    if not linear:
        attempts["grad of grad, eager"] = lambda: jax.grad(contracted)(W, x, c)
    for name, attempt in attempts.items():
        with raises_higher_order(grad):
            attempt()
            pytest.fail(f"{name} did not raise")


@pytest.mark.backend("jax")
def test_jax_first_derivative_under_vmap_is_unchanged():
    """The check is a no-op for first derivatives under jax.vmap (batched=False solves)."""
    import jax
    import jax.numpy as jnp

    U, b = jnp.asarray(U0), jnp.asarray(B0)

    def per_sample(W, x, c):
        sol = deqcore.solve(lambda z, x_: jnp.tanh(W @ z + U @ x_ + b), x, batched=False, tol=1e-12,
                            grad="implicit", grad_options={"tol": 1e-12, "max_iter": 200})
        return jnp.sum(c * jnp.sin(sol.z))

    W = jnp.asarray(W0)
    vmapped = jax.jit(jax.vmap(jax.grad(per_sample), in_axes=(None, 0, 0)))(W, jnp.asarray(X0),
                                                                            jnp.asarray(C0))
    jx = Harness("jax")
    batched = gradient(jx, loss_fn(jx, "implicit", {"tol": 1e-12, "max_iter": 200}))(W0)
    np.testing.assert_allclose(np.asarray(vmapped).sum(axis=0), batched, rtol=1e-9, atol=1e-12)

    def per_sample_jfb(W_, x_, c_):
        sol = deqcore.solve(lambda z, x__: jnp.tanh(W_ @ z + U @ x__ + b), x_, batched=False, grad="jfb")
        return jnp.sum(c_ * sol.z)

    with raises_higher_order("jfb"):
        jax.hessian(per_sample_jfb)(W, jnp.asarray(X0[0]), jnp.asarray(C0[0]))


def test_attach_adjoint_without_a_mode_name(h):
    """A mode written directly on Backend.attach_adjoint (no higher_order_error given) is checked
    too, with a message that names the hook."""
    xp = h.xp
    U, b = h.asarray(U0), h.asarray(B0)
    match = "a gradient built on Backend.attach_adjoint gives first derivatives only"

    def L(W, x, c):
        f = lambda z, x_: xp.tanh(z @ W.T + x_ @ U.T + b)  # noqa: E731
        sol = deqcore.solve(f, x, grad=None, tol=1e-12)
        return xp.sum(c * h.backend.attach_adjoint(f, sol.z, x, lambda g, vjp_z: g))

    if h.name == "torch":
        import torch

        W, x, c = torch_leaves(W0, X0, C0)
        (gW,) = torch.autograd.grad(L(W, x, c), W, create_graph=True)
        with pytest.raises(deqcore.HigherOrderError, match=match):
            torch.autograd.grad((gW * torch.tensor(V0)).sum(), W)
        return
    import jax

    with pytest.raises(deqcore.HigherOrderError, match=match):
        jax.hessian(L)(*(h.asarray(a) for a in (W0, X0, C0)))


def test_hypersolver_forward_with_gradient_modes(h):
    """A hypersolver's solution: unroll differentiates its iterations exactly (H V against finite
    differences), and so does implicit its fixed point; jfb raises on a second derivative."""
    from deqcore.hypersolvers import DenseInitialiser, HyperAnderson, IdentityCompression

    hs = HyperAnderson(IdentityCompression(D), DenseInitialiser(D, D), memory=3, seed=4)
    L = loss_fn(h, "unroll", solver=hs, tol=1e-300, max_iter=8)
    fd = finite_difference(h, L)
    for hv in hvp(h, L, forward=False):
        assert rel(hv, fd) <= 1e-7, rel(hv, fd)
    if h.name == "torch":  # implicit's backward ignores the forward solver; JAX: tested above (slow compiles)
        L = loss_fn(h, "implicit", IMPLICIT, solver=hs, max_iter=300)
        fd = finite_difference(h, L)
        for hv in hvp(h, L, forward=False):
            assert rel(hv, fd) <= 1e-6, rel(hv, fd)
    with raises_higher_order("jfb"):
        hvp(h, loss_fn(h, "jfb", solver=hs, max_iter=100))


def test_modes_declare_their_order():
    modes = {entry.name: entry.obj for entry in deqcore.registry().entries("gradients")}
    exact = {name for name, cls in modes.items() if cls.exact_higher_order}
    assert {"unroll", "implicit"} <= exact and not exact & {"jfb", "npg", "upg", "gdeq"}
    assert not deqcore.extend.GradientMode.exact_higher_order



@pytest.mark.backend("torch")
def test_the_declaration_decides(monkeypatch):
    """deqcore.solve reads exact_higher_order, not a list of names: a mode declaring it (here UPG,
    patched; its second derivative is then UPG's own, z* held constant) is not checked."""
    import torch

    from deqcore.gradients import UPG

    monkeypatch.setattr(UPG, "exact_higher_order", True)
    L = loss_fn(Harness("torch"), "upg", {"k": 5, "lam": 0.5})
    W, x, c = torch_leaves(W0, X0, C0)
    (gW,) = torch.autograd.grad(L(W, x, c), W, create_graph=True)
    (hv,) = torch.autograd.grad((gW * torch.tensor(V0)).sum(), W)
    assert np.isfinite(hv.numpy()).all() and np.linalg.norm(hv.numpy()) > 0


@pytest.mark.backend("torch")
def test_torch_modules_tuple_states_and_backward_twice():
    """A layer of torch.nn.Linear modules on a tuple state: implicit's H V with respect to every
    parameter, taken by loss.backward(create_graph=True) and a second backward of the accumulated
    .grad, equals unroll's at convergence."""
    import torch

    torch.manual_seed(65)
    lin1, lin2, mix = (torch.nn.Linear(i, o).double() for i, o in ((D, D), (4, 4), (D, 4)))
    with torch.no_grad():
        for lin in (lin1, lin2):
            lin.weight.mul_(0.6 / torch.linalg.matrix_norm(lin.weight, 2))
    params = [*lin1.parameters(), *lin2.parameters(), *mix.parameters()]
    x = torch.tensor(X0)
    directions = [torch.randn_like(p) for p in params]

    def f(z, x_):
        return torch.tanh(lin1(z[0]) + x_), torch.tanh(lin2(z[1]) + mix(z[0]))

    def hessian_vector(grad, opts, solver):
        for p in params:
            p.grad = None
        z0 = (torch.zeros(B, D, dtype=torch.float64), torch.zeros(B, 4, dtype=torch.float64))
        sol = deqcore.solve(f, x, z0, solver=solver, grad=grad, grad_options=opts, tol=1e-13, max_iter=300)
        loss = (torch.sin(sol.z[0]) ** 2).sum() + (sol.z[1] ** 3).sum()
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "Using backward\\(\\) with create_graph=True", UserWarning)
            loss.backward(create_graph=True)
        first = [p.grad for p in params]
        for p in params:
            p.grad = None
        sum((g * v).sum() for g, v in zip(first, directions, strict=True)).backward()
        out = torch.cat([p.grad.reshape(-1) for p in params]).numpy()
        for p in params:
            p.grad = None
        return out

    exact = hessian_vector("implicit", IMPLICIT, "anderson")
    reference = hessian_vector("unroll", None, "fixed_point")
    assert np.linalg.norm(reference) > 1e-2 and rel(exact, reference) <= 1e-6, rel(exact, reference)


@pytest.mark.backend("torch")
def test_torch_exact_mode_refuses_what_it_cannot_reach(monkeypatch):
    """A tensor f closes over that was computed outside it (not a leaf, not in x) is a clear error
    on the second derivative, never a derivative that misses it; and a backend whose
    attach_adjoint ignores linear_solve gives the error naming the backend."""
    import torch
    from deqcore_torch._backend import TorchBackend

    U, b = torch.tensor(U0), torch.tensor(B0)
    W, x, c, V = torch.tensor(W0, requires_grad=True), torch.tensor(X0), torch.tensor(C0), torch.tensor(V0)
    W2 = W * 1.0  # an intermediate tensor, closed over
    sol = deqcore.solve(lambda z, x_: torch.tanh(z @ W2.T + x_ @ U.T + b), x, grad="implicit",
                        grad_options=IMPLICIT, tol=1e-13)
    (gW,) = torch.autograd.grad((c * torch.sin(sol.z)).sum(), W, create_graph=True)
    with pytest.raises(deqcore.HigherOrderError, match="computed outside f"):
        torch.autograd.grad((gW * V).sum(), W)

    original = TorchBackend.attach_adjoint

    def first_order_backend(self, f, z_star, x, adjoint, saved=(), higher_order_error=None,
                            linear_solve=None):
        return original(self, f, z_star, x, adjoint, saved, higher_order_error)

    monkeypatch.setattr(TorchBackend, "attach_adjoint", first_order_backend)
    L = loss_fn(Harness("torch"), "implicit", IMPLICIT)
    plain = gradient(Harness("torch"), L)(W0)
    assert np.linalg.norm(plain) > 1e-2
    with pytest.raises(deqcore.HigherOrderError, match="'implicit' is exact to every order, but backend "
                                                       "'torch' gives first derivatives of it only"):
        hvp(Harness("torch"), L)


@pytest.mark.backend("jax")
def test_jax_hessian_under_vmap_and_jit():
    """Per-sample solves (batched=False) under jax.vmap: jax.hessian with respect to the bias,
    jitted and vmapped over the samples, equals the batched solve's jax.hessian per sample."""
    import jax
    import jax.numpy as jnp

    U, W = jnp.asarray(U0), jnp.asarray(W0)

    def per_sample(b, x, c):
        sol = deqcore.solve(lambda z, x_: jnp.tanh(W @ z + U @ x_ + b), x, batched=False, tol=1e-13,
                            max_iter=300, grad="implicit", grad_options=IMPLICIT)
        return jnp.sum(c * jnp.sin(sol.z))

    def batched(b, k):  # the loss of sample k alone, solved with the whole batch
        sol = deqcore.solve(lambda z, x_: jnp.tanh(z @ W.T + x_ @ U.T + b), jnp.asarray(X0), tol=1e-13,
                            max_iter=300, grad="implicit", grad_options=IMPLICIT)
        return jnp.sum(jnp.asarray(C0)[k] * jnp.sin(sol.z[k]))

    b = jnp.asarray(B0)
    vmapped = jax.jit(jax.vmap(jax.hessian(per_sample), in_axes=(None, 0, 0)))(b, jnp.asarray(X0),
                                                                             jnp.asarray(C0))
    whole = jax.jit(jax.hessian(batched))  # k traced: one compile
    assert np.linalg.norm(np.asarray(whole(b, 0))) > 1e-2
    for k in range(B):
        assert rel(np.asarray(vmapped[k]), np.asarray(whole(b, k))) <= 1e-8
