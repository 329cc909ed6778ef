"""JAX data-parallel training: the engine on a mesh of 2 host devices takes the same steps as on
one (float64, every array compared to 1e-10), and ``deqcore train --devices 2`` writes the same
run as ``--devices 1``, resumable on either count.

The 2-device runs need ``XLA_FLAGS=--xla_force_host_platform_device_count=2`` before JAX starts,
so they run in subprocesses: this file run as a script (``python test_distributed_training_jax.py
engine DATA``) prints what the engine comparison measured as JSON, and the tests assert on it.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np

HOST_DEVICES = "--xla_force_host_platform_device_count"
#: The engine comparison's cases: gradient mode and whether every step carries the Jacobian penalty.
#: Every gradient mode the trainer's tests name, the penalty with two of them (each case compiles
#: its step twice, once per device count: most of this file's time).
CASES = [("implicit", False), ("implicit", True), ("gdeq", False), ("npg", True)]
GRAD_OPTIONS = {"implicit": {"max_iter": 8}, "gdeq": {}, "npg": {"k": 3, "lam": 0.5}}
STEPS = 3
FAST_COMPILE = ("--xla_backend_optimization_level=0", "--xla_llvm_disable_expensive_passes=true")


def _rel(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    """The largest difference of any array of ``a`` and ``b``, relative to the largest entry."""
    scale = max(float(np.abs(v).max()) for v in a.values() if v.size) or 1.0
    return max(float(np.abs(a[k] - b[k]).max()) if a[k].size else 0.0 for k in a) / scale


def _f64(tree):
    if tree is None:
        return None
    if isinstance(tree, dict):
        return {k: np.asarray(v, np.float64) if v.dtype.kind == "f" else v for k, v in tree.items()}
    return [np.asarray(v, np.float64) for v in tree]


def _compare_runs(engines, batches, settings, initial) -> dict[str, float]:
    """``STEPS`` steps of each of the two engines on the same ``batches``: the largest relative
    difference of the step results, of the first step's Adam moment (0.1 x the gradient), and of
    parameters and state after the last step; whether the NFE agreed every step; and how far the
    parameters moved from ``initial`` (so equal results are not two untouched models)."""
    results = {n: [] for n in engines}
    moments = {}
    for i, (x, y, masks, probe) in enumerate(batches):
        for n, e in engines.items():
            results[n].append(e.train_step(x, y, masks, settings, 1e-3 * (i + 1), probe))
            if i == 0:
                extra = e.export()[2]
                moments[n] = {k[len("opt.m/"):]: v for k, v in extra.items() if k.startswith("opt.m/")}
    a, b = engines
    out = {"same_nfe": all(r["nfe"] == s["nfe"] for r, s in zip(results[a], results[b], strict=True))}
    for key in ("loss", "residual", "jac", "bwd_residual"):
        pairs = [(r[key], s[key]) for r, s in zip(results[a], results[b], strict=True)]
        if all(np.isnan(u) and np.isnan(v) for u, v in pairs):
            out[key] = 0.0
        else:
            out[key] = max(abs(u - v) / max(abs(u), 1e-300) for u, v in pairs)
    out["gradient"] = _rel(moments[a], moments[b])
    (pa, sa, _), (pb, sb, _) = engines[a].export(), engines[b].export()
    out["params"], out["state"] = _rel(pa, pb), _rel(sa, sb) if sa else 0.0
    out["moved"] = _rel(pa, initial)
    return out


def engine_comparison(data: str) -> dict[str, object]:
    """Run in a process with 2 host devices and float64: 1 device against 2 for every case of
    :data:`CASES` on the MDEQ micro config (with dropout, so masks are split too; BatchNorm in
    its stem and head), then the DEQ-Transformer micro-mem config once (masks, a memory carried
    across steps), and that memory split along the batch against replicated."""
    import jax
    from deqcore_models import data as D
    from deqcore_models._equilibrium_layer import DEQSettings
    from deqcore_models._training_engines import make_engine
    from deqcore_models.families.mdeq import mdeq_task
    from deqcore_models.families.transformer import transformer_task
    from deqcore_models.mdeq import MDEQ_CONFIGS, dropout_masks, equilibrium_shapes, init_mdeq
    from deqcore_models.transformer import (
        TRANSFORMER_CONFIGS,
        empty_memory,
        init_transformer,
        transformer_masks,
    )
    from jax.sharding import NamedSharding, PartitionSpec

    assert jax.config.jax_enable_x64 and len(jax.local_devices()) == 2
    out: dict[str, object] = {}
    cfg = replace(MDEQ_CONFIGS["micro"], dropout=0.2)
    ds = D.fashion_mnist(Path(data), limit=8 * STEPS)
    xs = D.to_float_nchw(ds.train_x, [0.286], [0.353]).astype(np.float64)
    ys = np.eye(10)[ds.train_y]
    for grad, jac in CASES:
        rng = np.random.default_rng(7)
        batches = []
        for i in range(STEPS):
            x = xs[8 * i:8 * (i + 1)]
            probe = [rng.standard_normal(s) for s in equilibrium_shapes(cfg, x.shape)] if jac else None
            batches.append((x, ys[8 * i:8 * (i + 1)], _f64(dropout_masks(cfg, 8, rng)), probe))
        params, state = init_mdeq(cfg, 1, seed=3)
        settings = DEQSettings(solver="broyden", max_iter=8, grad=grad, grad_options=GRAD_OPTIONS[grad],
                               jac_weight=0.5 if jac else 0.0)
        engines = {n: make_engine("jax", mdeq_task(cfg), _f64(params), _f64(state), weight_decay=1e-4,
                                  devices=n) for n in (1, 2)}
        out[f"{grad}{'+jac' if jac else ''}"] = _compare_runs(engines, batches, settings, _f64(params))
        jax.clear_caches()

    tcfg = TRANSFORMER_CONFIGS["micro-mem"]
    vocab, rows = 30, 4
    rng = np.random.default_rng(11)
    params, _ = init_transformer(tcfg, vocab, seed=1, batch_size=rows)
    tokens = rng.integers(0, vocab, (rows, STEPS * tcfg.tgt_len + 1))
    batches = []
    for i in range(STEPS):
        a = i * tcfg.tgt_len
        x, y = tokens[:, a:a + tcfg.tgt_len], tokens[:, a + 1:a + 1 + tcfg.tgt_len]
        batches.append((x, y, _f64(transformer_masks(tcfg, rows, tcfg.tgt_len, rng)), None))
    settings = DEQSettings(solver="broyden", max_iter=8, grad="implicit", grad_options={"max_iter": 8})
    task = transformer_task(tcfg)
    engines = {n: make_engine("jax", task, _f64(params), _f64(empty_memory(tcfg, rows)), weight_decay=0.0,
                              devices=n) for n in (1, 2)}
    out["transformer"] = _compare_runs(engines, batches, settings, _f64(params))
    # the memory after those steps, split along the batch or replicated: the same next loss
    two = engines[2]
    mesh = two._mesh
    x, y, masks, _ = batches[0]
    rows_split = NamedSharding(mesh, PartitionSpec("batch"))
    whole = NamedSharding(mesh, PartitionSpec())
    ops = two.ops

    @jax.jit
    def loss(params, state, x, y, masks):
        return task.loss(ops, params, state, x, y, masks, settings, True)[0]

    args = jax.device_put((two.params, x, y, masks), (whole, rows_split, rows_split, rows_split))
    memory = {k: v for k, v in two.state.items() if v.ndim}
    split = loss(args[0], {**two.state, **jax.device_put(memory, rows_split)}, *args[1:])
    replicated = loss(args[0], jax.device_put(two.state, whole), *args[1:])
    out["memory_split_vs_replicated"] = abs(float(split) - float(replicated)) / abs(float(replicated))
    out["memory_valid"] = float(two.state["mem.valid"])
    return out


def _subprocess_env(devices: int, x64: bool) -> dict[str, str]:
    """The environment of a process with ``devices`` host devices, one thread, float64 if asked,
    and XLA's cheapest CPU code generation: compiling the training steps is most of these tests'
    time, and the comparisons are of two programs compiled alike."""
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_ENABLE_X64")}
    env["XLA_FLAGS"] = " ".join([f"{HOST_DEVICES}={devices}", *FAST_COMPILE])
    env["OMP_NUM_THREADS"] = "1"
    if x64:
        env["JAX_ENABLE_X64"] = "1"
    return env


if __name__ == "__main__":
    print(json.dumps(engine_comparison(sys.argv[2])))
    sys.exit(0)


import pytest  # noqa: E402  (the script above runs without pytest)
from deqcore_models._training_engines import DeviceCountError, make_engine  # noqa: E402
from deqcore_models.checkpoint import load_checkpoint  # noqa: E402
from deqcore_models.families.mdeq import mdeq_task  # noqa: E402
from deqcore_models.mdeq import MDEQ_CONFIGS, init_mdeq  # noqa: E402
from deqcore_models.train import KILL_ENV, ConfigError, TrainConfig, config_from_checkpoint  # noqa: E402

pytestmark = pytest.mark.backend("jax")


def test_two_devices_take_the_same_steps_as_one(data_root):
    proc = subprocess.run([sys.executable, __file__, "engine", str(data_root)], capture_output=True,
                          text=True, env=_subprocess_env(2, x64=True), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    for case in [f"{g}{'+jac' if j else ''}" for g, j in CASES] + ["transformer"]:
        r = out[case]
        assert r["same_nfe"], case
        for key in ("loss", "residual", "jac", "bwd_residual", "gradient", "params", "state"):
            assert r[key] < 1e-10, (case, key, r[key])
        assert r["moved"] > 1e-4, case
    assert out["memory_valid"] > 0  # the memory held the previous segment
    assert out["memory_split_vs_replicated"] < 1e-12


def _train(data_root, out: Path, devices: str, *extra: str, kill_at: int | None = None, check: bool = True):
    """``deqcore train --backend jax --devices DEVICES`` of the MDEQ micro config in a process
    with 2 host devices: 2 steps per epoch, 2 epochs, a checkpoint every 2 steps; test batches of
    15, 15 and 12 images (replicated on 2 devices, then split)."""
    env = _subprocess_env(2, x64=False)
    if kill_at is not None:
        env[KILL_ENV] = str(kill_at)
    flags = {"backend": "jax", "devices": devices, "config": "micro", "data": data_root, "train-limit": 32,
             "test-limit": 42, "batch-size": 16, "eval-batch-size": 15, "epochs": 2, "max-iter": 5,
             "lr": 1e-5, "min-lr": 1e-6, "checkpoint-every": 2, "out": out}
    args = [x for k, v in flags.items() for x in (f"--{k}", str(v))]
    command = [sys.executable, "-m", "deqcore_models.cli", "train", *args, "--no-progress", *extra]
    proc = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def _same_rows(a: list[dict[str, str]], b: list[dict[str, str]], close: tuple[str, ...],
               equal: tuple[str, ...], rel: float = 1e-4) -> None:
    assert len(a) == len(b)
    for ra, rb in zip(a, b, strict=True):
        for k in equal:
            assert ra[k] == rb[k], (k, ra, rb)
        for k in close:
            assert float(ra[k]) == pytest.approx(float(rb[k]), rel=rel), (k, ra, rb)


def test_cli_two_devices_write_the_same_run_and_resume_on_one(data_root, tmp_path):
    """``--devices 2`` and ``--devices 1`` give the same steps.csv and epochs.csv; a ``--devices
    2`` run killed after its step-2 checkpoint resumes with ``--devices 1`` to the weights of the
    uninterrupted run. In float32, as the trainer computes: 2 devices sum the batch in another
    order, and Adam scales every gradient entry to a step of about ``lr``, so the entries whose
    exact gradient is zero (conv biases before BatchNorm) step by +-lr on rounding noise. With
    ``--lr 1e-5`` the runs stay within 1e-4 (losses) and 1e-4 (weights) of each other; the
    1e-10 agreement is the float64 test's above."""
    one, two = tmp_path / "one", tmp_path / "two"
    _train(data_root, one, "1")
    proc = _train(data_root, two, "2", kill_at=3, check=False)
    assert proc.returncode == -9, proc.stderr[-3000:]  # SIGKILL after step 3, past the step-2 checkpoint
    saved = load_checkpoint(two / "checkpoint.npz")
    assert saved.meta["step"] == 2 and saved.meta["train_config"]["devices"] == 2
    # where a run ran is not carried over to what loads its checkpoint (deqcore eval, hypersolvers)
    assert config_from_checkpoint(saved, "two").devices == 1
    steps_one, epochs_one = _rows(one / "steps.csv"), _rows(one / "epochs.csv")
    steps_equal = ("step", "epoch", "acc", "nfe", "lr", "bwd_unconverged")
    _same_rows(_rows(two / "steps.csv"), steps_one[:3], ("loss",), steps_equal)
    _same_rows(_rows(two / "steps.csv"), steps_one[:3], ("residual",), (), rel=1e-2)
    epochs_close, epochs_equal = ("test_loss", "train_loss"), ("epoch", "step", "test_acc", "train_acc",
                                                             "test_nfe", "train_nfe")
    _same_rows(_rows(two / "epochs.csv"), epochs_one[:1], epochs_close, epochs_equal)
    _train(data_root, two, "1", "--resume")
    _same_rows(_rows(two / "steps.csv"), steps_one, ("loss",), steps_equal)
    _same_rows(_rows(two / "epochs.csv"), epochs_one, epochs_close, epochs_equal)
    a, b = load_checkpoint(one / "checkpoint.npz"), load_checkpoint(two / "checkpoint.npz")
    assert a.meta["step"] == b.meta["step"] == 4
    for group in ("params", "state"):
        for k, v in getattr(a, group).items():
            np.testing.assert_allclose(getattr(b, group)[k], v, rtol=1e-4, atol=1e-4, err_msg=k)


def test_devices_errors_name_the_flag(data_root, tmp_path):
    import jax

    with pytest.raises(ConfigError, match=r"\(--devices\) is a JAX setting .* torchrun --nproc-per-node"):
        TrainConfig(backend="torch", devices=2)
    for bad in (0, -1, "most", 2.0, True):
        with pytest.raises(ConfigError, match=r"devices \(--devices\) must be an int >= 1 or 'all'"):
            TrainConfig(backend="jax", devices=bad)
    with pytest.raises(ConfigError, match=r"must divide --batch-size 32 \(each device takes an equal share"):
        TrainConfig(backend="jax", devices=3, batch_size=32)
    assert TrainConfig(backend="jax", devices="all").devices == "all"
    have = len(jax.local_devices())
    params, state = init_mdeq(MDEQ_CONFIGS["micro"], 1, seed=0)
    with pytest.raises(DeviceCountError, match=rf"asks for {have + 1} devices but JAX sees {have} cpu device"
                                               rf".*XLA_FLAGS={HOST_DEVICES}={have + 1} in the environment "
                                               rf"before JAX starts"):
        make_engine("jax", mdeq_task(MDEQ_CONFIGS["micro"]), params, state, 0.0, devices=have + 1)
    # from the command line: one error line naming the flag, exit status 2, nothing written
    proc = _train(data_root, tmp_path / "four", "4", check=False)
    assert proc.returncode == 2 and proc.stderr.strip().endswith(
        f"--devices asks for 4 devices but JAX sees 2 cpu devices: on CPU, 4 host devices need "
        f"XLA_FLAGS={HOST_DEVICES}=4 in the environment before JAX starts"), proc.stderr
    proc = _train(data_root, tmp_path / "all", "all", "--batch-size", "15", check=False)
    assert proc.returncode == 2 and proc.stderr.strip().endswith(
        "--devices is 'all', 2 devices, which do not divide --batch-size 15"), proc.stderr
    assert not (tmp_path / "four").exists() and not (tmp_path / "all").exists()
