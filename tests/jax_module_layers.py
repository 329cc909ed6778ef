"""Layers of tests/problems.py as an Equinox module and a Flax NNX module (weights as each
framework's parameters), for the tests of deqcore_jax.equinox and deqcore_jax.flax."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax.numpy as jnp
import numpy as np
from flax import nnx

FRAMEWORKS = ("equinox", "flax")


class EquinoxLayer(eqx.Module):
    params: dict[str, Any]
    fn: Callable[..., Any] = eqx.field(static=True)

    def __call__(self, z, x):
        return self.fn(jnp.tanh, self.params, z, x)


class FlaxLayer(nnx.Module):
    def __init__(self, fn, params):
        self.fn = fn
        self.names = tuple(params)
        for name, value in params.items():
            setattr(self, name, nnx.Param(value))

    def __call__(self, z, x):
        return self.fn(jnp.tanh, {n: getattr(self, n)[...] for n in self.names}, z, x)


def build(framework: str, fn, params: dict[str, np.ndarray], **settings):
    """A DEQ module of ``framework`` around the layer ``fn`` with the weights ``params``."""
    arrays = {k: jnp.asarray(v) for k, v in params.items()}
    if framework == "equinox":
        from deqcore_jax.equinox import DEQ

        return DEQ(EquinoxLayer(arrays, fn), **settings)
    from deqcore_jax.flax import DEQ

    return DEQ(FlaxLayer(fn, arrays), **settings)


def value_and_grads(framework: str, model, loss, x, z0=None, jit: bool = True, of=lambda out: out[0]):
    """``loss(z*)`` (``loss(of((z*, solution)))``) and its gradients (the layer's weights by name,
    and ``x``) through the module, under the framework's jit and gradient transforms."""
    if framework == "equinox":
        run = eqx.filter_value_and_grad(lambda mx: loss(of(mx[0](mx[1], z0))))
        value, (gm, gx) = (eqx.filter_jit(run) if jit else run)((model, x))
        return value, dict(gm.layer.params), gx
    run = nnx.value_and_grad(lambda m, x: loss(of(m(x, z0))), argnums=(0, 1))
    value, (gm, gx) = (nnx.jit(run) if jit else run)(model, x)
    layer = nnx.to_pure_dict(gm)["layer"]
    return value, {n: layer[n] for n in model.layer.names}, gx

