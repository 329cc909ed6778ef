"""The conformance checks: a backend's protocol methods, deqcore's solvers and gradient modes on it,
each against exact float64 values computed with NumPy.

Every check builds its arrays with the backend's own ``xp.asarray`` from NumPy arrays and reads
results back with ``to_numpy``, so it works for any backend without knowing its framework.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import numpy as np

from .. import CapabilityError, jacobian_penalty, registry, solve
from .._capabilities import Capabilities
from ..hypersolvers import HyperAnderson, IdentityCompression, train_hypersolver

#: The built-in solvers every backend must run, and the problems they are checked on.
SOLVERS = ("anderson", "broyden", "fixed_point", "reversible")
PROBLEMS = ("linear", "tanh", "tuple")
#: Forward settings of the solver checks: tight enough that a solution equals the exact one to 1e-9.
TIGHT: dict[str, Any] = {"tol": 1e-12, "max_iter": 300}


class ConformanceError(AssertionError):
    """A backend failed deqcore's conformance checks; the message lists every failed check."""


def _close(what: str, got: Any, want: Any, tol: float) -> None:
    got, want = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
    if got.shape != want.shape:
        raise AssertionError(f"{what}: shape {got.shape}, expected {want.shape}")
    err = float(np.max(np.abs(got - want), initial=0.0)) if got.size else 0.0
    scale = max(1.0, float(np.max(np.abs(want), initial=0.0)))
    if not err <= tol * scale:  # also fails on NaN
        raise AssertionError(f"{what}: differs from the expected values by {err:.3e} "
                             f"(allowed {tol * scale:.1e})")


def _expect(condition: bool, message: str) -> None:
    if not condition:
        raise AssertionError(message)


@dataclasses.dataclass(frozen=True)
class _Pair:
    """A dataclass for ``register_pytree``."""

    a: Any
    b: Any


class Kit:
    """One backend under test: NumPy in, NumPy out."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.backend = registry().backend(name)
        self.xp = self.backend.xp

    def array(self, a: Any, dtype: Any = np.float64) -> Any:
        return self.xp.asarray(np.array(a, dtype=dtype))  # a copy: in-place writes never reach `a`

    def numpy(self, a: Any) -> np.ndarray:
        return np.asarray(self.backend.to_numpy(a))

    def solve(self, problem: str, solver: str, **kw: Any) -> Any:
        f, x, z0 = _problem(self, problem)
        return solve(f, x, z0, backend=self.name, solver=solver, **kw)


# ------------------------------------------------------------------------------------------------
# problems, with their exact float64 solutions

_RNG_SEED = 20


def _weights(n: int, m: int, rho: float, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    W = rng.standard_normal((n, n))
    W *= rho / np.linalg.norm(W, 2)
    return W, rng.standard_normal((n, m)) / np.sqrt(m), rng.standard_normal(n) * 0.1


def _inputs(batch: int, m: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, m))


LINEAR = _weights(6, 6, 0.5, _RNG_SEED)
TANH = _weights(8, 5, 0.6, _RNG_SEED + 1)
SPLIT = 5  # the tuple problem is the tanh layer with its state cut into (B, 5) and (B, 3)
X_LINEAR, X_TANH = _inputs(4, 6, _RNG_SEED + 2), _inputs(3, 5, _RNG_SEED + 3)


def _problem(kit: Kit, name: str, dtype: Any = np.float64) -> tuple[Callable[[Any, Any], Any], Any, Any]:
    """``(f, x, z0)`` on the kit's backend: ``linear`` z A^T + x + c, ``tanh`` tanh(z W^T + x U^T
    + b), ``tuple`` the same tanh layer on a state of two arrays, (B, 5) and (B, 3); ``z0`` zeros
    (None where they are shaped like ``x``)."""
    xp = kit.xp
    if name == "linear":
        A, _, c = LINEAR
        At, cb = kit.array(A.T, dtype), kit.array(c, dtype)
        return (lambda z, x: z @ At + x + cb), kit.array(X_LINEAR, dtype), None
    W, U, b = TANH
    Wt, Ut, bb = kit.array(W.T, dtype), kit.array(U.T, dtype), kit.array(b, dtype)
    if name == "tanh":
        z0 = kit.array(np.zeros((X_TANH.shape[0], W.shape[0])), dtype)
        return (lambda z, x: xp.tanh(z @ Wt + x @ Ut + bb)), kit.array(X_TANH, dtype), z0
    top, bottom = kit.array(W.T[:SPLIT], dtype), kit.array(W.T[SPLIT:], dtype)
    xu = X_TANH @ U.T + b

    def f(z: Any, x: Any) -> Any:
        pre = z[0] @ top + z[1] @ bottom
        return xp.tanh(pre[:, :SPLIT] + x[0]), xp.tanh(pre[:, SPLIT:] + x[1])

    return f, (kit.array(xu[:, :SPLIT], dtype), kit.array(xu[:, SPLIT:], dtype)), None


def exact_solution(name: str) -> np.ndarray:
    """The fixed point of problem ``name`` in float64 (the tuple problem's two arrays side by side)."""
    if name == "linear":
        A, _, c = LINEAR
        return np.linalg.solve(np.eye(A.shape[0]) - A, (X_LINEAR + c).T).T
    W, U, b = TANH
    z = np.zeros((X_TANH.shape[0], W.shape[0]))
    for _ in range(200):  # a contraction of modulus 0.6: 200 steps reach machine precision
        z = np.tanh(z @ W.T + X_TANH @ U.T + b)
    return z


def _flat(kit: Kit, z: Any) -> np.ndarray:
    return np.concatenate([kit.numpy(a) for a in z], axis=1) if isinstance(z, tuple) else kit.numpy(z)


# ------------------------------------------------------------------------------------------------
# the protocol's methods


def check_attributes(kit: Kit) -> None:
    be = kit.backend
    _expect(be.name == kit.name, f"name is {be.name!r}, registered as {kit.name!r}")
    _expect(isinstance(be.static_shapes, bool), f"static_shapes is {be.static_shapes!r}, not a bool")
    _expect(isinstance(be.capabilities, Capabilities),
            f"capabilities is {be.capabilities!r}, not a deqcore.extend.Capabilities")
    needed = ("asarray", "zeros", "zeros_like", "full_like", "where", "stack", "isfinite", "tanh",
              "matmul", "astype", "finfo", "isdtype", "any", "all", "max", "sum", "linalg")
    missing = [n for n in needed if not hasattr(be.xp, n)]
    _expect(not missing, f"xp lacks Array-API functions the algorithms use: {', '.join(missing)}")
    _expect(hasattr(be.xp.linalg, "vector_norm"), "xp.linalg lacks vector_norm")


def check_is_array(kit: Kit) -> None:
    be = kit.backend
    _expect(be.is_array(kit.array([1.0, 2.0])), "is_array(xp.asarray(...)) is False")
    for other in ([1.0, 2.0], 1.5, None, "a"):
        _expect(not be.is_array(other), f"is_array({other!r}) is True")


def _counter(kit: Kit) -> tuple[Any, Callable[[Any], Any], Callable[[Any], Any]]:
    return kit.array(0.0), (lambda s: s < 5), (lambda s: s + 1)


def check_while_loop(kit: Kit) -> None:
    start, cond, body = _counter(kit)
    for kwargs, want in (({}, 5), ({"max_steps": 3}, 3), ({"check_every": 2}, 6),
                         ({"max_steps": 5, "check_every": 2}, 5)):
        got = float(kit.numpy(kit.backend.while_loop(cond, body, start, **kwargs)))
        _expect(got == want, f"while_loop(s < 5, s + 1, 0, {kwargs}) gave {got}, expected {want}")


def check_differentiable_loop(kit: Kit) -> None:
    start, cond, body = _counter(kit)
    for max_steps, check_every, want in ((10, 1, 5), (3, 1, 3), (10, 2, 6), (5, 2, 5)):
        got = float(kit.numpy(kit.backend.differentiable_loop(cond, body, start, max_steps, check_every)))
        _expect(got == want, f"differentiable_loop(s < 5, s + 1, 0, max_steps={max_steps}, check_every="
                             f"{check_every}) gave {got}, expected {want}")


def check_fori_loop(kit: Kit) -> None:
    got = kit.numpy(kit.backend.fori_loop(4, lambda i, s: s + i, kit.array(0.5)))
    _close("fori_loop(4, s + i, 0.5)", got, 6.5, 0.0)


def check_jit(kit: Kit) -> None:
    a = np.arange(5.0)
    fn = kit.backend.jit(lambda v: {"twice": v * 2.0, "pair": (v + 1.0, v)})
    out = fn(kit.array(a))
    _close("jit(fn)(a)['twice']", kit.numpy(out["twice"]), 2 * a, 0.0)
    _close("jit(fn)(a)['pair'][0]", kit.numpy(out["pair"][0]), a + 1, 0.0)


def check_set_index(kit: Kit) -> None:
    be = kit.backend
    value = np.arange(1.0, 5.0)
    got = kit.numpy(be.set_index(kit.array(np.zeros((3, 4))), 1, kit.array(value), axis=0))
    want = np.zeros((3, 4))
    want[1] = value
    _close("set_index(zeros (3, 4), 1, value, axis=0)", got, want, 0.0)
    index = kit.xp.asarray(np.asarray(2, dtype=np.int32))
    got = kit.numpy(be.set_index(kit.array(np.zeros((3, 4))), index, kit.array(value[:3]), axis=-1))
    want = np.zeros((3, 4))
    want[:, 2] = value[:3]
    _close("set_index(zeros (3, 4), array(2), value, axis=-1)", got, want, 0.0)


def check_active_prefix(kit: Kit) -> None:
    buffer = np.arange(30.0).reshape(2, 5, 3)
    got = kit.numpy(kit.backend.active_prefix(kit.array(buffer), 2, 1))
    _expect(got.shape in ((2, 2, 3), (2, 5, 3)), f"active_prefix(buffer (2, 5, 3), 2, axis=1) has shape "
                                                 f"{got.shape}, expected (2, 2, 3) or the whole buffer")
    _close("active_prefix(buffer, 2, axis=1)[:, :2]", got[:, :2], buffer[:, :2], 0.0)


def check_linear_solve(kit: Kit) -> None:
    rng = np.random.default_rng(_RNG_SEED + 4)
    m = rng.standard_normal((3, 4, 4))
    b = rng.standard_normal((3, 4))
    for spd, a in ((False, m + 4 * np.eye(4)), (True, m @ np.swapaxes(m, 1, 2) + np.eye(4))):
        want = np.linalg.solve(a, b[..., None])[..., 0]
        got = kit.numpy(kit.backend.linear_solve(kit.array(a), kit.array(b), symmetric_positive_definite=spd))
        _close(f"linear_solve(symmetric_positive_definite={spd})", got, want, 1e-10)
    a = m + 4 * np.eye(4)
    a[1] = 0.0
    got = kit.numpy(kit.backend.linear_solve(kit.array(a), kit.array(b)))  # must not raise
    _expect(not np.all(np.isfinite(got[1])), "linear_solve of a singular system gave finite values "
                                             "(a singular system must give non-finite entries)")
    want = np.linalg.solve(a[[0, 2]], b[[0, 2], :, None])[..., 0]
    _close("linear_solve: the regular systems beside a singular one", got[[0, 2]], want, 1e-10)


def check_to_numpy(kit: Kit) -> None:
    for dtype in (np.float64, np.float32):
        a = np.linspace(-1, 1, 6, dtype=dtype).reshape(2, 3)
        got = kit.backend.to_numpy(kit.array(a, dtype))
        _expect(isinstance(got, np.ndarray), f"to_numpy returned a {type(got).__name__}, not a numpy.ndarray")
        _expect(got.dtype == dtype, f"to_numpy of a {np.dtype(dtype).name} array has dtype {got.dtype} "
                                    "(on JAX, enable float64 with jax.config.update('jax_enable_x64', True))")
        _close("to_numpy", got, a, 0.0)


def check_host_callback(kit: Kit) -> None:
    seen: list[tuple[Any, ...]] = []
    kit.backend.host_callback(lambda *arrays: seen.append(arrays), kit.array([1.0, 2.0]), kit.array(3.0))
    _expect(len(seen) == 1, f"host_callback called fn {len(seen)} times, expected once")
    _expect(all(isinstance(a, np.ndarray) for a in seen[0]), "host_callback passed non-NumPy arrays")
    _close("host_callback's arrays", np.concatenate([np.ravel(a) for a in seen[0]]), [1.0, 2.0, 3.0], 0.0)


def check_host_check(kit: Kit) -> None:
    made: list[tuple[Exception, tuple[Any, ...]]] = []

    def make_error(*arrays: Any) -> Exception:
        made.append((RuntimeError("flagged"), arrays))
        return made[-1][0]

    payload = kit.array([7.0, 8.0])
    kit.backend.host_check(kit.xp.asarray(np.array([False, False])), make_error, payload)
    _expect(not made, "host_check called make_error although no entry of failed was True")
    try:
        kit.backend.host_check(kit.xp.asarray(np.array([False, True])), make_error, payload)
    except RuntimeError as error:
        _expect(len(made) == 1 and error is made[0][0], f"host_check raised {error!r}, not make_error(...)")
        failed, got = made[0][1]
        _expect(isinstance(failed, np.ndarray) and isinstance(got, np.ndarray),
                "host_check passed non-NumPy arrays to make_error")
        _close("host_check's failed mask", failed, [False, True], 0.0)
        _close("host_check's payload", got, [7.0, 8.0], 0.0)
    else:
        raise AssertionError("host_check did not raise make_error(...) when an entry of failed was True")


def check_host_queries(kit: Kit) -> None:
    be = kit.backend
    a = kit.array([1.0])
    _expect(be.is_concrete(a) is True, "is_concrete of a concrete array is not True")
    be.device(a)
    be.register_pytree(_Pair, ["a", "b"], [])
    be.register_pytree(_Pair, ["a", "b"], [])  # a second registration (a registry reset) is allowed
    with be.no_grad():
        _close("an operation under no_grad()", kit.numpy(a * 2.0), [2.0], 0.0)


def check_identities(kit: Kit) -> None:
    a = np.array([[1.0, -2.0], [0.5, 3.0]])
    be = kit.backend
    _close("stop_gradient(x)", kit.numpy(be.stop_gradient(kit.array(a))), a, 0.0)
    out = be.first_order_only(kit.array(a), lambda: RuntimeError("differentiated twice"))
    _close("first_order_only(x, make_error)", kit.numpy(out), a, 0.0)


def check_vjp(kit: Kit) -> None:
    xp = kit.xp
    a, b, ct = np.array([0.3, -1.2, 2.0]), np.array([1.5, 0.5, -0.25]), np.array([1.0, -2.0, 0.5])
    out, pullback = kit.backend.vjp(lambda u, v: u * v + xp.sin(u), kit.array(a), kit.array(b))
    _close("vjp's value", kit.numpy(out), a * b + np.sin(a), 1e-15)
    for attempt in ("first", "second"):  # a pullback may be called many times
        ga, gb = pullback(kit.array(ct))
        _close(f"vjp's first cotangent ({attempt} call)", kit.numpy(ga), ct * (b + np.cos(a)), 1e-14)
        _close(f"vjp's second cotangent ({attempt} call)", kit.numpy(gb), ct * a, 1e-14)


def check_attach_reverse(kit: Kit) -> None:
    """``attach_reverse`` with ``f(z, x) = sin(z) x`` and a backward of two pullbacks (at ``p``
    with ``v = g``, then at ``f(p)`` with the first one's ``v @ df/dz``): the value is ``z*`` and
    the gradient of ``ct . z*`` with respect to ``x`` is the sum of both ``v @ df/dx``."""
    xp, be = kit.xp, kit.backend
    z, x, p, ct = (np.array([v]) for v in ([0.2, -0.4, 0.9], [1.5, 0.5, -0.25], [0.3, -1.2, 2.0],
                                           [1.0, -2.0, 0.5]))

    def backward(g: Any, pullback: Callable[..., Any], acc: Any, point: Any) -> Any:
        fp, vz, acc = pullback(point, g, acc)
        return pullback(fp, vz, acc)[2]

    out, vjp = be.vjp(lambda x_: be.attach_reverse(lambda z_, x_: xp.sin(z_) * x_, kit.array(z), x_, backward,
                                                   saved=(kit.array(p),)), kit.array(x))
    _close("attach_reverse's value", kit.numpy(out), z, 0.0)
    (gx,) = vjp(kit.array(ct))
    fp, vz = np.sin(p) * x, ct * np.cos(p) * x
    _close("attach_reverse's gradient through two pullbacks", kit.numpy(gx), ct * np.sin(p) + vz * np.sin(fp),
           1e-14)


# ------------------------------------------------------------------------------------------------
# solvers


def solver_check(solver: str, problem: str) -> Callable[[Kit], None]:
    def check(kit: Kit) -> None:
        sol = kit.solve(problem, solver, grad=None, **TIGHT)
        _expect(bool(np.all(kit.numpy(sol.converged))), f"{solver} did not converge on the {problem} "
                                                         f"problem: status {kit.numpy(sol.status)}")
        _close(f"{solver} on the {problem} problem", _flat(kit, sol.z), exact_solution(problem), 1e-9)

    return check


def dtype_check(solver: str) -> Callable[[Kit], None]:
    def check(kit: Kit) -> None:
        f, x, z0 = _problem(kit, "tanh", np.float32)
        sol = solve(f, x, z0, backend=kit.name, solver=solver, grad=None, tol=1e-5, max_iter=100)
        z = kit.numpy(sol.z)
        _expect(z.dtype == np.float32, f"{solver}: a float32 solve returned {z.dtype}")
        _close(f"{solver} in float32", z, exact_solution("tanh"), 1e-4)

    return check


def freezing_check(solver: str) -> Callable[[Kit], None]:
    """A converged sample is frozen: in a batch with a slowly converging sample it ends exactly as
    when it is solved alone, although the loop runs on for the other sample."""

    def check(kit: Kit) -> None:
        xp = kit.xp
        W, U, b = TANH
        Wt, Ut = kit.array(W.T), kit.array(U.T)
        rates = np.array([[0.1], [1.3]])  # sample 0 contracts fast, sample 1 slowly (rate 1.3 * 0.6)

        def layer(r: Any) -> Callable[[Any, Any], Any]:
            return lambda z, x: r * xp.tanh(z @ Wt + x @ Ut)

        settings: dict[str, Any] = {"grad": None, "tol": 1e-8, "max_iter": 200, "backend": kit.name,
                                    "solver": solver}
        z0 = np.zeros((2, W.shape[0]))
        both = solve(layer(kit.array(rates)), kit.array(X_TANH[:2]), kit.array(z0), **settings)
        alone = solve(layer(kit.array(rates[:1])), kit.array(X_TANH[:1]), kit.array(z0[:1]), **settings)
        its, its_alone = kit.numpy(both.iterations), kit.numpy(alone.iterations)
        _expect(bool(np.all(kit.numpy(both.converged))), f"{solver}: the freezing problem did not converge")
        _expect(its[0] < its[1], f"{solver}: iterations {its.tolist()}; the first sample should stop first")
        _expect(its[0] == its_alone[0], f"{solver}: the fast sample took {its[0]} steps in the batch, "
                                        f"{its_alone[0]} alone")
        _close(f"{solver}: the fast sample's solution in the batch against the same sample solved alone "
               "(it changed after it converged)", kit.numpy(both.z)[:1], kit.numpy(alone.z), 1e-13)

    return check


def reference_check(solver: str, problem: str, reference: str) -> Callable[[Kit], None]:
    def check(kit: Kit) -> None:
        other = Kit(reference)
        sol = kit.solve(problem, solver, grad=None, **TIGHT)
        ref = other.solve(problem, solver, grad=None, **TIGHT)
        _close(f"{solver} on the {problem} problem against backend {reference!r}", _flat(kit, sol.z),
               _flat(other, ref.z), 1e-12)
        _expect(np.array_equal(kit.numpy(sol.iterations), other.numpy(ref.iterations)),
                f"{solver} on the {problem} problem: iterations {kit.numpy(sol.iterations).tolist()}, "
                f"backend {reference!r} {other.numpy(ref.iterations).tolist()}")

    return check


# ------------------------------------------------------------------------------------------------
# gradient modes


def _tanh_state_gradient(z: np.ndarray, ct: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For the tanh problem at its fixed point ``z``: the exact ``d(sum(ct * z*))/dx`` (implicit
    function theorem) and the one-step (Jacobian-free) one."""
    W, U, _ = TANH
    s = 1.0 - z**2
    eye = np.eye(len(W))
    exact = np.stack([np.linalg.solve((eye - si[:, None] * W).T, c) for si, c in zip(s, ct, strict=True)])
    return (exact * s) @ U, (ct * s) @ U


def gradient_check(mode: str) -> Callable[[Kit], None]:
    """``mode``'s gradient of ``sum(ct * z*)`` with respect to ``x``, through the backend's ``vjp``:
    ``implicit``, ``gdeq_refined`` (after Broyden), ``unroll`` and ``reversible`` (by the reversible
    solver) equal the exact gradient, ``jfb`` the one-step one, the others are finite and shaped
    like ``x``."""

    def check(kit: Kit) -> None:
        f, x, z0 = _problem(kit, "tanh")
        solver = {"gdeq": "broyden", "gdeq_refined": "broyden",
                  "reversible": "reversible"}.get(mode, "anderson")
        grad_options = {"tol": 1e-12, "max_iter": 200} if mode in ("implicit", "gdeq_refined") else None
        # the reversal restarts from exact pairs every few steps (rounding grows as it reverses)
        options: dict[str, Any] = {**TIGHT, "checkpoints": 30} if mode == "reversible" else TIGHT
        z, pullback = kit.backend.vjp(lambda x_: solve(f, x_, z0, backend=kit.name, solver=solver, grad=mode,
                                                       grad_options=grad_options, **options).z, x)
        ct = np.random.default_rng(_RNG_SEED + 5).standard_normal(X_TANH.shape[:1] + (TANH[0].shape[0],))
        (gx,) = pullback(kit.array(ct))
        gx = kit.numpy(gx)
        exact, one_step = _tanh_state_gradient(kit.numpy(z), ct)
        if mode in ("implicit", "gdeq_refined", "unroll", "reversible"):
            _close(f"grad={mode!r}: d(ct . z*)/dx", gx, exact, 1e-8)
        elif mode == "jfb":
            _close("grad='jfb': d(ct . z*)/dx", gx, one_step, 1e-10)
        else:
            _expect(gx.shape == X_TANH.shape and bool(np.all(np.isfinite(gx))),
                    f"grad={mode!r}: the gradient has shape {gx.shape} or non-finite entries")

    return check


def check_implicit_second_order(kit: Kit) -> None:
    """``implicit`` is exact to second order: through the backend's ``vjp`` (the inner one with
    ``create_graph=True``), the derivative with respect to the bias ``b`` of ``v . d(ct . z*)/dx``
    equals central differences of that first-order gradient to 1e-6 (a backend whose
    ``attach_adjoint`` ignores ``linear_solve`` raises :class:`deqcore.HigherOrderError` here)."""
    W, U, b = TANH
    Wt, Ut = kit.array(W.T), kit.array(U.T)
    rng = np.random.default_rng(_RNG_SEED + 6)
    ct, v = rng.standard_normal(X_TANH.shape[:1] + (W.shape[0],)), rng.standard_normal(X_TANH.shape)
    direction = rng.standard_normal(b.shape)
    x, z0 = kit.array(X_TANH), kit.array(np.zeros(ct.shape))
    options = {"tol": 1e-13, "max_iter": 300}

    def contracted(b_: Any) -> Any:  # v . d(ct . z*)/dx, differentiable in b_
        def z_star(x_: Any) -> Any:
            return solve(lambda z, x__: kit.xp.tanh(z @ Wt + x__ @ Ut + b_), x_, z0, backend=kit.name,
                         grad="implicit", grad_options=options, tol=1e-13, max_iter=300).z

        _, pullback = kit.backend.vjp(z_star, x, create_graph=True)
        return kit.xp.sum(pullback(kit.array(ct))[0] * kit.array(v))

    _, pullback = kit.backend.vjp(contracted, kit.array(b))
    (second,) = pullback(kit.array(1.0))
    eps = 1e-5
    plus, minus = (float(kit.numpy(contracted(kit.array(b + s * eps * direction)))) for s in (1, -1))
    _close("grad='implicit': d/db (v . d(ct . z*)/dx)", np.array(float(kit.numpy(second) @ direction)),
           np.array((plus - minus) / (2 * eps)), 1e-6)


def check_gradients_refused(kit: Kit) -> None:
    """Without autodiff a gradient mode, hypersolver training and the Jacobian penalty are errors
    naming the backend."""
    f, x, z0 = _problem(kit, "tanh")
    sol = solve(f, x, z0, backend=kit.name)  # the default, grad="auto", is no gradient mode here
    _expect(sol.grad is None, f"the default gradient mode on a backend without autodiff is {sol.grad!r}, "
            "not None")
    for mode in ("implicit", "jfb", "unroll"):
        try:
            solve(f, x, z0, backend=kit.name, grad=mode)
        except CapabilityError as error:
            _expect(repr(kit.name) in str(error) and "grad=None" in str(error),
                    f"the error for grad={mode!r} does not name the backend and the fix: {error}")
        else:
            raise AssertionError(f"solve(grad={mode!r}) on a backend without autodiff did not raise "
                                 "deqcore.CapabilityError")
    hs = HyperAnderson(IdentityCompression(TANH[0].shape[0]))
    requests: dict[str, Callable[[], Any]] = {
        "train_hypersolver": lambda: train_hypersolver(hs, f, [x], steps=1, backend=kit.name,
                                                       start=lambda x_: z0),
        "jacobian_penalty": lambda: jacobian_penalty(f, z0, x, z0 + 1.0, backend=kit.name),
    }
    for request, call in requests.items():
        try:
            call()
        except CapabilityError as error:
            _expect(repr(kit.name) in str(error), f"the {request} error does not name the backend: {error}")
        else:
            raise AssertionError(f"{request} on a backend without autodiff did not raise "
                                 "deqcore.CapabilityError")


# ------------------------------------------------------------------------------------------------
# the suite

PROTOCOL_CHECKS: dict[str, Callable[[Kit], None]] = {
    "attributes": check_attributes,
    "is_array": check_is_array,
    "while_loop": check_while_loop,
    "differentiable_loop": check_differentiable_loop,
    "fori_loop": check_fori_loop,
    "jit": check_jit,
    "set_index": check_set_index,
    "active_prefix": check_active_prefix,
    "linear_solve": check_linear_solve,
    "to_numpy": check_to_numpy,
    "host_callback": check_host_callback,
    "host_check": check_host_check,
    "is_concrete-device-register_pytree-no_grad": check_host_queries,
    "stop_gradient-first_order_only": check_identities,
}


def conformance_checks(name: str, reference: str | None = None) -> dict[str, Callable[[], None]]:
    """The checks for the registered backend ``name``, by check name; each raises on failure.

    Protocol methods (shapes, dtypes, values), every built-in solver (anderson, broyden,
    fixed_point, reversible) against exact float64 solutions of a linear, a tanh and a tuple-state
    problem, float32 solves, per-sample freezing; where the backend's capabilities declare
    ``autodiff``, ``vjp``, ``attach_reverse`` and every built-in gradient mode (``implicit``,
    ``unroll`` and ``reversible`` against the exact gradient, ``jfb`` against the one-step one) and
    ``implicit``'s second derivative (against finite differences of its gradient), else that
    gradient modes and hypersolver training are refused with :class:`deqcore.CapabilityError`.
    With ``reference`` (another registered backend, such as ``"torch"``), every solver's solutions
    and iteration counts on every problem must equal the reference backend's to 1e-12. Building
    the backend happens here: a backend that is not registered or does not implement the protocol
    raises at once.
    """
    kit = Kit(name)
    table: dict[str, Callable[[Kit], None]] = dict(PROTOCOL_CHECKS)
    for solver in SOLVERS:
        for problem in PROBLEMS:
            table[f"{solver}-{problem}"] = solver_check(solver, problem)
        table[f"{solver}-float32"] = dtype_check(solver)
        table[f"{solver}-freezing"] = freezing_check(solver)
    if kit.backend.capabilities.autodiff:
        table["vjp"] = check_vjp
        table["attach_reverse"] = check_attach_reverse
        builtin = [e.name for e in registry().entries("gradients") if e.plugin == "deqcore"]
        for mode in builtin:
            table[f"grad-{mode}"] = gradient_check(mode)
        table["grad-implicit-second-order"] = check_implicit_second_order
    else:
        table["grad-refused"] = check_gradients_refused
    if reference is not None:
        registry().backend(reference)  # an unknown or broken reference fails here, not per check
        for solver in SOLVERS:
            for problem in PROBLEMS:
                table[f"{solver}-{problem}-equals-{reference}"] = reference_check(solver, problem, reference)
    return {label: _bound(check, kit) for label, check in table.items()}


def _bound(check: Callable[[Kit], None], kit: Kit) -> Callable[[], None]:
    return lambda: check(kit)


def check_backend(name: str, reference: str | None = None) -> list[str]:
    """Run every conformance check on the registered backend ``name``; return the checks' names.

    Raises :class:`ConformanceError` listing every check that failed and why (all checks run, a
    failure does not stop the others). ``reference`` names a backend to compare with (see
    :func:`conformance_checks`).
    """
    checks = conformance_checks(name, reference)
    failures = []
    for label, check in checks.items():
        try:
            check()
        except Exception as error:
            failures.append(f"{label}: {type(error).__name__}: {error}")
    if failures:
        raise ConformanceError(f"backend {name!r} failed {len(failures)} of {len(checks)} conformance "
                               "checks:\n  " + "\n  ".join(failures))
    return list(checks)
