"""GDEQ's gradient quality against JFB on the benchmark's tanh DEQs, as the forward changes.

The dense problems of ``bench_gradients.py`` (bench_solvers' data: batch 64, ``--d``, Gaussian and
symmetric W, injection 0.1, weights rounded to float32) solved in float64; its loss
``sum(c * z*)``. For each setting: the cosine of dL/dW with the exact gradient (dense per-sample
adjoint solves at the float64 fixed point). JFB (Anderson forward) is the yardstick GDEQ should
beat; GDEQ is run with the Broyden forward at several tolerances and ring sizes, to show how its
inverse-Jacobian estimate ages.

Run:  python benchmarks/bench_gdeq_fidelity.py [--d 256]
      python benchmarks/bench_gdeq_fidelity.py --d 32        (a check of the script: seconds)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_gradients as bg  # noqa: E402

SETTINGS = (  # label, solve options
    ("jfb (anderson, tol 1e-4)", {"solver": "anderson", "grad": "jfb"}),
    ("npg k=5 (anderson, tol 1e-4)", {"solver": "anderson", "grad": "npg"}),
    ("gdeq tol 1e-4, m = max_iter", {"solver": "broyden", "grad": "gdeq"}),
    ("gdeq tol 1e-4, m = 10", {"solver": "broyden", "grad": "gdeq", "memory": 10}),
    ("gdeq tol 1e-6, m = max_iter", {"solver": "broyden", "grad": "gdeq", "tol": 1e-6, "max_iter": 100}),
    ("gdeq tol 1e-8, m = max_iter", {"solver": "broyden", "grad": "gdeq", "tol": 1e-8, "max_iter": 200}),
)


def main(argv: list[str] | None = None) -> int:
    import deqcore

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--d", type=int, default=256, help="state size d (default 256)")
    args = ap.parse_args(argv)
    if args.d < 1:
        raise SystemExit(f"bench_gdeq_fidelity: --d wants a positive integer, got {args.d}")
    print(f"{'problem':<10} {'setting':<32} {'steps':>5} {'cos':>8}")
    for kind in bg.PROBLEMS:
        p = bg.make_problem(kind, args.d)
        c = bg.cotangent(p)
        G = bg.exact_gradient(p, p.reference(), c)
        T = bg.TorchData(p, c, "float64")
        for label, options in SETTINGS:
            options = {"tol": bg.TOL, "max_iter": bg.MAX_ITER, **options}
            T.Wt.grad = None
            sol = deqcore.solve(T.f, T.x, stop_mode="rel", **options)
            (sol.z * T.c).sum().backward()
            cos, _ = bg.accuracy(T.Wt.grad.numpy().T, G)
            print(f"{kind:<10} {label:<32} {int(sol.steps):>5} {cos:>8.4f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
