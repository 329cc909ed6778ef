"""Gradient benchmark: deqcore's gradient modes against TorchDEQ (torch) and jaxopt / optimistix (JAX).

Problem: the dense tanh DEQ layer of ``bench_solvers.py`` (its ``make_problem``, so the data are
the very same): ``f(z, x) = tanh(z W^T + x U^T + b)``, batch 64, ``d`` in ``--sizes``, W
``gaussian`` (spectral norm 0.9) or ``symmetric`` (eigenvalues spread over [-0.9, 0.9]), injection
scale 0.1, float32. The loss is ``L = sum(c * z*)`` with a fixed random ``c`` (standard normal, seeded per
problem); the gradient is taken with respect to W only.

Forward solve (identical for every deqcore mode): Anderson (Broyden for ``gdeq`` and
``gdeq_refined``, which need its inverse-Jacobian estimate; the reversible solver for
``reversible``), per-sample relative tolerance 1e-4, at most 50 iterations. The anchors run their
own forward solver with the closest settings they offer (see below).

What is measured, per problem, framework and method:

* ``fwd ms`` / ``bwd ms``: medians over ``--repeats`` rounds, the methods of one problem timed
  round-robin (rotating order) so that outside load hits all of them alike.
  torch: one turn runs the forward (solve with the gradient path attached, loss) and then
  ``loss.backward()``; the backward time is ``time.perf_counter`` around ``loss.backward()``
  alone (torch on CPU runs eagerly and synchronously, so this is the backward's own time).
  JAX: one turn runs the jitted forward ``loss(W)`` and then, alone, a jitted application of the
  pullback that ``jax.vjp(loss, W)`` returned (computed once, outside the timing: the pullback is
  a pytree holding the forward's residuals), each with ``block_until_ready`` and repeated to last
  about 30 ms; the split gradient is checked against ``jax.grad``.
* ``VJPs``: batched vector-Jacobian products of f in the backward pass, the final one to the
  parameters included. Counted, not assumed: f is wrapped in a pass-through whose backward
  increments a counter (torch: an ``autograd.Function``; JAX: a ``custom_vjp`` whose backward
  calls ``jax.debug.callback``), in a separate untimed run. Expected: implicit ``1 +
  solution.backward.vjps`` (printed next to it as a cross-check), jfb / gdeq 1, npg ``k - 1 +
  1``, upg ``k``, unroll the forward's f evaluations, gdeq_refined ``1 + solution.backward.vjps`` (its
  backward is implicit's solve, tol 1e-6, from GDEQ's estimate by Anderson; ``(seeded)``: by a
  Broyden solve seeded with the forward's ring), reversible ``solution.backward.vjps`` (two per
  reversed step). jaxopt's default normal-CG solve also applies
  the transposed product (a JVP) once per VJP: its ``J-products`` column counts both.
  optimistix cannot be wrapped that way (its implicit adjoint needs forward-mode through f); its
  count is that of a replica of its backward linear solve (the same lineax GMRES on the transposed
  Jacobian at its fixed point, with a counting operator) plus 1.
* ``cos`` / ``rel err``: cosine and relative Frobenius error of the gradient w.r.t. W against the
  "exact" gradient: the float64 fixed point of the float32-rounded weights (plain iteration to
  1e-12, bench_solvers' ``Problem.reference``) and a dense float64 solve ``(I - J^T) u = c`` per
  sample (``np.linalg.solve``), then ``dL/dW = (u * s)^T z*`` with ``s = 1 - z*^2``. A method's
  error therefore contains its forward error (``fwd rel`` column: the worst sample's relative
  residual of its z, judged in float64).
  ``bwd err`` isolates the backward: the relative error against the same dense formula evaluated
  at the method's own returned z (float64), i.e. the exact implicit gradient given its forward.
* ``bytes``: what the forward keeps for the backward.
  torch: ``torch.autograd.graph.saved_tensors_hooks`` around one forward; every tensor packed for
  backward is recorded by its storage, and the ``nbytes`` of the unique storages are summed (a
  view counts its whole storage). The storages of W, U, b, x and c are excluded (they exist with
  or without a gradient). Arrays a mode keeps through a Python closure rather than autograd's
  saved tensors are not seen.
  JAX: ``jax.jit(grad_fn).lower(...).compile().memory_analysis().temp_size_in_bytes``, the XLA
  temporary buffers of the whole forward + backward program (so it includes the forward solver's
  own workspace, not only what is kept for the backward).

Anchors (read from their sources, driven with the documented options):

* TorchDEQ: ``torchdeq.get_deq(core="sliced", f_solver="anderson", f_max_iter=50, f_tol=1e-4,
  f_stop_mode="rel")`` with ``solver_kwargs={"m": 5, "lam": 1e-4, "tau": 1}`` (bench_solvers'
  ``TORCHDEQ["anderson"]``); ``ift=True`` with ``b_solver="anderson", b_tol=1e-6, b_stop_mode="rel",
  b_max_iter=100`` (deqcore implicit's backward defaults); phantom gradient ``grad=5, tau=0.5``;
  JFB ``grad=1``. TorchDEQ's backward solver gets no options besides these (its Anderson keeps
  m=6, lam=1e-4).
* jaxopt: ``AndersonAcceleration(history_size=5, maxiter=50, implicit_diff=True)`` with the
  default implicit-diff solve (``linear_solve.solve_normal_cg``) at ``tol=1e-6``.
* optimistix: ``optx.fixed_point(FixedPointIteration(rtol=0, atol=tol, norm=two_norm),
  max_steps=50, adjoint=ImplicitAdjoint(linear_solver=lx.GMRES(rtol=1e-6, atol=1e-6)))``.
  optimistix has no Anderson. Its default linear solver (``AutoLinearSolver``) would materialise
  the (64 d)^2 Jacobian and LU-factor it, which is out of reach here, hence GMRES.
  jaxopt / optimistix use one absolute whole-batch L2 tolerance: it is calibrated as in
  bench_solvers.py (the loosest of 16, 8, 4, 2, 1 times ``1e-4 min_i ||z*_i||`` that still
  brings every sample's relative residual to 1e-4, or the tightest if none does).

Memory sweep: deqcore's modes at ``max_iter`` 10 and 40 with ``tol=1e-30`` (every iteration runs;
deqcore refuses tol=0), on the first problem at the smallest size; plus ``gdeq`` with a bounded
Broyden ring (``memory=8``) to separate the ring from the mode.

Goal lines:

* GDEQ backward time <= 1.2x JFB's (per problem, size and framework);
* GDEQ gradient clearly better than JFB on the symmetric problem: ``1 - cos`` at most half JFB's;
* torch: implicit backward <= 0.5x TorchDEQ IFT's, with a backward error (``bwd err``) at most
  1.05x TorchDEQ IFT's (equal or better accuracy; the 5 % absorbs float32 noise). The total
  error is compared on ``bwd err`` because TorchDEQ's forward runs past the 1e-4 tolerance both
  are given (its stop test differs), which lowers its total error at the price of forward time;
* gdeq_refined: cosine with the exact gradient >= 0.999 with at most 0.5x the counted VJPs of
  implicit (same backward tolerance 1e-6), per problem, size and framework; its backward time is
  printed against implicit's on the same line (reported, not judged);
* memory flat: implicit / jfb / npg / gdeq (memory=8) / reversible bytes at max_iter 40 within 5 %
  of those at 10; unroll's grow. gdeq with the default ring (memory = max_iter) is reported, not judged: its
  ring is sized by max_iter by definition (2 m n floats per sample).

Run:  python benchmarks/bench_gradients.py [--sizes 256,1024] [--repeats 7]
      python benchmarks/bench_gradients.py --quick
      python benchmarks/bench_gradients.py --sizes 32 --repeats 1 --frameworks torch --no-anchors \
          --wait-idle 0 --json /tmp/gradients.json                  (a check of the script: seconds)
The anchors need ``torchdeq`` (torch) and ``jaxopt``, ``optimistix``, ``lineax`` (JAX): a missing one
stops the script at the start, with the command that installs it; ``--no-anchors`` measures deqcore
alone (the comparison goal with TorchDEQ is then reported as skipped). Results go to ``--json``
(default benchmarks/results/gradients.json); an existing file is kept unless ``--overwrite`` is
given. The documentation's blocks generated from that file (docs/benchmarks-gradients.md) are
rendered again (``render_docs.py``).
"""

from __future__ import annotations

import argparse
import functools
import gc
import math
import os
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

import numpy as np

from deqcore.internal import dumps_json, write_text

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_solvers as fwd  # noqa: E402  (problems, judge, reference, idle wait, versions)

BATCH = 64
INJECTION = 0.1
TOL = fwd.TOL
MAX_ITER = fwd.MAX_ITER
K, LAM = 5, 0.5  # npg / upg / TorchDEQ phantom
B_TOL, B_MAX_ITER = 1e-6, 100  # backward solves of the implicit methods
OPTX_TOL = 1e-5  # lineax GMRES (elementwise max-norm test): 1e-6 stagnates in float32
MEM_ITERS = (10, 40)
MEM_TOL = 1e-30
PROBLEMS = ("gaussian", "symmetric")  # bench_solvers' dense problems: the gradient is taken w.r.t. W
#: The anchor libraries per framework, by import name (lineax: optimistix's linear solver, used directly).
ANCHOR_PACKAGES = {"torch": fwd.ANCHOR_PACKAGES["torch"], "jax": (*fwd.ANCHOR_PACKAGES["jax"], "lineax")}
DEQCORE_MODES = (  # label, grad, forward solver, grad_options, solver options
    ("implicit", "implicit", "anderson", {}, {}),
    ("jfb", "jfb", "anderson", {}, {}),
    ("npg", "npg", "anderson", {"k": K, "lam": LAM}, {}),
    ("upg", "upg", "anderson", {"k": K, "lam": LAM}, {}),
    ("gdeq", "gdeq", "broyden", {}, {}),
    ("gdeq_refined", "gdeq_refined", "broyden", {}, {}),
    ("gdeq_refined (seeded)", "gdeq_refined", "broyden", {"seed_inverse": True, "solver": "broyden"}, {}),
    ("unroll", "unroll", "anderson", {}, {}),
    ("reversible", "reversible", "reversible", {}, {}),
)
MEM_MODES = DEQCORE_MODES + (("gdeq (memory=8)", "gdeq", "broyden", {}, {"memory": 8}),)
# gdeq's ring holds `memory` pairs, by default max_iter of them: it is flat in the iterations for a
# fixed ring, which is what the goal checks; the default row shows the ring growing with max_iter.
FLAT_MODES = ("implicit", "jfb", "npg", "gdeq (memory=8)", "reversible")
GDEQ_TIME_LIMIT = 1.2
GDEQ_COS_FACTOR = 0.5
IFT_TIME_LIMIT = 0.5
IFT_ACC_SLACK = 1.05
#: VJPs after the backward report's own (the final one to the parameters; the reversible mode's
#: reversal carries the parameters' cotangent itself)
_FINAL_VJPS = {"reversible": 0}
REFINED_COS = 0.999  # gdeq_refined: cosine with the exact gradient at least this ...
REFINED_VJP_LIMIT = 0.5  # ... with at most this fraction of implicit's counted VJPs
FLAT_LIMIT = 1.05
COUNT_JAX = True  # count JAX VJPs with a tapped f (one more compile per method); off in --quick
JAX_TURN_S = 0.03  # each JAX timing turn repeats forward and gradient to last about this long


# ----------------------------------------------------------------------------------------------
# Exact gradient (NumPy, float64)
# ----------------------------------------------------------------------------------------------


def make_problem(kind: str, d: int) -> fwd.Problem:
    """bench_solvers' dense problem ``kind`` at state size ``d``, batch 64, injection 0.1, float32."""
    return fwd.make_problem(kind, (d, BATCH), "float32", INJECTION)


def cotangent(p: fwd.Problem) -> np.ndarray:
    rng = np.random.default_rng([fwd.SEED, p.extra["d"], PROBLEMS.index(p.kind), 1])
    return rng.standard_normal((p.batch, p.extra["d"])).astype(np.float32).astype(np.float64)


def exact_gradient(p: fwd.Problem, z: np.ndarray, c: np.ndarray, chunk: int = 8) -> np.ndarray:
    """dL/dW of L = sum(c * z*) at the fixed point z: dense per-sample adjoint solves."""
    W = p.arrays["W"]
    d = W.shape[0]
    s = 1.0 - p.f_numpy(z) ** 2  # tanh' at z*
    u = np.empty_like(z)
    eye = np.eye(d)
    for i in range(0, z.shape[0], chunk):
        # u (I - J) = c with J = diag(s) W, i.e. (I - W^T diag(s)) u^T = c^T
        A = eye[None] - W.T[None] * s[i:i + chunk, None, :]
        u[i:i + chunk] = np.linalg.solve(A, c[i:i + chunk, :, None])[..., 0]
    return (u * s).T @ z


def accuracy(g: np.ndarray, G: np.ndarray) -> tuple[float, float]:
    g = np.asarray(g, dtype=np.float64)
    if not np.all(np.isfinite(g)):
        return float("nan"), float("nan")
    ng, nG = np.linalg.norm(g), np.linalg.norm(G)
    cos = float(np.sum(g * G) / (ng * nG)) if ng > 0 else float("nan")
    return cos, float(np.linalg.norm(g - G) / nG)


# ----------------------------------------------------------------------------------------------
# Cases and timing
# ----------------------------------------------------------------------------------------------


class Case:
    """One method on one problem, warmed up; ``turn()`` returns (forward s, backward s), the
    backward timed alone (torch: ``loss.backward()``; JAX: the jitted pullback)."""

    def __init__(self, framework, p, method, library, fsolver, turn, info):
        self.framework, self.p, self.method, self.library = framework, p, method, library
        self.fsolver, self.turn, self.info = fsolver, turn, info
        self.tf: list[float] = []
        self.tb: list[float] = []


def time_round_robin(cases: list[Case], repeats: int) -> None:
    gc_was = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        for r in range(repeats):
            k = r % len(cases)
            for case in cases[k:] + cases[:k]:
                a, b = case.turn()
                case.tf.append(a)
                case.tb.append(b)
            gc.collect()
    finally:
        if gc_was:
            gc.enable()


def row(case: Case, G: np.ndarray) -> dict:
    info = case.info
    cos, err = accuracy(info["grad"], G)
    _, bwd_err = accuracy(info["grad"], info["grad_at_z"])
    tf = statistics.median(case.tf)
    tb = statistics.median(case.tb)
    tb_min = min(case.tb)
    total = [a + b for a, b in zip(case.tf, case.tb, strict=True)]
    return {
        "backend": case.framework, "problem": case.p.kind, "d": case.p.extra["d"],
        "method": case.method, "library": case.library, "forward_solver": case.fsolver,
        "fwd_steps": info.get("steps"), "fwd_worst_rel": info["worst"],
        "fwd_converged": fwd.converged(info["worst"]),
        "fwd_ms": 1e3 * tf, "bwd_ms": 1e3 * tb, "bwd_min_ms": 1e3 * tb_min,
        "total_ms": 1e3 * statistics.median(total),
        "fwd_times_ms": [1e3 * v for v in case.tf],
        "bwd_times_ms": [1e3 * v for v in case.tb],
        "vjps": info.get("vjps"), "jprods": info.get("jprods", info.get("vjps")),
        "vjps_reported": info.get("vjps_reported"), "vjps_expected": info.get("vjps_expected"),
        "cos": cos, "rel_err": err, "bwd_rel_err": bwd_err, "bytes": info.get("bytes"),
        "bytes_fwd_only": info.get("bytes_fwd_only"),
        "bwd_converged": info.get("bwd_converged"), "note": info.get("note", ""),
    }


# ----------------------------------------------------------------------------------------------
# torch
# ----------------------------------------------------------------------------------------------


def _torch_saved_bytes(run, exclude):
    """Run ``run()`` (a forward) under saved_tensors_hooks; sum the unique saved storages."""
    import torch

    skip = {t.untyped_storage().data_ptr() for t in exclude}
    seen: dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        ptr = st.data_ptr()
        if ptr not in skip:
            seen[ptr] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = run()
    return sum(seen.values()), out


class TorchData:
    """The problem's tensors with W^T a leaf that requires grad; ``f`` and ``f_counted`` (the same
    layer, counting the VJPs of its backward in ``count[0]``)."""

    def __init__(self, p: fwd.Problem, c: np.ndarray, dtype: str = "float32"):
        import torch

        dt = getattr(torch, dtype)
        a = p.arrays
        self.Wt = torch.tensor(a["W"].T.copy(), dtype=dt, requires_grad=True)
        self.Ut = torch.tensor(a["U"].T.copy(), dtype=dt)
        self.b = torch.tensor(a["b"], dtype=dt)
        self.x = torch.tensor(a["x"], dtype=dt)
        self.c = torch.tensor(c, dtype=dt)
        self.count = [0]
        counter = self.count

        class Tap(torch.autograd.Function):
            @staticmethod
            def forward(ctx, a):
                return a.view_as(a)

            @staticmethod
            def backward(ctx, g):
                counter[0] += 1
                return g

        def f(z, x):
            return torch.tanh(z @ self.Wt + x @ self.Ut + self.b)

        def f_counted(z, x):
            return torch.tanh(Tap.apply(z @ self.Wt + x @ self.Ut + self.b))

        self.f, self.f_counted = f, f_counted

    def exclude(self):
        return (self.Wt, self.Ut, self.b, self.x, self.c)


def torch_cases(p: fwd.Problem, c: np.ndarray, anchors: bool = True) -> list[Case]:
    import torch

    import deqcore

    T = TorchData(p, c)
    cases = []

    def build(forward_of, method, library, fsolver, expected=None):
        """``forward_of(f)`` returns a function running the forward, giving (z, meta)."""
        forward, forward_counted = forward_of(T.f), forward_of(T.f_counted)
        info = {"vjps_expected": expected}
        # counted run (untimed): VJPs, gradient, forward quality, reported statistics
        T.Wt.grad = None
        T.count[0] = 0
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            z, meta = forward_counted()
            (T.c * z).sum().backward()
        info["vjps"] = T.count[0]
        info["grad"] = T.Wt.grad.detach().numpy().T.astype(np.float64)
        info["worst"] = float(p.judge(z).max())
        info["grad_at_z"] = exact_gradient(p, z.detach().numpy().astype(np.float64), c)
        info["steps"] = meta["steps"]
        if meta.get("nfe") is not None and method == "unroll":
            info["vjps_expected"] = meta["nfe"]
        rep = meta.get("report")
        if rep is not None and rep.vjps is not None:
            info["vjps_reported"] = rep.vjps + _FINAL_VJPS.get(method, 1)
            info["bwd_converged"] = bool(np.all(rep.converged))
        notes = sorted({type(w.message).__name__ for w in caught})
        # memory (one forward under saved_tensors_hooks), then drop the graph
        T.Wt.grad = None
        nbytes, (z, _) = _torch_saved_bytes(forward, T.exclude())
        info["bytes"] = nbytes
        del z
        if notes:
            info["note"] = "warned: " + ", ".join(notes)

        def turn():
            T.Wt.grad = None
            t0 = time.perf_counter()
            z, _ = forward()
            loss = (T.c * z).sum()
            t1 = time.perf_counter()
            loss.backward()
            t2 = time.perf_counter()
            return t1 - t0, t2 - t1

        def quiet_turn():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return turn()

        quiet_turn()  # warm-up
        cases.append(Case("torch", p, method, library, fsolver, quiet_turn, info))

    for label, mode, solver, gopts, sopts in DEQCORE_MODES:
        def forward_of(f, mode=mode, solver=solver, gopts=gopts, sopts=sopts):
            def run():
                sol = deqcore.solve(f, T.x, solver=solver, tol=TOL, max_iter=MAX_ITER,
                                    stop_mode="rel", grad=mode, grad_options=gopts, **sopts)
                return sol.z, {"steps": int(sol.steps), "nfe": int(sol.nfe), "report": sol.backward}
            return run

        expected = {"jfb": 1, "gdeq": 1, "npg": K, "upg": K}.get(mode)
        build(forward_of, label, "deqcore", solver, expected)

    if not anchors:
        return cases
    from torchdeq import get_deq

    common = dict(core="sliced", f_solver="anderson", f_max_iter=MAX_ITER, f_tol=TOL,
                  f_stop_mode="rel", b_solver="anderson", b_max_iter=B_MAX_ITER, b_tol=B_TOL,
                  b_stop_mode="rel")
    fkw = fwd.TORCHDEQ["anderson"]
    torchdeq_modes = [
        ("IFT", dict(ift=True), None),
        (f"phantom (k={K}, tau={LAM})", dict(grad=K, tau=LAM), K),
        ("JFB", dict(grad=1), 1),
    ]
    for name, kw, expected in torchdeq_modes:
        deq = get_deq(**common, **kw)
        deq.train()

        def forward_of(f, deq=deq):
            def run():
                z_out, info = deq(lambda z: f(z, T.x), torch.zeros_like(T.x), solver_kwargs=dict(fkw))
                return z_out[-1], {"steps": int(info["rel_trace"].shape[1])}
            return run

        build(forward_of, name, "torchdeq", "anderson", expected)
    return cases


def torch_memory(p: fwd.Problem, c: np.ndarray) -> list[dict]:
    import deqcore

    T = TorchData(p, c)
    out = []
    for label, mode, solver, gopts, sopts in MEM_MODES:
        rec = {"backend": "torch", "problem": p.kind, "d": p.extra["d"], "method": label,
               "measure": "saved_tensors_hooks unique storages (excl. W, U, b, x, c)"}
        for n in MEM_ITERS:
            def run(n=n, mode=mode, solver=solver, gopts=gopts, sopts=sopts):
                return deqcore.solve(T.f, T.x, solver=solver, tol=MEM_TOL, max_iter=n,
                                     stop_mode="rel", grad=mode, grad_options=gopts, **sopts)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                nbytes, sol = _torch_saved_bytes(run, T.exclude())
            rec[f"bytes_{n}"] = nbytes
            rec[f"steps_{n}"] = int(sol.steps)
            del sol
        out.append(rec)
    return out


# ----------------------------------------------------------------------------------------------
# JAX
# ----------------------------------------------------------------------------------------------


def _jax_tap(counter):
    import jax

    def inc(_):
        counter[0] += 1

    @jax.custom_vjp
    def tap(a):
        return a

    def tap_fwd(a):
        return a, None

    def tap_bwd(_, g):
        jax.debug.callback(inc, g.reshape(-1)[0])
        return (g,)

    tap.defvjp(tap_fwd, tap_bwd)
    return tap


class _JaxData:
    def __init__(self, p: fwd.Problem, c: np.ndarray):
        import jax.numpy as jnp

        a = p.arrays
        self.Wt = jnp.asarray(a["W"].T, dtype=jnp.float32)
        self.Ut = jnp.asarray(a["U"].T, dtype=jnp.float32)
        self.b = jnp.asarray(a["b"], dtype=jnp.float32)
        self.x = jnp.asarray(a["x"], dtype=jnp.float32)
        self.c = jnp.asarray(c, dtype=jnp.float32)
        self.count = [0]
        tap = _jax_tap(self.count)
        Ut, b, x = self.Ut, self.b, self.x

        def f(Wt, z):
            return jnp.tanh(z @ Wt + x @ Ut + b)

        def f_counted(Wt, z):
            return jnp.tanh(tap(z @ Wt + x @ Ut + b))

        self.f, self.f_counted = f, f_counted


def _temp_bytes(compiled):
    try:
        return int(compiled.memory_analysis().temp_size_in_bytes)
    except Exception:  # noqa: BLE001 - memory analysis is optional on some platforms
        return None


def jax_cases(p: fwd.Problem, c: np.ndarray, zref: np.ndarray, anchors: bool = True) -> list[Case]:
    import jax
    import jax.numpy as jnp

    import deqcore

    J = _JaxData(p, c)
    cases = []

    def build(loss_of, method, library, fsolver, args=(), expected=None, jprod=None, count=None):
        """``loss_of(f)`` gives ``loss(Wt, c, *args) -> (loss, aux)`` with aux = (z, steps)."""
        loss = loss_of(J.f)
        targs = (J.Wt, J.c, *args)
        reports.clear()  # deqcore's BackwardReport objects, appended while tracing
        # compiled once, ahead of time: the same executables give the memory analysis and run
        fwd_fn = jax.jit(loss).lower(*targs).compile()
        grad_fn = jax.jit(jax.grad(loss, has_aux=True)).lower(*targs).compile()
        info = {"vjps_expected": expected, "bytes": _temp_bytes(grad_fn),
                "bytes_fwd_only": _temp_bytes(fwd_fn)}
        g, (z, steps) = jax.block_until_ready(grad_fn(*targs))
        jax.effects_barrier()
        rep = reports[-1] if reports else None
        if rep is not None and rep.vjps is not None:
            info["vjps_reported"] = rep.vjps + _FINAL_VJPS.get(method, 1)
            info["bwd_converged"] = bool(np.all(rep.converged))
        info["grad"] = np.asarray(g, dtype=np.float64).T
        info["worst"] = float(p.judge(z).max())
        info["grad_at_z"] = exact_gradient(p, np.asarray(z, dtype=np.float64), c)
        info["steps"] = int(steps)
        if count is not None:
            info["vjps"] = count(z)
        elif COUNT_JAX:
            counted = jax.jit(jax.grad(loss_of(J.f_counted), has_aux=True))
            J.count[0] = 0
            jax.block_until_ready(counted(*targs))
            jax.effects_barrier()
            info["vjps"] = J.count[0]
        else:
            info["vjps"] = info.get("vjps_reported", expected)
            info["note"] = "VJPs not counted (--quick)"
        if jprod is not None and info["vjps"] is not None:
            info["jprods"] = jprod(info["vjps"])
        # Each timed turn runs the forward and the gradient ``inner`` times each (the means enter
        # the medians): one call can take well under a millisecond, far below the noise of a
        # shared machine's scheduler.
        # The backward alone: jax.vjp's pullback is a pytree (the residuals the forward kept), so
        # a jitted forward can return it and a second jitted function can apply it.
        def split(Wt, c, *rest):
            _, pullback, _ = jax.vjp(lambda W_: loss(W_, c, *rest), Wt, has_aux=True)
            return pullback

        fwd_vjp = jax.jit(split)
        bwd_fn = jax.jit(lambda pullback: pullback(jnp.ones((), jnp.float32))[0])
        pullback = jax.block_until_ready(fwd_vjp(*targs))
        g_split = np.asarray(jax.block_until_ready(bwd_fn(pullback)), dtype=np.float64).T
        if not np.allclose(g_split, info["grad"], rtol=1e-4, atol=1e-6 * np.abs(info["grad"]).max()):
            raise AssertionError(f"{method}: the split forward/backward disagrees with jax.grad")
        t = time.perf_counter()
        jax.block_until_ready(fwd_fn(*targs))
        jax.block_until_ready(bwd_fn(pullback))
        once = time.perf_counter() - t
        inner = max(1, min(50, int(JAX_TURN_S / max(once, 1e-6))))
        info["inner"] = inner

        def turn():
            t0 = time.perf_counter()
            for _ in range(inner):
                jax.block_until_ready(fwd_fn(*targs))
            t1 = time.perf_counter()
            for _ in range(inner):
                jax.block_until_ready(bwd_fn(pullback))
            t2 = time.perf_counter()
            return (t1 - t0) / inner, (t2 - t1) / inner

        cases.append(Case("jax", p, method, library, fsolver, turn, info))
        return info

    reports: list = []
    for label, mode, solver, gopts, sopts in DEQCORE_MODES:
        def loss_of(f, mode=mode, solver=solver, gopts=gopts, sopts=sopts):
            def loss(Wt, c):
                sol = deqcore.solve(lambda z, x: f(Wt, z), J.x, solver=solver, tol=TOL,
                                    max_iter=MAX_ITER, stop_mode="rel", grad=mode,
                                    grad_options=gopts, **sopts)
                reports.append(sol.backward)
                return jnp.sum(c * sol.z), (sol.z, sol.steps)
            return loss

        expected = {"jfb": 1, "gdeq": 1, "npg": K, "upg": K}.get(mode)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            info = build(loss_of, label, "deqcore", solver, expected=expected)
        if mode == "unroll":
            info["vjps_expected"] = info["steps"] + 1

    if not anchors:
        return cases
    import jaxopt
    import lineax as lx
    import optimistix as optx

    # anchors: absolute whole-batch tolerance, calibrated on the forward (as bench_solvers.py)
    t0 = TOL * float(np.min(np.linalg.norm(zref, axis=-1)))

    def calibrate(solve):
        chosen = None
        for fac in fwd.CALIBRATION_FACTORS:
            tol = jnp.asarray(t0 * fac, dtype=jnp.float32)
            z = jax.block_until_ready(solve(J.Wt, tol))
            worst = float(p.judge(z).max())
            chosen = (fac, tol)
            if fwd.converged(worst):
                break
        return chosen

    def jaxopt_run(f, Wt, tol, solve=None):
        solve = solve or functools.partial(jaxopt.linear_solve.solve_normal_cg, tol=B_TOL)
        solver = jaxopt.AndersonAcceleration(fixed_point_fun=lambda z, W_: f(W_, z),
                                             history_size=5, maxiter=MAX_ITER, tol=tol,
                                             implicit_diff=True, implicit_diff_solve=solve)
        z, state = solver.run(jnp.zeros_like(J.x), Wt)
        return z, state.iter_num

    gmres = lx.GMRES(rtol=OPTX_TOL, atol=OPTX_TOL)

    def optx_run(f, Wt, tol):
        solver = optx.FixedPointIteration(rtol=0.0, atol=tol, norm=optx.two_norm)
        sol = optx.fixed_point(lambda z, W_: f(W_, z), solver, jnp.zeros_like(J.x), args=Wt,
                               max_steps=MAX_ITER, throw=False,
                               adjoint=optx.ImplicitAdjoint(linear_solver=gmres))
        return sol.value, sol.stats["num_steps"]

    def optx_count(z):
        """Replica of optimistix's backward solve: GMRES on (I - J)^T at its z, counted."""
        counter = [0]

        def inc(_):
            counter[0] += 1

        @jax.jit
        def replica(Wt, z, c):
            _, vjp = jax.vjp(lambda z_: J.f(Wt, z_) - z_, z)

            def mv(u):
                jax.debug.callback(inc, u.reshape(-1)[0])
                return vjp(u)[0]

            op = lx.FunctionLinearOperator(mv, jax.eval_shape(lambda: z))
            return lx.linear_solve(op, -c, solver=gmres, throw=False).value

        jax.block_until_ready(replica(J.Wt, z, J.c))
        jax.effects_barrier()
        return counter[0] + 1

    for name, lib, run, extra in (
            ("AndersonAcceleration implicit_diff", "jaxopt", jaxopt_run, {}),
            ("fixed_point ImplicitAdjoint", "optimistix", optx_run, {"count": optx_count})):
        fsolve = jax.jit(lambda Wt, tol, run=run: run(J.f, Wt, tol)[0])
        fac, abs_tol = calibrate(fsolve)

        def loss_of(f, run=run):
            def loss(Wt, c, tol):
                z, steps = run(f, Wt, tol)
                return jnp.sum(c * z), (z, steps)
            return loss

        jprod = (lambda v: 2 * v) if lib == "jaxopt" else None
        info = build(loss_of, name, lib, "anderson" if lib == "jaxopt" else "fixed_point",
                     args=(abs_tol,), jprod=jprod, **extra)
        info["note"] = f"fwd tol={float(abs_tol):.2e} ({fac:g}x t0) whole-batch L2 abs"
    return cases


def jax_memory(p: fwd.Problem, c: np.ndarray) -> list[dict]:
    import jax
    import jax.numpy as jnp

    import deqcore

    J = _JaxData(p, c)
    out = []
    for label, mode, solver, gopts, sopts in MEM_MODES:
        rec = {"backend": "jax", "problem": p.kind, "d": p.extra["d"], "method": label,
               "measure": "temp_size_in_bytes of jit(grad) (forward + backward program)"}
        for n in MEM_ITERS:
            def loss(Wt, c, n=n, mode=mode, solver=solver, gopts=gopts, sopts=sopts):
                sol = deqcore.solve(lambda z, x: J.f(Wt, z), J.x, solver=solver, tol=MEM_TOL,
                                    max_iter=n, stop_mode="rel", grad=mode, grad_options=gopts,
                                    **sopts)
                return jnp.sum(c * sol.z)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                rec[f"bytes_{n}"] = _temp_bytes(jax.jit(jax.grad(loss)).lower(J.Wt, J.c).compile())
        out.append(rec)
    return out


# ----------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------

HEADER = (f"{'problem':<9} {'d':>5} {'backend':<6} {'library':<10} {'method':<34} {'fwd':>3} "
          f"{'fwd rel':>8} {'fwd ms':>8} {'bwd ms':>8} {'(min)':>8} {'VJPs':>5} {'Jprod':>5} "
          f"{'cos':>8} {'rel err':>8} {'bwd err':>8} {'bytes':>10}  note")


def _f(v, fmt, width):
    return f"{'-':>{width}}" if v is None or (isinstance(v, float) and not math.isfinite(v)) \
        else format(v, fmt).rjust(width)


def fmt_row(r: dict) -> str:
    vj = r["vjps"]
    vj_s = str(vj)
    if r.get("vjps_reported") is not None and r["vjps_reported"] != vj:
        vj_s += f"(rep {r['vjps_reported']})"
    return (f"{r['problem']:<9} {r['d']:>5} {r['backend']:<6} {r['library']:<10} {r['method']:<34} "
            f"{_f(r['fwd_steps'], 'd', 3)} {r['fwd_worst_rel']:8.1e} {r['fwd_ms']:8.2f} "
            f"{r['bwd_ms']:8.2f} {r['bwd_min_ms']:8.2f} {vj_s:>5} {_f(r['jprods'], 'd', 5)} "
            f"{_f(r['cos'], '.5f', 8)} {_f(r['rel_err'], '.2e', 8)} {_f(r['bwd_rel_err'], '.2e', 8)} "
            f"{_f(r['bytes'], 'd', 10)}  "
            f"{r['note']}")


def _refined_goals(rf: dict | None, im: dict | None, kind: str, d: int, be: str) -> list[dict]:
    """gdeq_refined against implicit on one problem: the cosine and VJP goal, and the backward time."""
    if rf is None or im is None:
        return []
    where = f"({be}, {kind}, d={d})"
    ratio = None
    if rf["vjps"] is None or im["vjps"] is None:
        ok, vjp = None, "VJPs not counted"
    else:
        ratio = rf["vjps"] / im["vjps"]
        ok = rf["cos"] >= REFINED_COS and ratio <= REFINED_VJP_LIMIT
        vjp = f"VJPs {rf['vjps']} vs implicit's {im['vjps']} = {ratio:.2f}x"
    mark = "SKIP" if ok is None else "PASS" if ok else "FAIL"
    time_ratio = rf["bwd_ms"] / im["bwd_ms"] if im["bwd_ms"] > 0 else float("inf")
    return [{"goal": "refined-vjps", "pass": ok, "ratio": ratio, "problem": kind, "d": d, "backend": be,
             "line":
             f"[{mark}] gdeq_refined cosine >= {REFINED_COS} with <= {REFINED_VJP_LIMIT}x implicit's VJPs "
             f"{where}: cos {rf['cos']:.5f} (implicit {im['cos']:.5f}); {vjp}"},
            {"goal": "refined-time", "pass": None, "ratio": time_ratio, "problem": kind, "d": d,
             "backend": be, "line":
             f"[INFO] gdeq_refined backward vs implicit {where}: {rf['bwd_ms']:.2f} ms vs "
             f"{im['bwd_ms']:.2f} ms = {time_ratio:.2f}x (min {rf['bwd_min_ms']:.2f} vs "
             f"{im['bwd_min_ms']:.2f}); forward {rf['fwd_ms']:.2f} vs {im['fwd_ms']:.2f} ms"}]


def goals(rows: list[dict], mem: list[dict]) -> list[dict]:
    out = []

    def pick(rs, method, library="deqcore"):
        for r in rs:
            if r["method"] == method and r["library"] == library:
                return r
        return None

    groups: dict = {}
    for r in rows:
        groups.setdefault((r["problem"], r["d"], r["backend"]), []).append(r)
    for (kind, d, be), rs in groups.items():
        out.extend(_refined_goals(pick(rs, "gdeq_refined"), pick(rs, "implicit"), kind, d, be))
        gd, jf = pick(rs, "gdeq"), pick(rs, "jfb")
        if gd and jf:
            ratio = gd["bwd_ms"] / jf["bwd_ms"] if jf["bwd_ms"] > 0 else float("inf")
            ok = ratio <= GDEQ_TIME_LIMIT
            out.append({"goal": "gdeq-time", "pass": ok, "ratio": ratio, "problem": kind, "d": d,
                        "backend": be, "line":
                        f"[{'PASS' if ok else 'FAIL'}] GDEQ backward <= {GDEQ_TIME_LIMIT}x JFB ({be}, "
                        f"{kind}, d={d}): {gd['bwd_ms']:.3f} ms vs {jf['bwd_ms']:.3f} ms = {ratio:.2f}x "
                        f"(on min times {gd['bwd_min_ms']:.3f} vs {jf['bwd_min_ms']:.3f} ms)"})
            if kind == "symmetric":
                gap_g, gap_j = 1 - gd["cos"], 1 - jf["cos"]
                ok = math.isfinite(gap_g) and gap_g <= GDEQ_COS_FACTOR * gap_j
                out.append({"goal": "gdeq-cos", "pass": ok, "problem": kind, "d": d, "backend": be,
                            "line": f"[{'PASS' if ok else 'FAIL'}] GDEQ cosine clearly better than JFB "
                                    f"({be}, {kind}, d={d}; 1-cos at most {GDEQ_COS_FACTOR}x JFB's): "
                                    f"cos {gd['cos']:.4f} vs {jf['cos']:.4f} (rel err {gd['rel_err']:.3f} "
                                    f"vs {jf['rel_err']:.3f})"})
        if be == "torch":
            im, ift = pick(rs, "implicit"), pick(rs, "IFT", "torchdeq")
            if im and ift:
                ratio = im["bwd_ms"] / ift["bwd_ms"]
                # the backward's own accuracy: both against the exact gradient at their own z
                acc = im["bwd_rel_err"] <= IFT_ACC_SLACK * ift["bwd_rel_err"]
                ok = ratio <= IFT_TIME_LIMIT and acc
                out.append({"goal": "implicit-vs-ift", "pass": ok, "ratio": ratio, "problem": kind,
                            "d": d, "backend": be, "line":
                            f"[{'PASS' if ok else 'FAIL'}] implicit backward <= {IFT_TIME_LIMIT}x TorchDEQ "
                            f"IFT at equal or better accuracy (torch, {kind}, d={d}): {im['bwd_ms']:.2f} ms "
                            f"vs {ift['bwd_ms']:.2f} ms = {ratio:.2f}x (min {im['bwd_min_ms']:.2f} vs "
                            f"{ift['bwd_min_ms']:.2f}); VJPs {im['vjps']} vs {ift['vjps']}; backward "
                            f"rel err {im['bwd_rel_err']:.2e} vs {ift['bwd_rel_err']:.2e} "
                            f"({'ok' if acc else 'WORSE'}; total rel err {im['rel_err']:.2e} vs "
                            f"{ift['rel_err']:.2e})"})
            elif im:
                out.append({"goal": "implicit-vs-ift", "pass": None, "problem": kind, "d": d,
                            "backend": be, "line":
                            f"[SKIP] implicit backward vs TorchDEQ IFT (torch, {kind}, d={d}): "
                            f"not judged, TorchDEQ was not run (--no-anchors)"})
    for m in mem:
        a, b = m.get(f"bytes_{MEM_ITERS[0]}"), m.get(f"bytes_{MEM_ITERS[1]}")
        if a is None or b is None:
            continue
        growth = b / a if a else float("inf")
        m["growth"] = growth
        base = m["method"]
        if base in FLAT_MODES:
            ok = growth <= FLAT_LIMIT
            want = f"flat (<= {FLAT_LIMIT:.2f}x)"
        elif base == "unroll":
            ok = growth > FLAT_LIMIT
            want = "grows"
        elif base in ("gdeq", "gdeq_refined"):
            out.append({"goal": "memory-info", "pass": None, "ratio": growth, "backend": m["backend"],
                        "method": base, "line":
                        f"[INFO] {m['backend']} {base} with the default ring (memory = max_iter) keeps "
                        f"{a} -> {b} bytes at max_iter {MEM_ITERS[0]} vs {MEM_ITERS[1]} = {growth:.3f}x: "
                        f"the ring is sized by max_iter; set memory=m for a fixed budget"})
            continue
        else:
            continue
        out.append({"goal": "memory", "pass": ok, "ratio": growth, "backend": m["backend"],
                    "method": base, "line":
                    f"[{'PASS' if ok else 'FAIL'}] memory {want}: {m['backend']} {base} bytes at "
                    f"max_iter {MEM_ITERS[0]} vs {MEM_ITERS[1]} (tol {MEM_TOL:g}, {m['problem']}, "
                    f"d={m['d']}): {a} -> {b} = {growth:.3f}x"})
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="256,1024", help="comma-separated d values (default 256,1024)")
    ap.add_argument("--repeats", type=int, default=7, help="timed rounds after the warm-up (median)")
    ap.add_argument("--frameworks", default="torch,jax", help="torch,jax (default both)")
    ap.add_argument("--problems", default=",".join(PROBLEMS), help="gaussian,symmetric (default both)")
    ap.add_argument("--quick", action="store_true",
                    help="d=256 only, 3 repeats, no memory sweep, JAX VJPs not counted (a smoke run)")
    ap.add_argument("--no-anchors", action="store_true",
                    help="measure deqcore's modes alone (no TorchDEQ, jaxopt, optimistix)")
    ap.add_argument("--wait-idle", type=float, default=10.0, metavar="S",
                    help="before timing each problem, wait up to S seconds for the CPUs to be >= 85%% "
                         "idle (a shared machine); 0 disables (default 10)")
    ap.add_argument("--json", default=str(Path(__file__).parent / "results" / "gradients.json"))
    ap.add_argument("--overwrite", action="store_true", help="replace an existing --json file")
    args = ap.parse_args(argv)
    global COUNT_JAX
    COUNT_JAX = not args.quick

    out = Path(args.json)
    if out.exists() and not args.overwrite:
        raise SystemExit(f"bench_gradients: {out} exists; pass --overwrite to replace it or --json PATH")
    sizes = [256] if args.quick else [d for (d,) in fwd._shapes(args.sizes, 1, "--sizes", "bench_gradients")]
    repeats = 3 if args.quick else args.repeats
    frameworks = [s for s in args.frameworks.split(",") if s]
    problems = [s for s in args.problems.split(",") if s]
    unknown = sorted(set(problems) - set(PROBLEMS))
    if not problems or unknown:
        raise SystemExit(f"bench_gradients: --problems takes {', '.join(PROBLEMS)}, got {args.problems!r}")
    if not sizes:
        raise SystemExit("bench_gradients: --sizes is empty; give state sizes d like 256,1024")
    if not frameworks or set(frameworks) - {"torch", "jax"} or repeats < 1:
        raise SystemExit(f"bench_gradients: --frameworks takes torch,jax (got {args.frameworks!r}); "
                         f"--repeats >= 1 (got {repeats})")
    anchors = not args.no_anchors
    if anchors:
        fwd.require_packages("bench_gradients", [m for fw in frameworks for m in ANCHOR_PACKAGES[fw]],
                             ", or pass --no-anchors to measure deqcore alone")

    versions = {"python": platform.python_version(), "machine": platform.machine(),
                "cpus": os.cpu_count()}
    for mod in ("numpy", "torch", "torchdeq", "jax", "jaxopt", "optimistix", "lineax", "deqcore"):
        try:
            versions[mod] = fwd._version(mod)
        except Exception:  # noqa: BLE001
            versions[mod] = None
    versions["deqcore git"] = fwd._git_state()
    print(f"deqcore gradient benchmark: tanh DEQ, batch {BATCH}, float32, forward tol {TOL:g} (rel), "
          f"max_iter {MAX_ITER}, loss sum(c*z*), gradient w.r.t. W, repeats {repeats} (median)")
    print("versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()), flush=True)
    if not anchors:
        print("anchors not run (--no-anchors): deqcore's modes only; the goal against TorchDEQ IFT "
              "is reported as skipped", flush=True)

    start = time.perf_counter()
    load_start = os.getloadavg()
    rows, exact_info, idle_seen = [], [], []
    for d in sizes:
        for kind in problems:
            p = make_problem(kind, d)
            c = cotangent(p)
            t = time.perf_counter()
            zref = p.reference()
            G = exact_gradient(p, zref, c)
            exact_info.append({"problem": kind, "d": d, "seconds": time.perf_counter() - t,
                               "ref_worst_rel": float(p.judge(zref).max()),
                               "grad_norm": float(np.linalg.norm(G))})
            for fw, make in (("torch", functools.partial(torch_cases, p, c, anchors)),
                             ("jax", functools.partial(jax_cases, p, c, zref, anchors))):
                if fw not in frameworks:
                    continue
                t = time.perf_counter()
                cases = make()
                setup = time.perf_counter() - t
                idle = fwd.wait_idle(args.wait_idle)
                if idle is not None:
                    idle_seen.append(idle)
                time_round_robin(cases, repeats)
                print(f"\n{kind} d={d} {fw}: setup {setup:.0f} s (compile, counted run, memory), "
                      f"idle before timing {idle if idle is None else f'{idle:.0%}'}")
                print(HEADER)
                for case in cases:
                    rows.append(row(case, G))
                    print(fmt_row(rows[-1]), flush=True)

    mem = []
    if not args.quick:
        pm = make_problem(problems[0], min(sizes))
        cm = cotangent(pm)
        for fw, make in (("torch", torch_memory), ("jax", jax_memory)):
            if fw in frameworks:
                mem.extend(make(pm, cm))

    elapsed = time.perf_counter() - start
    load_end = os.getloadavg()
    print(f"\nResults ({elapsed:.0f} s). fwd: forward solver steps; fwd rel: worst sample's relative "
          f"residual of the returned z (float64); fwd/bwd ms: medians (bwd torch: loss.backward() "
          f"alone; JAX: the jitted pullback of jax.vjp alone); (min): backward from minimum times; "
          f"VJPs: counted batched VJPs of f in the backward (rep: the mode's own report); "
          f"Jprod: VJPs + transposed products; cos / rel err: vs the float64 exact dL/dW; "
          f"bytes: torch saved-for-backward storages, JAX temp bytes of jit(grad)\n")
    print(HEADER)
    fwd.print_grouped(rows, fmt_row, ("d", "problem", "backend"))
    if mem:
        print(f"\nMemory sweep (tol {MEM_TOL:g}: every iteration runs):")
        print(f"{'backend':<6} {'method':<18} {'bytes @' + str(MEM_ITERS[0]):>14} "
              f"{'bytes @' + str(MEM_ITERS[1]):>14} {'growth':>7}  measure")
    gl = goals(rows, mem)
    for m in mem:
        a, b = m.get(f"bytes_{MEM_ITERS[0]}"), m.get(f"bytes_{MEM_ITERS[1]}")
        print(f"{m['backend']:<6} {m['method']:<18} {_f(a, 'd', 14)} {_f(b, 'd', 14)} "
              f"{_f(m.get('growth'), '.3f', 7)}  {m['measure']}")
    idle_s = (f"; CPU idle before timing: min {min(idle_seen):.0%}, median "
              f"{statistics.median(idle_seen):.0%}" if idle_seen else "")
    print(f"\nload average (1/5/15 min) at start {tuple(round(v, 2) for v in load_start)}, at end "
          f"{tuple(round(v, 2) for v in load_end)} on {os.cpu_count()} CPUs{idle_s}")
    print()
    for g in gl:
        print(g["line"])

    out.parent.mkdir(parents=True, exist_ok=True)
    write_text(out, dumps_json({
        "config": {"batch": BATCH, "tol": TOL, "max_iter": MAX_ITER, "dtype": "float32",
                   "sizes": sizes, "repeats": repeats, "problems": problems, "rho": fwd.RHO,
                   "injection": INJECTION, "seed": fwd.SEED, "frameworks": frameworks, "anchors": anchors,
                   "k": K, "lam": LAM, "backward_tol": B_TOL, "backward_max_iter": B_MAX_ITER,
                   "memory_sweep": {"max_iter": MEM_ITERS, "tol": MEM_TOL},
                   "timing": "round-robin over the methods of a problem; torch: loss.backward() "
                             "timed alone; JAX: the jitted pullback of jax.vjp timed alone"},
        "versions": versions, "elapsed_s": elapsed, "loadavg_start": load_start,
        "loadavg_end": load_end, "idle_before_timing": idle_seen, "exact": exact_info,
        "rows": rows, "memory": mem, "goals": gl,
    }, indent=1))
    print(f"\nwrote {out}")
    from render_docs import refresh_pages_of

    for page in refresh_pages_of(out):  # the pages whose generated blocks quote this file
        print(f"rendered {page}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
