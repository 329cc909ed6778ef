"""Bad input gives a clear error or a flagged Solution, never a silent garbage z*."""

from __future__ import annotations

import numpy as np
import pytest
from problems import tanh_deq, tanh_fixed_point

import deqcore
from deqcore import ConvergenceError, Status
from deqcore.solvers._anderson import mixing_weights

SOLVERS = ["fixed_point", "anderson", "broyden"]


@pytest.mark.parametrize("solver", SOLVERS)
def test_nan_in_x_flags_only_that_sample(h, solver):
    W, U, b, x = tanh_deq(seed=20, d=8, batch=4)
    x[2, 3] = np.nan
    f = h.tanh_layer(W, U, b)
    sol = h.solve(f, h.asarray(x), solver=solver, tol=1e-10, max_iter=100)
    status = h.numpy(sol.status)
    assert status[2] == Status.NONFINITE and not h.numpy(sol.converged)[2]
    assert (status[[0, 1, 3]] == Status.CONVERGED).all()
    assert sol.result is deqcore.Status.NONFINITE
    good = [0, 1, 3]
    np.testing.assert_allclose(h.numpy(sol.z)[good], tanh_fixed_point(W, U, b, x[good]), atol=1e-9)
    assert not np.isfinite(h.numpy(sol.residual)[2])
    with pytest.raises(ConvergenceError, match="x itself contains NaN"):
        h.solve(f, h.asarray(x), solver=solver, tol=1e-10, max_iter=100, throw=True)


@pytest.mark.parametrize("solver", SOLVERS)
def test_f_producing_nan_midway_is_flagged_and_keeps_last_finite_iterate(h, solver):
    xp = h.xp
    W, U, b, x = tanh_deq(seed=21, d=8, batch=3)
    f0 = h.tanh_layer(W, U, b)
    radius = 0.5 * float(np.linalg.norm(tanh_fixed_point(W, U, b, x)[1]))

    def f(z, x):  # sample 1 turns NaN once its state leaves a small ball
        out = f0(z, x)
        bad = xp.linalg.vector_norm(z, axis=-1) > radius
        poison = xp.where(bad & (xp.arange(3) == 1), float("nan"), 0.0)
        return out + poison[:, None]

    sol = h.solve(f, h.asarray(x), solver=solver, tol=1e-10, max_iter=100)
    status = h.numpy(sol.status)
    assert status[1] == Status.NONFINITE
    assert np.isfinite(h.numpy(sol.z)).all()  # the last finite iterate, not NaN
    assert (status[[0, 2]] == Status.CONVERGED).all()


def test_diverging_f_is_flagged(h):
    f = lambda z, x: 2.0 * z + x  # noqa: E731  repelling fixed point z* = -x
    x = h.asarray(np.ones((2, 3)))
    plain = h.solve(f, x, solver="fixed_point", tol=1e-8, max_iter=60)
    assert (h.numpy(plain.status) == Status.DIVERGED).all()
    assert int(h.numpy(plain.steps)) < 60  # frozen when the residual passed 1e6 x the initial one
    with pytest.raises(ConvergenceError, match="DIVERGED.*contraction"):
        h.solve(f, x, solver="fixed_point", tol=1e-8, max_iter=60, throw=True)


@pytest.mark.parametrize("solver", ["anderson", "broyden"])
def test_secant_solvers_find_repelling_fixed_point(h, solver):
    f = lambda z, x: 2.0 * z + x  # noqa: E731  linear: Anderson and Broyden solve it exactly
    x = h.asarray(np.ones((2, 3)))
    sol = h.solve(f, x, solver=solver, tol=1e-8, max_iter=60)
    assert h.numpy(sol.converged).all()
    np.testing.assert_allclose(h.numpy(sol.z), -1.0, atol=1e-7)


def test_divergence_test_can_be_disabled(h):
    f = lambda z, x: 2.0 * z + x  # noqa: E731
    sol = h.solve(f, h.asarray(np.ones((2, 3))), solver="fixed_point", max_iter=30, divergence=None)
    assert (h.numpy(sol.status) == Status.MAX_ITER).all()


def test_wrong_shape_dtype_structure(h):
    xp = h.xp
    x = h.asarray(np.ones((2, 3)))
    with pytest.raises(ValueError, match=r"shape \(2, 4\), z0 has \(2, 3\)"):
        deqcore.solve(lambda z, x: xp.concat([z, z[:, :1]], axis=1), x)
    with pytest.raises(TypeError, match="dtype"):
        deqcore.solve(lambda z, x: xp.astype(z * 0.5, xp.float32), x)
    with pytest.raises(TypeError, match="must return a single array"):
        deqcore.solve(lambda z, x: (z, z), x)
    with pytest.raises(TypeError, match="must return a tuple"):
        deqcore.solve(lambda z, x: z[0], x, (x, x))
    with pytest.raises(ValueError, match="returned 1 arrays, z0 has 2"):
        deqcore.solve(lambda z, x: (z[0],), x, (x, x))


@pytest.mark.backend("torch")
def test_wrong_device_torch():
    import torch

    x = torch.ones(2, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match="device meta"):
        deqcore.solve(lambda z, x: (0.5 * z).to("meta"), x)


def test_options_are_validated(h):
    x = h.asarray(np.ones((2, 3)))
    f = lambda z, x: 0.5 * z + x  # noqa: E731
    with pytest.raises(TypeError, match=r"unknown option 'mem'.*Valid options: beta, lam, memory"):
        deqcore.solve(f, x, solver="anderson", mem=3)
    with pytest.raises(TypeError, match="Valid options: damping"):
        deqcore.solve(f, x, solver="fixed_point", beta=0.5)
    with pytest.raises(ValueError, match="'memory' must be an int >= 1"):
        deqcore.solve(f, x, solver="anderson", memory=0)
    with pytest.raises(ValueError, match="'tol' must be a finite float > 0"):
        deqcore.solve(f, x, tol=-1.0)
    with pytest.raises(ValueError, match="'stop_mode' must be one of 'rel', 'abs'"):
        deqcore.solve(f, x, stop_mode="relative")
    with pytest.raises(ValueError, match="'damping' must be a float in"):
        deqcore.solve(f, x, solver="fixed_point", damping=1.5)
    with pytest.raises(ValueError, match="unknown solver 'newton'; available solvers: anderson, broyden"):
        deqcore.solve(f, x, solver="newton")


@pytest.mark.equivalence
def test_backend_mismatch_and_inference_errors(both):
    import jax.numpy as jnp
    import torch

    f = lambda z, x: 0.5 * z + x  # noqa: E731
    with pytest.raises(TypeError, match=r"backend 'torch' was requested.*\(backend 'jax'\)"):
        deqcore.solve(f, jnp.ones((2, 3)), backend="torch")
    with pytest.raises(TypeError, match=r"backend 'jax' was requested.*torch.Tensor \(backend 'torch'\)"):
        deqcore.solve(f, torch.ones(2, 3), backend="jax")
    with pytest.raises(TypeError, match="cannot infer the backend from ndarray"):
        deqcore.solve(f, np.ones((2, 3)))
    with pytest.raises(ValueError, match="unknown backend 'numpy'"):
        deqcore.solve(f, np.ones((2, 3)), backend="numpy")


def test_unbatched_vector_needs_batched_false(h):
    x = h.asarray(np.ones(3))
    with pytest.raises(ValueError, match="batched=False"):
        deqcore.solve(lambda z, x: 0.5 * z + x, x)
    sol = deqcore.solve(lambda z, x: 0.5 * z + x, x, batched=False, tol=1e-12, max_iter=100)
    np.testing.assert_allclose(h.numpy(sol.z), 2.0 * np.ones(3), atol=1e-10)


def test_anderson_singular_system(h):
    xp = h.xp
    rng = np.random.default_rng(22)
    G = rng.standard_normal((2, 4, 6))
    G[:, 2] = G[:, 1]  # duplicate residuals: G G^T is exactly singular
    valid = h.asarray(np.ones(4, dtype=bool), dtype=bool)
    alpha, singular = mixing_weights(h.backend, h.asarray(G @ G.transpose(0, 2, 1)), 0.0, valid)
    assert not h.numpy(singular).any()  # the eps floor keeps the weights bounded
    np.testing.assert_allclose(h.numpy(xp.sum(alpha, axis=-1)), 1.0, atol=1e-10)
    assert np.abs(h.numpy(alpha)).max() < 1e6
    zero = h.asarray(np.zeros((2, 4, 4)))
    _, singular = mixing_weights(h.backend, zero, 0.0, valid)
    assert h.numpy(singular).all()  # all-zero window: no finite weights, flagged


def test_anderson_without_regularisation_on_rank_deficient_history(h):
    rng = np.random.default_rng(23)
    d = 4
    A = 0.5 * np.linalg.qr(rng.standard_normal((d, d)))[0]
    c = rng.standard_normal(d)
    f = h.affine_layer(A, c)
    x = h.asarray(rng.standard_normal((3, d)))
    # memory > d: the residual window becomes linearly dependent before convergence
    sol = h.solve(f, x, solver="anderson", memory=8, lam=0.0, tol=1e-13, max_iter=60)
    exact = np.linalg.solve(np.eye(d) - A, (h.numpy(x) + c).T).T
    assert h.numpy(sol.converged).all()
    np.testing.assert_allclose(h.numpy(sol.z), exact, atol=1e-11)


def test_broyden_zero_denominator_is_skipped_and_counted(h):
    x = h.asarray(np.ones((2, 3)))
    f = lambda z, x: z + x  # noqa: E731  g = x is constant: every secant denominator is zero
    sol = h.solve(f, x, solver="broyden", tol=1e-8, max_iter=10)
    assert (h.numpy(sol.status) == Status.MAX_ITER).all()
    assert np.isfinite(h.numpy(sol.z)).all()
    assert (h.numpy(sol.solver_state.breakdowns) > 0).all()
    assert np.abs(h.numpy(sol.solver_state.U)).max() == 0.0  # nothing non-finite was stored


def test_throw_reports_max_iter(h):
    W, U, b, x = tanh_deq(seed=24)
    with pytest.raises(ConvergenceError, match=r"4 of 4 samples did not converge \(4 MAX_ITER\).*max_iter"):
        h.solve(h.tanh_layer(W, U, b), h.asarray(x), tol=1e-12, max_iter=2, throw=True)


@pytest.mark.backend("jax")
def test_throw_under_jax_jit():
    import jax
    from conftest import Harness

    h = Harness("jax")
    W, U, b, x = tanh_deq(seed=25)
    f = h.tanh_layer(W, U, b)
    run = jax.jit(lambda x, it: deqcore.solve(f, x, tol=1e-10, max_iter=3, throw=True).z)
    with pytest.raises(Exception, match="did not converge"):
        jax.block_until_ready(run(h.asarray(x), 0))
    ok = jax.jit(lambda x: deqcore.solve(f, x, tol=1e-10, max_iter=100, throw=True).z)(h.asarray(x))
    np.testing.assert_allclose(np.asarray(ok), tanh_fixed_point(W, U, b, x), atol=1e-9)


# --- reduced precision -----------------------------------------------------------------------

HALF = ["bfloat16", "float16"]
#: unit roundoff of each half dtype: the accuracy a state of that dtype can hold
ROUNDOFF = {"bfloat16": 2.0**-8, "float16": 2.0**-11}


def _cast(h, a, dtype):
    """A NumPy array as a ``dtype`` array of ``h``'s framework (bfloat16 included)."""
    if h.name == "torch":
        import torch

        return torch.from_numpy(np.asarray(a, dtype=np.float32)).to(getattr(torch, dtype))
    import jax.numpy as jnp

    return jnp.asarray(np.asarray(a, dtype=np.float32), dtype=getattr(jnp, dtype))


def _half_layer(h, W, U, b, dtype):
    Wh, Uh, bh = (_cast(h, a, dtype) for a in (W, U, b))
    return lambda z, x: h.xp.tanh(z @ Wh.T + x @ Uh.T + bh)


def _half_grads(h, weights, dtype, grad, solver, **kw):
    """dL/dW (float64 NumPy) of L = sum(c * z*) solved with the state in ``dtype``."""
    W, U, b, x = weights
    c = np.random.default_rng(99).standard_normal(x.shape)
    Uh, bh, xh = (_cast(h, a, dtype) for a in (U, b, x))
    if h.name == "torch":
        import torch

        Wt = _cast(h, W, dtype).requires_grad_(True)
        sol = deqcore.solve(lambda z, x: torch.tanh(z @ Wt.T + x @ Uh.T + bh), xh, solver=solver,
                            grad=grad, **kw)
        (sol.z.float() * torch.from_numpy(c).float()).sum().backward()
        return Wt.grad.float().numpy().astype(np.float64)
    import jax
    import jax.numpy as jnp

    def loss(W_):
        sol = deqcore.solve(lambda z, x: jnp.tanh(z @ W_.T + x @ Uh.T + bh), xh, solver=solver,
                            grad=grad, **kw)
        return jnp.sum(sol.z.astype(jnp.float32) * c)

    return np.asarray(jax.grad(loss)(_cast(h, W, dtype)), dtype=np.float64)


def _reference_grads(weights, adjoint):
    """dL/dW in float64 from the adjoint of each sample: exact (``"implicit"``) or ``"jfb"``."""
    W, U, b, x = weights
    c = np.random.default_rng(99).standard_normal(x.shape)
    z = tanh_fixed_point(W, U, b, x)
    s = 1.0 - np.tanh(z @ W.T + x @ U.T + b) ** 2
    d = W.shape[0]
    if adjoint == "jfb":
        u = c
    else:
        u = np.stack([np.linalg.solve((np.eye(d) - s[i][:, None] * W).T, c[i]) for i in range(len(x))])
    return (u * s).T @ z


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("solver", SOLVERS)
def test_half_precision_solve_matches_the_float64_fixed_point(h, dtype, solver):
    W, U, b, x = tanh_deq(seed=30, d=32, batch=6, rho=0.8)
    tol = 4 * ROUNDOFF[dtype]
    f = _half_layer(h, W, U, b, dtype)
    sol = h.solve(f, _cast(h, x, dtype), solver=solver, tol=tol, max_iter=100)
    assert str(sol.z.dtype).endswith(dtype)
    # statistics are float32 sums over the half-precision values the loop saw (a half-precision
    # norm would be off by up to 2**-9 for bfloat16); the converging iterate is the last one
    for name in ("abs_residual", "rel_residual", "abs_trace", "rel_trace"):
        assert str(getattr(sol, name).dtype).endswith("float32"), name
    assert h.numpy(sol.converged).all() and sol.result is deqcore.Status.CONVERGED
    z = h.numpy(sol.z).astype(np.float64)
    np.testing.assert_array_equal(h.numpy(sol.solver_state.z), h.numpy(sol.z))
    fz = h.numpy(sol.solver_state.fz).astype(np.float64)
    abs_res = np.linalg.norm(fz - z, axis=-1)
    # XLA may keep f's float32 values unrounded inside its loop (excess precision)
    rtol = 1e-5 if h.name == "torch" else ROUNDOFF[dtype]
    np.testing.assert_allclose(h.numpy(sol.abs_residual), abs_res, rtol=rtol)
    np.testing.assert_allclose(h.numpy(sol.rel_residual), abs_res / np.linalg.norm(fz, axis=-1), rtol=rtol)
    assert sol.summary().startswith(f"{solver}: CONVERGED, 6/6 converged")
    # contraction rate <= 0.8: ||z - z*|| <= ||f(z) - z|| / (1 - 0.8), plus the rounding of z
    ref = tanh_fixed_point(W, U, b, x)
    err = np.linalg.norm(z - ref, axis=-1) / np.linalg.norm(ref, axis=-1)
    assert err.max() <= tol / (1 - 0.8) + ROUNDOFF[dtype], err.max()
    with pytest.raises(ConvergenceError, match=r"6 of 6 samples did not converge \(6 MAX_ITER\)"):
        h.solve(f, _cast(h, x, dtype), solver=solver, tol=1e-9, max_iter=2, throw=True)


@pytest.mark.parametrize("solver", SOLVERS + ["broyden_ls"])
def test_float16_norms_beyond_its_range_are_computed_in_float32(h, solver):
    # z* = 5000 in each of 256 entries: ||z*|| = 80000 is above float16's largest value 65504
    # (and the sum of squares is 1.6e9), which every statistic and Anderson's Gram matrix meet
    kw = {"solver": "broyden", "line_search": True} if solver == "broyden_ls" else {"solver": solver}
    x = _cast(h, np.full((3, 256), 2500.0), "float16")
    sol = h.solve(lambda z, x: 0.5 * z + x, x, tol=1e-3, max_iter=60, **kw)
    assert (h.numpy(sol.status) == Status.CONVERGED).all(), sol.summary()
    # contraction 0.5: |z - z*| <= |f(z) - z| / 0.5
    np.testing.assert_allclose(h.numpy(sol.z), 5000.0, rtol=2e-3 + ROUNDOFF["float16"])
    assert np.isfinite(h.numpy(sol.abs_trace)).all()
    np.testing.assert_allclose(h.numpy(sol.abs_trace)[0], np.sqrt(256) * 2500.0, rtol=1e-6)


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize(("grad", "solver", "reference"), [
    ("implicit", "anderson", "implicit"),
    ("implicit", "broyden", "implicit"),
    ("jfb", "anderson", "jfb"),
    ("gdeq", "broyden", "gdeq"),
])
def test_half_precision_gradients_agree_with_float64_ones(h, dtype, grad, solver, reference):
    """Every backward pass runs in half precision (the implicit one's report included), with
    forward and backward tol = 4 roundoffs: the gradient is within 8 roundoffs of the exact one
    (3e-2 bfloat16, 4e-3 float16). GDEQ's is compared with GDEQ's in float32 (3e-2: Broyden's
    estimate depends on the iterates it saw)."""
    weights = tanh_deq(seed=31, d=32, batch=6, rho=0.8)
    tol = 4 * ROUNDOFF[dtype]
    opts = {"tol": tol} if grad == "implicit" else None
    got = _half_grads(h, weights, dtype, grad, solver, tol=tol, max_iter=100, grad_options=opts)
    if reference == "gdeq":
        want, bound = _half_grads(h, weights, "float32", grad, solver, tol=tol, max_iter=100), 3e-2
    else:
        want, bound = _reference_grads(weights, reference), 8 * ROUNDOFF[dtype]
    assert np.isfinite(got).all()
    assert np.linalg.norm(got - want) / np.linalg.norm(want) <= bound
    assert np.sum(got * want) / (np.linalg.norm(got) * np.linalg.norm(want)) > 0.999


@pytest.mark.parametrize("dtype", HALF)
def test_half_precision_implicit_backward_report(h, dtype):
    W, U, b, x = tanh_deq(seed=32, d=16, batch=4, rho=0.8)
    if h.name == "torch":
        Wt = _cast(h, W, dtype).requires_grad_(True)
        f = lambda z, x: h.xp.tanh(z @ Wt.T + x)  # noqa: E731
        sol = deqcore.solve(f, _cast(h, x, dtype), tol=4 * ROUNDOFF[dtype],
                            grad_options={"tol": 1e-9, "max_iter": 3, "on_fail": "warn"})
        with pytest.warns(deqcore.BackwardWarning, match=r"4 of 4 samples did not reach rel tol 1e-09"):
            sol.z.float().sum().backward()
    else:
        import jax

        def loss(W_):
            s = deqcore.solve(lambda z, x: h.xp.tanh(z @ W_.T + x), _cast(h, x, dtype),
                              tol=4 * ROUNDOFF[dtype],
                              grad_options={"tol": 1e-9, "max_iter": 3, "on_fail": "warn"})
            box.append(s)
            return s.z.astype("float32").sum()

        box: list = []
        with pytest.warns(deqcore.BackwardWarning, match=r"4 of 4 samples did not reach rel tol 1e-09"):
            jax.grad(loss)(_cast(h, W, dtype))
        sol = box[0]
    report = sol.backward
    assert report.calls == 1 and report.residual.dtype == np.float32 and report.residual.shape == (4,)
    assert not report.converged.any() and (report.iterations == 3).all()
    assert "0/4 converged" in report.summary()
    with pytest.raises(ConvergenceError, match="implicit backward .* 4 of 4 samples"):
        if h.name == "torch":
            sol = deqcore.solve(f, _cast(h, x, dtype),
                                grad_options={"tol": 1e-9, "max_iter": 3, "on_fail": "raise"})
            sol.z.float().sum().backward()
        else:
            jax.grad(lambda W_: deqcore.solve(
                lambda z, x: h.xp.tanh(z @ W_.T + x), _cast(h, x, dtype),
                grad_options={"tol": 1e-9, "max_iter": 3, "on_fail": "raise"}).z.astype("float32").sum())(
                _cast(h, W, dtype))


@pytest.mark.backend("torch")
def test_bfloat16_training_step_of_a_torch_module():
    """A DEQ layer as a torch.nn.Module in bfloat16: solve with the implicit gradient, backward,
    SGD steps. Its gradient agrees with the float32 copy's (cosine > 0.999 and a relative error
    below 8 bfloat16 roundoffs, 3e-2, with both solves to 4 roundoffs; 1e-2 is typical), the
    parameters move and stay finite, and the loss goes down."""
    import copy

    import torch

    class Layer(torch.nn.Module):
        def __init__(self, d: int = 24, classes: int = 5) -> None:
            super().__init__()
            self.inject = torch.nn.Linear(d, d)
            self.mix = torch.nn.Linear(d, d, bias=False)
            self.head = torch.nn.Linear(d, classes)
            with torch.no_grad():  # a contraction: ||W|| = 0.6
                self.mix.weight.mul_(0.6 / torch.linalg.matrix_norm(self.mix.weight.float(), 2))

        def forward(self, x: torch.Tensor, tol: float) -> torch.Tensor:
            u = self.inject(x)
            sol = deqcore.solve(lambda z, u: torch.tanh(self.mix(z) + u), u, tol=tol,
                                grad_options={"tol": tol}, throw=True)
            return self.head(sol.z)

    torch.manual_seed(40)
    x, y = torch.randn(32, 24), torch.randint(0, 5, (32,))
    full = Layer()
    half = copy.deepcopy(full).to(torch.bfloat16)

    def loss_and_grad(model: Layer, dtype: torch.dtype, tol: float) -> tuple[float, torch.Tensor]:
        model.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x.to(dtype), tol).float(), y)
        loss.backward()
        return float(loss.detach()), torch.cat([p.grad.float().flatten() for p in model.parameters()])

    _, g32 = loss_and_grad(full, torch.float32, 1e-6)
    before = [p.detach().clone() for p in half.parameters()]
    opt = torch.optim.SGD(half.parameters(), lr=0.5)
    losses = []
    for step in range(3):
        loss, g16 = loss_and_grad(half, torch.bfloat16, 4 * ROUNDOFF["bfloat16"])
        if step == 0:
            assert torch.nn.functional.cosine_similarity(g16, g32, dim=0) > 0.999
            assert (g16 - g32).norm() / g32.norm() < 8 * ROUNDOFF["bfloat16"]
        opt.step()
        losses.append(loss)
    for p, p0 in zip(half.parameters(), before, strict=True):
        assert p.dtype == torch.bfloat16 and torch.isfinite(p).all() and not torch.equal(p, p0)
    assert losses[2] < losses[0]


# --- empty batches ---------------------------------------------------------------------------

GRAD_MODES = [("implicit", "anderson"), ("implicit", "broyden"), ("jfb", "fixed_point"), ("npg", "anderson"),
              ("upg", "anderson"), ("gdeq", "broyden"), ("unroll", "anderson"), ("unroll", "broyden"),
              ("unroll", "fixed_point"), (None, "anderson")]


def _check_empty(h, sol, shapes, rows):
    zs = sol.z if isinstance(sol.z, tuple) else (sol.z,)
    assert [tuple(z.shape) for z in zs] == shapes
    for name in ("abs_residual", "rel_residual", "converged", "status", "iterations"):
        assert h.numpy(getattr(sol, name)).shape == (0,), name
    assert h.numpy(sol.abs_trace).shape == (rows, 0) and h.numpy(sol.rel_trace).shape == (rows, 0)
    assert int(h.numpy(sol.steps)) == 0 and int(h.numpy(sol.nfe)) == 1  # f(z0) on the empty batch
    assert sol.result is deqcore.Status.CONVERGED
    assert sol.summary() == (f"{sol.solver}: CONVERGED, 0/0 converged, steps 0, nfe 1, max {sol.stop_mode} "
                             "residual 0.000e+00")


@pytest.mark.parametrize(("grad", "solver"), GRAD_MODES)
def test_empty_batch_returns_an_empty_solution_and_zero_gradients(h, grad, solver):
    d = 5
    W = np.random.default_rng(50).standard_normal((d, d)) * 0.1
    x = np.zeros((0, d))
    if h.name == "torch":
        import torch

        Wt = torch.tensor(W, requires_grad=True)
        sol = deqcore.solve(lambda z, x: torch.tanh(z @ Wt.T + x), torch.tensor(x), solver=solver, grad=grad,
                            max_iter=20, throw=True)
        _check_empty(h, sol, [(0, d)], 21)
        if grad is not None:
            sol.z.sum().backward()
            np.testing.assert_array_equal(Wt.grad.numpy(), np.zeros((d, d)))
        return
    import jax
    import jax.numpy as jnp

    def run(W_, x_):
        return deqcore.solve(lambda z, x: jnp.tanh(z @ W_.T + x), x_, solver=solver, grad=grad, max_iter=20,
                             throw=True)

    for fn in (run, jax.jit(run)):
        _check_empty(h, fn(jnp.asarray(W), jnp.asarray(x)), [(0, d)], 21)
    if grad is not None:
        for grad_fn in (jax.grad(lambda W_: run(W_, jnp.asarray(x)).z.sum()),
                        jax.jit(jax.grad(lambda W_: run(W_, jnp.asarray(x)).z.sum()))):
            np.testing.assert_array_equal(np.asarray(grad_fn(jnp.asarray(W))), np.zeros((d, d)))


def test_empty_batch_of_a_tuple_state_a_given_z0_and_a_hypersolver(h):
    x = h.asarray(np.zeros((0, 3)))
    z0 = (h.asarray(np.zeros((0, 3))), h.asarray(np.zeros((0, 2, 2))))
    sol = h.solve(lambda z, x: (0.5 * z[0] + x, 0.5 * z[1]), x, z0, trace=4)
    _check_empty(h, sol, [(0, 3), (0, 2, 2)], 5)
    sol = h.solve(lambda z, x: 0.5 * z, x, h.asarray(np.zeros((0, 4))), trace=False, jit=True)
    assert tuple(sol.z.shape) == (0, 4) and sol.abs_trace is None and sol.result is deqcore.Status.CONVERGED
    hs = deqcore.HyperAnderson(deqcore.hypersolvers.IdentityCompression(3))
    _check_empty(h, h.solve(lambda z, x: 0.5 * z + x, x, solver=hs, max_iter=4), [(0, 3)], 5)


# --- arrays of several frameworks ------------------------------------------------------------

def _never(z, x):
    raise AssertionError("f ran: the mixed inputs were not caught before solving")


def test_numpy_arrays_beside_framework_arrays_are_a_type_error(h):
    x, xn = h.asarray(np.ones((2, 3))), np.ones((2, 3))
    with pytest.raises(TypeError, match=r"z0 holds \w+ arrays .* but x is a numpy.ndarray \(NumPy\)"):
        deqcore.solve(_never, xn, x)
    with pytest.raises(TypeError, match=r"z0\[0\] holds \w+ arrays .* but x\[1\] is a numpy.ndarray"):
        deqcore.solve(_never, (x, xn), (x, x))
    with pytest.raises(TypeError, match=r"z0\[0\] holds .* but z0\[1\] is a numpy.ndarray"):
        deqcore.solve(_never, x, (x, xn))
    with pytest.raises(TypeError, match=r"x\['scale'\] is a numpy.ndarray"):
        deqcore.solve(_never, {"scale": xn, "input": x}, x)
    with pytest.raises(TypeError, match=r"^jacobian_penalty: .* noise is a numpy.ndarray"):
        deqcore.jacobian_penalty(_never, x, x, xn)
    with pytest.raises(TypeError, match=rf"backend '{h.name}' cannot handle inputs of type ndarray"):
        deqcore.solve(_never, xn, backend=h.name)


@pytest.mark.equivalence
def test_arrays_of_two_frameworks_are_a_type_error_before_solving(both):
    import jax.numpy as jnp
    import torch

    xt, xj = torch.ones(2, 3), jnp.ones((2, 3))
    with pytest.raises(TypeError, match=r"z0 holds jax arrays \(backend 'jax'\) but x is a torch.Tensor "
                                        r"\(backend 'torch'\); convert every array of z0 and x to jax"):
        deqcore.solve(_never, xt, jnp.zeros((2, 3)))
    with pytest.raises(TypeError, match=r"z0 holds torch arrays .* but x is a .*Array.* \(backend 'jax'\)"):
        deqcore.solve(_never, xj, torch.zeros(2, 3))
    with pytest.raises(TypeError, match=r"z0\[0\] holds torch arrays .* but z0\[1\] is .*\(backend 'jax'\)"):
        deqcore.solve(_never, xt, (torch.zeros(2, 3), jnp.zeros((2, 3))))
    with pytest.raises(TypeError, match=r"x\[0\] holds torch arrays .* but x\[1\] is .*\(backend 'jax'\)"):
        deqcore.solve(_never, (xt, xj))
    with pytest.raises(TypeError, match=r"backend 'torch' was requested but x\[1\] is .*\(backend 'jax'\)"):
        deqcore.solve(_never, (xt, xj), backend="torch")
    with pytest.raises(TypeError, match=r"^jacobian_penalty: the arrays mix frameworks: z holds torch .* x "):
        deqcore.jacobian_penalty(_never, torch.zeros(2, 3), xj, torch.zeros(2, 3))
    hs = deqcore.HyperAnderson(deqcore.hypersolvers.IdentityCompression(3))
    with pytest.raises(TypeError, match=r"^train_hypersolver: the arrays mix frameworks: x\[0\] holds torch"):
        deqcore.train_hypersolver(hs, _never, [(xt, xj)], steps=1)


# --- the default z0 --------------------------------------------------------------------------

def test_errors_of_f_on_the_default_z0_say_it_was_defaulted(h):
    xp = h.xp
    W = h.asarray(np.ones((5, 5)))
    x = h.asarray(np.ones((2, 3)))
    f = lambda z, x: xp.tanh(z @ W)  # noqa: E731  the state has 5 features, x 3

    with pytest.raises(Exception) as info:  # the framework's own error, unchanged in type and text
        deqcore.solve(f, x)
    notes = [n for n in getattr(info.value, "__notes__", []) if "deqcore" in n]  # JAX adds its own
    dtype = str(x.dtype)
    assert notes == [f"deqcore.solve: z0 was not given, so it defaulted to zeros shaped like x, (2, 3) "
                     f"{dtype}; if the state of f has another shape, pass z0= (for example zeros of "
                     "shape (batch, state size))"]
    sol = deqcore.solve(f, x, h.asarray(np.zeros((2, 5))), tol=1e-8, max_iter=100)
    assert h.numpy(sol.converged).all()
    with pytest.raises(Exception) as info:  # z0 given: the error of f is left alone
        deqcore.solve(f, x, h.asarray(np.zeros((2, 4))))
    assert not [n for n in getattr(info.value, "__notes__", []) if "deqcore" in n]
    with pytest.raises(ValueError, match=rf"f\(z\) has shape \(2, 6\), z0 has \(2, 3\) \(z0 was not "
                                         rf"given, so it defaulted to zeros shaped like x, \(2, 3\) "
                                         rf"{dtype}; pass z0="):
        deqcore.solve(lambda z, x: xp.concat([z, z], axis=1), x)
    with pytest.raises(ValueError, match=r"z0 has \(2, 3\) \(pass z0 with the structure f returns\)$"):
        deqcore.solve(lambda z, x: xp.concat([z, z], axis=1), x, h.asarray(np.zeros((2, 3))))


def test_append_note_stands_in_for_add_note_before_python_3_11():
    from deqcore._inputs import append_note

    error = ValueError("shapes do not match")
    append_note(error, "z0 defaulted")
    assert str(error) == "shapes do not match\nz0 defaulted" and error.__notes__ == ["z0 defaulted"]
    bare = KeyError()
    append_note(bare, "z0 defaulted")
    assert bare.args == ("z0 defaulted",) and bare.__notes__ == ["z0 defaulted"]


# --- residual norms that overflow ------------------------------------------------------------

@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize(("dtype", "big"), [("float32", 1e19), ("float64", 1e160)])
def test_a_residual_norm_beyond_the_dtype_is_overflow_not_nan(h, solver, dtype, big):
    # z* = 2 x: sample 0's entries (2 big) are finite, but the sum of squares of its norm is not
    x = np.ones((3, 64))
    x[0] = big
    f = lambda z, x: 0.5 * z + x  # noqa: E731
    for jit in (False, True):
        sol = h.solve(f, h.asarray(x, dtype), solver=solver, tol=1e-6, max_iter=50, jit=jit)
        assert h.numpy(sol.status).tolist() == [Status.OVERFLOW, Status.CONVERGED, Status.CONVERGED]
        assert sol.result is deqcore.Status.OVERFLOW
        # stopped at z0 = 0, where ||f(z0) - z0|| = 8 big is representable: measured without overflow
        np.testing.assert_array_equal(h.numpy(sol.z)[0], 0.0)
        np.testing.assert_allclose(h.numpy(sol.abs_residual)[0], 8 * big, rtol=1e-6)
        np.testing.assert_allclose(h.numpy(sol.rel_residual)[0], 1.0, rtol=1e-6)
        assert not np.isfinite(h.numpy(sol.abs_trace)[0, 0])  # the loop's own (plain) measurement
        np.testing.assert_allclose(h.numpy(sol.z)[1:], 2.0, rtol=1e-5)
    with pytest.raises(ConvergenceError) as info:
        h.solve(f, h.asarray(x, dtype), solver=solver, tol=1e-6, max_iter=50, throw=True)
    msg = str(info.value)
    assert "1 of 3 samples did not converge (1 OVERFLOW)" in msg
    assert f"OVERFLOW: the iterate and f(z) are finite but the residual norm overflowed {dtype}" in msg
    assert "NaN" not in msg


def test_overflowed_norm_of_f_no_longer_reads_as_a_zero_rel_residual(h):
    # near z* = 2e19: ||f(z) - z|| = 8e16 is fine but ||f(z)|| overflows float32, which made the
    # rel residual 0 and the sample "converged"; re-measured, it is 5e-4
    x = np.full((1, 64), 1e19)
    z0 = h.asarray(np.full((1, 64), 2e19 * (1 + 1e-3)), "float32")
    f = lambda z, x: 0.5 * z + x  # noqa: E731
    strict = h.solve(f, h.asarray(x, "float32"), z0, tol=1e-4)
    assert h.numpy(strict.status).tolist() == [Status.OVERFLOW]
    np.testing.assert_allclose(h.numpy(strict.rel_residual), 5e-4, rtol=1e-3)
    loose = h.solve(f, h.asarray(x, "float32"), z0, tol=1e-3)
    assert h.numpy(loose.status).tolist() == [Status.CONVERGED]
    np.testing.assert_allclose(h.numpy(loose.rel_residual), 5e-4, rtol=1e-3)
    # the abs stop test was measured correctly all along: only the reported rel residual changes
    absolute = h.solve(f, h.asarray(x, "float32"), z0, tol=1e17, stop_mode="abs")
    assert h.numpy(absolute.status).tolist() == [Status.CONVERGED]
    np.testing.assert_allclose(h.numpy(absolute.rel_residual), 5e-4, rtol=1e-3)


def test_overflow_and_nan_in_one_batch_are_told_apart(h):
    x = np.ones((4, 64))
    x[0] = 1e19  # overflow
    x[1, 3] = np.nan  # NaN from f
    x[2, 5] = np.inf  # Inf from f
    f = lambda z, x: 0.5 * z + x  # noqa: E731
    sol = h.solve(f, h.asarray(x, "float32"), tol=1e-6)
    assert h.numpy(sol.status).tolist() == [Status.OVERFLOW, Status.NONFINITE, Status.NONFINITE,
                                            Status.CONVERGED]
    assert sol.result is deqcore.Status.NONFINITE  # the worst
    with pytest.raises(ConvergenceError, match=r"3 of 4 samples did not converge \(1 OVERFLOW, 2 NONFINITE\)"
                                               r".*NONFINITE: f produced NaN/Inf; x itself contains "
                                               r"NaN/Inf\. OVERFLOW: the iterate and f\(z\) are finite"):
        h.solve(f, h.asarray(x, "float32"), tol=1e-6, throw=True)


def test_iterates_growing_until_their_norm_overflows_are_overflow(h):
    f = lambda z, x: 2.0 * z + x  # noqa: E731  z_k = 2^k - 1 with plain iteration
    x = h.asarray(np.ones((2, 64)), "float32")
    sol = h.solve(f, x, solver="fixed_point", divergence=None, max_iter=200)
    assert (h.numpy(sol.status) == Status.OVERFLOW).all()
    assert int(h.numpy(sol.steps)) < 70 and np.isfinite(h.numpy(sol.z)).all()
    # with the divergence test on, growth is caught long before
    sol = h.solve(f, x, solver="fixed_point", max_iter=200)
    assert (h.numpy(sol.status) == Status.DIVERGED).all()


def test_status_values_order_outcomes_from_best_to_worst():
    order = ["CONVERGED", "MAX_ITER", "DIVERGED", "OVERFLOW", "NONFINITE"]
    assert [s.name for s in sorted(Status)] == order
    assert [int(s) for s in sorted(Status)] == list(range(len(order)))
    assert all(isinstance(s.message, str) and len(s.message) > 20 for s in Status)
    assert Status(3) is Status.OVERFLOW and Status.OVERFLOW.message.startswith("the iterate and f(z) stayed")


def test_unroll_differentiates_through_broydens_line_search(h):
    """grad="unroll" records every step, the line search's trial steps included: its gradient
    equals central differences of the forward solve itself (8 steps, the line search active).
    A line search run as a plain while_loop cut that path (torch) or could not be
    differentiated at all (JAX)."""
    rng = np.random.default_rng(4)
    d = 6
    W = rng.standard_normal((d, d))
    W = 2.5 * W / np.linalg.norm(W, 2)
    x = 2 * rng.standard_normal((3, d))
    c = rng.standard_normal((3, d))
    kw = {"solver": "broyden", "line_search": True, "tol": 1e-14, "max_iter": 8}
    xp = h.xp

    def forward(W_):
        return h.solve(lambda z, x_: xp.tanh(z @ W_.T + x_), h.asarray(x), grad=None, jit=False, **kw)

    sol = forward(h.asarray(W))
    assert int(h.numpy(sol.nfe)) > 1 + int(h.numpy(sol.steps))  # trial steps were taken
    if h.name == "jax":
        import jax

        def unrolled(W_):
            out = h.solve(lambda z, x_: xp.tanh(z @ W_.T + x_), h.asarray(x), grad="unroll", **kw)
            return xp.sum(out.z * c)

        loss = jax.jit(lambda W_: xp.sum(forward(W_).z * c))
        got = np.asarray(jax.grad(unrolled)(h.asarray(W)))
    else:
        import torch

        def loss(W_):
            return (forward(W_).z * torch.from_numpy(c)).sum()

        Wt = torch.tensor(W, requires_grad=True)
        out = h.solve(lambda z, x_: torch.tanh(z @ Wt.T + x_), h.asarray(x), grad="unroll", **kw)
        (out.z * torch.from_numpy(c)).sum().backward()
        got = Wt.grad.numpy()
    eps = 1e-6
    fd = np.zeros_like(W)
    for idx in np.ndindex(W.shape):
        E = np.zeros_like(W)
        E[idx] = eps
        fd[idx] = (float(loss(h.asarray(W + E))) - float(loss(h.asarray(W - E)))) / (2 * eps)
    np.testing.assert_allclose(got, fd, rtol=1e-6, atol=1e-8)
