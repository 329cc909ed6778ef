"""How fast can an eager PyTorch Anderson step be? deqcore's Anderson against a bare-minimum loop.

The "floor" is a hand-written Anderson (m=5, relative lam, beta=1) with the fewest torch calls
per step we could find, and none of deqcore's guarantees: no per-sample freezing, no
lowest-residual iterate, no traces, no breakdown handling. It bounds what any eager-mode
implementation can reach; the gap to deqcore is the price of those guarantees. The problem is the
symmetric tanh DEQ of bench_solvers.py (batch 64, injection 0.1, float32, tol 1e-4 rel).

Run:  python benchmarks/bench_eager_floor.py [--sizes 256,1024] [--repeats 25]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

import deqcore


def problem(d: int, batch: int = 64, seed: int = 0):
    rng = np.random.default_rng(seed)
    Q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    W = torch.tensor(Q @ np.diag(np.linspace(-0.9, 0.9, d)) @ Q.T, dtype=torch.float32)
    U = torch.tensor(rng.standard_normal((d, d)) / np.sqrt(d), dtype=torch.float32)
    x = torch.tensor(0.1 * rng.standard_normal((batch, d)), dtype=torch.float32)
    b = torch.tensor(0.01 * rng.standard_normal(d), dtype=torch.float32)
    return (lambda z, x: torch.tanh(z @ W.T + x @ U.T + b)), x


def floor_anderson(f, x, m=5, tol=1e-4, max_iter=50, lam=1e-4):
    z = torch.zeros_like(x)
    fz = f(z, x)
    B, n = z.shape
    G, Y, H = torch.zeros(B, m, n), torch.zeros(B, m, n), torch.zeros(B, m, m)
    k, nfe = 0, 1
    while True:
        g = fz - z
        rel = torch.linalg.vector_norm(g, dim=-1) / (torch.linalg.vector_norm(fz, dim=-1) + 1e-9)
        if k >= max_iter or not bool((rel > tol).any()):
            return z, nfe
        s = k % m
        G[:, s], Y[:, s] = g, fz
        row = torch.bmm(g[:, None, :], G.transpose(1, 2))[:, 0]
        H[:, s], H[:, :, s] = row, row
        w = min(k + 1, m)
        Hw = H[:, :w, :w]
        shift = lam * Hw.diagonal(dim1=-2, dim2=-1).mean(-1, keepdim=True)
        a, _ = torch.linalg.solve_ex(Hw + torch.diag_embed(shift.expand(B, w)), torch.ones(B, w, 1),
                                     check_errors=False)
        a = a[:, :, 0] / a[:, :, 0].sum(-1, keepdim=True)
        z = torch.bmm(a[:, None, :], Y[:, :w])[:, 0]
        fz = f(z, x)
        nfe, k = nfe + 1, k + 1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="256,1024")
    ap.add_argument("--repeats", type=int, default=25)
    args = ap.parse_args()
    print(f"{'d':>5} {'method':<16} {'NFE':>4} {'median ms':>10} {'t/bare':>7} {'overhead/step':>14}")
    for d in (int(s) for s in args.sizes.split(",")):
        measure(d, args.repeats)


def measure(d: int, repeats: int) -> None:
    f, x = problem(d)
    nfe = int(deqcore.solve(f, x, solver="anderson", grad=None).nfe)
    floor_nfe = floor_anderson(f, x)[1]

    def bare():
        z = torch.zeros_like(x)
        for _ in range(nfe):
            z = f(z, x)

    methods = {"deqcore anderson": lambda: deqcore.solve(f, x, solver="anderson", grad=None),
               "floor anderson": lambda: floor_anderson(f, x), "bare f": bare}
    for fn in methods.values():
        fn()
    times: dict[str, list[float]] = {k: [] for k in methods}
    for _ in range(repeats):
        for k, fn in methods.items():
            t = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t)
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    for k, n in (("deqcore anderson", nfe), ("floor anderson", floor_nfe)):
        bare_n = med["bare f"] * n / nfe
        print(f"{d:>5} {k:<16} {n:>4} {med[k]:>10.2f} {med[k] / bare_n:>7.2f} "
              f"{(med[k] - bare_n) / n * 1e3:>11.0f} us")
    print(f"{d:>5} {'bare f':<16} {nfe:>4} {med['bare f']:>10.2f}")


if __name__ == "__main__":
    main()
