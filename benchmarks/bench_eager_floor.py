"""How fast can an eager PyTorch solver be? deqcore against bare-minimum loops, per solver.

The "floor" of each solver is a hand-written eager loop with the fewest torch calls per step we
could find and none of deqcore's guarantees: no per-sample freezing, no lowest-residual iterate,
no traces, no breakdown or non-finite handling; it stops when every sample's relative residual is
<= 1e-4. Fixed-point iteration is ``z = f(z)``; Anderson mixes m = 5 iterates with relative
lam = 1e-4 from a Gram matrix (one small batched solve per step); Broyden keeps every rank-one
pair of the inverse Jacobian and does four batched products per step. The floor bounds what any
eager implementation of the same algorithm reaches; the gap between it and deqcore is the price
of deqcore's guarantees, and the gap between it and NFE bare evaluations of f is the algorithm's
own arithmetic. deqcore's compiled path (``compile=True``) is shown beside them.

Problems are bench_solvers.py's (the same weights): the symmetric dense layer at each ``--dense``
size and the convolutional layer (``--conv``), float32, one torch thread.

Run:  python benchmarks/bench_eager_floor.py [--repeats 15] [--dense 256x256,1024x64] [--no-compile]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_solvers as bs  # noqa: E402

import deqcore  # noqa: E402

TOL, MAX_ITER = 1e-4, 50


def _rel(fz, z):
    return torch.linalg.vector_norm(fz - z, dim=-1) / (torch.linalg.vector_norm(fz, dim=-1) + 1e-9)


def floor_fixed_point(f, z):
    fz, nfe = f(z), 1
    while nfe <= MAX_ITER and bool((_rel(fz, z) > TOL).any()):
        z, fz, nfe = fz, f(fz), nfe + 1
    return z, nfe


def floor_anderson(f, z, m=5, lam=1e-4):
    fz, nfe = f(z), 1
    B, n = z.shape
    G, Y, H = torch.zeros(B, m, n), torch.zeros(B, m, n), torch.zeros(B, m, m)
    for k in range(MAX_ITER):
        g = fz - z
        if not bool((_rel(fz, z) > TOL).any()):
            break
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
        fz, nfe = f(z), nfe + 1
    return z, nfe


def floor_broyden(f, z):
    fz, nfe = f(z), 1
    g = fz - z
    Bg = -g
    B, n = z.shape
    U, V = torch.empty(B, MAX_ITER, n), torch.empty(B, MAX_ITER, n)
    for k in range(MAX_ITER):
        if not bool((_rel(fz, z) > TOL).any()):
            break
        z_new = z - Bg
        fz, nfe = f(z_new), nfe + 1
        g_new = fz - z_new
        Uk, Vk = U[:, :k], V[:, :k]
        Bg_new = torch.bmm(torch.bmm(g_new[:, None], Vk.transpose(1, 2)), Uk)[:, 0] - g_new
        dz = z_new - z
        v = torch.bmm(torch.bmm(dz[:, None], Uk.transpose(1, 2)), Vk)[:, 0] - dz
        u = (dz - Bg_new + Bg) / (v * (g_new - g)).sum(-1, keepdim=True)
        U[:, k], V[:, k] = u, v
        Bg = Bg_new + u * (v * g_new).sum(-1, keepdim=True)
        z, g = z_new, g_new
    return z, nfe


FLOORS = {"fixed_point": floor_fixed_point, "anderson": floor_anderson, "broyden": floor_broyden}


def measure(p: bs.Problem, repeats: int, compiled: bool) -> None:
    f, x = p.torch_layer()
    shape = x.shape
    flat = lambda z: f(z.reshape(shape), x).reshape(shape[0], -1)  # noqa: E731
    zero = torch.zeros(shape[0], p.n)
    methods = {}
    for s, floor in FLOORS.items():
        sol = deqcore.solve(f, x, solver=s, grad=None, tol=TOL, max_iter=MAX_ITER)
        nfe = int(sol.nfe)
        methods[f"deqcore {s}"] = (nfe, lambda s=s: deqcore.solve(f, x, solver=s, grad=None, tol=TOL,
                                                                   max_iter=MAX_ITER))
        if compiled:
            run = lambda s=s: deqcore.solve(f, x, solver=s, grad=None, tol=TOL, max_iter=MAX_ITER,  # noqa: E731
                                            compile=True)
            run()
            methods[f"compiled {s}"] = (nfe, run)
        z, fnfe = floor(flat, zero)
        worst = float(p.judge(z.reshape(shape)).max())
        note = "" if bs.converged(worst) else f" (did not converge: {worst:.1e})"
        methods[f"floor {s}{note}"] = (fnfe, lambda floor=floor: floor(flat, zero))

    def bare():
        z = torch.zeros_like(x)
        for _ in range(10):
            z = f(z, x)

    methods["10 bare f"] = (10, bare)
    with torch.no_grad():
        for _, fn in methods.values():
            fn()
        times: dict[str, list[float]] = {k: [] for k in methods}
        for _ in range(repeats):
            for k, (_, fn) in methods.items():
                t = time.perf_counter()
                fn()
                times[k].append(time.perf_counter() - t)
    tf = statistics.median(times["10 bare f"]) / 10
    print(f"\n{p.kind} {p.label}: one f = {tf * 1e3:.3f} ms")
    print(f"{'method':<28} {'NFE':>4} {'median ms':>10} {'min ms':>8} {'t/(NFE f)':>10} "
          f"{'overhead/step':>14}")
    for k, (nfe, _) in methods.items():
        if k == "10 bare f":
            continue
        med, low = statistics.median(times[k]), min(times[k])
        print(f"{k:<28} {nfe:>4} {med * 1e3:>10.2f} {low * 1e3:>8.2f} {med / (nfe * tf):>10.2f} "
              f"{(med - nfe * tf) / max(nfe - 1, 1) * 1e6:>11.0f} us")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dense", default="256x256,1024x64", help="symmetric dense layers' d x batch pairs")
    ap.add_argument("--conv", default="64x16x14x14", help="conv layers' batch x channels x height x width")
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--no-compile", action="store_true", help="skip deqcore's compiled path")
    args = ap.parse_args(argv)
    if args.repeats < 1:
        raise SystemExit("bench_eager_floor: --repeats must be >= 1")
    torch.set_num_threads(1)
    dense = bs._shapes(args.dense, 2, "--dense", "bench_eager_floor")
    convs = bs._shapes(args.conv, 4, "--conv", "bench_eager_floor")
    problems = [bs.make_problem("symmetric", s, "float32", 0.1) for s in dense]
    problems += [bs.make_problem("conv", s, "float32", 0.1) for s in convs]
    for p in problems:
        measure(p, args.repeats, not args.no_compile)
    return 0


if __name__ == "__main__":
    sys.exit(main())
