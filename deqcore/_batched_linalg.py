"""Per-sample linear algebra of the solvers' inner loops: ring products and tiny SPD solves.

Every solver memory is a ring of ``k`` rows per sample, ``(B, k, n)``. Its two products,
``ring_dots`` (``R_b y_b``, one dot per row) and ``ring_combine`` (``w_b^T R_b``), run several
times a step, and the fastest formulation differs by framework (PyTorch CPU: ``bmm``; XLA: a
``dot_general`` without a singleton axis, 3-6x faster than ``matmul`` of a ``(B, 1, n)`` row).
Broyden keeps its two rings in one buffer (B, 2, k, n) and multiplies both at once
(``pair_dots``, ``pair_combine``): XLA then updates the buffer in place, and PyTorch multiplies
views of it without stacking the operands. A namespace may provide its own ``ring_dots``,
``ring_combine``, ``pair_dots`` and ``pair_combine``; deqcore's torch and JAX namespaces do. The
generic versions here are used otherwise.
"""

from __future__ import annotations

from typing import Any


def ring_dots(xp: Any, ring: Any, y: Any) -> Any:
    """``out[b, i] = ring[b, i] . y[b]``: (B, k, n) and (B, n) to (B, k)."""
    fast = getattr(xp, "ring_dots", None)
    if fast is not None:
        return fast(ring, y)
    return xp.matmul(y[:, None, :], xp.matrix_transpose(ring))[:, 0]


def ring_combine(xp: Any, weights: Any, ring: Any) -> Any:
    """``out[b] = sum_i weights[b, i] ring[b, i]``: (B, k) and (B, k, n) to (B, n)."""
    fast = getattr(xp, "ring_combine", None)
    if fast is not None:
        return fast(weights, ring)
    return xp.matmul(weights[:, None, :], ring)[:, 0]


def pair_dots(xp: Any, pairs: Any, a: Any, b: Any) -> tuple[Any, Any]:
    """``(U a, V b)`` per sample for a pair ring ``pairs`` (B, 2, k, n) with ``U = pairs[:, 0]``,
    ``V = pairs[:, 1]``: two (B, k) arrays."""
    fast = getattr(xp, "pair_dots", None)
    if fast is not None:
        return fast(pairs, a, b)
    B, _, k, n = pairs.shape
    out = ring_dots(xp, xp.reshape(pairs, (2 * B, k, n)), xp.reshape(xp.stack([a, b], axis=1), (2 * B, n)))
    out = xp.reshape(out, (B, 2, k))
    return out[:, 0], out[:, 1]


def pair_combine(xp: Any, pairs: Any, wa: Any, wb: Any) -> tuple[Any, Any]:
    """``(wa^T U, wb^T V)`` per sample for a pair ring (B, 2, k, n): two (B, n) arrays."""
    fast = getattr(xp, "pair_combine", None)
    if fast is not None:
        return fast(pairs, wa, wb)
    B, _, k, n = pairs.shape
    weights = xp.reshape(xp.stack([wa, wb], axis=1), (2 * B, k))
    out = ring_combine(xp, weights, xp.reshape(pairs, (2 * B, k, n)))
    out = xp.reshape(out, (B, 2, n))
    return out[:, 0], out[:, 1]


#: The largest system :func:`spd_solve_unrolled` is used for (its code grows as k^3); backends
#: solve larger ones with their LU.
UNROLLED_SPD_MAX = 16


def spd_solve_unrolled(xp: Any, a: Any, b: Any) -> Any:
    """Solve ``a x = b`` for small symmetric positive definite ``a`` (..., k, k), ``b`` (..., k).

    A Cholesky factorisation unrolled over the k x k entries, so every operation is elementwise
    over the batch and a compiler (XLA, Inductor) fuses the whole solve into a few kernels: for
    Anderson's 5 x 5 systems at batch 256 it takes 4 us where a batched LU takes 80 us. Jacobi
    equilibration first, since Anderson's Gram diagonal spans many orders of magnitude. A matrix
    that is not positive definite gives non-finite entries (the square root of a negative pivot),
    which callers detect. Meant for k up to :data:`UNROLLED_SPD_MAX`.
    """
    k = a.shape[-1]
    scale = 1.0 / xp.sqrt(xp.abs(xp.linalg.diagonal(a)))
    s = [scale[..., i] for i in range(k)]
    L: list[list[Any]] = [[None] * k for _ in range(k)]
    for j in range(k):
        acc = a[..., j, j] * s[j] * s[j]
        for p in range(j):
            acc = acc - L[j][p] * L[j][p]
        L[j][j] = xp.sqrt(acc)
        inv = 1.0 / L[j][j]
        for i in range(j + 1, k):
            acc = a[..., i, j] * s[i] * s[j]
            for p in range(j):
                acc = acc - L[i][p] * L[j][p]
            L[i][j] = acc * inv
    y: list[Any] = [None] * k
    for i in range(k):
        acc = b[..., i] * s[i]
        for p in range(i):
            acc = acc - L[i][p] * y[p]
        y[i] = acc / L[i][i]
    x: list[Any] = [None] * k
    for i in reversed(range(k)):
        acc = y[i]
        for p in range(i + 1, k):
            acc = acc - L[p][i] * x[p]
        x[i] = acc / L[i][i]
    return xp.stack(x, axis=-1) * scale


def statistics_dtype(xp: Any, dtype: Any) -> Any:
    """The dtype of residuals and mixing systems for a state of ``dtype``: float32 for
    half-precision states (float16 overflows at 65504; bfloat16 keeps 8 significant bits), the
    state's own dtype otherwise."""
    return xp.float32 if xp.finfo(dtype).bits < 32 else dtype
