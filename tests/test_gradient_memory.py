"""Memory kept for the backward pass, measured the frameworks' own ways.

torch: ``torch.autograd.graph.saved_tensors_hooks`` sees every tensor autograd keeps (including
what a custom ``autograd.Function`` saves, such as GDEQ's ``U``, ``V``); unique storages are
summed. JAX: ``memory_analysis()`` of the compiled gradient function (temporary buffers).
Implicit, JFB, NPG and GDEQ keep the same bytes after 10 and after 40 forward iterations (within
5 %); unroll grows with the iterations and UPG with its k.
"""

from __future__ import annotations

import numpy as np
import pytest
from problems import tanh_deq

import deqcore

D, BATCH = 128, 4
CONSTANT = [("implicit", {}, "anderson"), ("jfb", {}, "anderson"), ("npg", {"k": 5, "lam": 0.5}, "anderson"),
            ("gdeq", {}, "broyden")]


def kept_bytes(h, grad, grad_options, solver, max_iter, memory=6):
    W, U, b, x = tanh_deq(seed=31, d=D, batch=BATCH, rho=0.9, sym=True)
    # tol below reach: every forward runs exactly max_iter steps
    kw = {"solver": solver, "tol": 1e-300, "max_iter": max_iter, "grad": grad,
          "grad_options": grad_options or None}
    if solver == "broyden":
        kw["memory"] = memory
    if h.name == "torch":
        import torch

        Wt = torch.tensor(W, requires_grad=True)
        Ut, bt, xt = torch.tensor(U), torch.tensor(b), torch.tensor(x)
        storages = {}

        def pack(t):
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            sol = deqcore.solve(lambda z, x: torch.tanh(z @ Wt.T + x @ Ut.T + bt), xt, **kw)
            loss = sol.z.sum()
        loss.backward()  # the graph is usable
        assert Wt.grad is not None
        return sum(storages.values())
    import jax
    import jax.numpy as jnp

    def loss(W_):
        return jnp.sum(deqcore.solve(lambda z, x: jnp.tanh(z @ W_.T + x @ U.T + b), jnp.asarray(x), **kw).z)

    compiled = jax.jit(jax.grad(loss)).lower(jnp.asarray(W)).compile()
    return compiled.memory_analysis().temp_size_in_bytes


@pytest.mark.parametrize(("grad", "opts", "solver"), CONSTANT)
def test_backward_memory_does_not_grow_with_forward_iterations(h, grad, opts, solver):
    short, long = (kept_bytes(h, grad, opts, solver, n) for n in (10, 40))
    assert short > 0
    assert abs(long - short) <= 0.05 * short, (short, long)


@pytest.mark.parametrize("solver", ["anderson", "broyden"])
def test_unroll_memory_grows_with_forward_iterations(h, solver):
    short, long = (kept_bytes(h, "unroll", {}, solver, n) for n in (10, 40))
    assert long > 2.5 * short, (short, long)


def test_upg_memory_grows_with_k(h):
    small, large = (kept_bytes(h, "upg", {"k": k, "lam": 0.5}, "anderson", 10) for k in (2, 8))
    step = BATCH * D * 8  # at least one (B, d) float64 array kept per extra recorded step
    assert large - small >= 6 * step, (small, large)


def test_gdeq_keeps_the_broyden_ring(h):
    jfb, gdeq = (kept_bytes(h, g, {}, "broyden", 20) for g in ("jfb", "gdeq"))
    ring = 2 * BATCH * 6 * D * 8  # U and V: (B, m=6, d) float64
    if h.name == "torch":  # saved tensors: exactly the ring on top of JFB's graph
        assert ring <= gdeq - jfb <= ring + BATCH * D * 8, (jfb, gdeq, ring)
    else:  # XLA's temporaries already hold the ring during the forward loop; it stays live
        assert gdeq >= jfb, (jfb, gdeq)
    assert np.isfinite(gdeq)


@pytest.mark.backend("torch")
def test_gdeq_keeps_only_the_ring_slots_in_use():
    """A solve that converges before its ring is full: the backward pass keeps the pairs
    written, not the buffer they were written into (on torch a prefix view would keep it all)."""
    import torch

    W, U, b, x = tanh_deq(seed=32, d=D, batch=BATCH, rho=0.9, sym=True)
    Wt = torch.tensor(W, requires_grad=True)
    Ut, bt, xt = torch.tensor(U), torch.tensor(b), torch.tensor(x)
    kept = {}
    for grad in ("jfb", "gdeq"):
        storages = {}

        def pack(t, storages=storages):
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            sol = deqcore.solve(lambda z, x: torch.tanh(z @ Wt.T + x @ Ut.T + bt), xt, solver="broyden",
                                tol=1e-6, max_iter=50, memory=50, grad=grad)
        kept[grad] = sum(storages.values())
        count = int(sol.solver_state.count)
    assert 0 < count < 25, count  # converged well before the 50 slots
    ring = 2 * BATCH * count * D * 8
    assert ring <= kept["gdeq"] - kept["jfb"] <= ring + BATCH * D * 8, (kept, ring)
