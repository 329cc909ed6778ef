"""Training: loss goes down for every gradient mode on real data, torch and JAX take the same
step, a killed run resumes to the same result, and the CLI."""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import SELECTED
from deqcore_models import data as D
from deqcore_models._equilibrium_layer import DEQSettings
from deqcore_models._training_engines import make_engine
from deqcore_models.checkpoint import load_checkpoint
from deqcore_models.cli import build_parser
from deqcore_models.families import jacobian_probe
from deqcore_models.families.mdeq import mdeq_task
from deqcore_models.mdeq import MDEQ_CONFIGS, dropout_masks, init_mdeq
from deqcore_models.train import KILL_ENV, TrainConfig, cosine_lr
from models_helpers import BN_FED_BIASES, grad_rel_diff

MICRO = MDEQ_CONFIGS["micro"]
CPU = MDEQ_CONFIGS["cpu"]


_task = mdeq_task


@pytest.fixture(scope="module")
def fmnist(data_root):
    ds = D.fashion_mnist(data_root, limit=64)
    x = D.to_float_nchw(ds.train_x, [0.286], [0.353])
    return x, np.eye(10, dtype=np.float32)[ds.train_y]


MODES = [("broyden", "implicit", {"max_iter": 10}), ("broyden", "jfb", {}),
         ("broyden", "npg", {"k": 5, "lam": 0.5}), ("broyden", "gdeq", {}),
         ("broyden", "gdeq_refined", {"max_iter": 10}),
         ("anderson", "upg", {"k": 2, "lam": 0.5}), ("fixed_point", "unroll", {})]


@pytest.mark.parametrize("backend", SELECTED)
@pytest.mark.parametrize("solver,grad,grad_options", MODES)
def test_training_steps_reduce_the_loss(backend, solver, grad, grad_options, fmnist):
    x, y = fmnist
    params, state = init_mdeq(CPU, 1, seed=0)
    engine = make_engine(backend, _task(CPU), params, state, weight_decay=0.0)
    settings = DEQSettings(solver=solver, max_iter=6, grad=grad, grad_options=grad_options)
    xb, yb = x[:32], y[:32]
    losses = [engine.train_step(xb, yb, None, settings, 1e-2)["loss"] for _ in range(8)]
    assert all(np.isfinite(losses))
    assert losses[-1] < 0.9 * losses[0], losses
    assert np.mean(losses[-3:]) < 0.9 * np.mean(losses[:3]), losses


@pytest.mark.parametrize("backend", SELECTED)
def test_gradient_clipping(backend, fmnist):
    """Adam's first moment after one step is 0.1 x the gradient it was given: with clip_norm at
    half the gradient's norm that gradient is exactly the unclipped one halved, and a clipped
    run's optimizer state resumes into the same next step."""
    x, y = fmnist
    cfg = MDEQ_CONFIGS["micro"]
    params, state = init_mdeq(cfg, 1, seed=2)
    settings = DEQSettings(solver="broyden", max_iter=6, grad="jfb")

    def first_moment(clip):
        engine = make_engine(backend, _task(cfg), params, state, weight_decay=0.0, clip_norm=clip)
        engine.train_step(x[:16], y[:16], None, settings, 1e-3)
        extra = engine.export()[2]
        return engine, np.concatenate([extra[f"opt.m/{k}"].ravel() for k in sorted(params)]) / 0.1

    _, g = first_moment(None)
    norm = float(np.linalg.norm(g))
    engine, clipped = first_moment(0.5 * norm)
    np.testing.assert_allclose(clipped, 0.5 * g, rtol=2e-5, atol=1e-9 * norm)
    resumed = make_engine(backend, _task(cfg), params, state, weight_decay=0.0, clip_norm=0.5 * norm)
    resumed.load(*engine.export())
    for e in (engine, resumed):
        e.train_step(x[16:32], y[16:32], None, settings, 1e-3)
    for k, v in engine.export()[0].items():
        np.testing.assert_array_equal(resumed.export()[0][k], v, err_msg=k)
    with pytest.raises(ValueError, match=r"clip_norm \(--clip-norm\) must be a finite float > 0"):
        TrainConfig(clip_norm=0.0)


def test_cosine_schedule():
    assert cosine_lr(0, 100, 1e-3, 1e-6) == pytest.approx(1e-3)
    assert cosine_lr(50, 100, 1e-3, 1e-6) == pytest.approx((1e-3 + 1e-6) / 2)
    assert cosine_lr(100, 100, 1e-3, 1e-6) == pytest.approx(1e-6)
    assert cosine_lr(150, 100, 1e-3, 1e-6) == pytest.approx(1e-6)




@pytest.mark.equivalence
@pytest.mark.parametrize("grad", ["implicit", "gdeq", "npg"])
def test_one_training_step_gives_the_same_weights(fmnist, grad):
    x, y = fmnist
    cfg = CPU
    params, state = init_mdeq(cfg, 1, seed=5)
    masks = dropout_masks(cfg, 16, np.random.default_rng(3))
    settings = DEQSettings(solver="broyden", max_iter=8, grad=grad,
                           grad_options={"max_iter": 8} if grad == "implicit" else {})
    out = {}
    for backend in ("torch", "jax"):
        engine = make_engine(backend, _task(cfg), params, state, weight_decay=1e-4)
        r = engine.train_step(x[:16], y[:16], masks, settings, 1e-3)
        out[backend] = (r, *engine.export())
    (rt, pt, st, et), (rj, pj, sj, ej) = out["torch"], out["jax"]
    assert rt["nfe"] == rj["nfe"] and abs(rt["loss"] - rj["loss"]) < 1e-4
    assert int(et["opt.step"]) == int(ej["opt.step"]) == 1
    top = max(np.abs(et[f"opt.m/{k}"]).max() for k in params)
    compared = [k for k in params if k not in BN_FED_BIASES]
    for k in BN_FED_BIASES:
        assert np.abs(et[f"opt.m/{k}"]).max() < 1e-3 * top and np.abs(ej[f"opt.m/{k}"]).max() < 1e-3 * top
    # the first moments are 0.1 * gradient: the gradients agree
    m_t = {k: et[f"opt.m/{k}"] for k in compared}
    assert grad_rel_diff(m_t, {k: ej[f"opt.m/{k}"] for k in compared}) < 1e-3
    # the updates agree as a whole, and every weight to a tenth of the learning rate (Adam's
    # first step g / (|g| + eps) amplifies rounding differences where |g| is tiny)
    upd_t = {k: pt[k] - params[k] for k in compared}
    upd_j = {k: pj[k] - params[k] for k in compared}
    assert grad_rel_diff(upd_t, upd_j) < 1e-3
    for k in compared:
        np.testing.assert_allclose(pt[k], pj[k], atol=1e-4, rtol=0, err_msg=k)
    for k in st:
        np.testing.assert_allclose(st[k], sj[k], rtol=1e-4, atol=1e-5, err_msg=k)


# --------------------------------------------------------------------------- CLI and resume


def _cli(args, env_extra=None, check=True):
    env = dict(os.environ)
    env.update(env_extra or {})
    proc = subprocess.run([sys.executable, "-m", "deqcore_models.cli", *args], capture_output=True, text=True,
                          env=env, timeout=600)
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _train_args(data_root, out, backend=None, **overrides):
    flags = {"backend": backend or SELECTED[0], "config": "micro", "data": data_root, "train-limit": 256,
             "test-limit": 64, "batch-size": 32, "epochs": 2, "max-iter": 5, "pretrain-steps": 3,
             "unrolled-layers": 2, "grad": "jfb", "checkpoint-every": 4, "out": out}
    flags.update({k.replace("_", "-"): v for k, v in overrides.items()})
    return ["train", *(x for k, v in flags.items() for x in (f"--{k}", str(v))), "--no-progress"]


@pytest.mark.parametrize("backend", [
    pytest.param("torch", marks=pytest.mark.backend("torch"), id="torch-pretrain-jacobian"),
    pytest.param("jax", marks=pytest.mark.backend("jax"), id="jax")])
def test_kill_and_resume_reaches_the_same_result(data_root, tmp_path, backend):
    """On torch with pre-training and a Jacobian penalty on half the steps (its probes are seeded
    per step, and the penalised steps fill steps.csv's jac column). On JAX without them: what
    differs on JAX is the optimizer state restored into optax, and each of those options would
    add two more compilations (about 25 s) to each of the three processes; the trainer logic
    they exercise is the same on both backends."""
    extra = {"jac_weight": 0.5, "jac_freq": 0.5} if backend == "torch" else {"pretrain_steps": 0}

    def args(out, **kw):
        return _train_args(data_root, out, backend, **extra, **kw)

    straight, killed = tmp_path / "straight", tmp_path / "killed"
    lines = _cli(args(straight)).stderr.splitlines()
    saved = [ln.split()[1] for ln in lines if ln.endswith("checkpoint saved")]  # --no-progress status
    assert saved == ["4/16", "8/16", "12/16", "16/16"]
    proc = _cli(args(killed), {KILL_ENV: "10"}, check=False)
    assert proc.returncode == -9  # SIGKILL, mid-epoch-2, two steps after the step-8 checkpoint
    assert load_checkpoint(killed / "checkpoint.npz").meta["step"] == 8
    with open(killed / "steps.csv") as fh:
        assert [r["step"] for r in csv.DictReader(fh)][-1] == "10"
    _cli(args(killed) + ["--resume"])
    a, b = load_checkpoint(straight / "checkpoint.npz"), load_checkpoint(killed / "checkpoint.npz")
    assert a.meta["step"] == b.meta["step"] == 16
    for k in a.params:
        np.testing.assert_allclose(b.params[k], a.params[k], rtol=1e-6, atol=1e-7, err_msg=k)
    with open(killed / "steps.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [int(r["step"]) for r in rows] == list(range(1, 17))  # past the checkpoint: dropped, rewritten
    if "jac_weight" in extra:
        cfg = TrainConfig(jac_weight=0.5, jac_freq=0.5)
        drawn = [jacobian_probe(cfg, int(r["step"]) - 1, [(1, 1)]) is not None for r in rows]
        assert 0 < sum(drawn) < len(rows)
        for r, expect in zip(rows, drawn, strict=True):
            assert (r["jac"] != "") == expect and (not expect or float(r["jac"]) > 0)
    ea = json.loads((straight / "summary.json").read_text())["epochs"]
    eb = json.loads((killed / "summary.json").read_text())["epochs"]
    for ra, rb in zip(ea, eb, strict=True):
        assert ra["test_acc"] == rb["test_acc"]
        assert ra["test_loss"] == pytest.approx(rb["test_loss"], rel=1e-5)
        assert ra["train_loss"] == pytest.approx(rb["train_loss"], rel=1e-5)
    # a resume with different settings is refused, naming the difference
    proc = _cli(args(killed, lr=0.5) + ["--resume"], check=False)
    assert proc.returncode == 2 and "lr 0.001 there vs 0.5 now" in proc.stderr


@pytest.mark.backend("torch")
def test_transformer_with_memory_kill_and_resume(data_root, tmp_path):
    """The DEQ-Transformer trains from the CLI on real text, reports perplexity, and a run killed
    mid-epoch resumes (weights, optimizer and the segment memory) to the uninterrupted result.
    torch only: saving and restoring the memory is framework-neutral NumPy, and JAX's resume is
    checked by the MDEQ test above."""
    backend = "torch"

    def args(out):
        return _train_args(data_root, out, backend, model="transformer", config="micro-mem",
                           dataset="tiny-shakespeare", train_limit=700, test_limit=400, batch_size=4,
                           solver="anderson", grad="implicit", pretrain_steps=4, epochs=2)

    straight, killed = tmp_path / "straight", tmp_path / "killed"
    _cli(args(straight))
    proc = _cli(args(killed), {KILL_ENV: "27"}, check=False)
    assert proc.returncode == -9
    assert load_checkpoint(killed / "checkpoint.npz").meta["step"] == 24
    _cli(args(killed) + ["--resume"])
    a, b = load_checkpoint(straight / "checkpoint.npz"), load_checkpoint(killed / "checkpoint.npz")
    assert a.meta["step"] == b.meta["step"] == 42  # 2 epochs of (175 - 1) // 8 segments
    assert set(a.state) == {"mem.z", "mem.u", "mem.valid"} and float(a.state["mem.valid"]) == 8
    for part in ("params", "state"):
        for k, v in getattr(a, part).items():
            np.testing.assert_allclose(getattr(b, part)[k], v, rtol=1e-5, atol=1e-6, err_msg=k)
    ea = json.loads((straight / "summary.json").read_text())["epochs"]
    eb = json.loads((killed / "summary.json").read_text())["epochs"]
    assert len(ea) == len(eb) == 2
    for ra, rb in zip(ea, eb, strict=True):
        assert ra["test_ppl"] == pytest.approx(rb["test_ppl"], rel=1e-5)
        assert ra["test_ppl"] == pytest.approx(np.exp(ra["test_loss"]), rel=1e-9)
    assert ea[-1]["test_ppl"] < 65  # the character vocabulary: below a uniform guess
    assert ea[-1]["train_loss"] < ea[0]["train_loss"]


@pytest.mark.equivalence
def test_same_command_on_both_backends_gives_matching_curves(data_root, tmp_path):
    """The DEQ-Transformer CLI run on torch and on JAX: the same per-step losses (to float32
    solver noise) and test perplexity; the comparison command writes its report and plot."""
    from deqcore_models.experiments import main as experiments

    def args(backend):
        return _train_args(data_root, tmp_path / backend, backend, model="transformer", config="micro-mem",
                           dataset="tiny-shakespeare", train_limit=700, test_limit=400, batch_size=4,
                           solver="anderson", grad="implicit", pretrain_steps=4, epochs=1)

    for backend in ("torch", "jax"):
        _cli(args(backend))
    assert experiments(["backends", str(tmp_path / "torch"), str(tmp_path / "jax"),
                        "--out", str(tmp_path / "cmp")]) == 0
    res = json.loads((tmp_path / "cmp" / "backends.json").read_text())
    assert res["backends"] == ["torch", "jax"] and res["steps"] == 21
    assert res["max_rel_loss_diff"] < 1e-3, res
    assert res["final"][0]["test_ppl"] == pytest.approx(res["final"][1]["test_ppl"], rel=1e-3)
    assert {p.name for p in (tmp_path / "cmp").iterdir()} == {"backends.md", "backends.json", "backends.png"}
    before = (tmp_path / "cmp" / "backends.json").read_bytes()
    assert experiments(["backends", str(tmp_path / "torch"), str(tmp_path / "jax"),
                        "--out", str(tmp_path / "cmp")]) == 2  # earlier results are kept unless asked
    assert experiments(["backends", str(tmp_path / "torch"), str(tmp_path / "nowhere"),
                        "--out", str(tmp_path / "cmp"), "--overwrite"]) == 2
    assert (tmp_path / "cmp" / "backends.json").read_bytes() == before


@pytest.mark.equivalence
def test_checkpoint_from_torch_evaluates_identically_on_jax(data_root, tmp_path):
    _cli(_train_args(data_root, tmp_path / "run", max_steps=4))
    res = {b: json.loads(_cli(["eval", "--run", str(tmp_path / "run"), "--backend", b]).stdout)
           for b in ("torch", "jax")}
    assert res["torch"]["step"] == res["jax"]["step"] == 4
    assert res["torch"]["test_acc"] == res["jax"]["test_acc"]
    assert res["torch"]["test_loss"] == pytest.approx(res["jax"]["test_loss"], rel=1e-4)


def test_cli_help_explains_every_flag():
    parser = build_parser()
    def check(parser, path):
        for action in parser._actions:
            if action.dest != "help":
                assert action.help and len(action.help) > 8, f"{path} {action.option_strings}"
            if isinstance(action.choices, dict):  # subcommands (hypersolver train|eval nest one more level)
                for name, child in action.choices.items():
                    check(child, f"{path} {name}")

    check(parser, "deqcore")
    out = _cli(["train", "--help"]).stdout
    for flag in ("--backend", "--solver", "--grad", "--pretrain-steps", "--resume", "--seed", "--out"):
        assert flag in out


def test_cli_errors_are_clear(data_root, tmp_path):
    proc = _cli(_train_args(data_root, tmp_path / "r") + ["--solver-option", "bogus=1"], check=False)
    assert proc.returncode == 2 and "bogus" in proc.stderr and "memory" in proc.stderr
    proc = _cli(["train", "--backend", SELECTED[0], "--data", str(tmp_path / "none"), "--out",
                 str(tmp_path / "r2")], check=False)
    assert proc.returncode == 2 and "does not exist" in proc.stderr
    proc = _cli(["train", "--data", str(data_root), "--epochs", "0"], check=False)
    assert proc.returncode == 2 and "--epochs must be an int >= 1, got 0" in proc.stderr
    proc = _cli(_train_args(data_root, tmp_path / "r4") + ["--softmax-chunk", "16"], check=False)
    assert proc.returncode == 2 and "--softmax-chunk is an option of model transformer" in proc.stderr
    proc = _cli(["eval", "--run", str(tmp_path / "nothing")], check=False)
    assert proc.returncode == 2 and "checkpoint not found" in proc.stderr
    for backend in [b for b in ("torch", "jax") if importlib.util.find_spec(b) is None]:  # tox torch/jax envs
        proc = _cli(_train_args(data_root, tmp_path / "r3", backend), check=False)
        hint = {"torch": "'torch==2.13.0'", "jax": "'deqcore[jax]'"}[backend]
        assert proc.returncode == 2 and f"install it with pip install {hint}" in proc.stderr


def test_softmax_chunk_option(data_root):
    from deqcore_models._losses import DEFAULT_SOFTMAX_CHUNK
    from deqcore_models.train import make_workload

    def task(**kw):
        cfg = TrainConfig(model="transformer", config="micro", dataset="tiny-shakespeare",
                          data=str(data_root), train_limit=200, test_limit=100, batch_size=2, **kw)
        return make_workload(cfg).task

    assert (task().output, task().chunk) == (("embed.weight", "out.bias"), DEFAULT_SOFTMAX_CHUNK)
    assert task(softmax_chunk=5).chunk == 5
    assert task(softmax_chunk=0).output is None
    with pytest.raises(ValueError, match=r"softmax_chunk \(--softmax-chunk\) must be an int >= 0"):
        TrainConfig(model="transformer", config="micro", dataset="tiny-shakespeare", softmax_chunk=-1)


@pytest.mark.parametrize("backend", SELECTED)
def test_cosine_probe_of_implicit_against_itself_is_one(data_root, tmp_path, backend):
    """The probe compares against implicit: implicit with the reference's own settings gives
    cosine 1."""
    from deqcore_models.train import Trainer

    cfg = TrainConfig(backend=backend, config="micro", data=str(data_root), train_limit=96, test_limit=32,
                      batch_size=32, max_iter=5, grad="implicit", grad_options={"max_iter": 6},
                      cosine_every=1, cosine_reference={"max_iter": 6}, out=str(tmp_path / "probe"),
                      pretrain_steps=0)
    Trainer(cfg, progress=False).run()
    with open(tmp_path / "probe" / "cosine.csv") as fh:
        cos = [float(r["cosine"]) for r in csv.DictReader(fh)]
    assert len(cos) == 3 and all(abs(c - 1) < 1e-5 for c in cos)


@pytest.mark.backend("torch")
def test_gdeq_experiment_writes_its_table_and_plots(data_root, tmp_path):
    """The experiment command (one Trainer per mode, then tables and plots: framework-neutral,
    so it runs on torch, the quicker to start) writes its table, results and plots."""
    from deqcore_models.experiments import main as experiment

    out = tmp_path / "exp"
    assert experiment(["gdeq", "--backend", "torch", "--config", "micro", "--data", str(data_root),
                       "--train-limit", "64", "--test-limit", "32", "--batch-size", "32", "--max-iter", "4",
                       "--modes", "implicit,jfb", "--pretrain", "1", "--unrolled-layers", "2",
                       "--cosine-every", "1", "--out", str(out), "--no-progress"]) == 0
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert [(r["mode"], r["pretrain"]) for r in rows] == [("implicit", 1), ("jfb", 1)]
    assert all(r["speedup_vs_implicit"] > 0 for r in rows)
    jfb = rows[1]
    assert -1 <= jfb["cosine_mean"] < 0.999  # JFB drops the Jacobian term: not the implicit gradient
    table = (out / "README.md").read_text()
    assert table.count("\n| jfb | 1 |") == 1 and "speedup vs implicit" in table
    assert {p.name for p in out.glob("*.png")} == {"accuracy.png", "cosine.png", "step_time.png"}


def test_trainer_implicit_backward_defaults_to_the_papers_budget():
    from deqcore_models.train import IMPLICIT_BACKWARD

    assert TrainConfig(grad="implicit").deq_settings().grad_options == IMPLICIT_BACKWARD
    assert IMPLICIT_BACKWARD["max_iter"] == 20
    mine = TrainConfig(grad="implicit", grad_options={"max_iter": 5, "tol": 1e-3}).deq_settings()
    assert mine.grad_options == {**IMPLICIT_BACKWARD, "max_iter": 5, "tol": 1e-3}
    assert TrainConfig(grad="jfb").deq_settings().grad_options == {}
    # gdeq_refined runs implicit's solve from Broyden's estimate: the same budget, and Broyden forward
    assert TrainConfig(grad="gdeq_refined").deq_settings().grad_options == IMPLICIT_BACKWARD
    with pytest.raises(ValueError, match="gdeq_refined does not work with --solver anderson"):
        TrainConfig(grad="gdeq_refined", solver="anderson")


@pytest.mark.parametrize("backend", SELECTED)
def test_train_step_reports_the_backward_residual(backend, fmnist):
    x, y = fmnist
    params, state = init_mdeq(CPU, 1, seed=0)
    reached = {}
    for budget in (2, 30):
        engine = make_engine(backend, _task(CPU), params, state, weight_decay=0.0)
        settings = DEQSettings(max_iter=6, grad="implicit",
                               grad_options={"max_iter": budget, "on_fail": "ignore"})
        reached[budget] = [engine.train_step(x[:32], y[:32], None, settings, 1e-3)["bwd_residual"]
                           for _ in range(2)]
    assert all(np.isfinite(v) and v > 0 for v in reached[2] + reached[30])
    assert reached[30][0] < reached[2][0]  # the same first batch and weights: more steps, smaller residual
    jfb = make_engine(backend, _task(CPU), params, state, weight_decay=0.0)
    step = jfb.train_step(x[:32], y[:32], None, DEQSettings(max_iter=6, grad="jfb"), 1e-3)
    assert np.isnan(step["bwd_residual"])


def test_steps_csv_records_the_backward_residual(data_root, tmp_path):
    out = tmp_path / "implicit"
    _cli(_train_args(data_root, out, grad="implicit", epochs=1, pretrain_steps=0, train_limit=64))
    with open(out / "steps.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert rows and all(float(r["bwd_residual"]) > 0 for r in rows)
    assert all(r["bwd_unconverged"] == "0" for r in rows)  # a budget, not a tolerance: nothing warned
