"""Small networks around :class:`deqcore_torch.DEQ` for ``tests/test_torch_module.py``, and the
worker that trains one under DistributedDataParallel (run by :func:`process_group.run_ranks`).

Imported when a test runs: it imports torch, which the JAX-only environment that collects (and
deselects) the tests does not have.
"""

from __future__ import annotations

import copy
from typing import Any

import deqcore_torch
import numpy as np
import torch
from ddp_equilibrium import RowwiseLinear, rowwise
from torch import nn

D_IN, D, D2, D_OUT = 5, 6, 4, 3


class TanhLayer(nn.Module):
    """``f(z, x) = tanh(z W^T + x)``; with ``tuple_state`` the state is ``(z, y)`` and ``f`` returns
    ``(tanh(z W^T + x), tanh(y A^T + z C^T))``. ``W`` and ``A`` have spectral norm 0.9 (``f``
    contracts); rows are multiplied in a batch-independent order (:func:`ddp_equilibrium.rowwise`)."""

    def __init__(self, tuple_state: bool = False, seed: int = 0) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)

        def weight(rows: int, cols: int, norm: float | None = None) -> nn.Parameter:
            w = torch.randn(rows, cols, generator=gen, dtype=torch.float64)
            return nn.Parameter(w / torch.linalg.matrix_norm(w, 2) * norm if norm else w / cols ** 0.5)

        self.tuple_state = tuple_state
        self.W = weight(D, D, 0.9)
        if tuple_state:
            self.A, self.C = weight(D2, D2, 0.9), weight(D2, D)

    def forward(self, z: Any, x: torch.Tensor) -> Any:
        if not self.tuple_state:
            return torch.tanh(rowwise(z, self.W) + x)
        z1, z2 = z
        return torch.tanh(rowwise(z1, self.W) + x), torch.tanh(rowwise(z2, self.A) + rowwise(z1, self.C))

    def weights(self) -> dict[str, np.ndarray]:
        return {n: p.detach().numpy().copy() for n, p in self.named_parameters()}


def zeros_state(x: torch.Tensor, tuple_state: bool) -> Any:
    """The initial state for the injection ``x``: zeros, with the layer's structure."""
    return (torch.zeros_like(x), x.new_zeros(x.shape[0], D2)) if tuple_state else torch.zeros_like(x)


class DEQNet(nn.Module):
    """``head(z*)`` with ``z*`` the fixed point of :class:`TanhLayer` on ``encoder(features)``: a
    model with parameters before, inside and after the equilibrium layer."""

    def __init__(self, settings: dict[str, Any], tuple_state: bool = False, seed: int = 0) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed + 1)
        self.tuple_state = tuple_state
        self.encoder = RowwiseLinear(D_IN, D, dtype=torch.float64)
        self.deq = deqcore_torch.DEQ(TanhLayer(tuple_state, seed), **settings)
        self.head = RowwiseLinear(D + (D2 if tuple_state else 0), D_OUT, dtype=torch.float64)
        with torch.no_grad():  # nn.Linear's own init draws from the global generator
            for p in (*self.encoder.parameters(), *self.head.parameters()):
                p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) / p.shape[-1] ** 0.5)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        u = torch.relu(self.encoder(features))
        z, _ = self.deq(u, zeros_state(u, self.tuple_state))
        return self.head(torch.cat(z, dim=1) if self.tuple_state else z)


def batch(n: int, seed: int = 1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"features": rng.standard_normal((n, D_IN)), "target": rng.standard_normal((n, D_OUT))}


def mse(model: nn.Module, features: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return ((model(features) - target) ** 2).mean()


def gradients_worker(rank: int, world_size: int, cases: list[dict[str, Any]],
                     data: dict[str, np.ndarray]) -> list[dict[str, Any]]:
    """Per case (``settings`` of the DEQ, ``tuple_state``): the gradients DDP leaves after one
    backward pass on this rank's rows, and on rank 0 those of one process on the whole batch."""
    results = []
    for case in cases:
        model = DEQNet(case["settings"], case.get("tuple_state", False))
        reference = copy.deepcopy(model)
        ddp = nn.parallel.DistributedDataParallel(model)
        rows = {k: torch.from_numpy(v.copy()).chunk(world_size)[rank] for k, v in data.items()}
        mse(ddp, rows["features"], rows["target"]).backward()
        result = {"ddp": {n: p.grad.numpy().copy() for n, p in model.named_parameters()}}
        if rank == 0:
            whole = {k: torch.from_numpy(v.copy()) for k, v in data.items()}
            mse(reference, whole["features"], whole["target"]).backward()
            result["reference"] = {n: p.grad.numpy().copy() for n, p in reference.named_parameters()}
        results.append(result)
    return results
