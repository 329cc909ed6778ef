"""GDEQ's gradient quality against JFB on the benchmark's tanh DEQs, as the forward changes.

The problems of ``bench_solvers.py`` (batch 64, ``--d``, Gaussian and symmetric W, injection 0.1)
in float64; the loss ``sum(c * z*)`` of ``bench_gradients.py``. For each setting: the cosine of
dL/dW with the exact gradient (dense per-sample adjoint solves at the float64 fixed point). JFB
(Anderson forward) is the yardstick GDEQ should beat; GDEQ is run with the Broyden forward at
several tolerances and ring sizes, to show how its inverse-Jacobian estimate ages.

Run:  python benchmarks/bench_gdeq_fidelity.py [--d 256]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_gradients as bg  # noqa: E402
import bench_solvers as fwd  # noqa: E402

SETTINGS = (  # label, solve options
    ("jfb (anderson, tol 1e-4)", {"solver": "anderson", "grad": "jfb"}),
    ("npg k=5 (anderson, tol 1e-4)", {"solver": "anderson", "grad": "npg"}),
    ("gdeq tol 1e-4, m = max_iter", {"solver": "broyden", "grad": "gdeq"}),
    ("gdeq tol 1e-4, m = 10", {"solver": "broyden", "grad": "gdeq", "memory": 10}),
    ("gdeq tol 1e-6, m = max_iter", {"solver": "broyden", "grad": "gdeq", "tol": 1e-6, "max_iter": 100}),
    ("gdeq tol 1e-8, m = max_iter", {"solver": "broyden", "grad": "gdeq", "tol": 1e-8, "max_iter": 200}),
)


def main(argv: list[str] | None = None) -> int:
    import torch

    import deqcore

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--d", type=int, default=256)
    args = ap.parse_args(argv)
    print(f"{'problem':<10} {'setting':<32} {'steps':>5} {'cos':>8}")
    for kind in fwd.PROBLEMS:
        p = fwd.make_problem(kind, args.d, "float32")
        c = bg.cotangent(p)
        G = bg.exact_gradient(p, fwd.reference_fixed_point(p), c)
        W = torch.tensor(p["W"].T.copy(), dtype=torch.float64, requires_grad=True)
        U = torch.tensor(p["U"].T.copy(), dtype=torch.float64)
        b = torch.tensor(p["b"], dtype=torch.float64)
        x = torch.tensor(p["x"], dtype=torch.float64)
        ct = torch.tensor(c)

        def f(z, x, W=W, U=U, b=b):
            return torch.tanh(z @ W + x @ U + b)

        for label, options in SETTINGS:
            options = {"tol": fwd.TOL, "max_iter": fwd.MAX_ITER, **options}
            W.grad = None
            sol = deqcore.solve(f, x, stop_mode="rel", **options)
            (sol.z * ct).sum().backward()
            cos, _ = bg.accuracy(W.grad.numpy().T, G)
            print(f"{kind:<10} {label:<32} {int(sol.steps):>5} {cos:>8.4f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
