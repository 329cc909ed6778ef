"""Reversible solver and gradient: reconstruction error, gradient error and backward memory.

Problem: the dense tanh layer ``f(z, x) = tanh(z W^T + x U^T + b)``, W Gaussian with spectral
norm 0.9, d = 64, batch 16, z0 = 0 (tests/problems.py's ``tanh_deq`` generator, seed 11). Every
solve runs exactly ``steps`` steps (tol below reach), solver ``"reversible"``, on torch (the
arithmetic is the same on JAX; the equivalence tests hold them equal to 1e-9).

* ``drift``: the worst sample's relative error of the reconstructed initial pair, which
  ``grad="reversible"`` reports as ``solution.backward.residual``: the reversal's last state, where
  the amplified rounding is largest, against the exact ``z0``, over the larger of ``||z0||`` and
  ``||z_N||`` (null where it overflowed). With checkpoints it is the worst segment's error: each
  segment's reconstructed pair against the exact one kept at the checkpoint where it ends.
* ``grad rel err``: relative Frobenius error of ``dL/dW`` (``L = sum(c * z)``) against
  ``grad="unroll"`` of the same solve in the same dtype.
* ``steps to tol``: the steps the solver takes to a relative residual of 1e-4 and 1e-6 (float64),
  to weigh the forward's speed against the reversal's stability per beta.
* ``bytes``: what the forward keeps for the backward at ``max_iter`` 10 and 40 (d = 128, batch 4,
  float64), for ``reversible`` and ``unroll``. torch: unique storages packed by
  ``torch.autograd.graph.saved_tensors_hooks`` (W and x excluded). JAX: the compiled gradient's
  ``memory_analysis().temp_size_in_bytes``.

Writes benchmarks/results/reversible.json (kept unless ``--overwrite``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

BETAS = (0.5, 0.8, 1.2, 1.5)
STEPS = (10, 20, 30, 40, 50)


def _problem(d: int, batch: int, seed: int = 11):
    from problems import tanh_deq

    return tanh_deq(seed=seed, d=d, batch=batch, rho=0.9)


def _layer(torch, W, U, b):
    return lambda z, x: torch.tanh(z @ W.T + x @ U.T + b)


def reconstruction(dtype: str, beta: float, steps: int, checkpoints: int = 0) -> dict:
    import torch

    import deqcore

    W, U, b, x = _problem(64, 16)
    c = torch.tensor(np.random.default_rng(1).standard_normal(x.shape), dtype=getattr(torch, dtype))
    out = {}
    for grad in ("reversible", "unroll"):
        Wt = torch.tensor(W, dtype=getattr(torch, dtype), requires_grad=True)
        Ut, bt, xt = (torch.tensor(a, dtype=getattr(torch, dtype)) for a in (U, b, x))
        quiet = {"on_fail": "ignore"} if grad == "reversible" else None  # the drift is measured here
        sol = deqcore.solve(_layer(torch, Wt, Ut, bt), xt, solver="reversible", grad=grad, beta=beta,
                            checkpoints=checkpoints, tol=1e-300, max_iter=steps, grad_options=quiet)
        (gW,) = torch.autograd.grad((sol.z * c).sum(), Wt)
        out[grad] = (gW.double().numpy(), sol)
    g, ref = out["reversible"][0], out["unroll"][0]
    drift = out["reversible"][1].backward.residual
    return {"dtype": dtype, "beta": beta, "steps": steps, "checkpoints": checkpoints,
            "drift": _number(np.max(drift)),
            "grad_rel_err": float(np.linalg.norm(g - ref) / np.linalg.norm(ref))}


def _number(v: float) -> float | None:
    """``v`` as a JSON number; None (null) when it overflowed to inf or NaN."""
    return float(v) if np.isfinite(v) else None


def steps_to_tol(beta: float, tol: float) -> int:
    import torch

    import deqcore

    W, U, b, x = (torch.tensor(a) for a in _problem(64, 16))
    sol = deqcore.solve(lambda z, x: torch.tanh(z @ W.T + x @ U.T + b), x, solver="reversible", beta=beta,
                        tol=tol, max_iter=500, grad=None)
    return int(sol.steps)


def _quiet(grad: str) -> dict | None:
    """No drift warning: the memory rows measure bytes, not the gradient."""
    return {"on_fail": "ignore"} if grad == "reversible" else None


def torch_bytes(grad: str, max_iter: int) -> int:
    import torch

    import deqcore

    W, U, b, x = _problem(128, 4)
    Wt = torch.tensor(W, requires_grad=True)
    Ut, bt, xt = torch.tensor(U), torch.tensor(b), torch.tensor(x)
    exclude = {t.untyped_storage().data_ptr() for t in (Wt, xt)}
    storages = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in exclude:
            storages[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        sol = deqcore.solve(lambda z, x: torch.tanh(z @ Wt.T + x @ Ut.T + bt), xt, solver="reversible",
                            grad=grad, tol=1e-300, max_iter=max_iter, grad_options=_quiet(grad))
    sol.z.sum().backward()
    return sum(storages.values())


def jax_bytes(grad: str, max_iter: int) -> int:
    import jax

    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp

    import deqcore

    W, U, b, x = _problem(128, 4)

    def loss(W_):
        return jnp.sum(deqcore.solve(lambda z, x: jnp.tanh(z @ W_.T + x @ U.T + b), jnp.asarray(x),
                                     solver="reversible", grad=grad, tol=1e-300, max_iter=max_iter,
                                     grad_options=_quiet(grad)).z)

    compiled = jax.jit(jax.grad(loss)).lower(jnp.asarray(W)).compile()
    return int(compiled.memory_analysis().temp_size_in_bytes)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--frameworks", default="torch,jax", help="for the memory rows: torch, jax or both")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "reversible.json")
    p.add_argument("--overwrite", action="store_true")
    args = p.parse_args(argv)
    if args.out.exists() and not args.overwrite:
        p.error(f"{args.out} exists; pass --overwrite to replace it")
    rows = []
    for dtype in ("float64", "float32"):
        for beta in BETAS:
            for steps in STEPS:
                rows.append(reconstruction(dtype, beta, steps))
            rows.append(reconstruction(dtype, beta, 50, checkpoints=4))
            rows.append(reconstruction(dtype, beta, 50, checkpoints=9))
    for r in rows:
        print(f"{r['dtype']:8} beta {r['beta']:.1f} steps {r['steps']:3d} checkpoints {r['checkpoints']}: "
              f"drift {r['drift'] if r['drift'] is None else format(r['drift'], '.2e')}  "
              f"grad rel err {r['grad_rel_err']:.2e}")
    speed = [{"beta": beta, "tol": tol, "steps": steps_to_tol(beta, tol)}
             for beta in BETAS for tol in (1e-4, 1e-6)]
    for r in speed:
        print(f"beta {r['beta']:.1f}: {r['steps']} steps to rel tol {r['tol']:g}")
    memory = []
    for fw in args.frameworks.split(","):
        measure = torch_bytes if fw == "torch" else jax_bytes
        for grad in ("reversible", "unroll"):
            short, long = measure(grad, 10), measure(grad, 40)
            memory.append({"framework": fw, "grad": grad, "bytes_10": short, "bytes_40": long,
                           "ratio": long / short})
            print(f"{fw:5} {grad:10}: {short} bytes at max_iter 10, {long} at 40 ({long / short:.3f}x)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"reconstruction": rows, "steps_to_tol": speed, "memory": memory},
                                   indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
