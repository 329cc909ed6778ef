"""Batched, restarted, matrix-free GMRES written once over deqcore's backend protocol.

Every row of the (B, n) right-hand side is its own linear system ``A x_b = b_b`` with its own
Krylov basis; ``matvec`` applies the B operators at once to a (B, n) array (one batched call of
``f`` or of a VJP). All shapes are fixed (the basis is a (B, r + 1, n) buffer), loops go through
``backend.while_loop`` and nothing branches on array values in Python, so the solver runs eagerly
on PyTorch and under ``jax.jit`` on JAX.

Per cycle: Arnoldi with classical Gram-Schmidt applied twice (CGS2: two batched products with the
whole basis, as accurate as modified Gram-Schmidt and free of a loop over basis vectors; unused
basis rows are zero, so they project to nothing), Givens rotations that keep the least-squares
residual norm of each sample up to date after every Arnoldi step, and at the end of the cycle one
batched ``backend.linear_solve`` of the triangular (B, r, r) system. A sample stops adding basis
vectors once its residual estimate is below ``rtol * ||b||`` (or its Krylov space is invariant);
its unused columns become identity columns with a zero right-hand side, so the padded system stays
regular and gives them zero weight.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import array_api_compat


class GMRESResult(NamedTuple):
    """The outcome of :func:`gmres`, per sample unless said otherwise.

    ``x`` (B, n) the solution estimate; ``residual`` (B,) the norm of ``b - A x`` (recomputed
    with one extra ``matvec`` per cycle when ``true_residual``, else the Arnoldi estimate);
    ``iterations`` (B,) Krylov iterations that sample used; ``matvecs`` the batched ``matvec``
    calls made (a scalar: a Python int on eager backends, an int array under tracing).
    """

    x: Any
    residual: Any
    iterations: Any
    matvecs: Any


class _Arnoldi(NamedTuple):
    j: Any  # columns built so far in this cycle (scalar)
    V: Any  # (B, r + 1, n) orthonormal basis (rows past a sample's columns are zero)
    H: Any  # (B, r + 1, r) Hessenberg matrix, A V[:, :k] = V H[:, :, :k]
    R: Any  # (B, r, r) H rotated to upper-triangular form
    cs: Any  # (B, r) Givens cosines (1 where no rotation was made)
    sn: Any  # (B, r) Givens sines (0 where no rotation was made)
    gamma: Any  # (B, r + 1) rotated right-hand side beta e_1; |gamma[k]| is the residual norm
    k: Any  # (B,) columns used by each sample
    live: Any  # (B,) samples still adding columns


class _Cycles(NamedTuple):
    x: Any
    rvec: Any  # (B, n) residual b - A x (true or recursively updated)
    iterations: Any
    used: Any  # Krylov iterations spent (scalar; the max_iter budget)
    matvecs: Any


def _norm(xp: Any, a: Any) -> Any:
    return xp.linalg.vector_norm(a, axis=-1)


def _safe(xp: Any, d: Any) -> Any:
    """``d`` where it is positive, 1 elsewhere: a divisor that never makes 0/0 (or NaN/NaN)."""
    return xp.where(d > 0, d, xp.ones_like(d))


def gmres(backend: Any, matvec: Callable[[Any], Any], b: Any, *, restart: int, max_iter: int,
          rtol: float, active: Any = None, true_residual: bool = False) -> GMRESResult:
    """Solve ``A x = b`` row by row from ``x_0 = 0`` with GMRES(``restart``).

    ``matvec(v)`` returns ``A v`` for a (B, n) ``v``. A sample stops when its residual norm is at
    most ``rtol * ||b_b||``; at most ``max_iter`` Krylov iterations (``matvec`` calls inside the
    Arnoldi loop) are spent in all, over ``ceil(max_iter / restart)`` cycles. Rows where
    ``active`` (B,) is False are not solved (their ``x`` is 0); non-finite rows of ``b`` never
    become live, so they cannot spread NaN to other samples. With ``true_residual`` the residual
    ``b - A x`` is recomputed after each cycle (one more ``matvec``), which the next cycle restarts
    from and which is reported; otherwise it is updated from the Arnoldi relation at no cost.
    """
    xp = backend.xp
    dev = array_api_compat.device(b)
    B, n = b.shape
    r = max(1, min(restart, max_iter))
    dtype = b.dtype
    if active is None:
        active = xp.ones((B,), dtype=xp.bool, device=dev)
    target = rtol * _norm(xp, b)
    rows_r1 = xp.arange(r + 1, device=dev)
    rows_r = xp.arange(r, device=dev)
    eye = xp.eye(r, dtype=dtype, device=dev)
    zero_b = xp.zeros((B,), dtype=dtype, device=dev)

    def onehot(rows: Any, i: Any) -> Any:
        return xp.astype(rows == i, dtype)

    def cycle(c: _Cycles) -> _Cycles:
        beta = _norm(xp, c.rvec)
        live0 = active & (beta > target)
        V = xp.zeros((B, r + 1, n), dtype=dtype, device=dev)
        V = backend.set_index(V, 0, xp.where(live0[:, None], c.rvec / _safe(xp, beta)[:, None],
                                             xp.zeros_like(c.rvec)), axis=1)
        gamma = xp.where(live0[:, None], onehot(rows_r1, 0) * beta[:, None],
                         xp.zeros((B, r + 1), dtype=dtype, device=dev))
        state = _Arnoldi(
            j=0, V=V, H=xp.zeros((B, r + 1, r), dtype=dtype, device=dev),
            R=xp.zeros((B, r, r), dtype=dtype, device=dev),
            cs=xp.ones((B, r), dtype=dtype, device=dev), sn=xp.zeros((B, r), dtype=dtype, device=dev),
            gamma=gamma, k=xp.zeros((B,), dtype=xp.int32, device=dev), live=live0,
        )
        budget = max_iter - c.used

        def cond(s: _Arnoldi) -> Any:
            return xp.any(s.live) & (s.j < r) & (s.j < budget)

        def body(s: _Arnoldi) -> _Arnoldi:
            j, live = s.j, s.live
            w = matvec(s.V[:, j])
            # CGS2 against the whole basis (rows past column j are zero)
            h1 = xp.matmul(s.V, w[:, :, None])[:, :, 0]
            w = w - xp.matmul(h1[:, None, :], s.V)[:, 0]
            h2 = xp.matmul(s.V, w[:, :, None])[:, :, 0]
            w = w - xp.matmul(h2[:, None, :], s.V)[:, 0]
            hn = _norm(xp, w)
            e_j, e_next = onehot(rows_r1, j), onehot(rows_r1, j + 1)
            hcol = xp.where(live[:, None], h1 + h2 + e_next * hn[:, None], xp.zeros_like(h1))
            v_next = xp.where((live & (hn > 0))[:, None], w / _safe(xp, hn)[:, None], xp.zeros_like(w))
            H = backend.set_index(s.H, j, hcol, axis=2)
            V = backend.set_index(s.V, j + 1, v_next, axis=1)

            # apply the rotations of the previous columns (0 .. j-1) to the new column
            def rot_cond(t: Any) -> Any:
                return t[0] < j

            def rot_body(t: Any) -> Any:
                i, h = t
                ei, ei1 = onehot(rows_r1, i), onehot(rows_r1, i + 1)
                sel = onehot(rows_r, i)
                ci, si = xp.sum(s.cs * sel, axis=-1), xp.sum(s.sn * sel, axis=-1)
                hi, hi1 = xp.sum(h * ei, axis=-1), xp.sum(h * ei1, axis=-1)
                h = h + ei * (ci * hi + si * hi1 - hi)[:, None] + ei1 * (ci * hi1 - si * hi - hi1)[:, None]
                return i + 1, h

            _, hrot = backend.while_loop(rot_cond, rot_body, (0, hcol))
            # the new rotation zeroes the subdiagonal entry h[j+1, j]
            a, bb = xp.sum(hrot * e_j, axis=-1), xp.sum(hrot * e_next, axis=-1)
            den = xp.sqrt(a * a + bb * bb)
            turn = live & (den > 0)
            c_j = xp.where(turn, a / _safe(xp, den), xp.ones_like(a))
            s_j = xp.where(turn, bb / _safe(xp, den), zero_b)
            hrot = hrot - e_j * a[:, None] - e_next * bb[:, None] + e_j * (c_j * a + s_j * bb)[:, None]
            R = backend.set_index(s.R, j, hrot[:, :r], axis=2)
            sel_j = onehot(rows_r, j)
            cs = s.cs + sel_j * (c_j - 1.0)[:, None]
            sn = s.sn + sel_j * s_j[:, None]
            g_j = xp.sum(s.gamma * e_j, axis=-1)
            gamma = s.gamma + e_j * (c_j * g_j - g_j)[:, None] - e_next * (s_j * g_j)[:, None]
            k = s.k + xp.astype(live, xp.int32)
            # hn == 0: the Krylov space is invariant and this column made the solve exact
            live = live & (xp.abs(s_j * g_j) > target) & (hn > 0)
            return _Arnoldi(j + 1, V, H, R, cs, sn, gamma, k, live)

        s = backend.while_loop(cond, body, state)
        used_cols = rows_r[None, :] < s.k[:, None]
        R = xp.where(used_cols[:, None, :], s.R, eye)
        rhs = xp.where(used_cols, s.gamma[:, :r], xp.zeros_like(s.gamma[:, :r]))
        y = backend.linear_solve(R, rhs)
        x = c.x + xp.matmul(y[:, None, :], s.V[:, :r])[:, 0]
        matvecs = c.matvecs + s.j
        if true_residual:
            rvec = xp.where(active[:, None], b - matvec(x), xp.zeros_like(b))
            matvecs = matvecs + 1
        else:  # b - A x_new = r - A V y = r - V H y (the Arnoldi relation)
            Hy = xp.matmul(s.H, y[:, :, None])[:, :, 0]
            rvec = c.rvec - xp.matmul(Hy[:, None, :], s.V)[:, 0]
        return _Cycles(x, rvec, c.iterations + s.k, c.used + s.j, matvecs)

    def running(c: _Cycles) -> Any:
        return xp.any(active & (_norm(xp, c.rvec) > target)) & (c.used < max_iter)

    start = _Cycles(x=xp.zeros_like(b), rvec=xp.where(active[:, None], b, xp.zeros_like(b)),
                    iterations=xp.zeros((B,), dtype=xp.int32, device=dev), used=0, matvecs=0)
    out = backend.while_loop(running, cycle, start)
    return GMRESResult(out.x, _norm(xp, out.rvec), out.iterations, out.matvecs)
