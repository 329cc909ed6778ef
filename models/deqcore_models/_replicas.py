"""Data-parallel training over the processes a launcher started (``torchrun``): which share of
the global batch a process trains on, the few collectives the trainer needs, and which process
writes.

The launcher's environment (``WORLD_SIZE`` > 1, ``RANK``, ``MASTER_ADDR``/``MASTER_PORT``)
selects it (:meth:`Replicas.from_environment`); without one, :class:`Replicas` is one process
and every method is the identity, so the trainer has one code path. Each of ``size`` processes
trains on rows ``[rank * b, (rank + 1) * b)`` of the batch the workload draws for the step
(``b = batch / size``), so data order, dropout masks and the Jacobian probe are the one-process
run's by construction. Collectives run on torch.distributed's default group (gloo: the torch
engine computes on the CPU) with a timeout, and a failed one (a peer died) is a
:class:`WorkerLost`, never a hang.
"""

from __future__ import annotations

import datetime
import os
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import replace
from typing import Any

import numpy as np

from .families import Batch

#: How long a collective waits for a peer before the run fails.
TIMEOUT = datetime.timedelta(seconds=300)
#: The launcher's variables that select data-parallel training.
LAUNCHER_ENV = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


class WorkerLost(RuntimeError):
    """A collective failed: another training process stopped (killed, out of memory, an error of
    its own) or did not answer within :data:`TIMEOUT`."""


class Replicas:
    """This process's place among ``size`` data-parallel training processes (``rank`` 0 writes
    the run's files). Arrays are NumPy unless said otherwise; the methods that communicate must
    be called by every process in the same order."""

    def __init__(self, rank: int = 0, size: int = 1) -> None:
        if not 0 <= rank < size:
            raise ValueError(f"rank {rank} is not one of {size} processes")
        self.rank, self.size = rank, size

    @classmethod
    def from_environment(cls, backend: str, environ: Mapping[str, str] = os.environ) -> Replicas:
        """One process unless a launcher's ``WORLD_SIZE`` > 1; then the process group (gloo, with
        :data:`TIMEOUT`) of this ``RANK``. A ``ValueError`` for the JAX backend (JAX spreads a
        batch over the devices of one process) or a malformed environment."""
        try:
            size = int(environ.get("WORLD_SIZE", "1"))
            rank = int(environ.get("RANK", "0"))
        except ValueError:
            raise ValueError(f"the launcher's WORLD_SIZE {environ.get('WORLD_SIZE')!r} and RANK "
                             f"{environ.get('RANK')!r} must be integers") from None
        if size <= 1:
            return cls()
        if backend != "torch":
            raise ValueError(f"--backend {backend} runs in one process: JAX trains over several devices "
                             f"with --devices, not under a multi-process launcher (WORLD_SIZE={size}); "
                             f"launch it without torchrun")
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group("gloo", rank=rank, world_size=size, timeout=TIMEOUT)
        return cls(dist.get_rank(), dist.get_world_size())

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def writes(self) -> bool:
        """Whether this process writes the run's files and shows its progress."""
        return self.rank == 0

    # ------------------------------------------------------------------ sharding
    def rows(self, n: int) -> slice:
        """This process's rows of a training batch of ``n`` (a multiple of :attr:`size`)."""
        if n % self.size:
            raise ValueError(f"a batch of {n} does not split into {self.size} equal shares")
        b = n // self.size
        return slice(self.rank * b, (self.rank + 1) * b)

    def eval_rows(self, n: int) -> np.ndarray:
        """This process's rows of an evaluation batch of ``n`` (``np.array_split``: any ``n``,
        possibly none)."""
        return np.array_split(np.arange(n), self.size)[self.rank]

    def shard_batch(self, batch: Batch) -> Batch:
        """This process's share of ``batch``: its rows of x, y, the sample indices, and of every
        mask and probe array whose axis 0 is the batch (all of them, in both families); ``count``
        stays global."""
        if not self.distributed:
            return batch
        n = batch.x.shape[0]
        rows = self.rows(n)
        return replace(batch, x=batch.x[rows], y=batch.y[rows], masks=_rows_of(batch.masks, rows, n),
                       probe=_rows_of(batch.probe, rows, n),
                       indices=None if batch.indices is None else batch.indices[rows])

    def shard_state(self, state: Mapping[str, np.ndarray] | None, batch_state: Iterable[str],
                    rows: Any = None) -> dict[str, np.ndarray] | None:
        """``state`` with the arrays named in ``batch_state`` cut to this process's ``rows``
        (default: its training rows)."""
        if state is None or not self.distributed:
            return None if state is None else dict(state)
        names = set(batch_state)
        return {k: np.asarray(v)[self.rows(len(v)) if rows is None else rows] if k in names else v
                for k, v in state.items()}

    def gather_state(self, state: Mapping[str, np.ndarray],
                     batch_state: Iterable[str]) -> dict[str, np.ndarray]:
        """The global ``state``: the ``batch_state`` arrays of every process concatenated along
        axis 0 in rank order (the others are the same everywhere)."""
        if not self.distributed:
            return dict(state)
        import torch
        import torch.distributed as dist

        out = dict(state)
        for k in sorted(set(batch_state) & set(state)):
            local = torch.from_numpy(np.ascontiguousarray(state[k]))
            parts = [torch.empty_like(local) for _ in range(self.size)]
            self._collective(dist.all_gather, parts, local)
            out[k] = np.concatenate([p.numpy() for p in parts])
        return out

    # ------------------------------------------------------------------ collectives
    def gather(self, values: Iterable[float]) -> np.ndarray:
        """``(size, k)`` float64: row ``r`` holds process ``r``'s ``values`` (``k`` numbers, the
        same ``k`` on every process). One collective."""
        mine = np.asarray(list(values), np.float64)
        if not self.distributed:
            return mine[None]
        import torch
        import torch.distributed as dist

        local = torch.from_numpy(mine)
        parts = [torch.empty_like(local) for _ in range(self.size)]
        self._collective(dist.all_gather, parts, local)
        return np.stack([p.numpy() for p in parts])

    def mean(self, arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The mean over the processes of each array (a gradient of equal shares of a batch)."""
        if not self.distributed:
            return dict(arrays)
        import torch
        import torch.distributed as dist

        out = {}
        for k in sorted(arrays):
            t = torch.from_numpy(np.array(arrays[k], copy=True))
            self._collective(dist.all_reduce, t)
            out[k] = (t / self.size).numpy()
        return out

    def average(self, tensors: Mapping[str, Any], skip: Iterable[str] = ()) -> dict[str, Any]:
        """torch tensors (not ``skip``) averaged over the processes, in one collective: state every
        process updates from its share (BatchNorm running statistics of per-replica groups, whose
        update is linear in the groups' statistics)."""
        if not self.distributed:
            return dict(tensors)
        import torch
        import torch.distributed as dist

        skipped = set(skip)
        names = [k for k in sorted(tensors) if k not in skipped and tensors[k].is_floating_point()]
        if not names:
            return dict(tensors)
        flat = torch.cat([tensors[k].reshape(-1) for k in names])
        self._collective(dist.all_reduce, flat)
        out = dict(tensors)
        parts = torch.split(flat / self.size, [tensors[k].numel() for k in names])
        for k, part in zip(names, parts, strict=True):
            out[k] = part.reshape(tensors[k].shape)
        return out

    def replica_sum(self, t: Any) -> Any:
        """The sum of torch tensor ``t`` over the processes; its backward sums the cotangents
        (torch.distributed.nn's all-reduce), as synchronised BatchNorm needs."""
        from torch.distributed.nn.functional import all_reduce

        # torch 2.13 marks it deprecated for a private module's all-reduce, which has no autograd
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=FutureWarning)
            try:
                return all_reduce(t)
            except RuntimeError as exc:
                raise self.lost(exc) from exc

    def _collective(self, fn: Any, *args: Any) -> None:
        try:
            fn(*args)
        except RuntimeError as exc:
            raise self.lost(exc) from exc

    def lost(self, exc: BaseException) -> WorkerLost:
        """The :class:`WorkerLost` of a failed collective ``exc``."""
        cause = " ".join(str(exc).split())[:300]
        return WorkerLost(f"process {self.rank} of {self.size}: another training process stopped or did not "
                          f"answer within {TIMEOUT.total_seconds():.0f} s ({cause}); the run stops here: "
                          f"continue it with --resume from the last checkpoint")

    def close(self) -> None:
        """Leave the process group (its resources; nothing when one process)."""
        if self.distributed:
            import gc

            import torch.distributed as dist

            if dist.is_initialized():
                # a DistributedDataParallel reducer freed after its group aborts the process at exit
                gc.collect()
                dist.destroy_process_group()


def _rows_of(tree: Any, rows: slice, n: int) -> Any:
    """``tree`` (None, a list or a dict of arrays) with every array of ``n`` rows cut to ``rows``;
    an array of another length is a ``ValueError`` (a workload whose masks do not follow its
    batch)."""
    if tree is None:
        return None

    def cut(a: np.ndarray) -> np.ndarray:
        if a.ndim == 0 or a.shape[0] != n:
            raise ValueError(f"a per-step array of shape {a.shape} has no batch axis of {n} rows to shard")
        return a[rows]

    if isinstance(tree, dict):
        return {k: cut(v) for k, v in tree.items()}
    return [cut(v) for v in tree]
