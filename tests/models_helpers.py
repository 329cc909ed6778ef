"""Run deqcore_models on either backend from NumPy inputs and return NumPy results."""

from __future__ import annotations

import json

import numpy as np
from deqcore_models._equilibrium_layer import DEQSettings
from deqcore_models._layers import cross_entropy
from deqcore_models._ops import ops_for
from deqcore_models.mdeq import mdeq_apply


def mdeq_run(backend, cfg, params, state, x, y, settings: DEQSettings, masks=None, *, train=True,
             dtype="float32", grad=True):
    """Loss, logits, fixed point (tuple), new state and parameter gradients as NumPy."""
    ops = ops_for(backend)
    P = {k: ops.asarray(v, dtype) for k, v in params.items()}
    S = {k: ops.asarray(v, dtype) for k, v in state.items()}
    X, Y = ops.asarray(x, dtype), ops.asarray(y, dtype)
    M = None if masks is None else [ops.asarray(m, dtype) for m in masks]
    if backend == "torch":
        import torch

        for v in P.values():
            v.requires_grad_(grad)
        with torch.set_grad_enabled(grad):
            logits, new_state, stats = mdeq_apply(ops, cfg, P, S, X, train=train, settings=settings, masks=M)
            loss = cross_entropy(ops.xp, logits, Y)
        grads = None
        if grad:
            loss.backward()
            grads = {k: v.grad.numpy().copy() for k, v in P.items()}
        z = None if stats.solution is None else tuple(ops.to_numpy(a) for a in stats.solution.z)
        return {"loss": float(loss), "logits": ops.to_numpy(logits), "z": z, "grads": grads,
                "state": {k: ops.to_numpy(v) for k, v in new_state.items()}, "nfe": int(stats.nfe)}
    import jax

    def lossf(P, S, X, Y, M):
        logits, new_state, stats = mdeq_apply(ops, cfg, P, S, X, train=train, settings=settings, masks=M)
        z = None if stats.solution is None else stats.solution.z
        return cross_entropy(ops.xp, logits, Y), (logits, new_state, z, stats.nfe)

    if grad:
        step = jax.jit(jax.value_and_grad(lossf, has_aux=True))
        (loss, (logits, new_state, z, nfe)), g = step(P, S, X, Y, M)
        grads = {k: np.asarray(v) for k, v in g.items()}
    else:
        loss, (logits, new_state, z, nfe) = jax.jit(lossf)(P, S, X, Y, M)
        grads = None
    z = None if z is None else tuple(map(np.asarray, z))
    return {"loss": float(loss), "logits": np.asarray(logits), "z": z, "grads": grads,
            "state": {k: np.asarray(v) for k, v in new_state.items()}, "nfe": int(nfe)}


#: Biases of MDEQ convs followed by BatchNorm have an exactly zero gradient (BN removes any
#: constant shift); Adam turns their float32 rounding noise into steps of +-lr that differ from one
#: way of computing the same gradient to another (frameworks, numbers of processes).
BN_FED_BIASES = {"head.down0.conv.bias", "head.final.conv.bias"}
#: BatchNorm running means that follow those biases (and so their noise).
BN_AFTER_FED_BIASES = {"head.down0.bn.running_mean", "head.final.bn.running_mean"}

#: (solver, gradient mode, options) of the cross-backend gradient checks: every built-in mode
GRAD_MODES = [
    ("broyden", "implicit", {"max_iter": 8}),
    ("broyden", "jfb", {}),
    ("anderson", "npg", {"k": 5, "lam": 0.5}),
    ("broyden", "gdeq", {}),
    ("fixed_point", "unroll", {}),
    ("anderson", "upg", {"k": 3, "lam": 0.5}),
]


def grad_rel_diff(a: dict, b: dict) -> float:
    """||a - b|| / ||a|| over all parameters together."""
    num = sum(float(np.sum((a[k] - b[k]) ** 2)) for k in a)
    den = sum(float(np.sum(a[k] ** 2)) for k in a)
    return (num / den) ** 0.5


def task_run(backend, task, params, state, x, y, settings: DEQSettings, masks=None, probe=None,
             dtype="float64", grad=True):
    """A task's training-mode loss, Jacobian penalty and parameter gradients (None with
    ``grad=False``) as NumPy; ``masks`` (a list or dict) and ``probe`` (a list) are NumPy,
    converted to ``dtype`` (integer inputs and targets, the tokens of a language model, keep
    theirs)."""
    ops = ops_for(backend)
    P = {k: ops.asarray(v, dtype) for k, v in params.items()}
    S = {k: ops.asarray(v, dtype) for k, v in state.items()}
    X, Y = (ops.asarray(a, None if np.issubdtype(a.dtype, np.integer) else dtype) for a in (x, y))
    if isinstance(masks, dict):
        M = {k: ops.asarray(v, dtype) for k, v in masks.items()}
    else:
        M = None if masks is None else [ops.asarray(m, dtype) for m in masks]
    V = None if probe is None else [ops.asarray(p, dtype) for p in probe]
    if backend == "torch":
        for v in P.values():
            v.requires_grad_(grad)
        loss, aux = task.loss(ops, P, S, X, Y, M, settings, True, V)
        grads = None
        if grad:
            loss.backward()
            grads = {k: (np.zeros(v.shape) if v.grad is None else v.grad.numpy().copy())
                     for k, v in P.items()}
        return {"loss": float(loss.detach()), "jac": float(aux[4].detach()), "nfe": int(aux[2]),
                "residual": float(aux[3]), "grads": grads}
    import jax

    def lossf(P):
        loss, aux = task.loss(ops, P, S, X, Y, M, settings, True, V)
        return loss, (aux[4], aux[2], aux[3])

    if not grad:
        loss, (jac, nfe, res) = jax.jit(lossf)(P)
        return {"loss": float(loss), "jac": float(jac), "nfe": int(nfe), "residual": float(res),
                "grads": None}
    (loss, (jac, nfe, res)), g = jax.jit(jax.value_and_grad(lossf, has_aux=True))(P)
    return {"loss": float(loss), "jac": float(jac), "nfe": int(nfe), "residual": float(res),
            "grads": {k: np.asarray(v) for k, v in g.items()}}


def rewrite_npz(path, change):
    """Rewrite a deqcore ``.npz`` (checkpoint or hypersolver weights) at ``path`` through
    ``change(arrays, meta)``, which returns ``(arrays, meta)``; ``meta`` may be raw bytes (for
    files whose metadata is not JSON)."""
    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files}
    meta = json.loads(arrays.pop("__meta__").tobytes())
    arrays, meta = change(arrays, meta)
    raw = meta if isinstance(meta, bytes) else json.dumps(meta).encode()
    with open(path, "wb") as fh:
        np.savez(fh, **arrays, __meta__=np.frombuffer(raw, np.uint8))
