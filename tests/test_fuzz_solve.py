"""Fuzzing ``deqcore.solve``'s arguments: every outcome is a documented error naming its argument,
or a Solution whose flags agree with its residuals.

Hypothesis draws state structures (one array or a tuple, an empty batch, ``batched=False``),
dtypes (float16, bfloat16, float32, float64), layers (a tanh contraction, an affine map that may
diverge), option values (valid, and invalid ones that must be rejected), gradient modes with
their options, unknown keys, and NaN/Inf placed in ``x``, ``z0`` or the weights. The examples
are derandomized, so a run is the same in CI and locally.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import deqcore
from deqcore import ConvergenceError, Status

#: examples per backend: a JAX solve compiles its loops (about a second each), a torch one does not
EXAMPLES = {"torch": 1000, "jax": 30}

DTYPES = ["float16", "bfloat16", "float32", "float64"]
ROUNDOFF = {"float16": 2.0**-11, "bfloat16": 2.0**-8, "float32": 2.0**-24, "float64": 2.0**-53}


def _chance(draw: Any, percent: int) -> bool:
    """True with about this probability; shrinks to False (hypothesis biases floats to 0.0)."""
    return draw(st.sampled_from([False] * (100 - percent) + [True] * percent))


def _option(draw: Any, name: str, valid: st.SearchStrategy, invalid: list[Any], bad: list[str],
            percent: int = 5) -> Any:
    """A valid value, or (with about ``percent`` % chance) an invalid one whose name goes to ``bad``."""
    if invalid and _chance(draw, percent):
        bad.append(name)
        return draw(st.sampled_from(invalid))
    return draw(valid)


@st.composite
def cases(draw: Any) -> dict[str, Any]:
    bad: list[str] = []
    batched = not _chance(draw, 15)
    batch = draw(st.sampled_from([0, 1, 3])) if batched else 1
    trailing = draw(st.lists(st.sampled_from([(4,), (2, 3), (1,)]), min_size=1, max_size=2))
    shapes = [((batch,) if batched else ()) + t for t in trailing]
    solver = draw(st.sampled_from(["anderson", "broyden", "fixed_point"]))
    kw: dict[str, Any] = {
        "tol": _option(draw, "tol", st.sampled_from([1e-1, 1e-3, 1e-6, 1e-10]),
                       [0.0, -1e-3, math.nan, math.inf, "1e-3", True, None], bad),
        "max_iter": _option(draw, "max_iter", st.integers(1, 25), [0, -3, 2.5, True, "5"], bad),
        "stop_mode": _option(draw, "stop_mode", st.sampled_from(["rel", "abs"]), ["relative", None, 1], bad),
        "divergence": _option(draw, "divergence", st.sampled_from([None, 1e3, 1e6]), [0, -1.0, math.inf, "x"],
                              bad),
        "check_every": _option(draw, "check_every", st.integers(1, 4), [0, 1.5, False], bad),
        "trace": _option(draw, "trace", st.one_of(st.booleans(), st.integers(0, 6)), [-1, 2.5, "yes", None],
                         bad),
        "batched": batched,
    }
    if solver == "anderson":
        kw["memory"] = _option(draw, "memory", st.integers(1, 6), [0, -1, 2.0], bad)
        kw["beta"] = _option(draw, "beta", st.sampled_from([0.5, 1.0]), [0.0, -1.0], bad)
        kw["lam"] = _option(draw, "lam", st.sampled_from([0.0, 1e-4]), [-1.0, math.nan], bad)
    elif solver == "broyden":
        kw["memory"] = _option(draw, "memory", st.sampled_from([None, 0, 3, 8]), [-1, "all"], bad)
        kw["line_search"] = _option(draw, "line_search", st.booleans(), ["yes"], bad)
    else:
        kw["damping"] = _option(draw, "damping", st.sampled_from([0.5, 1.0]), [0.0, 1.5], bad)
    if _chance(draw, 4):
        key = draw(st.sampled_from(["tolerance", "memroy", "damping" if solver != "fixed_point" else "beta"]))
        kw[key] = 1
        bad.append(key)
    grad = draw(st.sampled_from(["implicit", "jfb", "npg", "upg", "gdeq", "unroll", None]))
    grad_options: Any = None
    if grad == "implicit":
        grad_options = draw(st.sampled_from([None, {"tol": 1e-4}, {"max_iter": 5, "on_fail": "ignore"},
                                             {"solver": "broyden"}]))
    elif grad in ("npg", "upg"):
        grad_options = draw(st.sampled_from([None, {"k": 3, "lam": 0.5}]))
    if _chance(draw, 6):
        wrong = {"implicit": ({"tol": -1.0}, "tol"), "npg": ({"k": 0}, "k"), "upg": ({"lam": 2.0}, "lam"),
                 "jfb": ({"k": 1}, "k"), "gdeq": ({"bogus": 1}, "bogus"), "unroll": ({"k": 1}, "k"),
                 None: ({"tol": 1e-4}, "grad_options")}[grad]
        grad_options, name = wrong
        bad.append(name)
    if grad == "gdeq" and solver != "broyden":
        bad.append("gdeq")
    if _chance(draw, 3):
        grad = "bogus"
        bad.append("bogus")
    kw["grad"], kw["grad_options"] = grad, grad_options
    nonfinite = draw(st.sampled_from([None] * 6 + ["x", "z0", "weights"]))
    return {
        "shapes": shapes,
        "dtype": draw(st.sampled_from(DTYPES)),
        "solver": solver,
        "kw": kw,
        "bad": bad,
        "layer": draw(st.sampled_from(["tanh", "tanh", "affine"])),
        "rho": draw(st.sampled_from([0.5, 0.9, 1.5, 6.0])),
        "scale": draw(st.sampled_from([1.0] * 6 + [1e4, 1e19, 1e160])),
        "backward": _chance(draw, 30),
        "give_z0": draw(st.booleans()) or nonfinite == "z0",
        "nonfinite": nonfinite,
        "poison": draw(st.sampled_from([math.nan, math.inf, -math.inf])),
        "where": draw(st.integers(0, 10**6)),
        "throw": _chance(draw, 20),
        "seed": draw(st.integers(0, 2**16)),
    }


def _poison(a: np.ndarray, where: int, value: float) -> np.ndarray:
    if a.size:
        a = a.copy()
        a.flat[where % a.size] = value
    return a


class Case:
    """One drawn case on one backend: arrays, the layer, and the expected structure."""

    def __init__(self, h: Any, c: dict[str, Any]) -> None:
        self.h, self.c = h, c
        rng = np.random.default_rng(c["seed"])
        self.sizes = [int(np.prod(s[1:] if c["kw"]["batched"] else s)) for s in c["shapes"]]
        self.weights = []
        for n in self.sizes:
            W = rng.standard_normal((n, n))
            self.weights.append(c["rho"] * W / max(np.linalg.norm(W, 2), 1e-12))
        xs = [c["scale"] * rng.standard_normal(s) for s in c["shapes"]]
        z0s = [0.1 * rng.standard_normal(s) for s in c["shapes"]]
        if c["nonfinite"] == "x":
            xs[0] = _poison(xs[0], c["where"], c["poison"])
        elif c["nonfinite"] == "z0":
            z0s[0] = _poison(z0s[0], c["where"], c["poison"])
        elif c["nonfinite"] == "weights":
            self.weights[0] = _poison(self.weights[0], c["where"], c["poison"])
        self.tuple = len(c["shapes"]) > 1
        self.x = self._pack(xs)
        self.z0 = self._pack(z0s) if c["give_z0"] else None
        self.W = [self.cast(W) for W in self.weights]

    def cast(self, a: np.ndarray) -> Any:
        dtype = self.c["dtype"]
        if self.h.name == "torch":
            import torch

            return torch.from_numpy(np.asarray(a, dtype=np.float64)).to(getattr(torch, dtype))
        import jax.numpy as jnp

        return jnp.asarray(np.asarray(a, dtype=np.float64), dtype=getattr(jnp, dtype))

    def _pack(self, arrays: list[np.ndarray]) -> Any:
        out = [self.cast(a) for a in arrays]
        return tuple(out) if self.tuple else out[0]

    def f(self, z: Any, x: Any) -> Any:
        return self.layer(self.W)(z, x)

    def layer(self, weights: list[Any]) -> Any:
        return lambda z, x: self._apply(weights, z, x)

    def _apply(self, weights: list[Any], z: Any, x: Any) -> Any:
        xp = self.h.xp
        zs, xs = (z, x) if self.tuple else ((z,), (x,))
        out = []
        for zi, xi, W, n in zip(zs, xs, weights, self.sizes, strict=True):
            lead = tuple(zi.shape[:1]) if self.c["kw"]["batched"] else ()
            flat = xp.reshape(zi, lead + (n,)) @ W.T + xp.reshape(xi, lead + (n,))
            out.append(xp.reshape(xp.tanh(flat) if self.c["layer"] == "tanh" else flat, tuple(zi.shape)))
        return tuple(out) if self.tuple else out[0]


def _numpy(h: Any, a: Any) -> np.ndarray:
    return np.asarray(h.numpy(a))


def check_solution(case: Case, sol: deqcore.Solution) -> None:
    """The flags of ``sol`` agree with its residuals, shapes and limits."""
    h, c, kw = case.h, case.c, case.c["kw"]
    batch = c["shapes"][0][0] if kw["batched"] else 1
    zs = sol.z if case.tuple else (sol.z,)
    assert [tuple(z.shape) for z in zs] == c["shapes"]
    assert all(str(z.dtype).endswith(c["dtype"]) for z in zs)
    stats = "float32" if c["dtype"] in ("float16", "bfloat16") else c["dtype"]
    for name in ("abs_residual", "rel_residual"):
        assert str(getattr(sol, name).dtype).endswith(stats), name
    status = _numpy(h, sol.status)
    converged = _numpy(h, sol.converged)
    iterations = _numpy(h, sol.iterations)
    residual = _numpy(h, sol.residual).astype(np.float64)
    for arr in (status, converged, iterations, residual, _numpy(h, sol.abs_residual)):
        assert arr.shape == (batch,)
    assert set(status.tolist()) <= {int(s) for s in Status}
    assert (converged == (status == Status.CONVERGED)).all()
    # converged <=> the stop residual reached tol (a comparison with NaN is False)
    assert (converged == (residual <= kw["tol"])).all(), (status, residual)
    assert (iterations >= 0).all() and (iterations <= kw["max_iter"]).all()
    assert (iterations[status == Status.MAX_ITER] == kw["max_iter"]).all()
    steps = int(_numpy(h, sol.steps))
    assert steps == (int(iterations.max()) if batch else 0)
    assert int(_numpy(h, sol.nfe)) >= 1 + steps
    assert sol.result == (int(status.max()) if batch else 0)
    assert isinstance(sol.summary(), str)
    for i in np.flatnonzero(status == Status.CONVERGED):
        for z in zs:
            assert np.isfinite(_numpy(h, z)[i] if kw["batched"] else _numpy(h, z)).all()
    check_residuals(case, sol, status)
    check_final_iterates(case, sol, status)
    trace = kw["trace"]
    rows = 0 if trace is False or trace == 0 else min(1000 if trace is True else trace, kw["max_iter"]) + 1
    if rows == 0:
        assert sol.abs_trace is None and sol.rel_trace is None
        return
    stop_trace = _numpy(h, sol.rel_trace if kw["stop_mode"] == "rel" else sol.abs_trace)
    assert stop_trace.shape == (rows, batch) and _numpy(h, sol.abs_trace).shape == (rows, batch)
    if rows == kw["max_iter"] + 1:
        # the last row is the loop's own final measurement: not finite exactly for the samples
        # flagged NONFINITE or OVERFLOW (an overflow may also show as a rel residual of 0)
        unmeasured = ~np.isfinite(stop_trace[-1])
        nonfinite, overflow = status == Status.NONFINITE, status == Status.OVERFLOW
        assert (unmeasured <= (nonfinite | overflow)).all(), (status, stop_trace[-1])
        assert (nonfinite <= unmeasured).all(), (status, stop_trace[-1])
        zero_rel = _numpy(h, sol.rel_trace)[-1] == 0
        assert (overflow <= (unmeasured | zero_rel)).all(), (status, stop_trace[-1])


def _per_sample(case: Case, arrays: Any) -> np.ndarray:
    """(B, n) float64 NumPy rows of a state of ``case``'s structure (one row when unbatched)."""
    items = arrays if case.tuple else (arrays,)
    batch = case.c["shapes"][0][0] if case.c["kw"]["batched"] else 1
    return np.concatenate([_numpy(case.h, a).astype(np.float64).reshape(batch, n)
                           for a, n in zip(items, case.sizes, strict=True)], axis=1)


def _norm(rows: np.ndarray) -> np.ndarray:
    scale = np.max(np.abs(rows), axis=1, initial=0.0)
    scale = np.where(np.isfinite(scale) & (scale > 0), scale, 1.0)
    with np.errstate(invalid="ignore", over="ignore"):
        return scale * np.linalg.norm(rows / scale[:, None], axis=1)


def check_residuals(case: Case, sol: deqcore.Solution, status: np.ndarray) -> None:
    """The reported residuals are those of the returned ``z``: ``f`` evaluated again on it, the
    norms taken in float64 without overflow. ``f`` rounds differently inside a compiled loop
    (XLA keeps excess precision), so they agree to 8 roundoffs of ``||f(z)|| + ||z||``."""
    c, kw = case.c, case.c["kw"]
    with np.errstate(all="ignore"):
        z = _per_sample(case, sol.z)
        fz = _per_sample(case, case.f(sol.z, case.x))
        g = _norm(fz - z)
        want = g if kw["stop_mode"] == "abs" else g / (_norm(fz) + 1e-9)
        slack = 8 * ROUNDOFF[c["dtype"]] * (_norm(fz) + _norm(z))
        if kw["stop_mode"] == "rel":
            slack = slack / (_norm(fz) + 1e-9)
    got = _numpy(case.h, sol.residual).astype(np.float64)
    finite = np.isfinite(got)
    both = finite & np.isfinite(want)
    assert (np.abs(got - want)[both] <= slack[both] + 1e-30).all(), (got, want, status)
    # an unmeasured residual: f produced NaN/Inf there, or the norm overflowed the dtype
    assert (~np.isfinite(want[~finite]) | (status[~finite] == Status.OVERFLOW)).all(), (got, want, status)


def check_final_iterates(case: Case, sol: deqcore.Solution, status: np.ndarray) -> None:
    """NONFINITE means f gave NaN/Inf at the sample's final iterate, OVERFLOW that it did not."""
    state = sol.solver_state
    if not (hasattr(state, "z") and hasattr(state, "fz")) or status.size == 0:
        return
    z, fz = (np.asarray(case.h.numpy(a), dtype=np.float64) for a in (state.z, state.fz))
    finite = np.isfinite(z).all(axis=1) & np.isfinite(fz).all(axis=1)
    assert not finite[status == Status.NONFINITE].any(), status
    assert finite[status == Status.OVERFLOW].all(), status


def check_backward(case: Case, sol: deqcore.Solution) -> None:
    """A backward pass through the drawn gradient mode runs; its gradient has the weights'
    shapes, and is finite where every sample converged from finite inputs."""
    h, c = case.h, case.c
    if h.name == "torch":
        weights = [W.detach().requires_grad_(True) for W in case.W]
        sol = deqcore.solve(case.layer(weights), case.x, case.z0, solver=c["solver"], **c["kw"])
        zs = sol.z if case.tuple else (sol.z,)
        sum(z.float().sum() for z in zs).backward()
        grads = [np.zeros(tuple(W.shape)) if W.grad is None else W.grad.float().numpy() for W in weights]
    else:
        import jax

        def loss(weights: list[Any]) -> Any:
            out = deqcore.solve(case.layer(weights), case.x, case.z0, solver=c["solver"], **c["kw"])
            zs = out.z if case.tuple else (out.z,)
            return sum(z.astype("float32").sum() for z in zs)

        grads = [np.asarray(g, dtype=np.float32) for g in jax.grad(loss)(list(case.W))]
    assert [g.shape for g in grads] == [tuple(W.shape) for W in case.W]
    if c["nonfinite"] is None and _numpy(h, sol.converged).all():
        assert all(np.isfinite(g).all() for g in grads)


def _error_names_argument(error: BaseException, bad: list[str]) -> bool:
    msg = str(error)
    return any(f"'{name}'" in msg or name in msg for name in bad)


def test_fuzz_solve(h):
    """Derandomized examples (the same each run), a few tens of seconds per backend."""

    @settings(max_examples=EXAMPLES[h.name], deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow])
    @given(c=cases())
    def run(c: dict[str, Any]) -> None:
        check_case(h, c)

    run()


def check_case(h: Any, c: dict[str, Any]) -> None:
    case = Case(h, c)
    kw = dict(c["kw"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            sol = deqcore.solve(case.f, case.x, case.z0, solver=c["solver"], **kw)
        except (TypeError, ValueError) as error:
            assert c["bad"], f"valid arguments rejected: {error!r}"
            assert _error_names_argument(error, c["bad"]), (error, c["bad"])
            return
        assert not c["bad"], f"invalid {c['bad']} accepted"
        check_solution(case, sol)
        if c["backward"] and kw["grad"] is not None:
            check_backward(case, sol)
        if c["throw"]:
            unconverged = not _numpy(h, sol.converged).all()
            try:
                deqcore.solve(case.f, case.x, case.z0, solver=c["solver"], throw=True, **kw)
            except ConvergenceError as error:
                assert unconverged and "did not converge" in str(error)
            else:
                assert not unconverged


@pytest.mark.parametrize("dtype", DTYPES)
def test_fuzz_case_builder_makes_the_drawn_arrays(h, dtype):
    """The fuzzer's own plumbing: the drawn structure, dtype and poison reach the solve."""
    c = {"shapes": [(3, 4), (3, 2, 3)], "dtype": dtype, "solver": "anderson", "bad": [], "layer": "tanh",
         "scale": 1.0, "backward": False,
         "rho": 0.5, "give_z0": True, "nonfinite": "z0", "poison": math.nan, "where": 5, "throw": False,
         "seed": 1, "kw": {"tol": 1e-2, "max_iter": 20, "stop_mode": "rel", "divergence": None,
                           "check_every": 1, "trace": True, "batched": True, "grad": None,
                           "grad_options": None}}
    case = Case(h, c)
    sol = deqcore.solve(case.f, case.x, case.z0, **c["kw"])
    check_solution(case, sol)
    assert _numpy(h, sol.status).tolist() == [Status.CONVERGED, Status.NONFINITE, Status.CONVERGED]
