"""The Equinox and Flax DEQ modules agree with the PyTorch module (``deqcore_torch.DEQ``) holding
the same layer with the same weights: fixed point and gradients (weights and input), float64.
The frameworks are imported by the test, so that the single-framework environments collect (and
deselect) this file without them."""

from __future__ import annotations

import numpy as np
import pytest
from problems import tanh_deq, tanh_layer, two_scale_deq, two_scale_layer

pytestmark = pytest.mark.equivalence

SOLVE = {"solver": "anderson", "tol": 1e-12, "max_iter": 80}


@pytest.mark.parametrize(("framework", "state", "grad", "grad_options"), [
    ("equinox", "array", "implicit", {"tol": 1e-13, "max_iter": 100}),
    ("flax", "tuple", "jfb", None),
    ("flax", "array", "npg", {"k": 3, "lam": 0.6}),
])
def test_module_on_jax_equals_torch_module(framework, state, grad, grad_options):
    import jax.numpy as jnp
    import torch
    from deqcore_torch import DEQ
    from jax_module_layers import build, value_and_grads

    if state == "array":
        W, U, b, x = tanh_deq(seed=11, d=8, batch=3, rho=0.8)
        fn, params, z0 = tanh_layer, {"W": W, "U": U, "b": b}, None
    else:
        fn, (params, x, z0) = two_scale_layer, two_scale_deq(seed=12)
    settings = dict(SOLVE, grad=grad, grad_options=grad_options)
    weights = np.random.default_rng(13).standard_normal(len(z0) if z0 else 1) + 2

    def loss(z, sin):
        leaves = z if isinstance(z, tuple) else (z,)
        return sum(w * (sin(leaf) ** 2).sum() for w, leaf in zip(weights, leaves, strict=True))

    class TorchLayer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weights = torch.nn.ParameterDict({k: torch.tensor(v) for k, v in params.items()})

        def forward(self, z, x_):
            return fn(torch.tanh, dict(self.weights), z, x_)

    torch_module = DEQ(TorchLayer(), **settings)
    tp = dict(torch_module.f.weights)
    tx = torch.tensor(x, requires_grad=True)
    tz0 = None if z0 is None else tuple(torch.tensor(z) for z in z0)
    t_z, _ = torch_module(tx, tz0)
    t_value = loss(t_z, torch.sin)
    t_value.backward()

    model = build(framework, fn, params, **settings)
    jz0 = None if z0 is None else tuple(jnp.asarray(z) for z in z0)
    value, grads, gx = value_and_grads(framework, model, lambda z: loss(z, jnp.sin), jnp.asarray(x), jz0)
    np.testing.assert_allclose(float(value), t_value.item(), rtol=1e-10, atol=0)
    z_star, _ = model(jnp.asarray(x), jz0)
    for jax_leaf, torch_leaf in zip(*(z if isinstance(z, tuple) else (z,) for z in (z_star, t_z)),
                                    strict=True):
        np.testing.assert_allclose(jax_leaf, torch_leaf.detach().numpy(), rtol=0, atol=1e-10)
    for name in params:
        np.testing.assert_allclose(grads[name], tp[name].grad.numpy(), rtol=1e-10, atol=1e-11, err_msg=name)
    np.testing.assert_allclose(gx, tx.grad.numpy(), rtol=1e-10, atol=1e-11)
