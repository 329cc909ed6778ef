"""TorchDEQ's migration path: a model written in TorchDEQ's style gives the same fixed point and
gradients with ``from deqcore_torch.compat import get_deq`` as with ``from torchdeq import get_deq``.

TorchDEQ 0.1.0 is the reference: the torch tox env installs it, and a missing TorchDEQ fails
these tests. torch and torchdeq are imported inside the tests, so the file is collected (and
deselected) where torch is absent.
"""

from __future__ import annotations

import warnings

import pytest

pytestmark = pytest.mark.backend("torch")

D, B = 6, 4
# both solvers converge far below these; the tolerances of the comparison are 1e-6 and 1e-5
TIGHT = {"f_tol": 1e-11, "f_max_iter": 120, "b_tol": 1e-11, "b_max_iter": 200}


def _model(get_deq, seed=3, **deq_args):
    """A small DEQ classifier in TorchDEQ's style: the layer closes over the injection."""
    import torch
    from torch import nn

    class Layer(nn.Module):
        def __init__(self):
            super().__init__()
            self.mix = nn.Linear(D, D)
            self.inject = nn.Linear(D, D)

        def forward(self, z, x):
            return torch.tanh(self.mix(z) + self.inject(x))

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = Layer()
            self.deq = get_deq(**deq_args)
            self.head = nn.Linear(D, 3)

        def forward(self, x, **call):
            z_out, info = self.deq(lambda z: self.layer(z, x), torch.zeros_like(x), **call)
            return z_out[-1], info

    torch.manual_seed(seed)
    model = Model().double()
    with torch.no_grad():  # a contraction: ||mix|| = 0.7
        model.layer.mix.weight.mul_(0.7 / torch.linalg.matrix_norm(model.layer.mix.weight, 2))
    return model


def _both(**deq_args):
    from deqcore_torch.compat import get_deq
    from torchdeq import get_deq as torchdeq_get_deq

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _model(torchdeq_get_deq, **deq_args), _model(get_deq, **deq_args)


def _step(model, x):
    """The fixed point, and the gradients of a loss on it (parameters and input)."""
    import torch

    x = x.clone().requires_grad_(True)
    z, info = model(x)
    loss = (model.head(z) ** 2).sum() + torch.sin(z).sum()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    grads["x"] = x.grad.clone()
    return z.detach(), grads, info


def _input():
    import torch

    return torch.randn(B, D, dtype=torch.float64, generator=torch.Generator().manual_seed(5))


MODES = {"ift": {"ift": True}, "phantom1": {"grad": 1}, "phantom5": {"grad": 5, "tau": 0.6}}


@pytest.mark.parametrize("mode", sorted(MODES))
@pytest.mark.parametrize("solver", ["fixed_point_iter", "anderson", "broyden"])
def test_swapping_the_import_gives_the_same_fixed_point_and_gradients(solver, mode):
    import torch

    reference, ours = _both(f_solver=solver, b_solver=solver, **TIGHT, **MODES[mode])
    x = _input()
    z_ref, g_ref, info_ref = _step(reference, x)
    z, g, info = _step(ours, x)
    assert float(info["abs_lowest"].max()) < 1e-10  # converged: the comparison is meaningful
    torch.testing.assert_close(z, z_ref, rtol=0, atol=1e-6)
    assert set(g) == set(g_ref) and set(info) == set(info_ref)
    for name in g:
        scale = 1.0 + float(g_ref[name].abs().max())
        torch.testing.assert_close(g[name], g_ref[name], rtol=0, atol=1e-5 * scale, msg=name)
    # the gradient is not the trivial one: it moves every parameter of the layer
    assert all(float(g[n].abs().max()) > 1e-3 for n in ("layer.mix.weight", "layer.inject.weight", "x"))


@pytest.mark.parametrize("solver", ["fixed_point_iter", "anderson", "broyden"])
def test_eval_mode_solves_with_the_eval_budget_and_no_gradient(solver):
    import torch

    reference, ours = _both(f_solver=solver, f_tol=1e-11, f_max_iter=4, eval_f_max_iter=120)
    reference.eval()
    ours.eval()
    x = _input()
    with torch.no_grad():
        z_ref, _ = reference(x)
    z, info = ours(x)
    assert not z.requires_grad
    torch.testing.assert_close(z, z_ref, rtol=0, atol=1e-6)
    assert float(info["abs_lowest"].max()) < 1e-10  # 4 evaluations would not get there
    ours.train()
    z_short, _ = ours(x)
    assert float((z_short - z).abs().max()) > 1e-4


def test_list_states_in_mdeq_style():
    """``z_init`` a list of tensors, ``func`` taking and returning them as in TorchDEQ's MDEQ."""
    import torch
    from deqcore_torch.compat import get_deq
    from torchdeq import get_deq as torchdeq_get_deq

    x = _input()
    w = torch.randn(D, D, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    w = (0.4 * w / torch.linalg.matrix_norm(w, 2)).requires_grad_(True)

    def func(a, b):
        return [torch.tanh(b @ w + x), torch.tanh(0.5 * a @ w.T - x)]

    out = []
    for factory in (torchdeq_get_deq, get_deq):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            deq = factory(f_solver="anderson", ift=True, **TIGHT)
        (z,), _ = deq(func, [torch.zeros_like(x), torch.zeros_like(x)])
        (gw,) = torch.autograd.grad(sum(t.square().sum() for t in z), w)
        out.append((z, gw))
    (z_ref, gw_ref), (z, gw) = out
    assert isinstance(z, list) and len(z) == 2
    for a, b in zip(z, z_ref, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    torch.testing.assert_close(gw, gw_ref, rtol=0, atol=1e-5)


def test_unknown_and_unsupported_arguments_are_errors():
    import argparse

    from deqcore_torch.compat import ARGUMENTS, get_deq
    from torchdeq.utils import add_deq_args

    with pytest.raises(TypeError, match="f_max_iters"):
        get_deq(f_max_iters=10)
    with pytest.raises(TypeError, match="solver"):
        get_deq({"f_solver": "anderson"}, solver="anderson")
    with pytest.raises(ValueError, match="increasing"):
        get_deq(indexing=[9, 4])
    with pytest.raises(ValueError, match="after the second evaluation"):
        get_deq(n_states=10, f_max_iter=10)  # a state at f evaluation 1
    with pytest.raises(ValueError, match="end at f_max_iter"):
        get_deq(indexing=[5, 50], f_max_iter=40)
    with pytest.raises(ValueError, match="phantom gradient steps"):
        get_deq(n_states=3, grad=[1, 2, 3])
    with pytest.raises(ValueError, match="not supported"):
        get_deq(sup_gap=2)
    with pytest.raises(ValueError, match="f_solver"):
        get_deq(f_solver="newton")
    # every setting of TorchDEQ's argument parser and of its get_deq is a known name
    parser = argparse.ArgumentParser()
    add_deq_args(parser)
    defaults = vars(parser.parse_args([]))
    assert set(defaults) | {"core", "no_stat"} == set(ARGUMENTS)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        deq = get_deq(argparse.Namespace(**defaults))
    import torch

    with pytest.raises(TypeError, match="m_size"):
        deq(lambda z: 0.5 * z, torch.ones(2, 3), solver_kwargs={"m_size": 3})
    with pytest.raises(ValueError, match="sradius_mode"):
        deq(lambda z: 0.5 * z, torch.ones(2, 3), sradius_mode=True)


def _states_and_gradient(model, x, scale):
    """The returned states and the gradient of a loss on all of them, for the layer's ``mix``
    scaled to spectral norm ``scale``."""
    import torch

    with torch.no_grad():
        model.layer.mix.weight.mul_(scale / torch.linalg.matrix_norm(model.layer.mix.weight, 2))
    z_out, _ = model.deq(lambda z: model.layer(z, x), torch.zeros_like(x))
    sum(i * torch.sin(z).sum() for i, z in enumerate(z_out, start=1)).backward()
    return [z.detach() for z in z_out], model.layer.mix.weight.grad


@pytest.mark.parametrize(("core", "ift"), [("indexing", False), ("indexing", True), ("sliced", False)])
def test_correction_states_equal_torchdeqs_near_the_fixed_point(core, ift):
    """n_states=3 in f_max_iter=30: the states at f evaluations 10, 20, 30, each with its phantom
    gradient (the last with ift's, when on). Close to the fixed point the value differences the
    module warns about vanish."""
    import torch
    from deqcore_torch.compat import get_deq
    from torchdeq import get_deq as torchdeq_get_deq

    x = _input()
    settings = {"core": core, "ift": ift, "n_states": 3, "f_max_iter": 30, "grad": 2, "tau": 0.8,
                "b_tol": 1e-12, "b_max_iter": 100}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = _states_and_gradient(_model(torchdeq_get_deq, f_tol=0.0, **settings), x, 0.15)  # never stops
        ours = _states_and_gradient(_model(get_deq, f_tol=1e-300, **settings), x, 0.15)
    assert len(ours[0]) == len(ref[0]) == 3
    for a, b in zip(ours[0], ref[0], strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    torch.testing.assert_close(ours[1], ref[1], rtol=0, atol=1e-5)


def test_correction_states_far_from_the_fixed_point_are_deqcores_documented_values():
    """On a slow contraction the states differ from TorchDEQ's as the warning says: deqcore's
    state for f evaluation s is the iterate of a solve with max_iter = s - 1; TorchDEQ's is
    ``grad`` damped steps (``tau``) from f of it."""
    import torch
    from deqcore_torch import compat
    from torchdeq import get_deq as torchdeq_get_deq

    import deqcore

    x = _input()
    settings = {"core": "indexing", "indexing": [5, 12], "f_max_iter": 20, "grad": 2, "tau": 0.8}
    compat._warned.clear()
    with pytest.warns(compat.TorchDEQCompatWarning, match="step s - 1"):
        ours_model = _model(compat.get_deq, f_tol=1e-300, **settings)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref, _ = _states_and_gradient(_model(torchdeq_get_deq, f_tol=0.0, **settings), x, 0.95)
    ours, _ = _states_and_gradient(ours_model, x, 0.95)
    layer = ours_model.layer
    with torch.no_grad():
        for s, z, z_ref in zip((5, 12, 20), ours, ref, strict=True):
            alone = deqcore.solve(lambda z, _: layer(z, x), None, torch.zeros_like(x), backend="torch",
                                  solver="fixed_point", tol=1e-300, max_iter=s - 1, grad=None)
            torch.testing.assert_close(z, alone.z, rtol=0, atol=1e-12)
            step = layer(z, x)
            for _ in range(2):
                step = step + 0.8 * (layer(step, x) - step)
            torch.testing.assert_close(z_ref, step, rtol=0, atol=1e-12)
            assert (z - z_ref).abs().max() > 1e-6  # the difference the test is about
    with pytest.warns(compat.TorchDEQCompatWarning, match="restarts"):
        evenly = _model(compat.get_deq, f_tol=1e-300, n_states=3, f_max_iter=30)
    # a call's own f_max_iter moves the states, as in TorchDEQ: evaluations 4, 8, 12
    z_out, _ = evenly.deq(lambda z: evenly.layer(z, x), torch.zeros_like(x), solver_kwargs={"f_max_iter": 12})
    assert len(z_out) == 3 and len(evenly.deq.last_solution.correction_states) == 2
    with torch.no_grad():
        alone = deqcore.solve(lambda z, _: evenly.layer(z, x), None, torch.zeros_like(x), backend="torch",
                              solver="fixed_point", tol=1e-300, max_iter=3, grad=None)
    torch.testing.assert_close(z_out[0].detach(), alone.z, rtol=0, atol=1e-12)


def test_differences_warn_once():
    from deqcore_torch import compat

    compat._warned.clear()
    with pytest.warns(compat.TorchDEQCompatWarning, match="hook"):
        compat.get_deq(hook_ift=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        compat.get_deq(hook_ift=True)  # said once already


@pytest.mark.parametrize("norm_type", ["weight_norm", "spectral_norm"])
def test_compat_norms_equal_torchdeq(norm_type):
    """``compat.apply_norm`` / ``reset_norm`` give TorchDEQ's normalised weights and gradients."""
    import copy

    import torch
    import torchdeq.norm as reference_norm
    from deqcore_torch import compat

    torch.manual_seed(0)
    nn = torch.nn
    net = nn.Sequential(nn.Linear(5, 4), nn.Conv2d(3, 4, 3), nn.ConvTranspose2d(4, 2, 3), nn.Linear(4, 4))
    net = net.double()
    ref, ours = copy.deepcopy(net), copy.deepcopy(net)
    settings = {"norm_type": norm_type, "norm_clip": True, "norm_clip_value": 1.5, "sn_n_power_iters": 3}
    reference_norm.apply_norm(ref, filter_out="3", args=settings)
    ref.double()  # TorchDEQ makes spectral norm's scale in the default dtype
    compat.apply_norm(ours, filter_out="3", args=settings)
    for i in range(3):
        if norm_type == "spectral_norm":  # the same starting singular vectors
            ours[i].parametrizations.weight[0].u.copy_(ref[i].weight_u)
            ours[i].parametrizations.weight[0].v.copy_(ref[i].weight_v)
    for _ in range(2):  # two training steps
        reference_norm.reset_norm(ref)
        compat.reset_norm(ours)
        for i in range(3):
            torch.testing.assert_close(ours[i].weight, ref[i].weight, rtol=0, atol=1e-12)
    assert not torch.nn.utils.parametrize.is_parametrized(ours[3])
    for model in (ref, ours):  # a loss that weighs every entry differently
        sum((m.weight ** 2 * torch.arange(m.weight.numel()).reshape(m.weight.shape)).sum()
            for m in model[:3]).backward()
    for i in range(3):
        rescale = ours[i].parametrizations.weight
        torch.testing.assert_close(rescale.original.grad, ref[i].weight_v.grad if norm_type == "weight_norm"
                                   else ref[i].weight_orig.grad, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(rescale[0].g.grad, ref[i].weight_g.grad, rtol=1e-10, atol=1e-12)


def test_the_migration_page_maps_every_argument():
    import re
    from pathlib import Path

    from deqcore_torch.compat import ARGUMENTS

    page = (Path(__file__).resolve().parents[1] / "docs" / "migrating-from-torchdeq.md").read_text()
    table = page.split("## Every argument of `get_deq`")[1].split("\n## ")[0]
    rows = re.findall(r"^\| `(\w+)` \(", table, flags=re.M)
    assert sorted(rows) == sorted(ARGUMENTS) and len(rows) == len(set(rows))
