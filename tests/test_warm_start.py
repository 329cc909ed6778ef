"""deqcore.FixedPointCache: lookup and store, the staleness policy, tuple states, both backends,
and warm-started solves (float64)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
from problems import tanh_deq, tanh_fixed_point

import deqcore

TOL = 1e-11


def _problem(h, seed=0, batch=4, d=6):
    W, U, b, x = tanh_deq(seed, d=d, batch=batch, rho=0.8)
    return h.tanh_layer(W, U, b), h.asarray(x), (W, U, b, x)


def _solve(h, f, x, z0=None, **kw):
    options = {"solver": "anderson", "tol": TOL, "max_iter": 200, "stop_mode": "abs", "grad": None, **kw}
    return deqcore.solve(f, x, h.xp.zeros_like(x) if z0 is None else z0, **options)


def test_lookup_gives_stored_rows_where_they_hit_and_the_default_elsewhere(h):
    f, x, _ = _problem(h)
    cache = deqcore.FixedPointCache(8)
    zeros = h.xp.zeros_like(x)
    z0, hit = cache.lookup([10, 3, 7, 5], like=zeros)
    assert z0 is zeros and hit.tolist() == [False] * 4
    assert cache.lookup([10, 3], like=None)[0] is None
    sol = _solve(h, f, x)
    assert cache.store(np.array([10, 3, 7, 5]), sol) == 4 and len(cache) == 4
    like = h.asarray(np.full((4, 6), 2.0))
    z0, hit = cache.lookup([3, 99, 10, 5], like=like)
    assert hit.tolist() == [True, False, True, True]
    z, got = h.numpy(sol.z), h.numpy(z0)
    np.testing.assert_array_equal(got, np.stack([z[1], np.full(6, 2.0), z[0], z[3]]))
    assert h.backend.is_array(z0) and h.backend.device(z0) == h.backend.device(like)
    z0, _ = cache.lookup([99, 7])  # like=None: zeros where nothing hits
    np.testing.assert_array_equal(h.numpy(z0), np.stack([np.zeros(6), z[2]]))
    assert (cache.lookups, cache.hits) == (12, 4) and cache.hit_rate == 4 / 12
    assert 7 in cache and 99 not in cache
    assert cache.nbytes == (8 + 1) * 6 * 8 + 3 * 8 * 8
    cache.reset_statistics()
    assert np.isnan(cache.hit_rate)


def test_a_warm_started_solve_reaches_the_same_fixed_point_in_fewer_iterations(h):
    """The cached fixed point of slightly different weights (one optimizer step's change) starts
    the next solve: the same fixed point (the reference's) in fewer iterations per sample."""
    f, x, (W, U, b, xn) = _problem(h, seed=3, batch=5, d=8)
    cache = deqcore.FixedPointCache(5)
    keys = np.arange(5)
    cache.store(keys, _solve(h, f, x))
    cache.advance()
    W2 = W + 1e-3 * np.random.default_rng(1).standard_normal(W.shape)
    f2 = h.tanh_layer(W2, U, b)
    cold = _solve(h, f2, x)
    z0, hit = cache.lookup(keys, like=h.xp.zeros_like(x))
    warm = _solve(h, f2, x, z0)
    assert hit.all()
    reference = tanh_fixed_point(W2, U, b, xn)
    for sol in (cold, warm):
        assert h.numpy(sol.converged).all()
        np.testing.assert_allclose(h.numpy(sol.z), reference, atol=1e-10)
    assert (h.numpy(warm.iterations) < h.numpy(cold.iterations)).all()
    assert int(warm.nfe) < int(cold.nfe)


def test_samples_that_did_not_converge_are_not_stored_and_lose_their_entry(h):
    f, x, (W, U, b, xn) = _problem(h)
    keys = [0, 1, 2, 3]
    cache = deqcore.FixedPointCache(4)
    cache.store(keys, _solve(h, f, x))
    short = _solve(h, f, x, h.asarray(np.full((4, 6), 0.5)), max_iter=2)
    assert (h.numpy(short.status) == int(deqcore.Status.MAX_ITER)).all()
    assert cache.store(keys, short) == 0
    assert not cache.lookup(keys)[1].any() and len(cache) == 0
    best = deqcore.FixedPointCache(4, keep="best")
    xb = xn.copy()
    xb[2] = np.nan  # f is NaN for this sample: NONFINITE, never kept
    mixed = _solve(h, f, h.asarray(xb), max_iter=2)
    assert h.numpy(mixed.status).tolist() == [1, 1, 4, 1]
    assert best.store(keys, mixed) == 3
    z0, hit = best.lookup(keys)
    assert hit.tolist() == [True, True, False, True]
    np.testing.assert_array_equal(h.numpy(z0)[[0, 1, 3]], h.numpy(mixed.z)[[0, 1, 3]])


def _converged(h, z):
    """What ``store`` reads of a solution (its ``z`` and ``status``), every sample converged."""
    return SimpleNamespace(z=h.asarray(z), status=h.asarray(np.zeros(len(z)), dtype="int32"))


def test_entries_expire_max_age_updates_after_they_were_stored(h):
    x = np.random.default_rng(0).standard_normal((4, 6))
    cache = deqcore.FixedPointCache(4, max_age=2)
    cache.store([0, 1], _converged(h, x[:2]))
    cache.advance(2)
    cache.store([2, 3], _converged(h, x[2:]))
    assert cache.lookup([0, 1, 2, 3])[1].all()
    cache.advance()
    assert cache.lookup([0, 1, 2, 3])[1].tolist() == [False, False, True, True] and len(cache) == 2
    cache.advance(2)
    assert not cache.lookup([2, 3])[1].any() and len(cache) == 0
    fresh = deqcore.FixedPointCache(4, max_age=0)
    fresh.store([0], _converged(h, x[:1]))
    assert fresh.lookup([0])[1].all()
    fresh.advance()
    assert not fresh.lookup([0])[1].any()


def test_a_full_cache_evicts_the_entry_written_longest_ago(h):
    z = np.random.default_rng(0).standard_normal((4, 6))
    sol = _converged(h, z)
    cache = deqcore.FixedPointCache(3)
    cache.store([1, 2, 3, 4], sol)  # more than fit: the last three rows
    assert cache.lookup([1, 2, 3, 4])[1].tolist() == [False, True, True, True]
    cache.store([2, 2, 5, 2], sol)  # 2 rewritten (its last row), 5 evicts 3, the oldest
    z0, hit = cache.lookup([2, 3, 4, 5])
    assert hit.tolist() == [True, False, True, True]
    np.testing.assert_array_equal(h.numpy(z0)[[0, 3]], z[[3, 2]])
    cache.clear()
    assert len(cache) == 0 and cache.nbytes == 3 * 3 * 8


def test_tuple_states_are_cached_per_array(h):
    rng = np.random.default_rng(4)
    A = [h.asarray(0.3 * rng.standard_normal((6, 6))), h.asarray(0.3 * rng.standard_normal((3, 3)))]
    xs = (h.asarray(rng.standard_normal((4, 2, 3))), h.asarray(rng.standard_normal((4, 3))))
    xp = h.xp

    def f(z, x):
        a, c = z
        mixed = xp.reshape(xp.reshape(a, (-1, 6)) @ A[0], (-1, 2, 3))
        fa = xp.tanh(mixed + x[0] + xp.mean(c, axis=1)[:, None, None])
        return fa, xp.tanh(c @ A[1] + x[1])

    zeros = tuple(xp.zeros_like(v) for v in xs)
    sol = deqcore.solve(f, xs, zeros, tol=TOL, stop_mode="abs", max_iter=100, grad=None)
    cache = deqcore.FixedPointCache(10)
    assert cache.store([5, 6, 7, 8], sol) == 4
    z0, hit = cache.lookup([5, 60, 7, 80], like=zeros)
    assert isinstance(z0, tuple) and hit.tolist() == [True, False, True, False]
    for got, want in zip(z0, sol.z, strict=True):
        want = h.numpy(want)
        np.testing.assert_array_equal(h.numpy(got), np.stack([want[0], 0 * want[1], want[2], 0 * want[3]]))
    warm = deqcore.solve(f, xs, z0, tol=TOL, stop_mode="abs", max_iter=100, grad=None)
    assert h.numpy(warm.iterations)[[0, 2]].max() <= 1 < h.numpy(warm.iterations)[[1, 3]].min()


def test_bad_input_is_a_clear_error(h):
    f, x, _ = _problem(h)
    for kwargs, error, words in [({"capacity": 0}, ValueError, "capacity must be"),
                                 ({"capacity": 2.0}, TypeError, "capacity must be"),
                                 ({"capacity": 2, "max_age": -1}, ValueError, "max_age must be"),
                                 ({"capacity": 2, "keep": "all"}, ValueError, "keep must be one of")]:
        with pytest.raises(error, match=words):
            deqcore.FixedPointCache(**kwargs)
    cache = deqcore.FixedPointCache(8)
    sol = _solve(h, f, x)
    with pytest.raises(TypeError, match="indices must be a 1-D sequence of integers"):
        cache.store([0.0, 1.0, 2.0, 3.0], sol)
    with pytest.raises(TypeError, match="host integers"):
        cache.store(h.asarray([0, 1, 2, 3], dtype="int64"), sol)
    with pytest.raises(ValueError, match="batch of 4, indices 3"):
        cache.store([0, 1, 2], sol)
    cache.store([0, 1, 2, 3], sol)
    with pytest.raises(ValueError, match=r"per-sample shapes \(3,\), the cache holds \(6,\)"):
        cache.lookup([0, 1, 2, 3], like=x[:, :3])
    with pytest.raises(TypeError, match="dtype"):
        cache.lookup([0, 1, 2, 3], like=h.xp.astype(x, h.xp.float32))
    with pytest.raises(ValueError, match="batch of 4, indices 2"):
        cache.lookup([0, 1], like=x)
    with pytest.raises(ValueError, match="updates must be"):
        cache.advance(-1)


@pytest.mark.backend("jax")
def test_jitted_solves_take_and_give_the_cache_rows():
    """The cache lives outside jax.jit: z0 is an input of the compiled solve, its solution an
    output that store reads."""
    import jax
    from conftest import Harness

    h = Harness("jax")
    f, x, _ = _problem(h, batch=5)
    solve = jax.jit(lambda x, z0: _solve(h, f, x, z0))
    cache = deqcore.FixedPointCache(5)
    keys = np.arange(5)
    cold = solve(x, h.xp.zeros_like(x))
    assert cache.store(keys, cold) == 5
    z0, hit = cache.lookup(keys, like=h.xp.zeros_like(x))
    warm = solve(x, z0)
    assert hit.all() and int(warm.steps) <= 1 < int(cold.steps)
    np.testing.assert_allclose(h.numpy(warm.z), h.numpy(cold.z), atol=1e-10)


def test_both_backends_give_the_same_starts(both):
    starts = []
    for h in both:
        f, x, _ = _problem(h, seed=5)
        cache = deqcore.FixedPointCache(3, max_age=1)
        cache.store([4, 5, 6, 7], _solve(h, f, x))
        cache.advance()
        cache.store([9, 5], _solve(h, f, x[:2], max_iter=3))
        starts.append(h.numpy(cache.lookup([4, 5, 6, 7, 9], like=h.asarray(np.ones((5, 6))))[0]))
    np.testing.assert_allclose(starts[0], starts[1], rtol=0, atol=1e-12)
