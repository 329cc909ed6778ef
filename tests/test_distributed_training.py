"""Data-parallel training on PyTorch: two gloo processes, each with half of every batch, train the
same model as one process on the whole batch (DistributedDataParallel's gradient average,
synchronised or grouped BatchNorm, the transformer's memory rows sharded), and the command line
under torchrun gives the one-process run's curves and weights, fails cleanly when a worker is
killed and resumes on another number of workers.

The two-process runs start this file as a script (``python test_distributed_training.py RANK
OUT``) with the launcher's variables set; every process uses one thread and every subprocess a
timeout, so a bug fails the test instead of hanging it.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from deqcore_models._equilibrium_layer import DEQSettings
from deqcore_models._replicas import Replicas
from deqcore_models._training_engines import make_engine
from deqcore_models.families import Batch
from deqcore_models.families.mdeq import mdeq_task
from deqcore_models.families.transformer import transformer_task
from deqcore_models.mdeq import MDEQConfig, dropout_masks, equilibrium_shapes, init_mdeq
from deqcore_models.transformer import TRANSFORMER_CONFIGS, init_transformer, transformer_masks

pytestmark = pytest.mark.backend("torch")

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
#: MDEQ micro with dropout, so the variational masks are sharded too.
MDEQ_DROPOUT = MDEQConfig(channels=(8, 8), head_channels=(2, 4), final_channels=16, expansion=2, groups=4,
                          fuse_groups=4, dropout=0.2)
TRANSFORMER = TRANSFORMER_CONFIGS["micro-mem"]
BATCH, STEPS, VOCAB = 8, 3, 23
PRETRAIN = DEQSettings(unrolled=2)


def _f64(tree):
    if tree is None:
        return None
    if isinstance(tree, dict):
        return {k: np.asarray(v, np.float64) for k, v in tree.items()}
    return [np.asarray(v, np.float64) for v in tree]


def _mdeq_case(grad: str, jac: bool, bn_groups: int = 1):
    params, state = init_mdeq(MDEQ_DROPOUT, 1, seed=3)
    options = {"implicit": {"max_iter": 8, "on_fail": "ignore"}, "npg": {"k": 3, "lam": 0.5}}.get(grad, {})
    settings = DEQSettings(solver="anderson" if grad == "npg" else "broyden", max_iter=8, tol=1e-4, grad=grad,
                           grad_options=options, jac_weight=0.5 if jac else 0.0)
    rng = np.random.default_rng(7)
    batches = []
    for step in range(STEPS):
        x = rng.standard_normal((BATCH, 1, 28, 28))
        y = np.eye(10)[rng.integers(0, 10, BATCH)]
        probe = [rng.standard_normal(s) for s in equilibrium_shapes(MDEQ_DROPOUT, x.shape)] if jac else None
        masks = dropout_masks(MDEQ_DROPOUT, BATCH, rng)
        batches.append((Batch(x, y, _f64(masks), BATCH, probe), PRETRAIN if step == 0 else settings))
    return mdeq_task(MDEQ_DROPOUT, bn_groups), _f64(params), _f64(state), (), batches


def _transformer_case():
    params, state = init_transformer(TRANSFORMER, VOCAB, seed=4, batch_size=BATCH)
    settings = DEQSettings(solver="anderson", max_iter=8, tol=1e-4, grad="implicit",
                           grad_options={"max_iter": 8, "on_fail": "ignore"}, jac_weight=0.5)
    rng = np.random.default_rng(8)
    batches = []
    for step in range(STEPS):
        tokens = rng.integers(0, VOCAB, (BATCH, TRANSFORMER.tgt_len + 1))
        masks = transformer_masks(TRANSFORMER, BATCH, TRANSFORMER.tgt_len, rng)
        x, y = tokens[:, :-1], tokens[:, 1:]
        probe = [rng.standard_normal((*x.shape, TRANSFORMER.d_model))] if step == 2 else None
        batches.append((Batch(x, y, _f64(masks), y.size, probe), settings))
    return transformer_task(TRANSFORMER), _f64(params), _f64(state), ("mem.z", "mem.u"), batches


CASES = {**{f"{grad}{'-jac' if jac else ''}": (lambda g=grad, j=jac: _mdeq_case(g, j))
            for grad in ("implicit", "gdeq", "npg") for jac in (False, True)},
         "bn-groups-2": lambda: _mdeq_case("implicit", False, bn_groups=2),
         "transformer-memory": _transformer_case}


def train_cases(replicas: Replicas) -> dict[str, np.ndarray]:
    """Three Adam steps of every case on this process's share of each batch: ``{case/params/name
    or case/state/name: array}``, the state gathered to the whole batch."""
    out = {}
    for case, make in CASES.items():
        task, params, state, batch_state, batches = make()
        engine = make_engine("torch", task, params, replicas.shard_state(state, batch_state), 1e-4,
                             replicas=replicas, batch_state=batch_state)
        for batch, settings in batches:
            mine = replicas.shard_batch(batch)
            engine.train_step(mine.x, mine.y, mine.masks, settings, 1e-2, mine.probe)
        params, state, _ = engine.export()
        out.update({f"{case}/params/{k}": v for k, v in params.items()})
        out.update({f"{case}/state/{k}": v for k, v in replicas.gather_state(state, batch_state).items()})
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker_env(rank: int, size: int, port: int) -> dict[str, str]:
    """The variables torchrun gives worker ``rank`` of ``size``, one thread each."""
    env = dict(os.environ, OMP_NUM_THREADS="1", RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(size),
               LOCAL_WORLD_SIZE=str(size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    env["PYTHONPATH"] = os.pathsep.join([str(HERE), *sys.path])
    return env


def test_two_processes_train_the_one_process_weights(tmp_path):
    """float64, global batch 8 (4 per process), a pre-training step then two DEQ steps: the
    parameters (and the gathered state) after 3 steps equal one process's to 1e-10, for three
    gradient modes with and without the Jacobian penalty, synchronised BatchNorm (every case)
    and BatchNorm in 2 groups, and the transformer whose memory rows are sharded."""
    port = free_port()
    procs = [subprocess.Popen([sys.executable, __file__, str(rank), str(tmp_path)], text=True,
                              env=worker_env(rank, 2, port), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
             for rank in range(2)]
    logs = [p.communicate(timeout=600)[0] for p in procs]
    for p, log in zip(procs, logs, strict=True):
        assert p.returncode == 0, log[-3000:]
    import torch

    torch.set_num_threads(1)
    one = train_cases(Replicas())
    for rank in range(2):
        two = dict(np.load(tmp_path / f"rank{rank}.npz"))
        assert set(two) == set(one)
        for k, v in one.items():
            assert two[k].dtype == np.float64
            np.testing.assert_allclose(two[k], v, rtol=0, atol=1e-10, err_msg=k)
    for case, make in CASES.items():  # the steps moved every case's weights (Adam: by about lr)
        start = make()[1]
        assert max(np.abs(one[f"{case}/params/{k}"] - v).max() for k, v in start.items()) > 5e-3, case


if __name__ == "__main__":
    import torch

    torch.set_num_threads(1)
    replicas = Replicas.from_environment("torch")
    results = train_cases(replicas)
    np.savez(Path(sys.argv[2]) / f"rank{replicas.rank}.npz", **results)
    replicas.close()
