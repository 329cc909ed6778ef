"""A small equilibrium network and the worker functions that train it under PyTorch
DistributedDataParallel, for ``tests/test_distributed_torch.py`` and the krylov plugin's test.

The network has parameters before the solve (an encoder), inside ``f`` and after it (a head);
its state is one array or a tuple of two. Every sample carries its own contraction scale (the
second part of ``x``), so one rank's samples can be made to need many more solver iterations than
another's. Workers run under :func:`process_group.run_ranks`; every rank also builds the same
network from the same seed, and rank 0 runs it once more without DDP on the whole batch (the
reference), so one call compares DDP with one process.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

import deqcore

D_IN, D, D2, D_OUT = 6, 8, 5, 3
#: per-sample contraction scale of f: the easy rank's samples and the hard rank's
EASY, HARD = 0.05, 1.0


def rowwise(z: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    """``z W^T`` summed per row in a fixed order: a matrix product's rounding may depend on the
    number of rows, and the network's per-sample results must not depend on the batch beside
    them (Broyden's last rank-one pairs, from differences of nearly equal iterates, amplify
    a rounding difference in ``z*`` to 1e-7 in GDEQ's gradient)."""
    return (z[:, None, :] * W).sum(-1)


class RowwiseLinear(nn.Linear):
    """``nn.Linear`` with :func:`rowwise`'s batch-independent rounding."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rowwise(x, self.weight) + self.bias


class EquilibriumNet(nn.Module):
    """``head(z*)`` with ``z* = f(z*, (encoder(x), scale))``.

    ``f(z, (u, s)) = tanh(s * z W^T + u)``; with ``tuple_state`` the state is ``(z, y)`` and
    ``f`` returns ``(tanh(s * z W^T + u), tanh(s * y A^T + z C^T))``. ``W`` (and ``A``) have
    spectral norm 0.9, so ``f`` contracts for ``s <= 1``. ``penalty`` adds the layer's
    Jacobian penalty (a fixed probe) as a second output.
    """

    def __init__(self, solve: dict[str, Any], tuple_state: bool = False, seed: int = 0) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)

        def weight(rows: int, cols: int, norm: float | None = None) -> nn.Parameter:
            w = torch.randn(rows, cols, generator=gen, dtype=torch.float64)
            w = w / torch.linalg.matrix_norm(w, 2) * norm if norm else w / cols ** 0.5
            return nn.Parameter(w)

        self.solve_options, self.tuple_state = solve, tuple_state
        self.encoder = RowwiseLinear(D_IN, D, dtype=torch.float64)
        self.W = weight(D, D, 0.9)
        self.A = weight(D2, D2, 0.9) if tuple_state else None
        self.C = weight(D2, D) if tuple_state else None
        self.head = nn.Linear(D + (D2 if tuple_state else 0), D_OUT, dtype=torch.float64)
        with torch.no_grad():  # nn.Linear's own init draws from the global generator
            for p in (*self.encoder.parameters(), *self.head.parameters()):
                p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64) / p.shape[-1] ** 0.5)
        self.last: deqcore.Solution | None = None

    def f(self, z: Any, x: tuple[torch.Tensor, torch.Tensor]) -> Any:
        u, s = x
        if not self.tuple_state:
            return torch.tanh(s[:, None] * rowwise(z, self.W) + u)
        z1, z2 = z
        return (torch.tanh(s[:, None] * rowwise(z1, self.W) + u),
                torch.tanh(s[:, None] * rowwise(z2, self.A) + rowwise(z1, self.C)))

    def forward(self, features: torch.Tensor, scale: torch.Tensor, probe: Any = None,
                skip_solve: bool = False) -> Any:
        x = (self.encoder(features), scale)
        if skip_solve:  # a pretraining step: the head on the encoder, f's parameters unused
            return self.head(x[0])
        b = features.shape[0]
        z0 = features.new_zeros(b, D)
        if self.tuple_state:
            z0 = (z0, features.new_zeros(b, D2))
        self.last = deqcore.solve(self.f, x, z0, **self.solve_options)
        z = torch.cat(self.last.z, dim=1) if self.tuple_state else self.last.z
        out = self.head(z)
        if probe is None:
            return out
        return out, deqcore.jacobian_penalty(self.f, self.last.z, x, probe)


def batch(n_per_rank: int, world_size: int, seed: int = 1) -> dict[str, np.ndarray]:
    """The global batch: rank r's samples are rows ``r * n .. (r + 1) * n``; rank 0's are easy
    (scale ``EASY``), every other rank's hard (``HARD``). ``probe`` and ``probe2`` are penalty
    probes for the one-array and the tuple state."""
    rng = np.random.default_rng(seed)
    n = n_per_rank * world_size
    scale = np.full(n, HARD)
    scale[:n_per_rank] = EASY
    return {"features": rng.standard_normal((n, D_IN)), "scale": scale,
            "target": rng.standard_normal((n, D_OUT)), "probe": rng.standard_normal((n, D)),
            "probe2": rng.standard_normal((n, D2))}


def _rows(data: dict[str, np.ndarray], rank: int | None, world_size: int) -> dict[str, torch.Tensor]:
    """Rank ``rank``'s share of ``data`` as tensors (``None``: the whole batch)."""
    out = {}
    for k, v in data.items():
        t = torch.from_numpy(v.copy())
        out[k] = t if rank is None else t.chunk(world_size)[rank]
    return out


def loss_of(model: nn.Module, rows: dict[str, torch.Tensor], penalty: float, tuple_state: bool,
            skip_solve: bool = False) -> torch.Tensor:
    """Mean squared error of the head over the rows, plus ``penalty`` times the Jacobian penalty."""
    if not penalty or skip_solve:
        return ((model(rows["features"], rows["scale"], skip_solve=skip_solve) - rows["target"]) ** 2).mean()
    probe = (rows["probe"], rows["probe2"]) if tuple_state else rows["probe"]
    out, pen = model(rows["features"], rows["scale"], probe)
    return ((out - rows["target"]) ** 2).mean() + penalty * pen


def _grads(model: nn.Module) -> dict[str, np.ndarray]:
    return {n: p.grad.numpy().copy() for n, p in model.named_parameters() if p.grad is not None}


def gradients_worker(rank: int, world_size: int, cases: list[dict[str, Any]],
                     data: dict[str, np.ndarray]) -> dict[str, Any]:
    """For each case (``solve``: options of deqcore.solve, ``tuple_state``, ``penalty``,
    ``ddp``: keyword arguments of DistributedDataParallel), one backward pass under DDP on this
    rank's rows (two with ``separate_backward``: the loss's, then the penalty's; the penalty
    computed after DDP's forward with ``penalty_after_forward``): the gradients
    DDP leaves, and on rank 0 the one-process gradients of the whole loss on the whole batch."""
    results = {}
    for i, case in enumerate(cases):
        model = EquilibriumNet(case["solve"], case.get("tuple_state", False))
        reference = copy.deepcopy(model)
        ddp = nn.parallel.DistributedDataParallel(model, **case.get("ddp", {}))
        rows = _rows(data, rank, world_size)
        if case.get("separate_backward"):  # the penalty's gradient in a backward pass of its own
            out, pen = ddp(rows["features"], rows["scale"], rows["probe"])
            ((out - rows["target"]) ** 2).mean().backward(retain_graph=True)
            (case["penalty"] * pen).backward()
        elif case.get("penalty_after_forward"):  # on the wrapped module's f, outside DDP's forward
            out = ddp(rows["features"], rows["scale"])
            x = (model.encoder(rows["features"]), rows["scale"])
            pen = deqcore.jacobian_penalty(model.f, model.last.z, x, rows["probe"])
            (((out - rows["target"]) ** 2).mean() + case["penalty"] * pen).backward()
        else:
            loss_of(ddp, rows, case.get("penalty", 0.0), model.tuple_state).backward()
        result: dict[str, Any] = {"ddp": _grads(model)}
        if rank == 0:
            whole = _rows(data, None, world_size)
            loss_of(reference, whole, case.get("penalty", 0.0), model.tuple_state).backward()
            result["reference"] = _grads(reference)
            result["names"] = [n for n, _ in model.named_parameters()]
        results[i] = result
    return results


COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_object", "all_to_all",
               "all_to_all_single", "barrier", "broadcast", "broadcast_object_list", "gather", "reduce",
               "reduce_scatter", "reduce_scatter_tensor", "scatter", "send", "recv", "isend", "irecv",
               "monitored_barrier")


@contextmanager
def counting_collectives() -> Iterator[list[str]]:
    """Every collective or point-to-point call made through ``torch.distributed`` inside the
    block, by name (DDP's own gradient all-reduce runs in its C++ reducer, not through these)."""
    calls: list[str] = []
    modules = (dist, dist.distributed_c10d)
    saved = [(m, name, getattr(m, name)) for m in modules for name in COLLECTIVES if hasattr(m, name)]

    def counted(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            calls.append(name)
            return fn(*args, **kwargs)
        return call

    for m, name, fn in saved:
        setattr(m, name, counted(name, fn))
    try:
        yield calls
    finally:
        for m, name, fn in saved:
            setattr(m, name, fn)


def training_worker(rank: int, world_size: int, cases: list[dict[str, Any]], data: dict[str, np.ndarray],
                    steps: int) -> dict[str, Any]:
    """For each case, ``steps`` optimizer steps (``case["optimizer"]``: ``"sgd"`` or ``"adam"``)
    under DDP on this rank's rows, after ``case["skip_solve_steps"]`` steps without the solve, the
    penalty (``case["penalty"]``) in the loss of every other step (0, 2, ...): the parameters
    after each step, the solver steps each forward took on this rank (0: no solve), the
    ``torch.distributed`` calls made in the forward and backward passes; on rank 0 also the
    parameters of the same steps in one process on the whole batch; with ``case["expect_error"]``
    only the message of the RuntimeError the DDP run raised (None: none). And, as ``counted``, the
    calls the count saw around one barrier, the rank and its thread count."""
    def run(case: dict[str, Any], model: nn.Module, trained: nn.Module, rows: dict[str, torch.Tensor]):
        make = {"sgd": lambda p: torch.optim.SGD(p, lr=0.2), "adam": lambda p: torch.optim.Adam(p, lr=0.05)}
        opt = make[case["optimizer"]](model.parameters())
        params, solver_steps, calls = [], [], []
        for step in range(case.get("skip_solve_steps", 0) + steps):
            opt.zero_grad()
            trained.last = None
            skip = step < case.get("skip_solve_steps", 0)
            penalty = case.get("penalty", 0.0) if step % 2 == 0 else 0.0
            with counting_collectives() as seen:
                loss_of(model, rows, penalty, trained.tuple_state, skip).backward()
            calls += seen
            opt.step()
            solver_steps.append(0 if trained.last is None else int(trained.last.steps))
            params.append({n: p.detach().numpy().copy() for n, p in trained.named_parameters()})
        return {"params": params, "solver_steps": solver_steps, "calls": calls}

    results: list[dict[str, Any]] = []
    for case in cases:
        model = EquilibriumNet(case["solve"], case.get("tuple_state", False))
        reference = copy.deepcopy(model)
        ddp = nn.parallel.DistributedDataParallel(model, **case.get("ddp", {}))
        if case.get("expect_error"):
            try:
                run(case, ddp, model, _rows(data, rank, world_size))
            except RuntimeError as e:
                results.append({"error": str(e)})
                continue
            results.append({"error": None})
            continue
        result = {"ddp": run(case, ddp, model, _rows(data, rank, world_size))}
        if rank == 0:
            result["reference"] = run(case, reference, reference, _rows(data, None, world_size))
        results.append(result)
    with counting_collectives() as seen:  # the count sees a collective when there is one
        dist.barrier()
    return {"cases": results, "counted": seen, "rank": rank, "threads": torch.get_num_threads()}
