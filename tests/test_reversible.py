"""The reversible solver and ``grad="reversible"``: the reversed gradient against ``unroll`` of the
same iteration (float64, 1e-9), on both backends and across them, the reconstruction of the
forward states, memory flat in the steps, the errors.

The layer is ``r_b * tanh(z W^T + x U^T + b)`` with a per-sample rate ``r_b`` (samples stop at
different steps) and the loss ``sum(c * z*)``.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from problems import tanh_deq, tanh_fixed_point, two_scale_deq, two_scale_layer
from test_gradient_memory import kept_bytes

import deqcore

WEIGHTS = tanh_deq(seed=5, d=8, batch=3, rho=0.8)
RATES = np.array([[1.0], [0.4], [1.2]])
C = np.random.default_rng(7).standard_normal((3, 8))

CASES = {
    # every sample runs all steps
    "fixed-steps": {"tol": 1e-300, "max_iter": 12},
    # samples stop at different steps (the loop runs on for the slowest)
    "per-sample-stopping": {"tol": 1e-5, "max_iter": 40, "beta": 0.8},
    # beta near 2 oscillates: the returned lowest-residual iterate precedes the last one
    "best-before-last": {"tol": 1e-300, "max_iter": 9, "beta": 1.8},
    # 30 steps from 4 exact pairs
    "checkpoints": {"tol": 1e-300, "max_iter": 30, "checkpoints": 4},
}


def rel(a, b):
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def grads(h, grad, jit=True, **kw):
    """(dL/dW, dL/dx, solution, best residual, last residual) through ``deqcore.solve`` on ``h``."""
    W, U, b, x = WEIGHTS
    kw = {"solver": "reversible", "grad": grad, **kw}
    if h.name == "torch":
        import torch

        Wt, xt = torch.tensor(W, requires_grad=True), torch.tensor(x, requires_grad=True)
        Ut, bt, rt = torch.tensor(U), torch.tensor(b), torch.tensor(RATES)
        sol = deqcore.solve(lambda z, x: rt * torch.tanh(z @ Wt.T + x @ Ut.T + bt), xt, **kw)
        gW, gx = torch.autograd.grad((sol.z * torch.tensor(C)).sum(), (Wt, xt))
        return gW.numpy(), gx.numpy(), sol
    import jax
    import jax.numpy as jnp

    def loss(W_, x_):
        sol = deqcore.solve(lambda z, x: RATES * jnp.tanh(z @ W_.T + x @ U.T + b), x_, **kw)
        return jnp.sum(sol.z * C), sol

    fn = jax.grad(loss, argnums=(0, 1), has_aux=True)
    (gW, gx), sol = (jax.jit(fn) if jit else fn)(jnp.asarray(W), jnp.asarray(x))
    return np.asarray(gW), np.asarray(gx), sol


@pytest.mark.parametrize("case", list(CASES))
def test_gradient_equals_unroll_of_the_same_iteration(h, case):
    gW, gx, sol = grads(h, "reversible", **CASES[case])
    uW, ux, ref = grads(h, "unroll", **CASES[case])
    assert rel(gW, uW) <= 1e-9 and rel(gx, ux) <= 1e-9, (rel(gW, uW), rel(gx, ux))
    np.testing.assert_array_equal(h.numpy(sol.z), h.numpy(ref.z))
    its = h.numpy(sol.iterations)
    if case == "per-sample-stopping":
        assert len(set(its.tolist())) == 3 and h.numpy(sol.converged).all(), its
    if case == "best-before-last":
        best, last = h.numpy(sol.abs_residual), h.numpy(sol.abs_trace)[-1]
        assert np.any(best < last), (best, last)


def test_tuple_state(h):
    p, x, z0 = two_scale_deq(seed=2)
    c = tuple(np.random.default_rng(3).standard_normal(a.shape) for a in z0)
    kw = {"solver": "reversible", "tol": 1e-300, "max_iter": 10, "beta": 0.7}
    if h.name == "torch":
        import torch

        pt = {k: torch.tensor(v, requires_grad=True) for k, v in p.items()}

        def run(grad):
            sol = deqcore.solve(lambda z, x: two_scale_layer(torch.tanh, pt, z, x), torch.tensor(x),
                                tuple(torch.tensor(a) for a in z0), grad=grad, **kw)
            loss = sum((zi * torch.tensor(ci)).sum() for zi, ci in zip(sol.z, c, strict=True))
            return [g.numpy() for g in torch.autograd.grad(loss, list(pt.values()))]
    else:
        import jax
        import jax.numpy as jnp

        def run(grad):
            def loss(q):
                sol = deqcore.solve(lambda z, x: two_scale_layer(jnp.tanh, q, z, x), jnp.asarray(x),
                                    tuple(jnp.asarray(a) for a in z0), grad=grad, **kw)
                return sum(jnp.sum(zi * ci) for zi, ci in zip(sol.z, c, strict=True))

            g = jax.jit(jax.grad(loss))({k: jnp.asarray(v) for k, v in p.items()})
            return [np.asarray(g[k]) for k in p]

    for got, want in zip(run("reversible"), run("unroll"), strict=True):
        assert rel(got, want) <= 1e-9


def test_reconstruction_returns_to_the_initial_pair(h):
    """The reversal's reconstructed initial pair equals ``z0`` (f64, 12 steps; 30 with checkpoints):
    ``solution.backward.residual`` is that relative drift, per sample; 20 steps at beta 0.8 without
    checkpoints amplify the rounding by many orders of magnitude."""
    for kw, bound in (({"tol": 1e-300, "max_iter": 12}, 1e-10), (CASES["checkpoints"], 1e-12),
                      ({"tol": 1e-300, "max_iter": 20, "beta": 0.8}, None)):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            # eagerly where it warns: a warning issued while a compiled JAX computation runs is
            # not caught here
            *_, sol = grads(h, "reversible", jit=bound is not None, **kw)
        drift = sol.backward.residual
        warned = [w for w in caught if issubclass(w.category, deqcore.BackwardWarning)]
        assert len(warned) == (bound is None), [str(w.message) for w in caught]
        assert drift.shape == (3,) and sol.backward.calls == 1
        np.testing.assert_array_equal(sol.backward.iterations, h.numpy(sol.iterations))
        if bound is not None:
            assert np.all(drift <= bound), drift
        else:  # beyond drift_tol (0.1): the states are lost, and the warning says so
            assert np.max(drift) > 0.1 and "drifted beyond drift_tol 0.1" in str(warned[0].message), drift
            with pytest.raises(deqcore.ConvergenceError, match="checkpoints="):
                grads(h, "reversible", jit=False, grad_options={"on_fail": "raise"}, **kw)


def test_backward_memory_is_flat_in_the_steps(h):
    # the bytes, not the gradient, are measured: 40 steps drift beyond drift_tol here
    quiet = {"on_fail": "ignore"}
    short, long = (kept_bytes(h, "reversible", quiet, "reversible", n) for n in (10, 40))
    assert short > 0 and abs(long - short) <= 0.05 * short, (short, long)
    unrolled = [kept_bytes(h, "unroll", None, "reversible", n) for n in (10, 40)]
    assert unrolled[1] > 2 * unrolled[0], unrolled


def test_solver_finds_the_fixed_point_of_anderson(h):
    W, U, b, x = WEIGHTS
    f = h.tanh_layer(W, U, b)
    kw = {"tol": 1e-12, "max_iter": 200, "grad": "implicit"}
    rev = deqcore.solve(f, h.asarray(x), solver="reversible", **kw)
    ref = deqcore.solve(f, h.asarray(x), solver="anderson", **kw)
    assert h.numpy(rev.converged).all()
    np.testing.assert_allclose(h.numpy(rev.z), h.numpy(ref.z), rtol=0, atol=1e-11)


def test_errors(h):
    W, U, b, x = WEIGHTS
    f, xs = h.tanh_layer(W, U, b), h.asarray(x)
    with pytest.raises(ValueError, match="needs solver='reversible', got solver='anderson'"):
        deqcore.solve(f, xs, grad="reversible")
    for beta in (0.0, 1.0, 2.0, -0.5, True):
        with pytest.raises(ValueError, match=r"a float in \(0, 2\) other than 1"):
            deqcore.solve(f, xs, solver="reversible", beta=beta)
    with pytest.raises(ValueError, match="checkpoints"):
        deqcore.solve(f, xs, solver="reversible", checkpoints=-1)
    with pytest.raises(TypeError, match="memory"):
        deqcore.solve(f, xs, solver="reversible", memory=3)


@pytest.mark.backend("torch")
def test_a_drifting_segment_between_checkpoints_is_reported():
    """With checkpoints the reversal restarts from an exact pair at each one, so the reconstructed
    initial pair can be exact while a later segment went wrong: the reported drift is the worst
    segment's. Here f's first two evaluations in the backward pass (the last step's) are off by
    1e-3, as if the layer were not deterministic; the segment after the last checkpoint drifts,
    the two before it are exact."""
    import torch

    W, U, b, x = (torch.tensor(a) for a in WEIGHTS)
    bumps = [0]

    def f(z, x):
        out = torch.tanh(z @ W.T + x @ U.T + b)
        if bumps[0] > 0:
            bumps[0] -= 1
            out = out + 1e-3
        return out

    def drift(corrupted):
        xt = x.clone().requires_grad_(True)
        sol = deqcore.solve(f, xt, solver="reversible", grad="reversible", tol=1e-300, max_iter=12,
                            checkpoints=2, grad_options={"drift_tol": 1e-6, "on_fail": "ignore"})
        bumps[0] = 2 if corrupted else 0
        sol.z.sum().backward()
        assert bumps[0] == 0
        return sol.backward.residual

    assert np.all(drift(False) <= 1e-12)
    corrupted = drift(True)
    assert np.all(corrupted > 1e-4), corrupted
    with pytest.raises(deqcore.ConvergenceError, match="drifted beyond drift_tol"):
        xt = x.clone().requires_grad_(True)
        sol = deqcore.solve(f, xt, solver="reversible", grad="reversible", tol=1e-300, max_iter=12,
                            checkpoints=2, grad_options={"drift_tol": 1e-6, "on_fail": "raise"})
        bumps[0] = 2
        sol.z.sum().backward()


@pytest.mark.backend("torch")
def test_second_derivative_raises_on_torch():
    import torch

    W, U, b, x = WEIGHTS
    Wt = torch.tensor(W, requires_grad=True)
    sol = deqcore.solve(lambda z, x: torch.tanh(z @ Wt.T + x @ torch.tensor(U).T), torch.tensor(x),
                        solver="reversible", grad="reversible", tol=1e-300, max_iter=5)
    (gW,) = torch.autograd.grad(sol.z.sum(), Wt, create_graph=True)
    exact_first = "gradient mode 'reversible'(.|\n)*first derivative is exact"
    with pytest.raises(deqcore.HigherOrderError, match=exact_first):
        gW.sum().backward()


@pytest.mark.backend("jax")
def test_second_derivative_raises_on_jax_and_vmap_matches_the_batched_solve():
    import jax
    import jax.numpy as jnp

    W, U, b, x = WEIGHTS
    kw = {"solver": "reversible", "tol": 1e-4, "max_iter": 20, "batched": False}

    def loss(W_, grad):
        f = lambda z, x: jnp.tanh(z @ W_.T + x @ U.T + b)  # noqa: E731
        zs = jax.vmap(lambda xi: deqcore.solve(f, xi, grad=grad, **kw).z)(jnp.asarray(x))
        return jnp.sum(zs * C)

    got = jax.jit(jax.grad(lambda W_: loss(W_, "reversible")))(jnp.asarray(W))
    # the batched solve stops each sample at the same step: the gradient checked against unroll
    # in test_gradient_equals_unroll_of_the_same_iteration
    want = jax.jit(jax.grad(lambda W_: jnp.sum(C * deqcore.solve(
        lambda z, x: jnp.tanh(z @ W_.T + x @ U.T + b), jnp.asarray(x), grad="reversible",
        **{**kw, "batched": True}).z)))(jnp.asarray(W))
    assert rel(np.asarray(got), np.asarray(want)) <= 1e-9
    with pytest.raises(deqcore.HigherOrderError, match="gradient mode 'reversible'"):
        jax.grad(lambda W_: jnp.sum(jax.grad(lambda V: loss(V, "reversible"))(W_)))(jnp.asarray(W))


@pytest.mark.backend("torch")
def test_torch_modules_non_leaf_inputs_and_parametrized_weights():
    """Parameters of an nn.Module (also weight-normalised, by torch's parametrizations and by
    deqcore_torch.apply_norm), a closed-over tensor and a tuple ``x`` whose first tensor comes
    from an encoder: every gradient equals unroll's, also through ``loss.backward()``."""
    import torch
    from deqcore_torch import apply_norm

    torch.manual_seed(0)

    def build(norm):
        layer = torch.nn.Linear(6, 6).double()
        with torch.no_grad():
            layer.weight.mul_(0.3)
        if norm == "parametrizations":
            torch.nn.utils.parametrizations.weight_norm(layer)
        elif norm == "apply_norm":
            apply_norm(layer)
        return layer

    for norm in (None, "parametrizations", "apply_norm"):
        torch.manual_seed(1)
        layer, encoder = build(norm), torch.nn.Linear(4, 6).double()
        shift = torch.randn(6, dtype=torch.float64, requires_grad=True)
        data = torch.randn(5, 4, dtype=torch.float64)
        c = torch.randn(5, 6, dtype=torch.float64)
        results = {}
        for grad in ("reversible", "unroll"):
            for p in (*layer.parameters(), *encoder.parameters(), shift):
                p.grad = None
            x = (encoder(data), 0.5)
            sol = deqcore.solve(_module_layer(layer, shift), x, torch.zeros(5, 6, dtype=torch.float64),
                                solver="reversible", grad=grad, tol=1e-300, max_iter=10)
            (sol.z * c).sum().backward()
            results[grad] = [p.grad.clone() for p in (*layer.parameters(), *encoder.parameters(), shift)]
        assert len(results["reversible"]) >= 5
        for got, want in zip(results["reversible"], results["unroll"], strict=True):
            assert rel(got.numpy(), want.numpy()) <= 1e-9, norm


def _module_layer(layer, shift):
    import torch

    return lambda z, x: torch.tanh(layer(z) + x[0] * x[1] + shift)


@pytest.mark.backend("torch")
def test_torch_compiled_forward():
    import torch

    W, U, b, x = WEIGHTS
    gW, gx, _ = grads(deqcore_harness("torch"), "reversible", **CASES["fixed-steps"])
    Wt = torch.tensor(W, requires_grad=True)
    Ut, bt, rt = torch.tensor(U), torch.tensor(b), torch.tensor(RATES)
    sol = deqcore.solve(lambda z, x: rt * torch.tanh(z @ Wt.T + x @ Ut.T + bt), torch.tensor(x),
                        solver="reversible", grad="reversible", compile=True, **CASES["fixed-steps"])
    (cW,) = torch.autograd.grad((sol.z * torch.tensor(C)).sum(), Wt)
    assert rel(cW.numpy(), gW) <= 1e-9


@pytest.mark.backend("torch")
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_states_solve_and_their_reversal_is_flagged(dtype):
    """Half-precision states iterate as with the other solvers (residuals in float32); their
    reversal drifts beyond drift_tol within a few steps, which the mode reports, never silently."""
    import torch

    W, U, b, x = tanh_deq(seed=14, d=32, batch=4, rho=0.5)
    tdtype = getattr(torch, dtype)
    Wt = torch.tensor(W, dtype=tdtype, requires_grad=True)
    Ut, bt, xt = (torch.tensor(a, dtype=tdtype) for a in (U, b, x))
    f = lambda z, x: torch.tanh(z @ Wt.T + x @ Ut.T + bt)  # noqa: E731
    sol = deqcore.solve(f, xt, solver="reversible", grad=None, tol=2e-2, max_iter=40)
    assert sol.z.dtype == tdtype and sol.converged.all()
    np.testing.assert_allclose(sol.z.float().numpy(), tanh_fixed_point(W, U, b, x), atol=0.1)
    with pytest.warns(deqcore.BackwardWarning, match="drifted beyond drift_tol"):
        sol = deqcore.solve(f, xt, solver="reversible", grad="reversible", tol=1e-300, max_iter=10)
        sol.z.float().sum().backward()
    assert Wt.grad is not None and np.max(sol.backward.residual) > 0.1


def deqcore_harness(name):
    from conftest import Harness

    return Harness(name)


@pytest.mark.equivalence
def test_torch_equals_jax(both):
    th, jh = both
    for case in ("per-sample-stopping", "checkpoints"):
        tW, tx, _ = grads(th, "reversible", **CASES[case])
        jW, jx, _ = grads(jh, "reversible", **CASES[case])
        assert rel(tW, jW) <= 1e-9 and rel(tx, jx) <= 1e-9, case


@pytest.mark.backend("torch")
def test_torch_keeps_only_the_pair_z0_and_the_step_counts():
    """What the reversible gradient saves, whatever the steps and whichever iterate is returned:
    the final pair and z0 (B, n), beta, the per-sample iterations and best steps, and the
    one-element anchor of the second-derivative check; nothing of f's graph at z*."""
    import torch

    torch.manual_seed(0)
    W = (0.5 * torch.randn(8, 8, dtype=torch.float64) / 8**0.5).requires_grad_()
    x = torch.randn(3, 8, dtype=torch.float64)
    expected = sorted([(3, 8)] * 3 + [(3,)] * 2 + [(), (1,)])
    for tol, steps in ((1e-300, 10), (1e-300, 40), (1e-3, 40)):
        saved = {}

        def pack(t, saved=saved):
            saved[t.untyped_storage().data_ptr()] = tuple(t.shape)
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            sol = deqcore.solve(lambda z, x: torch.tanh(z @ W.T + x), x, solver="reversible",
                                grad="reversible", tol=tol, max_iter=steps,
                                grad_options={"on_fail": "ignore"})
        assert sorted(saved.values()) == expected, (tol, steps, sorted(saved.values()))
        sol.z.sum().backward()
