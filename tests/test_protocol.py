"""The backend protocol's operations, checked directly on every backend."""

from __future__ import annotations

import numpy as np
import pytest

import deqcore


def test_backends_implement_the_protocol(h):
    assert isinstance(h.backend, deqcore.extend.Backend)
    assert h.backend.name == h.name


def test_fori_loop_is_differentiable(h):
    # y_k = tanh(A y_{k-1}) for 5 steps; gradient of sum(y_5) w.r.t. A against finite differences
    rng = np.random.default_rng(50)
    A = 0.5 * rng.standard_normal((4, 4))
    y0 = rng.standard_normal(4)

    def unrolled(A_np):
        y = y0
        for _ in range(5):
            y = np.tanh(A_np @ y)
        return y.sum()

    eps = 1e-6
    fd = np.zeros_like(A)
    for i in range(4):
        for j in range(4):
            E = np.zeros_like(A)
            E[i, j] = eps
            fd[i, j] = (unrolled(A + E) - unrolled(A - E)) / (2 * eps)
    be, xp = h.backend, h.xp

    def loss(A_arr):
        return xp.sum(be.fori_loop(5, lambda i, y: xp.tanh(A_arr @ y), h.asarray(y0)))

    _, pullback = be.vjp(loss, h.asarray(A))
    (grad,) = pullback(h.asarray(1.0))
    np.testing.assert_allclose(h.numpy(grad), fd, rtol=1e-6, atol=1e-9)


def test_vjp_pullback_reusable_and_stop_gradient(h):
    be, xp = h.backend, h.xp
    x = h.asarray([1.0, 2.0, 3.0])
    out, pullback = be.vjp(lambda v: v * v + be.stop_gradient(v) * 10.0, x)
    np.testing.assert_allclose(h.numpy(out), [11.0, 24.0, 39.0])
    for ct in ([1.0, 1.0, 1.0], [0.0, 2.0, 0.0]):  # stop_gradient: no 10 * ct term
        (g,) = pullback(h.asarray(ct))
        np.testing.assert_allclose(h.numpy(g), 2.0 * np.asarray(ct) * h.numpy(x))
    assert xp is be.xp


def test_set_index_and_active_prefix(h):
    be = h.backend
    buf = h.asarray(np.zeros((2, 4, 3)))
    buf = be.set_index(buf, 2, h.asarray(np.ones((2, 3))), axis=1)
    buf = be.set_index(buf, 1, h.asarray(np.full((4, 3), 5.0)), axis=0)
    expected = np.zeros((2, 4, 3))
    expected[:, 2] = 1.0
    expected[1] = 5.0
    np.testing.assert_array_equal(h.numpy(buf), expected)
    prefix = be.active_prefix(buf, 3, axis=1)
    assert prefix.shape[1] == (3 if h.name == "torch" else 4)  # torch: filled prefix; JAX: whole
    np.testing.assert_array_equal(h.numpy(prefix), expected[:, : prefix.shape[1]])


@pytest.mark.parametrize("spd", [False, True])
def test_linear_solve(h, spd):
    rng = np.random.default_rng(51)
    G = rng.standard_normal((3, 5, 20))
    A = G @ G.transpose(0, 2, 1) + 1e-3 * np.eye(5) if spd else rng.standard_normal((3, 5, 5))
    b = rng.standard_normal((3, 5))
    x = h.numpy(h.backend.linear_solve(h.asarray(A), h.asarray(b), symmetric_positive_definite=spd))
    np.testing.assert_allclose(np.einsum("bij,bj->bi", A, x), b, atol=1e-9)
    singular = h.backend.linear_solve(h.asarray(np.zeros((1, 3, 3))), h.asarray(np.ones((1, 3))),
                                      symmetric_positive_definite=spd)
    assert not np.isfinite(h.numpy(singular)).all()  # never raises; non-finite marks it


def test_host_check(h):
    be = h.backend
    be.host_check(h.asarray([False, False], dtype=bool), lambda m: RuntimeError("no"))
    with pytest.raises(ValueError, match=r"bad \[False  True\] 7"):
        be.host_check(h.asarray([False, True], dtype=bool),
                      lambda m, p: ValueError(f"bad {m} {int(p)}"), h.asarray(7.0))


@pytest.mark.parametrize("max_steps, check_every", [(None, 1), (10, 1), (10, 3), (None, 4)])
def test_while_loop_tests_the_condition_every_check_every_bodies(h, max_steps, check_every):
    be = h.backend
    # state (i, tested): the body counts bodies; cond stops once i >= 5 and counts its own calls
    # through the state on JAX (it is traced), so the counts compare bodies run, not host calls
    def cond(s):
        return s[0] < 5

    def body(s):
        return s[0] + 1, s[1]

    out = be.while_loop(cond, body, (0, 0), max_steps, check_every)
    expected = 5 if check_every == 1 else -(-5 // check_every) * check_every
    if max_steps is not None:
        expected = min(expected, max_steps)
    assert int(h.numpy(h.xp.asarray(out[0]))) == expected
    capped = be.while_loop(lambda s: s[0] < 100, body, (0, 0), 7, check_every)
    assert int(h.numpy(h.xp.asarray(capped[0]))) == 7


def test_spd_solve_unrolled_matches_a_dense_solve(h):
    from deqcore._batched_linalg import spd_solve_unrolled

    rng = np.random.default_rng(52)
    G = rng.standard_normal((6, 5, 9)) * np.logspace(0, -6, 5)[None, :, None]  # Anderson-like scales
    gram = G @ G.transpose(0, 2, 1)
    A = gram + 1e-8 * np.einsum("bii->b", gram)[:, None, None] * np.eye(5)
    b = rng.standard_normal((6, 5))
    x = h.numpy(spd_solve_unrolled(h.xp, h.asarray(A), h.asarray(b)))
    np.testing.assert_allclose(x, np.linalg.solve(A, b[..., None])[..., 0], rtol=1e-6)
    indefinite = np.diag([1.0, -1.0, 2.0])[None]
    bad = h.numpy(spd_solve_unrolled(h.xp, h.asarray(indefinite), h.asarray(np.ones((1, 3)))))
    assert not np.isfinite(bad).all()  # not positive definite: non-finite, never a wrong number


@pytest.mark.parametrize("generic", [False, True])
def test_ring_products_match_einsum(h, generic):
    import types

    from deqcore import _batched_linalg as bl

    xp = h.xp
    if generic:  # the namespace without deqcore's fast paths
        fast = ("ring_dots", "ring_combine", "pair_dots", "pair_combine")
        xp = types.SimpleNamespace(**{k: getattr(h.xp, k) for k in dir(h.xp)
                                      if not k.startswith("__") and k not in fast})
    rng = np.random.default_rng(53)
    R, y, w = rng.standard_normal((3, 4, 7)), rng.standard_normal((3, 7)), rng.standard_normal((3, 4))
    P, a, c = rng.standard_normal((3, 2, 4, 7)), rng.standard_normal((3, 7)), rng.standard_normal((3, 4))
    np.testing.assert_allclose(h.numpy(bl.ring_dots(xp, h.asarray(R), h.asarray(y))),
                               np.einsum("bkn,bn->bk", R, y), atol=1e-12)
    np.testing.assert_allclose(h.numpy(bl.ring_combine(xp, h.asarray(w), h.asarray(R))),
                               np.einsum("bk,bkn->bn", w, R), atol=1e-12)
    da, db = bl.pair_dots(xp, h.asarray(P), h.asarray(a), h.asarray(y))
    np.testing.assert_allclose(h.numpy(da), np.einsum("bkn,bn->bk", P[:, 0], a), atol=1e-12)
    np.testing.assert_allclose(h.numpy(db), np.einsum("bkn,bn->bk", P[:, 1], y), atol=1e-12)
    ca, cb = bl.pair_combine(xp, h.asarray(P), h.asarray(w), h.asarray(c))
    np.testing.assert_allclose(h.numpy(ca), np.einsum("bk,bkn->bn", w, P[:, 0]), atol=1e-12)
    np.testing.assert_allclose(h.numpy(cb), np.einsum("bk,bkn->bn", c, P[:, 1]), atol=1e-12)


def test_select_rows_exact_with_non_finite_rows(h):
    new = h.asarray(np.array([[np.nan, 1.0], [2.0, np.inf], [3.0, 4.0]]).repeat(2048, axis=1))
    old = h.asarray(np.array([[5.0, 6.0], [7.0, 8.0], [9.0, 10.0]]).repeat(2048, axis=1))
    for mask in ([True, False, True], [True, True, True], [False, False, False]):
        got = h.numpy(deqcore.extend.select_rows(h.xp, h.asarray(np.array(mask), dtype=bool), new, old))
        expect = np.where(np.array(mask)[:, None], h.numpy(new), h.numpy(old))
        np.testing.assert_array_equal(got, expect)
