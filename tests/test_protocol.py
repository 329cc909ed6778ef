"""The backend protocol's operations, checked directly on every backend."""

from __future__ import annotations

import numpy as np
import pytest

import deqcore


def test_backends_implement_the_protocol(h):
    assert isinstance(h.backend, deqcore.Backend)
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
