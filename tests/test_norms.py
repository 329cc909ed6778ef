"""The layer normalisation utilities ``deqcore_torch.apply_norm``, ``reset_norm``, ``remove_norm``:
the normalised weights' defining property in float64, gradients to the stored parameters,
``state_dict`` round trips, and a layer that stays one function through a solve.
(Equality with TorchDEQ's own utilities: tests/test_torchdeq_compat.py.)
"""

from __future__ import annotations

import pytest

import deqcore

pytestmark = pytest.mark.backend("torch")


def _net(seed=0):
    import torch
    from torch import nn

    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 5), nn.Conv2d(3, 4, 3), nn.ConvTranspose1d(4, 3, 2),
                         nn.Sequential(nn.Linear(5, 5))).double()


def _rows(weight, dim):
    return weight.movedim(dim, 0).flatten(1)


def test_weight_norm_fixes_each_output_rows_norm_to_g():
    import torch
    from deqcore_torch import apply_norm

    net = _net()
    before = [m.weight.detach().clone() for m in (net[0], net[1], net[2])]
    assert apply_norm(net) == ["0.weight", "1.weight", "2.weight", "3.0.weight"]
    for m, w0, dim in zip((net[0], net[1], net[2]), before, (0, 0, 1), strict=True):
        torch.testing.assert_close(m.weight, w0, rtol=1e-14, atol=0)  # g starts at ||V_row||
        g = m.parametrizations.weight[0].g
        with torch.no_grad():
            g.copy_(torch.linspace(0.5, 2.0, g.numel(), dtype=g.dtype).reshape(g.shape))
        norms = torch.linalg.vector_norm(_rows(m.weight, dim), dim=1)
        torch.testing.assert_close(norms, g.flatten(), rtol=1e-14, atol=0)


def test_spectral_norm_gives_the_target_largest_singular_value():
    import torch
    from deqcore_torch import apply_norm, reset_norm

    net = _net()
    apply_norm(net, "spectral_norm", learn_scale=False, target_norm=0.8, n_power_iterations=5)
    for _ in range(20):
        reset_norm(net)
    for m, dim in zip((net[0], net[1], net[2], net[3][0]), (0, 0, 1, 0), strict=True):
        sigma = torch.linalg.matrix_norm(_rows(m.weight, dim), 2)
        assert abs(float(sigma.detach()) - 0.8) < 1e-10
    # a bound, not a target: clip_value=1 only shrinks weights
    small = _net()
    with torch.no_grad():
        small[0].weight.mul_(0.3 / torch.linalg.matrix_norm(small[0].weight, 2))
    w0 = small[0].weight.detach().clone()
    apply_norm(small, "spectral_norm", learn_scale=False, target_norm=1.0, clip_value=1.0)
    torch.testing.assert_close(small[0].weight, w0, rtol=1e-14, atol=0)


def test_gradients_reach_the_stored_parameters():
    import torch
    from deqcore_torch import apply_norm

    for norm in ("weight_norm", "spectral_norm"):
        net = _net()
        apply_norm(net, norm)
        lin = net[0]
        original, g = lin.parametrizations.weight.original, lin.parametrizations.weight[0].g

        x = torch.randn(4, 6, dtype=torch.float64)

        def loss(v, scale, lin=lin, x=x):
            state = {"parametrizations.weight.original": v, "parametrizations.weight.0.g": scale,
                     "bias": lin.bias}
            return (torch.func.functional_call(lin, state, (x,)) ** 3).sum()

        assert torch.autograd.gradcheck(loss, (original.detach().clone().requires_grad_(),
                                               g.detach().clone().requires_grad_()))
        (lin(x) ** 2).sum().backward()
        assert float(original.grad.abs().max()) > 0 and float(g.grad.abs().max()) > 0


def test_state_dict_round_trip_and_remove_norm():
    import torch
    from deqcore_torch import apply_norm, remove_norm, reset_norm

    net, other = _net(0), _net(1)
    apply_norm(net, "spectral_norm", skip=["3"])
    apply_norm(other, "spectral_norm", skip_prefix=["3"])
    reset_norm(net)
    other.load_state_dict(net.state_dict())
    x = torch.randn(2, 6, dtype=torch.float64)
    for a, b in zip((net[0], net[1], net[2]), (other[0], other[1], other[2]), strict=True):
        torch.testing.assert_close(a.weight, b.weight, rtol=0, atol=0)
        u_a, u_b = a.parametrizations.weight[0].u, b.parametrizations.weight[0].u
        torch.testing.assert_close(u_a, u_b, rtol=0, atol=0)
    torch.testing.assert_close(net[0](x), other[0](x), rtol=0, atol=0)
    normalised = net[1].weight.detach().clone()
    assert remove_norm(net) == ["0.weight", "1.weight", "2.weight"]
    assert isinstance(net[1].weight, torch.nn.Parameter)
    torch.testing.assert_close(net[1].weight, normalised, rtol=0, atol=0)
    assert "1.weight" in net.state_dict() and not any("parametrizations" in k for k in net.state_dict())


def test_the_layer_is_one_function_through_a_solve():
    """Power iteration runs in reset_norm only: reading the weight during a solve leaves it as it
    is (torch's own spectral_norm would iterate at every read in training mode)."""
    import torch
    from deqcore_torch import apply_norm, reset_norm

    torch.manual_seed(1)
    layer = torch.nn.Linear(5, 5).double()
    apply_norm(layer, "spectral_norm", target_norm=0.9, learn_scale=False)
    layer.train()
    reset_norm(layer)
    u = layer.parametrizations.weight[0].u.clone()
    x = torch.randn(3, 5, dtype=torch.float64)
    sol = deqcore.solve(lambda z, x: torch.tanh(layer(z) + x), x, tol=1e-12, max_iter=200, grad=None)
    assert bool(sol.converged.all()) and int(sol.nfe) > 5
    torch.testing.assert_close(layer.parametrizations.weight[0].u, u, rtol=0, atol=0)
    reset_norm(layer)
    assert not torch.equal(layer.parametrizations.weight[0].u, u)
    layer.eval()  # eval mode: no power iteration
    u = layer.parametrizations.weight[0].u.clone()
    reset_norm(layer)
    torch.testing.assert_close(layer.parametrizations.weight[0].u, u, rtol=0, atol=0)


def test_bad_input_is_an_error():
    import torch
    from deqcore_torch import apply_norm

    net = _net()
    with pytest.raises(ValueError, match="norm must be one of"):
        apply_norm(net, "batch_norm")
    with pytest.raises(ValueError, match="n_power_iterations"):
        apply_norm(net, "spectral_norm", n_power_iterations=0)
    with pytest.raises(ValueError, match="has no parameter 'kernel'"):
        apply_norm(net, targets={torch.nn.Conv2d: ("weight", 0), torch.nn.ConvTranspose1d: ("kernel", 0)})
    assert not torch.nn.utils.parametrize.is_parametrized(net[1])  # all checked before any change
    apply_norm(net)
    with pytest.raises(ValueError, match="already parametrized"):
        apply_norm(net)
