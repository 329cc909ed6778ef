"""Training penalties on the equilibrium layer, written once over the backend protocol."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ._capabilities import require_autodiff
from ._inputs import resolve_backend
from ._layer_precision import LayerPrecision
from ._registry import registry
from ._structure import Structure


def jacobian_penalty(f: Callable[[Any, Any], Any], z: Any, x: Any, noise: Any, *,
                     backend: str | None = None, batched: bool = True, f_dtype: Any = None) -> Any:
    """Hutchinson estimate of ``||J||_F^2 / numel``, ``J = df/dz`` at ``z``: the Jacobian
    regularisation of Bai, Koltun and Kolter (2021).

    Returns the scalar ``sum((v^T J)^2) / numel(v)`` with ``v = noise``. For ``v`` with
    independent zero-mean unit-variance entries (standard normal or Rademacher) its expectation is
    ``||J||_F^2 / numel(z)``, the mean squared entry of ``J`` scaled by the state size; one
    vector-Jacobian product per call. Adding ``weight * penalty`` to a training loss keeps the
    layer's Jacobian small, so the forward and backward solves need fewer iterations.

    Args:
        f: the layer, ``f(z, x)`` with the structure of :func:`deqcore.solve`'s ``f`` (an array or a
            tuple of arrays, axis 0 the batch when ``batched``).
        z: where to take the Jacobian, usually ``z*`` of a solve. It is treated as a constant (no
            gradient flows into it); the penalty is differentiable with respect to every array
            ``f`` closes over and to ``x``, so a framework's autodiff trains the parameters on it.
        x: the input injection, passed to ``f`` as is.
        noise: the probe vector ``v``, same structure, shapes and dtype as ``z``. The caller draws
            it (so a run is reproducible, and two backends can use the same draw).
        backend: ``"torch"``, ``"jax"`` or a plugin's backend; inferred from ``z`` if None.
        batched: as in :func:`deqcore.solve` (only changes how shapes are validated here).
        f_dtype: as in :func:`deqcore.solve`: ``f`` gets ``z`` in this half dtype and its output
            is cast up to ``z``'s dtype, in which the penalty is computed.

    Raises:
        ValueError / TypeError: ``noise`` does not match ``z``, or ``f``'s output does not.
    """
    be = resolve_backend(registry(), backend, "jacobian_penalty", {"z": z, "x": x, "noise": noise})
    require_autodiff(be, "jacobian_penalty", "train with the penalty on a backend with autodiff (torch, jax)")
    structure = Structure.of(be, z, batched, what="z")
    probe = Structure.of(be, noise, batched, what="noise")
    if (probe.is_tuple, probe.shapes, probe.dtype) != (structure.is_tuple, structure.shapes, structure.dtype):
        raise ValueError(f"jacobian_penalty: noise has shapes {probe.shapes} ({probe.dtype}); z has "
                         f"{structure.shapes} ({structure.dtype}); draw the noise like z")
    zf = be.stop_gradient(structure.flatten(be, z))
    vf = structure.flatten(be, noise)
    precision = LayerPrecision.of(be, f_dtype, structure)

    def fn(flat: Any) -> Any:
        return precision.evaluate(be, structure, f, flat, x, ref=flat)

    _, pullback = be.vjp(fn, zf, create_graph=True)
    (vjp,) = pullback(vf)
    xp = be.xp
    return xp.sum(vjp * vjp) / (structure.batch * structure.n)
