"""Mixed precision: ``f`` in bfloat16 (torch.autocast on the CPU, bfloat16 parameters on JAX) with a
float32 state, residuals, solver updates and implicit adjoint; the trainer's ``precision`` setting.

Tolerances. One evaluation of ``f`` in bfloat16 is exact up to rounding its operands and result to
8 significant bits, a relative error of at most ``2^-8`` each. On the contraction
``f(z) = tanh(W z + x)`` with Lipschitz constant ``L = ||W||_2`` the float32 fixed point ``z*``
and the point the mixed solve stops at (relative residual <= ``tol``) differ by at most
``(tol + c 2^-8) ||f|| / (1 - L)``, ``c = 4`` rounding steps per evaluation (``z``, ``W``, the
product and the output); the gradient inherits the same relative error.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import deqcore

BF16_EPS = 2.0 ** -8
TOL = 1e-2  # above bfloat16's residual floor (about 4e-3 relative)
B, N = 6, 24


def _problem(seed: int = 0) -> tuple[np.ndarray, np.ndarray, float]:
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((N, N))
    w *= 0.4 / np.linalg.norm(w, 2)
    return w.astype(np.float32), rng.standard_normal((B, N)).astype(np.float32), 0.4


def _bound(lipschitz: float) -> float:
    return (TOL + 4 * BF16_EPS) / (1 - lipschitz)


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.ravel(a).astype(np.float64), np.ravel(b).astype(np.float64)
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


@pytest.mark.backend("torch")
def test_torch_autocast_solve_state_float32_f_bfloat16_and_gradient():
    import torch

    w_np, x_np, lip = _problem()
    x = torch.from_numpy(x_np)
    seen = []

    def make_f(w):
        def f(z, x_):
            h = z @ w.T  # autocast: a bfloat16 matmul
            seen.append((z.dtype, h.dtype))
            return torch.tanh(h + x_)

        return f

    w32 = torch.from_numpy(w_np).requires_grad_(True)
    ref = deqcore.solve(make_f(w32), x, torch.zeros(B, N), tol=1e-6, max_iter=100)
    ref.z.sum().backward()
    seen.clear()
    w16 = torch.from_numpy(w_np).requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        sol = deqcore.solve(make_f(w16), x, torch.zeros(B, N), tol=TOL, max_iter=100,
                            f_dtype=torch.bfloat16, grad_options={"tol": TOL})
    assert set(seen) == {(torch.bfloat16, torch.bfloat16)}  # f got bfloat16 and ran in it
    for array in (sol.z, sol.abs_residual, sol.rel_residual, sol.abs_trace):
        assert array.dtype == torch.float32
    assert bool(sol.converged.all())
    scale = float(ref.z.detach().abs().max())
    assert float((sol.z - ref.z).detach().abs().max()) <= _bound(lip) * scale
    sol.z.sum().backward()  # outside autocast, as torch recommends: VJPs replay f's bfloat16 graph
    assert w16.grad.dtype == torch.float32
    assert sol.backward.residual.dtype == np.float32  # the adjoint solve ran in float32
    error = float((w16.grad - w32.grad).norm() / w32.grad.norm())
    assert error <= _bound(lip) and _cosine(w16.grad, w32.grad) >= 1 - _bound(lip) ** 2
    # the Jacobian penalty at the same point: one VJP of f in bfloat16, summed in float32
    noise = torch.from_numpy(np.random.default_rng(2).standard_normal((B, N)).astype(np.float32))
    z = ref.z.detach()
    exact = deqcore.jacobian_penalty(make_f(w32), z, x, noise)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = deqcore.jacobian_penalty(make_f(w16), z, x, noise, f_dtype=torch.bfloat16)
    assert mixed.dtype == torch.float32
    exact, mixed = float(exact.detach()), float(mixed.detach())
    assert abs(mixed - exact) <= 8 * BF16_EPS * exact  # a square of 4 roundings


@pytest.mark.backend("torch")
def test_torch_f_dtype_is_validated_and_autocast_output_without_it_is_an_error():
    import torch

    x = torch.randn(2, 3)
    with pytest.raises(TypeError, match="not narrower"):
        deqcore.solve(lambda z, x_: z, x, torch.zeros(2, 3), f_dtype=torch.float64)
    with pytest.raises(TypeError, match="f_dtype must be None or a real floating"):
        deqcore.solve(lambda z, x_: z, x, torch.zeros(2, 3), f_dtype="bfloat16")
    with pytest.raises(TypeError, match="f_dtype="):
        deqcore.solve(lambda z, x_: (z + x_).bfloat16(), x, torch.zeros(2, 3))
    with pytest.raises(TypeError, match=r"has dtype torch.float16, z0 has torch.float32 \(or f_dtype"):
        deqcore.solve(lambda z, x_: (z + x_).half(), x, torch.zeros(2, 3), f_dtype=torch.bfloat16)


@pytest.mark.backend("jax")
def test_jax_bfloat16_parameters_solve_state_float32_and_gradient():
    import jax
    import jax.numpy as jnp

    w_np, x_np, lip = _problem(1)
    x = jnp.asarray(x_np)
    seen = []

    def run(w, dtype):
        def f(z, x_):
            h = z @ w.astype(dtype).T
            seen.append((z.dtype, h.dtype))
            return jnp.tanh(h + x_.astype(dtype))

        mixed = {} if dtype == jnp.float32 else {"f_dtype": dtype}
        tol = 1e-6 if dtype == jnp.float32 else TOL
        sol = deqcore.solve(f, x, jnp.zeros((B, N), jnp.float32), tol=tol, max_iter=100,
                            grad_options={"tol": tol}, **mixed)
        return sol.z.sum(), sol

    # one compiled forward and backward per precision; f is traced when they are
    step = jax.jit(jax.value_and_grad(run, has_aux=True), static_argnums=1)
    w = jnp.asarray(w_np)
    (_, ref), g32 = step(w, jnp.float32)
    seen.clear()
    (_, sol), g16 = step(w, jnp.bfloat16)
    assert set(seen) == {(jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.bfloat16))}
    for array in (sol.z, sol.abs_residual, sol.rel_residual, sol.abs_trace, g16):
        assert array.dtype == jnp.float32
    assert bool(sol.converged.all())
    assert float(jnp.abs(sol.z - ref.z).max()) <= _bound(lip) * float(jnp.abs(ref.z).max())
    error = float(jnp.linalg.norm(g16 - g32) / jnp.linalg.norm(g32))
    assert error <= _bound(lip) and _cosine(np.asarray(g16), np.asarray(g32)) >= 1 - _bound(lip) ** 2


def _mdeq_batch(root: Path, batch: int):
    from deqcore_models.data import fashion_mnist, to_float_nchw

    data = fashion_mnist(root, limit=batch)
    x = to_float_nchw(data.train_x[:batch], np.array([0.286], np.float32), np.array([0.353], np.float32))
    return x, np.eye(10, dtype=np.float32)[data.train_y[:batch]]


def _flat(grads: dict[str, np.ndarray]) -> np.ndarray:
    return np.concatenate([grads[k].ravel() for k in sorted(grads)])


def _bf16(a: np.ndarray) -> np.ndarray:
    """``a`` rounded to bfloat16 (to nearest, ties to even) and back to float32, in NumPy alone so
    that each framework's environment can run it."""
    bits = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32).astype(np.uint64)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return rounded.astype(np.uint32).view(np.float32).reshape(np.shape(a))


@pytest.mark.backend("torch")
@pytest.mark.parametrize("mode", ["deq", "unrolled"])
def test_torch_mdeq_bfloat16_step_matches_float32_step(mode, data_root):
    """A training step of MDEQ-micro under ``--precision bfloat16`` against the float32 step.

    The yardstick is the float32 step's own sensitivity to bfloat16 rounding: the same float32
    step from weights and images rounded to bfloat16 once. At initialisation the micro MDEQ is
    ill-conditioned (branch 1 starts from z = 0 without injection, so its first GroupNorm sees a
    constant input and differentiates as ``1/sqrt(eps)``; the DEQ solve stops unconverged at a
    relative residual of about 0.2 after 30 steps, in float32 too), so that rounding alone moves
    the gradient's direction by a cosine of 0.90 (unrolled) and 0.76 (DEQ). The bfloat16 step
    rounds at every convolution, not once: its gradient may be up to twice as far from float32's
    (``1 - cos`` at most 2x the yardstick's; measured 0.91 and 0.63), as may the share of entries
    that Adam's first step (``lr sign(g)``) moves the other way. Losses agree to 1e-2 relative
    (bfloat16's ``2^-8`` times the head's modest gain). Every solve kept a float32 state while
    the convolutions of ``f`` ran in bfloat16."""
    import torch
    from deqcore_models._equilibrium_layer import DEQSettings, collect_forward_solves
    from deqcore_models._training_engines import make_engine
    from deqcore_models.families.mdeq import mdeq_task
    from deqcore_models.mdeq import MDEQ_CONFIGS, init_mdeq

    cfg = MDEQ_CONFIGS["micro"]
    params, state = init_mdeq(cfg, 1, 0)
    x, y = _mdeq_batch(data_root, 16)
    if mode == "deq":
        options = {"solver": "anderson", "tol": TOL, "max_iter": 30,
                   "grad_options": {"max_iter": 30, "tol": TOL, "on_fail": "ignore"}}
    else:
        options = {"unrolled": 4}
    runs = {"float32": (params, x, "float32"), "bfloat16": (params, x, "bfloat16"),
            "rounded": ({k: _bf16(v) for k, v in params.items()}, _bf16(x), "float32")}
    out = {}
    for name, (p0, images, precision) in runs.items():
        settings = DEQSettings(**options, precision=precision)
        engine = make_engine("torch", mdeq_task(cfg), p0, state, 0.0)
        grads = _flat(engine.gradients(images, y, None, settings))
        with collect_forward_solves() as solves:
            loss = engine.train_step(images, y, None, settings, 1e-3)["loss"]
        assert all(z.dtype == torch.float32 for s in solves for z in s.z)
        assert len(solves) == (mode == "deq")
        moved = np.sign(_flat(engine.export()[0]) - _flat(p0))
        out[name] = loss, grads, moved
    (loss32, g32, m32), (loss16, g16, m16), (_, g_rounded, m_rounded) = out.values()
    assert abs(loss16 - loss32) <= 1e-2 * abs(loss32)
    _assert_step_close((g32, m32), (g16, m16), (g_rounded, m_rounded))


def _assert_step_close(run32, run16, rounded) -> None:
    """``(flat gradient, signs of the step)`` of the float32 step, the bfloat16 step and the
    float32 step from bfloat16-rounded inputs: the bounds of the MDEQ step tests."""
    (g32, m32), (g16, m16), (g_rounded, m_rounded) = run32, run16, rounded
    assert not np.array_equal(g16, g32)  # the step did run in bfloat16
    assert 1 - _cosine(g16, g32) <= 2 * (1 - _cosine(g_rounded, g32))
    assert np.mean(m16 != m32) <= 2 * np.mean(m_rounded != m32)


@pytest.mark.backend("jax")
def test_jax_float16_on_the_cpu_is_refused():
    from deqcore_models._ops import ops_for
    from deqcore_models.train import ConfigError, TrainConfig

    with pytest.raises(ConfigError, match="float16 needs a GPU and JAX runs on the CPU"):
        TrainConfig(backend="jax", precision="float16")
    with pytest.raises(ValueError, match="'float16' needs a GPU"):
        ops_for("jax").precision("float16").__enter__()


@pytest.mark.backend("jax")
def test_jax_mdeq_bfloat16_step_matches_float32_step(data_root):
    """The torch test's DEQ step on the JAX engine, on a one-branch MDEQ (compiling the two-branch
    model twice would take a minute): gradients by :meth:`JaxEngine.gradients`, the step's signs
    those of Adam's first update (``-lr g / (|g| + eps)``); the loss is the torch test's. Measured:
    cosine 0.982 against the rounding yardstick's 0.990."""
    import jax.numpy as jnp
    from deqcore_models._equilibrium_layer import DEQSettings
    from deqcore_models._training_engines import make_engine
    from deqcore_models.families.mdeq import mdeq_task
    from deqcore_models.mdeq import MDEQConfig, init_mdeq

    cfg = MDEQConfig(channels=(8,), head_channels=(2,), final_channels=16, expansion=2, groups=4,
                     fuse_groups=4, dropout=0.0)
    params, state = init_mdeq(cfg, 1, 0)
    x, y = _mdeq_batch(data_root, 16)
    options = {"solver": "anderson", "tol": TOL, "max_iter": 30,
               "grad_options": {"max_iter": 30, "tol": TOL, "on_fail": "ignore"}}
    out = {}
    for precision in ("float32", "bfloat16"):
        engine = make_engine("jax", mdeq_task(cfg), params, state, 0.0)
        settings = DEQSettings(**options, precision=precision)
        runs = [(params, x)] + ([({k: _bf16(v) for k, v in params.items()}, _bf16(x))]
                                if precision == "float32" else [])
        for name, (p0, images) in zip((precision, "rounded"), runs, strict=False):
            _, s0, extra = engine.export()
            engine.load(p0, s0, extra)  # the same compiled function for the rounded inputs
            grads = _flat(engine.gradients(images, y, None, settings))
            out[name] = grads, np.sign(grads)
        assert engine.params["deq.block0.conv1.v"].dtype == jnp.float32
    _assert_step_close(out["float32"], out["bfloat16"], out["rounded"])


@pytest.mark.backend("torch")
def test_trainer_precision_setting_is_checked():
    from deqcore_models.train import ConfigError, TrainConfig

    assert TrainConfig(precision="bfloat16").deq_settings().precision == "bfloat16"
    with pytest.raises(ConfigError, match="float16 needs a GPU"):
        TrainConfig(precision="float16")
    with pytest.raises(ConfigError, match="precision"):
        TrainConfig(precision="half")
    with pytest.raises(ConfigError, match="on JAX is for model mdeq"):
        TrainConfig(backend="jax", model="transformer", config="micro", dataset="tiny-shakespeare",
                    precision="bfloat16")
