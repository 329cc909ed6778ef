"""The loop's options on every backend: bounded traces, ``check_every``, memory that follows the
steps run, and per-sample freezing that stays exact under all of them."""

from __future__ import annotations

import numpy as np
import pytest
from problems import tanh_deq

import deqcore

SOLVERS = ["fixed_point", "anderson", "broyden"]


def _solve(h, solver, **kw):
    W, U, b, x = tanh_deq(seed=60, d=16, batch=5, sym=True, rho=0.95)
    return h.solve(h.tanh_layer(W, U, b), h.asarray(x), solver=solver, **kw)


@pytest.mark.parametrize("solver", SOLVERS)
def test_trace_length_is_bounded_and_rows_are_steps(h, solver):
    full = _solve(h, solver, tol=1e-8, max_iter=40)
    assert h.numpy(full.rel_trace).shape == (41, 5)
    short = _solve(h, solver, tol=1e-8, max_iter=40, trace=7)
    for name in ("abs_trace", "rel_trace"):
        np.testing.assert_array_equal(h.numpy(getattr(short, name)), h.numpy(getattr(full, name))[:8])
    # the trace never changes the solve itself
    np.testing.assert_array_equal(h.numpy(short.z), h.numpy(full.z))
    np.testing.assert_array_equal(h.numpy(short.status), h.numpy(full.status))
    none = _solve(h, solver, tol=1e-8, max_iter=40, trace=False)
    assert none.abs_trace is None and none.rel_trace is None
    np.testing.assert_array_equal(h.numpy(none.z), h.numpy(full.z))
    assert int(h.numpy(none.nfe)) == int(h.numpy(full.nfe))


@pytest.mark.parametrize("solver", SOLVERS)
def test_huge_max_iter_does_not_size_memory_by_the_limit(h, solver):
    # converges in a few dozen steps with max_iter = 10**9: the trace keeps its default 1000
    # steps, and Broyden's ring grows with the steps run where shapes are dynamic; a static-shape
    # ring must hold min(memory, max_iter) pairs, so there it is a clear error instead
    if h.backend.static_shapes and solver == "broyden":
        with pytest.raises(ValueError, match="memory="):
            _solve(h, solver, tol=1e-6, max_iter=10**9)
        return
    sol = _solve(h, solver, tol=1e-6, max_iter=10**9)
    assert h.numpy(sol.converged).all()
    assert h.numpy(sol.rel_trace).shape == (1001, 5)
    if solver == "broyden":  # one pair per step, trimmed to the pairs written
        assert h.numpy(sol.solver_state.U).shape[1] == int(h.numpy(sol.steps))


@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("k", [2, 5])
def test_check_every_changes_only_the_wasted_evaluations(h, solver, k):
    ref = _solve(h, solver, tol=1e-8, max_iter=40)
    sol = _solve(h, solver, tol=1e-8, max_iter=40, check_every=k)
    for name in ("z", "status", "iterations", "abs_residual", "rel_residual", "rel_trace", "abs_trace"):
        np.testing.assert_array_equal(h.numpy(getattr(sol, name)), h.numpy(getattr(ref, name)), err_msg=name)
    nfe, nfe_ref = int(h.numpy(sol.nfe)), int(h.numpy(ref.nfe))
    assert nfe_ref <= nfe <= nfe_ref + k - 1
    assert int(h.numpy(sol.steps)) == int(h.numpy(ref.steps))


def test_check_every_waste_is_counted(h):
    # converges in s steps: with k = 7 the loop tests at 0, 7, 14, ... and runs to the next test
    ref = _solve(h, "fixed_point", tol=1e-6, max_iter=200)
    steps = int(h.numpy(ref.steps))
    sol = _solve(h, "fixed_point", tol=1e-6, max_iter=200, check_every=7)
    assert int(h.numpy(sol.nfe)) == 1 + -(-steps // 7) * 7


@pytest.mark.parametrize("solver", SOLVERS)
def test_frozen_sample_never_moves_under_check_every(h, solver):
    W, U, b, x = tanh_deq(seed=61, d=16, batch=4, sym=True)
    f, xa = h.tanh_layer(W, U, b), h.asarray(x)
    long = h.solve(f, xa, solver=solver, tol=1e-8, max_iter=80, check_every=3)
    its = h.numpy(long.iterations)
    first = int(np.argmin(its))
    assert its[first] < its.max()
    short = h.solve(f, xa, solver=solver, tol=1e-8, max_iter=int(its[first]))
    np.testing.assert_array_equal(h.numpy(long.z)[first], h.numpy(short.z)[first])
    assert int(h.numpy(long.iterations)[first]) == int(h.numpy(short.iterations)[first])


@pytest.mark.parametrize("option, bad", [("check_every", 0), ("check_every", 1.5), ("check_every", "3"),
                                         ("trace", -1), ("trace", 2.0), ("trace", "all"),
                                         ("compile", ""), ("compile", 1)])
def test_loop_options_are_validated(h, option, bad):
    W, U, b, x = tanh_deq(seed=62)
    with pytest.raises(ValueError, match=option):
        deqcore.solve(h.tanh_layer(W, U, b), h.asarray(x), **{option: bad})


def test_compile_mode_names_are_checked(h):
    W, U, b, x = tanh_deq(seed=62)
    with pytest.raises(ValueError, match="mode"):
        deqcore.solve(h.tanh_layer(W, U, b), h.asarray(x), compile="fastest")


def test_compile_on_a_backend_without_a_compiled_mode_is_a_clear_error(h, monkeypatch):
    W, U, b, x = tanh_deq(seed=63)
    monkeypatch.setattr(type(h.backend), "compiled", None)
    with pytest.raises(TypeError, match="has no compiled mode"):
        deqcore.solve(h.tanh_layer(W, U, b), h.asarray(x), compile=True)
