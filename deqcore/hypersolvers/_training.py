"""Training a hypersolver against a frozen layer, written once over the backend protocol.

Targets ``z*`` come from a precise classic solve; the losses unroll the hypersolver's K
iterations from its initialiser and backpropagate through them (through ``f`` in ``z``); only
the hypersolver's weights are differentiated, so the layer's parameters get no gradient and no
update. The optimiser is Adam written over ``xp``; on JAX the whole step is compiled.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np

from .._capabilities import require_autodiff
from .._inputs import first_floating, resolve_backend, zeros_like
from .._options import (
    Option,
    nonempty_str,
    nonnegative_float,
    one_of,
    optional,
    positive_float,
    positive_int,
    resolve,
)
from .._registry import registry
from .._solve import solve
from .._structure import Structure, leaves
from ..solvers._base import Problem
from ._hyperanderson import HyperAnderson
from ._mixers import safe_norm

TRAIN_OPTIONS: dict[str, Option[Any]] = {
    "lr": Option(1e-3, "Adam learning rate", positive_float),
    "conv_weight": Option(0.1, "lambda_1, the weight of L_conv", nonnegative_float),
    "init_weight": Option(0.05, "lambda_2, the weight of L_init", nonnegative_float),
    "alpha_weight": Option(1e-4, "lambda_3, the initial weight of L_alpha", nonnegative_float),
    "alpha_final": Option(5e-8, "lambda_3 after the decay", nonnegative_float),
    "alpha_decay_steps": Option(1500, "steps over which lambda_3 decays linearly to alpha_final",
                                positive_int),
    "target_solver": Option("broyden", "classic solver that computes the targets z*", nonempty_str),
    "target_tol": Option(1e-6, "stop tolerance (relative) of the target solve", positive_float),
    "target_max_iter": Option(100, "step budget of the target solve", positive_int),
    "conv_loss": Option("log", "L_conv's per-iterate error: 'norm' ||z_k - z*|| (HyperDEQ's) or 'log' "
                        "log ||z_k - z*|| (every order of magnitude counts alike)", one_of("norm", "log")),
    "unroll": Option(None, "iterations L_conv unrolls (default 2K, twice the hypersolver's budget): "
                     "unrolling only K leaves it free to stall after K steps", optional(positive_int)),
    "log_every": Option(10, "call progress every this many steps", positive_int),
}


def hypersolver_losses(hs: HyperAnderson, f: Callable[[Any, Any], Any], x: Any, z_star: Any,
                       params: Mapping[str, Any], *, backend: Any, conv_loss: str = "log",
                       unroll: int | None = None) -> tuple[Any, Any, Any]:
    """``(L_conv, L_init, L_alpha)`` of one batch, each a scalar averaged over the batch.

    ``L_conv = sum_k w_k e_k`` over ``unroll`` iterations (default ``2K``) with ``w_k = k /
    sum(1..unroll)`` and ``e_k = log ||z_k - z*||`` (``conv_loss="log"``) or ``||z_k - z*||``
    (``"norm"``, HyperDEQ's),
    ``L_init = ||h_phi(x) - z*||`` (0 without an initialiser) and ``L_alpha = sum_k ||G_k^T
    alpha_k||`` over the K mixing steps (the Anderson objective). ``params`` are framework arrays
    (the ones differentiated); ``z_star`` has the state's structure.
    """
    be = backend
    xp = be.xp
    structure = Structure.of(be, z_star, True, "z_star")
    zs = be.stop_gradient(structure.flatten(be, z_star))

    def fn(zf: Any) -> Any:
        return structure.flatten(be, f(structure.unflatten(be, zf), x))

    z0 = hs.initial_state(be, x, zs, params)
    if z0 is None:
        z0 = xp.zeros_like(zs)
        l_init = xp.sum(zs * 0.0)
    else:
        z0 = structure.flatten(be, z0)
        l_init = xp.mean(safe_norm(xp, z0 - zs))
    K = 2 * hs.iterations if unroll is None else unroll
    solver = hs.bind(be, structure, zs, max_iter=K, params=params)
    problem = Problem(be, fn, structure.batch, structure.n, structure.dtype)
    active = xp.ones(zs.shape[:1], dtype=xp.bool)
    zero = xp.sum(zs * 0.0)
    scale = 2.0 / (K * (K + 1))
    floor = 1e-10 * be.stop_gradient(xp.linalg.vector_norm(zs, axis=-1))

    def body(_: int, carry: tuple[Any, ...]) -> tuple[Any, ...]:
        state, k, l_conv, l_alpha = carry
        z, fz, state, _ = solver.step(problem, state, active)
        state = solver.commit(problem, state, z, fz, fz - z, active, active)
        k = k + 1.0
        err = safe_norm(xp, z - zs)
        if conv_loss == "log":
            err = xp.log(err + floor)
        l_conv = l_conv + k * scale * xp.mean(err)
        l_alpha = l_alpha + xp.mean(safe_norm(xp, state.mix_g))
        return state, k, l_conv, l_alpha

    state = solver.init(problem, z0, fn(z0))
    _, _, l_conv, l_alpha = be.fori_loop(K, body, (state, zero, zero, zero))
    return l_conv, l_init, l_alpha


def _adam(xp: Any, params: dict[str, Any], grads: dict[str, Any], m: dict[str, Any], v: dict[str, Any],
          t: Any, lr: Any) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    b1, b2, eps = 0.9, 0.999, 1e-8
    new_p, new_m, new_v = {}, {}, {}
    for k, p in params.items():
        g = grads[k]
        new_m[k] = b1 * m[k] + (1.0 - b1) * g
        new_v[k] = b2 * v[k] + (1.0 - b2) * g * g
        m_hat = new_m[k] / (1.0 - b1 ** t)
        v_hat = new_v[k] / (1.0 - b2 ** t)
        new_p[k] = p - lr * m_hat / (xp.sqrt(v_hat) + eps)
    return new_p, new_m, new_v


def train_hypersolver(
    hs: HyperAnderson,
    f: Callable[[Any, Any], Any],
    batches: Iterable[Any],
    *,
    steps: int,
    backend: str | None = None,
    start: Callable[[Any], Any] | None = None,
    progress: Callable[[dict[str, float]], None] | None = None,
    **options: Any,
) -> tuple[HyperAnderson, list[dict[str, float]]]:
    """Train ``hs`` to solve ``z = f(z, x)`` fast; ``f`` stays frozen.

    Args:
        hs: the hypersolver to train (its current weights are the start).
        f: the layer, ``f(z, x)`` as for :func:`deqcore.solve`; its parameters are not updated.
        batches: an iterable of inputs ``x`` (framework arrays), one per step; fewer than
            ``steps`` is an error. Small batches suffice (HyperDEQ used 8-32).
        steps: Adam steps.
        backend: as for :func:`deqcore.solve`; default inferred from the first batch.
        start: ``start(x)`` gives the target solve's ``z0`` (the state's structure); default zeros
            shaped like the initialiser's output, or like ``x`` without an initialiser.
        progress: called every ``log_every`` steps (and after the last) with that step's record.
        **options: ``lr`` (1e-3), ``conv_weight``/``init_weight``/``alpha_weight`` (lambda_1..3:
            0.1, 0.05, 1e-4), ``alpha_final`` (5e-8) and ``alpha_decay_steps`` (1500) for
            lambda_3's linear decay, ``target_solver`` ("broyden"), ``target_tol`` (1e-6, rel) and
            ``target_max_iter`` (100) for the targets, ``conv_loss`` ("log": ``log ||z_k - z*||``,
            or "norm": ``||z_k - z*||``), ``unroll`` (iterations in ``L_conv``, default ``2K``),
            ``log_every`` (10). Unknown names are a ``TypeError``.

    Returns:
        ``(trained, history)``: a copy of ``hs`` with the new weights, and one record per step
        (``step``, ``loss``, ``conv``, ``init``, ``alpha``, ``alpha_weight``,
        ``target_residual``: the worst relative residual of the targets, ``target_unconverged``:
        how many targets missed ``target_tol``, ``seconds``: wall time since the start).
    """
    opts = resolve("train_hypersolver", TRAIN_OPTIONS, options)
    if positive_int(steps) is not None:
        raise ValueError(f"train_hypersolver: steps must be {positive_int(steps)}, got {steps!r}")
    it = iter(batches)
    x = _next_batch(it, 0, steps)
    be = resolve_backend(registry(), backend, "train_hypersolver", {"x": x})
    require_autodiff(be, "train_hypersolver", "train on a backend with autodiff (torch, jax) and solve "
                     "with the trained hypersolver on this one")
    xp = be.xp
    target_fn, step_fn = _step_functions(hs, f, be, opts, start)
    history: list[dict[str, float]] = []
    t_start = time.perf_counter()
    params: dict[str, Any] = {}
    m: dict[str, Any] = {}
    v: dict[str, Any] = {}
    for step in range(1, steps + 1):
        if step > 1:
            x = _next_batch(it, step - 1, steps)
        z_star, target_res = target_fn(x)
        if not params:
            params = dict(hs.arrays(be, leaves(z_star)[0]))
            m = {k: xp.zeros_like(p) for k, p in params.items()}
            v = {k: xp.zeros_like(p) for k, p in params.items()}
        ref = next(iter(params.values()))
        fraction = min(1.0, (step - 1) / opts["alpha_decay_steps"])
        lam3 = opts["alpha_weight"] + fraction * (opts["alpha_final"] - opts["alpha_weight"])
        scalars = [xp.asarray(s, dtype=ref.dtype, device=be.device(ref)) for s in (step, opts["lr"], lam3)]
        params, m, v, values = step_fn(params, m, v, *scalars, x, z_star)
        vals = be.to_numpy(values)
        res = be.to_numpy(target_res)
        record = {"step": step, "loss": float(vals[0]), "conv": float(vals[1]), "init": float(vals[2]),
                  "alpha": float(vals[3]), "alpha_weight": lam3, "target_residual": float(np.max(res)),
                  "target_unconverged": int(np.sum(~(res <= opts["target_tol"]))),
                  "seconds": time.perf_counter() - t_start}
        if not math.isfinite(record["loss"]):
            raise FloatingPointError(f"train_hypersolver: the loss became {record['loss']} at step {step}; "
                                     "lower lr or check the layer")
        history.append(record)
        if progress is not None and (step % opts["log_every"] == 0 or step == steps):
            progress(record)
    trained = hs.with_params({k: np.asarray(be.to_numpy(p), np.float64) for k, p in params.items()})
    return trained, history


def _next_batch(it: Any, done: int, steps: int) -> Any:
    try:
        return next(it)
    except StopIteration:
        raise ValueError(f"train_hypersolver: batches ran out after {done} of {steps} steps") from None


def _step_functions(hs: HyperAnderson, f: Callable[[Any, Any], Any], be: Any, opts: dict[str, Any],
                    start: Callable[[Any], Any] | None) -> tuple[Any, Any]:
    """The (compiled) target solve and training step."""
    xp = be.xp
    names = sorted(hs.params)
    w1, w2 = opts["conv_weight"], opts["init_weight"]

    def targets(x: Any) -> tuple[Any, Any]:
        if start is not None:
            z0 = start(x)
        else:
            guess = hs.initial_state(be, x, first_floating(be, x, "train_hypersolver"))
            z0 = None if guess is None else zeros_like(be, guess, "train_hypersolver")
        sol = solve(f, x, z0, backend=be.name, solver=opts["target_solver"], tol=opts["target_tol"],
                    max_iter=opts["target_max_iter"], grad=None)
        return sol.z, sol.rel_residual

    def train_step(p: dict[str, Any], m: dict[str, Any], v: dict[str, Any], t: Any, lr: Any,
                   lam3: Any, x: Any, z_star: Any) -> tuple[Any, ...]:
        def objective(*leaves: Any) -> Any:
            weights = dict(zip(names, leaves, strict=True))
            l_conv, l_init, l_alpha = hypersolver_losses(hs, f, x, z_star, weights, backend=be,
                                                         conv_loss=opts["conv_loss"],
                                                         unroll=opts["unroll"])
            return xp.stack([w1 * l_conv + w2 * l_init + lam3 * l_alpha, l_conv, l_init, l_alpha])

        values, pullback = be.vjp(objective, *[p[k] for k in names])
        seed = xp.astype(xp.arange(4) == 0, values.dtype)
        grads = dict(zip(names, pullback(seed), strict=True))
        new_p, new_m, new_v = _adam(xp, p, grads, m, v, t, lr)
        return new_p, new_m, new_v, be.stop_gradient(values)

    return be.jit(targets), be.jit(train_step)
