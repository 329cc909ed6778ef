"""``deqcore.solve(..., compile=True)`` on PyTorch: the fixed-shape loop compiled by torch.compile.

It must give the eager answers (float64, to rounding), compile each loop body once per shape and
reuse it, contain no graph break of deqcore's own, fall back with a warning when compilation
fails, and leave gradients and per-sample freezing as they are.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from problems import tanh_deq

import deqcore

pytestmark = pytest.mark.backend("torch")

SOLVERS = ["fixed_point", "anderson", "broyden"]
KW = {"tol": 1e-10, "max_iter": 30, "grad": None}


@pytest.fixture
def t():
    from conftest import Harness

    return Harness("torch")


def _problem(t, batch=3, seed=70):
    W, U, b, x = tanh_deq(seed=seed, d=8, batch=batch, sym=True)
    return t.tanh_layer(W, U, b), t.asarray(x)


@pytest.mark.parametrize("solver", SOLVERS)
def test_compiled_solve_equals_eager(t, solver):
    f, x = _problem(t)
    eager = deqcore.solve(f, x, solver=solver, **KW)
    comp = deqcore.solve(f, x, solver=solver, compile=True, **KW)
    np.testing.assert_allclose(t.numpy(comp.z), t.numpy(eager.z), rtol=0, atol=1e-12)
    for name in ("status", "iterations"):
        np.testing.assert_array_equal(t.numpy(getattr(comp, name)), t.numpy(getattr(eager, name)))
    assert int(comp.nfe) == int(eager.nfe)
    np.testing.assert_allclose(t.numpy(comp.rel_trace), t.numpy(eager.rel_trace), rtol=1e-6, atol=1e-14)


def test_compiled_bodies_are_reused(t):
    from deqcore_torch._compiled import STATS

    f, x = _problem(t)
    deqcore.solve(f, x, solver="anderson", compile=True, **KW)  # compiled here or earlier
    graphs, bodies = STATS.graphs, STATS.bodies
    deqcore.solve(f, x, solver="anderson", compile=True, **KW)
    g2, x2 = _problem(t, seed=71)  # new weights and inputs, same code and shapes: no recompile
    deqcore.solve(g2, x2, solver="anderson", compile=True, **KW)
    assert (STATS.graphs, STATS.bodies) == (graphs, bodies)
    f4, x4 = _problem(t, batch=4)  # a new shape is a new body
    deqcore.solve(f4, x4, solver="anderson", compile=True, **KW)
    assert STATS.bodies == bodies + 1 and STATS.graphs == graphs + 1
    assert STATS.fallbacks == 0


@pytest.mark.parametrize("solver", SOLVERS)
def test_loop_body_has_no_graph_break(t, solver, monkeypatch):
    import torch
    import torch._dynamo
    from deqcore_torch import _compiled

    bodies = []
    original = _compiled.CompiledTorchBackend._compile

    def spy(self, body, state):
        bodies.append((body, state))
        return original(self, body, state)

    monkeypatch.setattr(_compiled.CompiledTorchBackend, "_compile", spy)
    f, x = _problem(t)
    deqcore.solve(f, x, solver=solver, compile=True, **KW)
    body, state = bodies[0]
    with torch.no_grad():
        report = torch._dynamo.explain(body)(state)
    assert report.graph_break_count == 0, [b.reason for b in report.break_reasons]
    assert report.graph_count == 1


def test_failed_compilation_runs_eagerly_with_a_warning(t, monkeypatch):
    from deqcore_torch import _compiled

    def broken(fn, **kw):
        def raise_(*a):
            raise RuntimeError("no C++ compiler")
        return raise_

    monkeypatch.setattr(_compiled.torch, "compile", broken)
    monkeypatch.setattr(_compiled, "_FAILED", {})
    monkeypatch.setattr(_compiled, "_CODES", {})
    f, x = _problem(t, batch=5)
    eager = deqcore.solve(f, x, solver="broyden", **KW)
    with pytest.warns(deqcore.CompileWarning, match="no C\\+\\+ compiler"):
        comp = deqcore.solve(f, x, solver="broyden", compile=True, **KW)
    np.testing.assert_allclose(t.numpy(comp.z), t.numpy(eager.z), rtol=0, atol=1e-12)
    with warnings.catch_warnings():  # once per body: the second solve is quiet
        warnings.simplefilter("error", deqcore.CompileWarning)
        deqcore.solve(f, x, solver="broyden", compile=True, **KW)


@pytest.mark.parametrize("grad", ["implicit", "gdeq"])
def test_compiled_forward_keeps_the_gradients(t, grad):
    import torch

    W, U, b, x_np = tanh_deq(seed=72, d=8, batch=3)
    x = t.asarray(x_np)
    grads = []
    for compile_ in (False, True):
        Wt = torch.tensor(W, requires_grad=True)
        f = lambda z, x, Wt=Wt: torch.tanh(z @ Wt.T + x @ t.asarray(U).T + t.asarray(b))  # noqa: E731
        sol = deqcore.solve(f, x, solver="broyden", tol=1e-7, max_iter=30, grad=grad, compile=compile_)
        (g,) = torch.autograd.grad(sol.z.sum(), (Wt,))
        grads.append(g.numpy())
    # GDEQ reads Broyden's (U, V), whose late secant pairs are differences of nearly equal
    # iterates: compiled and eager rounding (fused reductions) differ there at ~1e-8 relative
    np.testing.assert_allclose(grads[1], grads[0], rtol=1e-6, atol=1e-12)


def test_compiled_freezing_and_check_every(t):
    W, U, b, x_np = tanh_deq(seed=73, d=8, batch=4, sym=True)
    f, x = t.tanh_layer(W, U, b), t.asarray(x_np)
    eager = deqcore.solve(f, x, solver="anderson", tol=1e-10, max_iter=30, grad=None)
    comp = deqcore.solve(f, x, solver="anderson", tol=1e-10, max_iter=30, grad=None, compile=True,
                         check_every=4)
    its = t.numpy(eager.iterations)
    assert its.min() < its.max()  # samples stop at different steps
    np.testing.assert_array_equal(t.numpy(comp.iterations), its)
    np.testing.assert_allclose(t.numpy(comp.z), t.numpy(eager.z), rtol=0, atol=1e-12)
    assert int(eager.nfe) <= int(comp.nfe) <= int(eager.nfe) + 3
