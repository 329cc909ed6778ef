"""Warm starts in training: the engines start a solve from a given state and return its fixed
points, the trainer keeps them per training sample (``--warm-start``) and logs the hit rate."""

from __future__ import annotations

import csv

import numpy as np
import pytest
from conftest import SELECTED
from deqcore_models import data as D
from deqcore_models._equilibrium_layer import DEQSettings
from deqcore_models._replicas import Replicas
from deqcore_models._training_engines import make_engine
from deqcore_models.families import Batch
from deqcore_models.families.mdeq import mdeq_task
from deqcore_models.mdeq import MDEQ_CONFIGS, equilibrium_shapes, init_mdeq
from deqcore_models.train import ConfigError, TrainConfig, Trainer

MICRO = MDEQ_CONFIGS["micro"]


@pytest.mark.parametrize("backend", SELECTED)
def test_an_engine_step_starts_its_solve_from_the_given_state(backend, data_root):
    """The same batch and weights (lr 0), two solver steps a solve: started from the iterate the
    first solve returned, the second ends at least as close to the fixed point in every sample
    (its start is one of its iterates) and closer in some."""
    ds = D.fashion_mnist(data_root, limit=16)
    x = D.to_float_nchw(ds.train_x, [0.286], [0.353])
    y = np.eye(10, dtype=np.float32)[ds.train_y]
    params, state = init_mdeq(MICRO, 1, seed=0)
    engine = make_engine(backend, mdeq_task(MICRO), params, state, weight_decay=0.0)
    settings = DEQSettings(solver="anderson", tol=1e-3, max_iter=2, grad="jfb")
    cold = engine.train_step(x, y, None, settings, 0.0, keep_solution=True)
    sol = cold["solution"]
    assert [tuple(a.shape) for a in sol.z] == equilibrium_shapes(MICRO, x.shape)
    assert sol.solver_state is None and sol.abs_trace is None
    warm = engine.train_step(x, y, None, settings, 0.0, z0=sol.z, keep_solution=True)
    before, after = (np.asarray(engine.ops.to_numpy(r["solution"].rel_residual)) for r in (cold, warm))
    assert (after <= before * (1 + 1e-5)).all()
    assert (after < 0.9 * before).any()
    assert warm["nfe"] == cold["nfe"] == 3


def _config(data_root, tmp_path, **overrides):
    settings = {"backend": "torch", "config": "micro", "data": str(data_root), "train_limit": 64,
                "test_limit": 32, "batch_size": 32, "epochs": 2, "max_iter": 4, "pretrain_steps": 1,
                "unrolled_layers": 2, "grad": "jfb", "out": str(tmp_path / "run")}
    return TrainConfig(**{**settings, **overrides})


def _steps(cfg):
    trainer = Trainer(cfg, progress=False)
    trainer.run()
    with open(f"{cfg.out}/steps.csv") as fh:
        return list(csv.DictReader(fh)), trainer


@pytest.mark.backend("torch")
def test_the_trainer_keeps_each_samples_fixed_point_and_logs_the_hit_rate(data_root, tmp_path):
    """Two batches per epoch, the first step pre-training: a DEQ step hits the samples an earlier
    DEQ step solved when unconverged solves are kept (``best``; 4 steps reach no tolerance),
    none when only converged ones are; misses start where a cold run starts. (PyTorch: the loop
    is the same for both engines, and the JAX engine's warm step is tested above.)"""
    cold, _ = _steps(_config(data_root, tmp_path / "cold"))
    best, trainer = _steps(_config(data_root, tmp_path / "best", warm_start=True, warm_start_keep="best"))
    converged, _ = _steps(_config(data_root, tmp_path / "converged", warm_start=True))
    seen: set[int] = set()
    expected = [""]
    for step in range(1, 4):
        indices = trainer.work.train_batch(step).indices.tolist()
        expected.append(f"{np.mean([i in seen for i in indices]):.4e}")
        seen.update(indices)
    assert expected[1] == "0.0000e+00" and 0 < float(expected[-1]) < 1
    assert [r["warm_hits"] for r in cold] == [""] * 4
    assert [r["warm_hits"] for r in best] == expected
    assert [r["warm_hits"] for r in converged] == ["", *["0.0000e+00"] * 3]
    assert [r["loss"] for r in best[:2]] == [r["loss"] for r in cold[:2]]
    assert [r["loss"] for r in converged] == [r["loss"] for r in cold]
    assert best[2]["loss"] != cold[2]["loss"]  # started elsewhere: another z*, another loss
    assert trainer.cache is not None and trainer.cache.updates == 4 and len(trainer.cache) == len(seen)


@pytest.mark.backend("torch")
def test_steps_csv_records_the_mean_solver_steps_per_sample(data_root, tmp_path):
    """``iterations``: empty on pre-training steps; 4 where no sample reaches the tolerance in
    4 steps; below the budget where some do, the NFE still the budget's (the slowest sample's)."""
    tight, _ = _steps(_config(data_root, tmp_path / "tight", tol=1e-9))
    assert [r["iterations"] for r in tight] == ["", *["4.0000e+00"] * 3]
    assert {r["nfe"] for r in tight[1:]} == {"5"}
    loose, _ = _steps(_config(data_root, tmp_path / "loose", tol=0.5, max_iter=8))
    assert loose[0]["iterations"] == "" and all(0 < float(r["iterations"]) < 8 for r in loose[1:])
    assert {r["nfe"] for r in loose[1:]} == {"9"}


@pytest.mark.backend("torch")
def test_warm_start_settings_are_checked(data_root, tmp_path):
    with pytest.raises(ConfigError, match=r"warm_start_max_age \(--warm-start-max-age\) is a warm-start "
                                          r"setting: add --warm-start"):
        _config(data_root, tmp_path, warm_start_max_age=3)
    with pytest.raises(ConfigError, match=r"warm_start_keep .* must be one of"):
        _config(data_root, tmp_path, warm_start=True, warm_start_keep="all")
    with pytest.raises(ConfigError, match=r"warm_start_max_age .* must be an int >= 0"):
        _config(data_root, tmp_path, warm_start=True, warm_start_max_age=-1)
    cfg = TrainConfig(model="transformer", config="micro", dataset="tiny-shakespeare", data=str(data_root),
                      warm_start=True, out=str(tmp_path / "lm"))
    with pytest.raises(ConfigError, match="model transformer's have none"):
        Trainer(cfg, progress=False)


@pytest.mark.backend("torch")
def test_each_data_parallel_worker_gets_the_indices_of_its_rows():
    batch = Batch(np.arange(8.0)[:, None], np.zeros((8, 10)), None, 8, None, np.arange(100, 108))
    shares = [Replicas(rank, 2).shard_batch(batch) for rank in (0, 1)]
    for share in shares:
        np.testing.assert_array_equal(share.indices, 100 + share.x[:, 0].astype(int))
    np.testing.assert_array_equal(np.concatenate([s.indices for s in shares]), batch.indices)
