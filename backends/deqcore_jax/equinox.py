"""A deep equilibrium layer as an Equinox module: :class:`DEQ`. Importing this module imports
Equinox (``pip install 'deqcore[equinox]'``); ``import deqcore_jax`` does not."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import equinox as eqx

import deqcore

from ._modules import SolveSettings, module_parts, solve_layer

__all__ = ["DEQ"]


class DEQ(eqx.Module):
    """The fixed point ``z* = layer(z*, x)`` of an Equinox layer, found by :func:`deqcore.solve`.

    ``layer`` is called as ``layer(z, x)`` (an :class:`equinox.Module`, whose arrays are this
    module's parameters like any other leaf; any callable of ``(z, x)`` works). ``**settings``
    are keyword arguments of :func:`deqcore.solve` (``solver``, its options, ``tol``,
    ``max_iter``, ``grad``, ``grad_options``, ``batched`` ...), checked here as ``solve`` checks
    them: unknown names are a ``TypeError``, bad values a ``ValueError``; what is not given keeps
    ``solve``'s default. ``f``, ``x``, ``z0`` and ``backend`` are the module's own.
    ``inference_settings`` (a dict, merged over ``settings``) apply when ``inference`` is True,
    for example more iterations and a tighter ``tol`` at evaluation; the flag is Equinox's
    (``eqx.nn.inference_mode(model)`` sets it, as for ``eqx.nn.Dropout``).

    Calling the module returns ``(z_star, solution)``: the fixed point, differentiable by the
    gradient mode ``grad`` with respect to ``x`` and the layer's arrays (``eqx.filter_grad``,
    ``eqx.filter_value_and_grad``), and the :class:`deqcore.Solution` (residuals, ``nfe``,
    status per sample). It works under ``eqx.filter_jit``, under ``jax.vmap`` with
    ``batched=False`` (each mapped sample is one state), and with
    ``eqx.tree_serialise_leaves`` / ``eqx.tree_deserialise_leaves`` (the settings are static
    fields, fixed by the module the leaves are read into).
    """

    layer: Callable[[Any, Any], Any]
    settings: SolveSettings = eqx.field(static=True)
    inference_settings: SolveSettings = eqx.field(static=True)
    inference: bool

    def __init__(self, layer: Callable[[Any, Any], Any], *, inference: bool = False,
                 inference_settings: Mapping[str, Any] | None = None, **settings: Any) -> None:
        self.layer, self.settings, self.inference_settings, self.inference = module_parts(
            "deqcore_jax.equinox.DEQ", layer, ("inference", inference), settings, inference_settings)

    def __call__(self, x: Any, z0: Any = None, *,
                 inference: bool | None = None) -> tuple[Any, deqcore.Solution]:
        """``(z_star, solution)`` for the input ``x`` from ``z0`` (default: ``solve``'s, zeros
        shaped like ``x``). ``inference`` overrides the module's flag for this call."""
        use = self.inference if inference is None else inference
        return solve_layer(self.layer, x, z0, self.inference_settings if use else self.settings)
