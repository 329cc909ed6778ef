"""A deep equilibrium layer as a Flax NNX module: :class:`DEQ`. Importing this module imports
Flax (``pip install 'deqcore[flax]'``); ``import deqcore_jax`` does not.

NNX, not linen: NNX is the API Flax recommends for new code, and it keeps parameters as ordinary
module state (``nnx.Param`` attributes of the layer), which is what a DEQ module wraps."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from flax import nnx

import deqcore

from ._modules import module_parts, solve_layer

__all__ = ["DEQ"]


class DEQ(nnx.Module):
    """The fixed point ``z* = layer(z*, x)`` of a Flax NNX layer, found by :func:`deqcore.solve`.

    ``layer`` is called as ``layer(z, x)`` (an :class:`flax.nnx.Module`, whose ``nnx.Param``
    variables are this module's parameters; any callable of ``(z, x)`` works). ``**settings``
    are keyword arguments of :func:`deqcore.solve` (``solver``, its options, ``tol``,
    ``max_iter``, ``grad``, ``grad_options``, ``batched`` ...), checked here as ``solve`` checks
    them: unknown names are a ``TypeError``, bad values a ``ValueError``; what is not given keeps
    ``solve``'s default. ``f``, ``x``, ``z0`` and ``backend`` are the module's own.
    ``inference_settings`` (a dict, merged over ``settings``) apply when ``deterministic`` is
    True, the flag NNX's ``model.eval()`` sets and ``model.train()`` clears (as for
    ``nnx.Dropout``), for example more iterations and a tighter ``tol`` at evaluation.

    Calling the module returns ``(z_star, solution)``: the fixed point, differentiable by the
    gradient mode ``grad`` with respect to ``x`` and the layer's parameters (``nnx.grad``,
    ``nnx.value_and_grad``), and the :class:`deqcore.Solution` (residuals, ``nfe``, status per
    sample). It works under ``nnx.jit``, and its state round-trips through ``nnx.state`` /
    ``nnx.update`` (and so through ``nnx.to_pure_dict`` and ``flax.serialization``); the
    settings are static, not state.
    """

    def __init__(self, layer: Callable[[Any, Any], Any], *, deterministic: bool = False,
                 inference_settings: Mapping[str, Any] | None = None, **settings: Any) -> None:
        self.layer, self.settings, self.inference_settings, self.deterministic = module_parts(
            "deqcore_jax.flax.DEQ", layer, ("deterministic", deterministic), settings, inference_settings)

    def __call__(self, x: Any, z0: Any = None, *,
                 deterministic: bool | None = None) -> tuple[Any, deqcore.Solution]:
        """``(z_star, solution)`` for the input ``x`` from ``z0`` (default: ``solve``'s, zeros
        shaped like ``x``). ``deterministic`` overrides the module's flag for this call."""
        use = self.deterministic if deterministic is None else deterministic
        return solve_layer(self.layer, x, z0, self.inference_settings if use else self.settings)
