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

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from deqcore_models._equilibrium_layer import DEQSettings
from deqcore_models._layers import BatchStatistics, batch_norm
from deqcore_models._replicas import Replicas
from deqcore_models._training_engines import make_engine
from deqcore_models.checkpoint import load_checkpoint
from deqcore_models.families import Batch
from deqcore_models.families.mdeq import mdeq_task
from deqcore_models.families.transformer import transformer_task
from deqcore_models.mdeq import MDEQ_CONFIGS, MDEQConfig, dropout_masks, equilibrium_shapes, init_mdeq
from deqcore_models.train import KILL_ENV, ConfigError, TrainConfig, Trainer
from deqcore_models.transformer import TRANSFORMER_CONFIGS, init_transformer, transformer_masks
from models_helpers import BN_AFTER_FED_BIASES, BN_FED_BIASES, grad_rel_diff
from process_group import free_port

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
        # the cosine probe's gradient (outside DistributedDataParallel): the workers' mean
        grads = replicas.mean(engine.gradients(mine.x, mine.y, mine.masks, settings))
        out.update({f"{case}/grad/{k}": v for k, v in grads.items()})
        params, state, _ = engine.export()
        out.update({f"{case}/params/{k}": v for k, v in params.items()})
        out.update({f"{case}/state/{k}": v for k, v in replicas.gather_state(state, batch_state).items()})
    return out


def worker_env(rank: int, size: int, port: int) -> dict[str, str]:
    """The variables torchrun gives worker ``rank`` of ``size``, one thread each."""
    env = dict(os.environ, OMP_NUM_THREADS="1", RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(size),
               LOCAL_WORLD_SIZE=str(size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    env["PYTHONPATH"] = os.pathsep.join([str(HERE), *sys.path])
    return env


def test_two_processes_train_the_one_process_weights(tmp_path):
    """float64, global batch 8 (4 per process), a pre-training step then two DEQ steps: the
    parameters (and the gathered state, and the mean of the processes' gradients of the last
    batch, as the cosine probe takes them) after 3 steps equal one process's to 1e-10, for three
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


def test_batch_norm_groups_are_torch_batch_norm_of_each_group():
    """Training-mode BatchNorm over 2 groups of consecutive samples: each group normalised by
    torch's BatchNorm2d of that group alone, the running statistics updated with the mean of the
    groups' (unbiased variance with a group's count); float64."""
    import torch

    rng = np.random.default_rng(0)
    x = rng.standard_normal((6, 3, 4, 5)) * 2 + 1
    params = {"bn.weight": rng.standard_normal(3), "bn.bias": rng.standard_normal(3)}
    state = {"bn.running_mean": rng.standard_normal(3), "bn.running_var": rng.random(3) + 0.5}
    t = {k: torch.from_numpy(v) for k, v in {**params, **state}.items()}
    new: dict = {}
    out = batch_norm(torch, torch.from_numpy(x), t, t, "bn", True, new, over=BatchStatistics(groups=2))
    running = []
    for g in range(2):
        rm, rv = t["bn.running_mean"].clone(), t["bn.running_var"].clone()
        ref = torch.nn.functional.batch_norm(torch.from_numpy(x[3 * g:3 * g + 3]), rm, rv, t["bn.weight"],
                                             t["bn.bias"], training=True, momentum=0.1, eps=1e-5)
        np.testing.assert_allclose(out[3 * g:3 * g + 3].numpy(), ref.numpy(), rtol=0, atol=1e-12)
        running.append((rm.numpy(), rv.numpy()))
    for i, key in enumerate(("bn.running_mean", "bn.running_var")):
        np.testing.assert_allclose(new[key].numpy(), (running[0][i] + running[1][i]) / 2, rtol=0, atol=1e-12)


# --------------------------------------------------------------------------- the command line


def _cli(args, workers=1, env=None, check=True):
    """``deqcore`` in one process, or under torchrun with ``workers`` processes."""
    launcher = [] if workers == 1 else ["-m", "torch.distributed.run", "--nproc-per-node", str(workers),
                                        "--master-addr", "127.0.0.1", "--master-port", str(free_port())]
    proc = subprocess.run([sys.executable, *launcher, "-m", "deqcore_models.cli", *args], capture_output=True,
                          text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _args(data_root, out):
    flags = {"config": "micro", "data": data_root, "train-limit": 64, "test-limit": 40, "batch-size": 16,
             "epochs": 2, "max-iter": 5, "pretrain-steps": 1, "unrolled-layers": 2, "grad": "implicit",
             "grad-option": "max_iter=5", "jac-weight": 0.5, "jac-freq": 0.5, "checkpoint-every": 3,
             "cosine-every": 3, "out": out}
    return ["train", "--backend", "torch", *(x for k, v in flags.items() for x in (f"--{k}", str(v))),
            "--no-progress"]


def _rows(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def _same_weights(a, b):
    """Final weights equal in float32 up to rounding, except what follows the gradient-free
    BN-fed biases (their Adam steps are rounding noise times lr): the weights' change from their
    start to 1e-3 as a whole, every weight to a tenth of the learning rate 1e-3 (Adam's steps
    g / (sqrt(v) + eps) amplify rounding where a gradient is near zero), the state to 1e-5."""
    start, _ = init_mdeq(MDEQ_CONFIGS["micro"], 1, seed=0)
    kept = [k for k in a.params if k not in BN_FED_BIASES]
    moved_a, moved_b = ({k: w.params[k] - start[k] for k in kept} for w in (a, b))
    assert grad_rel_diff(moved_a, moved_b) < 1e-3
    for k in kept:
        np.testing.assert_allclose(b.params[k], a.params[k], rtol=0, atol=1e-4, err_msg=k)
    for k, v in a.state.items():
        if k not in BN_AFTER_FED_BIASES:
            np.testing.assert_allclose(b.state[k], v, rtol=1e-5, atol=1e-5, err_msg=k)


def test_torchrun_gives_the_one_worker_run_and_resumes_on_one_worker(data_root, tmp_path):
    """The same command (MDEQ micro, pre-training, implicit gradient, Jacobian penalty on half the
    steps, the cosine probe) on 2 workers and on 1: the same steps.csv, epochs.csv and cosine.csv,
    ranks.csv with each worker's share; a worker killed mid-run stops its peer (a clear error, no
    hang) after the rank-0 checkpoint, and that 2-worker checkpoint resumed on 1 worker ends on
    the uninterrupted run's weights."""
    one, two, killed = tmp_path / "one", tmp_path / "two", tmp_path / "killed"
    _cli(_args(data_root, one))
    out = _cli(_args(data_root, two), workers=2)
    assert out.stderr.count("checkpoint saved") == 4 and "2 workers" in out.stderr  # rank 0 reports
    steps1, steps2 = _rows(one / "steps.csv"), _rows(two / "steps.csv")
    assert len(steps1) == len(steps2) == 8
    assert any(r["jac"] for r in steps1) and any(not r["jac"] for r in steps1)
    for a, b in zip(steps1, steps2, strict=True):
        same = ("step", "phase", "nfe", "acc", "bwd_unconverged")
        assert [a[k] for k in same] == [b[k] for k in same] and (a["jac"] == "") == (b["jac"] == "")
        assert float(b["loss"]) == pytest.approx(float(a["loss"]), rel=1e-5)
    shares = _rows(two / "ranks.csv")
    assert [(r["step"], r["rank"]) for r in shares] == [(str(s), str(k)) for s in range(1, 9) for k in (0, 1)]
    for row in steps2:
        mine = [r for r in shares if r["step"] == row["step"]]
        assert float(row["loss"]) == pytest.approx(np.mean([float(r["loss"]) for r in mine]), abs=2e-6)
        assert int(row["nfe"]) == max(int(r["nfe"]) for r in mine)
    ep1, ep2 = _rows(one / "epochs.csv"), _rows(two / "epochs.csv")
    for a, b in zip(ep1, ep2, strict=True):
        same = ("epoch", "step", "train_acc", "train_nfe", "test_acc", "test_nfe")
        assert [a[k] for k in same] == [b[k] for k in same]
        assert float(b["train_loss"]) == pytest.approx(float(a["train_loss"]), rel=1e-5)
        assert float(b["test_loss"]) == pytest.approx(float(a["test_loss"]), rel=1e-4)
    # the probe of the workers' mean gradients; compared at the first probe only: the 5-step
    # backward it measures is far from converged, and later the float32 weights' rounding
    # differences move it by more (the float64 engine test checks the mean gradient to 1e-10)
    cos1, cos2 = _rows(one / "cosine.csv"), _rows(two / "cosine.csv")
    assert [r["step"] for r in cos1] == [r["step"] for r in cos2] == ["3", "6"]
    assert float(cos2[0]["cosine"]) == pytest.approx(float(cos1[0]["cosine"]), abs=1e-4)
    assert json.loads((two / "summary.json").read_text())["workers"] == 2
    _same_weights(load_checkpoint(one / "checkpoint.npz"), load_checkpoint(two / "checkpoint.npz"))

    # a killed worker, launched without torchrun (which would stop the survivor itself): rank 1 dies
    # after step 7, and rank 0's next collective fails at once with one error line
    port = free_port()
    command = [sys.executable, "-m", "deqcore_models.cli", *_args(data_root, killed)]
    procs = [subprocess.Popen(command, env={**worker_env(rank, 2, port), KILL_ENV: "7@1"}, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for rank in range(2)]
    (_, err0), _ = (p.communicate(timeout=300) for p in procs)
    assert (procs[0].returncode, procs[1].returncode) == (1, -9), err0[-3000:]
    last = err0.strip().splitlines()[-1]
    assert last.startswith("deqcore train: error: process 0 of 2: another training process stopped")
    assert "--resume" in last
    assert load_checkpoint(killed / "checkpoint.npz").meta["step"] == 6  # mid-epoch 2
    _cli(_args(data_root, killed) + ["--resume"])
    resumed = load_checkpoint(killed / "checkpoint.npz")
    assert resumed.meta["step"] == 8
    _same_weights(load_checkpoint(one / "checkpoint.npz"), resumed)
    assert [int(r["step"]) for r in _rows(killed / "steps.csv")] == list(range(1, 9))
    assert {int(r["step"]) for r in _rows(killed / "ranks.csv")} == set(range(1, 7))  # the 2-worker steps


@pytest.mark.parametrize("setting,size,problem", [
    ({"batch_size": 16}, 3, "--batch-size) is the global batch, split equally among the 3 workers"),
    ({"batch_size": 12, "bn_groups": 3}, 2, "--bn-groups) must be 1 (statistics over the whole batch) or a "
                                            "multiple of the 2 workers"),
    ({"batch_size": 16, "bn_groups": 3}, 1, "--bn-groups) must divide --batch-size 16")])
def test_bad_data_parallel_settings_are_clear_errors(setting, size, problem, tmp_path):
    with pytest.raises(ConfigError) as info:
        Trainer(TrainConfig(config="micro", out=str(tmp_path), **setting), replicas=Replicas(0, size))
    assert problem in str(info.value)


def test_jax_under_a_launcher_points_to_devices(tmp_path):
    proc = _cli(["train", "--backend", "jax", "--config", "micro", "--out", str(tmp_path)],
                env={"WORLD_SIZE": "2", "RANK": "0"}, check=False)
    assert proc.returncode == 2
    assert "--devices" in proc.stderr and "WORLD_SIZE=2" in proc.stderr, proc.stderr


if __name__ == "__main__":
    import torch

    torch.set_num_threads(1)
    replicas = Replicas.from_environment("torch")
    results = train_cases(replicas)
    np.savez(Path(sys.argv[2]) / f"rank{replicas.rank}.npz", **results)
    replicas.close()
