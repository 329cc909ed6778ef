"""The ``deqcore`` command and the files it writes under bad input and faults: every user error is
one ``error:`` line with exit status 2, raised before data is loaded or a file is written; a
tampered or corrupted checkpoint is refused by every command that loads one, listing every
difference; earlier results are never replaced unless asked; a full disk leaves no partial file
and the previous checkpoint intact; JSON is strict and non-finite results are flagged."""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from conftest import SELECTED
from deqcore_models.checkpoint import CheckpointError, load_checkpoint
from deqcore_models.cli import main
from deqcore_models.train import ConfigError, ConfigTypeError, TrainConfig, result_flags
from models_helpers import rewrite_npz

from deqcore._arrays_io import WriteError, dumps_json, load_arrays, save_arrays


def run_cli(capsys, argv):
    """``deqcore ARGV`` in this process: (exit status, stdout, stderr)."""
    try:
        rc = main([str(a) for a in argv])
    except SystemExit as exc:  # argparse's own errors
        rc = exc.code
    out, err = capsys.readouterr()
    return rc, out, err


def one_error_line(err: str, prefix: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith(prefix + ": error: "), lines[0]
    return lines[0]


def strict_json(text: str):
    def refuse(name):
        raise ValueError(f"not JSON: {name}")

    return json.loads(text, parse_constant=refuse)


@pytest.fixture
def empty_data(tmp_path):
    """A data folder with nothing in it: loading any data set from it is a DataError."""
    folder = tmp_path / "no-data"
    folder.mkdir()
    return folder


# --------------------------------------------------------------------------- flags, before any data

MICRO = ["--config", "micro", "--train-limit", "64", "--test-limit", "32", "--batch-size", "32",
         "--max-iter", "3", "--grad", "jfb", "--epochs", "10", "--no-progress"]

BAD_TRAIN_FLAGS = [
    (["--train-limit", "0"], "--train-limit must be an int >= 1, got 0"),
    (["--train-limit", "-200"], "--train-limit must be an int >= 1, got -200"),
    (["--test-limit", "0"], "--test-limit must be an int >= 1"),
    (["--max-steps", "0"], "--max-steps must be an int >= 1, got 0"),
    (["--max-steps", "-3"], "--max-steps must be an int >= 1, got -3"),
    (["--epochs", "0"], "--epochs must be an int >= 1"),
    (["--batch-size", "0"], "--batch-size must be an int >= 1"),
    (["--lr", "nan"], "--lr must be a finite float > 0, got nan"),
    (["--lr", "inf"], "--lr must be a finite float > 0, got inf"),
    (["--lr", "-0.1"], "--lr must be a finite float > 0"),
    (["--lr", "1e39"], "--lr must be <= 3.4e+37 (Adam's first step, 10 lr, must be a float32), got 1e+39"),
    (["--tol", "1e39"], "--tol must be a finite float > 0 within float32's range"),
    (["--lr", "1e-3", "--min-lr", "0.1"], "--min-lr must be <= lr"),
    (["--min-lr", "-1"], "--min-lr must be a finite float >= 0"),
    (["--tol", "-1"], "--tol must be a finite float > 0, got -1.0"),
    (["--tol", "nan"], "--tol must be a finite float > 0"),
    (["--max-iter", "0"], "--max-iter must be an int >= 1"),
    (["--jac-freq", "0"], "--jac-freq must be a float in (0, 1]"),
    (["--jac-freq", "1.5"], "--jac-freq must be a float in (0, 1]"),
    (["--jac-weight", "-1"], "--jac-weight must be a finite float >= 0"),
    (["--weight-decay", "nan"], "--weight-decay must be a finite float >= 0"),
    (["--clip-norm", "0"], "--clip-norm must be a finite float > 0"),
    (["--seed", "-1"], "--seed must be an int >= 0"),
    (["--checkpoint-every", "0"], "--checkpoint-every must be an int >= 1"),
    (["--eval-batch-size", "0"], "--eval-batch-size must be an int >= 1"),
    (["--cosine-every", "-1"], "--cosine-every must be an int >= 0"),
    (["--pretrain-steps", "-1"], "--pretrain-steps must be an int >= 0"),
    (["--unrolled-layers", "0"], "--unrolled-layers must be an int >= 1"),
    (["--softmax-chunk", "4"], "--softmax-chunk is an option of model transformer"),
    (["--grad", "gdeq", "--solver", "anderson"], "--grad gdeq does not work with --solver anderson"),
    (["--solver", "bogus"], "--solver 'bogus' is not a solver"),
    (["--grad", "bogus"], "--grad 'bogus' is not a gradient mode"),
    (["--solver-option", "bogus=1"], "--solver-option is invalid: solver 'broyden': unknown option 'bogus'"),
    (["--solver-option", "memory=-1"], "--solver-option is invalid: solver 'broyden': option 'memory'"),
    (["--solver-option", "tol=0.1"], "--solver-option may not set tol: use --tol"),
    (["--solver-option", "memory"], "--solver-option expects KEY=VALUE"),
    (["--solver-option", "memory=4", "--solver-option", "memory=5"], "--solver-option sets 'memory' twice"),
    (["--grad", "npg", "--grad-option", "k=0"], "--grad-option is invalid: gradient mode 'npg': option 'k'"),
    (["--grad", "implicit", "--grad-option", "solver=bogus"], "--grad-option is invalid"),
    (["--grad", "implicit", "--grad-option", "tol=1e999"],
     "--grad-option tol=1e999: the value must be finite"),
    (["--grad", "implicit", "--grad-option", "tol=nan"],
     "option 'tol' must be a finite float > 0, got 'nan'"),
    (["--config", "small"],
     "--config must be one of cpu, micro, tiny for model mdeq, got 'small' ('small' is a transformer config: "
     "add --model transformer)"),
    (["--model", "transformer", "--config", "micro", "--dataset", "fashion-mnist"],
     "--dataset must be one of wikitext2, tiny-shakespeare for model transformer"),
    (["--model", "transformer", "--config", "micro", "--dataset", "tiny-shakespeare",
      "--softmax-chunk", "-1"], "--softmax-chunk must be an int >= 0"),
    (["--lr", "abc"], "argument --lr: invalid float value: 'abc'"),
    (["--max-steps", "1e3"], "argument --max-steps: invalid int value: '1e3'"),
    (["--resume", "--overwrite"], "argument --overwrite: not allowed with argument --resume"),
]


@pytest.mark.parametrize("extra,message", BAD_TRAIN_FLAGS, ids=[" ".join(a) for a, _ in BAD_TRAIN_FLAGS])
def test_train_rejects_each_bad_flag_before_loading_data(capsys, tmp_path, empty_data, extra, message):
    """Each bad value or combination is one line naming the flag, exit 2; the data folder is
    empty, so had the data been loaded the error would have been the data's; nothing is
    written."""
    out = tmp_path / "run"
    rc, stdout, err = run_cli(capsys, ["train", *MICRO, "--data", empty_data, "--out", out, *extra])
    line = one_error_line(err, "deqcore train")
    assert rc == 2 and message in line and stdout == ""
    assert "data file" not in line and str(empty_data) not in line  # not the data loader's error
    assert not out.exists()


@pytest.mark.parametrize("argv,message", [
    (["bench", "--steps", "0"], "--steps must be an int >= 1, got 0"),
    (["bench", "--lr", "nan"], "--lr must be a finite float > 0"),
    (["bench", "--out", "x"], "unrecognized arguments: --out x"),
    (["bench", "--train-limit", "-5"], "--train-limit must be an int >= 1, got -5"),
    (["eval"], "the following arguments are required: --run"),
    (["hypersolver", "train", "--run", "R", "--steps", "0"], "--steps must be an int >= 1, got 0"),
    (["hypersolver", "train", "--run", "R", "--batch-size", "-1"], "--batch-size must be an int >= 1"),
    (["hypersolver", "train", "--run", "R", "--seed", "-1"], "--seed must be an int >= 0"),
    (["hypersolver", "train", "--run", "R", "--train-option", "bogus=1"], "unknown option 'bogus'"),
    (["hypersolver", "train", "--run", "R", "--train-option", "lr=-1"],
     "option 'lr' must be a finite float > 0"),
    (["hypersolver", "train", "--run", "R", "--train-option", "target_solver=bogus"],
     "unknown solver 'bogus'"),
    (["hypersolver", "train", "--run", "R"], "--run R has no checkpoint.npz"),
    (["hypersolver", "eval", "--run", "R", "--budgets", "0,2"], "--budgets needs integers >= 1"),
    (["hypersolver", "eval", "--run", "R", "--budgets", "a"], "--budgets expects comma-separated integers"),
    (["hypersolver", "eval", "--run", "R", "--repeats", "0"], "--repeats must be an int >= 1"),
    (["hypersolver", "eval", "--run", "R", "--test-limit", "0"], "--test-limit must be an int >= 1"),
    (["hypersolver", "eval", "--run", "R", "--solvers", "anderson,bogus"], "unknown solver(s) bogus"),
])
def test_other_commands_reject_bad_flags(capsys, tmp_path, monkeypatch, argv, message):
    monkeypatch.chdir(tmp_path)
    rc, _, err = run_cli(capsys, argv)
    prog = "deqcore " + " ".join(argv[:2] if argv[0] == "hypersolver" else argv[:1])
    if "unrecognized" in message:  # argparse reports these from the top-level parser
        prog = "deqcore"
    assert rc == 2 and message in one_error_line(err, prog)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_errors_from_the_real_command_are_one_line(tmp_path, empty_data):
    """The installed entry point as a user runs it: exit status 2 and one line, no traceback."""
    cases = ((["train", "--train-limit", "0", "--data", str(empty_data), "--out", str(tmp_path / "r")],
              "--train-limit must be an int >= 1"),
             (["eval", "--run", str(tmp_path / "nowhere")], "checkpoint not found"))
    for argv, message in cases:
        proc = subprocess.run([sys.executable, "-m", "deqcore_models.cli", *argv], capture_output=True,
                              text=True, timeout=300)
        assert proc.returncode == 2 and proc.stdout == ""
        assert message in one_error_line(proc.stderr, f"deqcore {argv[0]}")
    assert not (tmp_path / "r").exists()


def test_train_config_checks_every_field_and_its_type():
    """The same checks hold for a TrainConfig made in Python or read from a checkpoint's JSON:
    the type (a wrong type is also a TypeError), the range, None only where it means something."""
    with pytest.raises(ConfigTypeError, match=r"TrainConfig.tol \(--tol\) must be a finite float > 0, got "
                                              r"str"):
        TrainConfig(tol="1e-3")
    with pytest.raises(ConfigTypeError, match=r"max_iter \(--max-iter\) must be an int >= 1, got float 3.0"):
        TrainConfig(max_iter=3.0)
    with pytest.raises(ConfigTypeError, match=r"epochs \(--epochs\) must be an int >= 1, got bool True"):
        TrainConfig(epochs=True)
    with pytest.raises(ConfigError, match=r"batch_size \(--batch-size\) must be an int >= 1, got None"):
        TrainConfig(batch_size=None)
    with pytest.raises(ConfigTypeError, match=r"solver_options \(--solver-option\) must be a dict"):
        TrainConfig(solver_options=[("memory", 3)])
    with pytest.raises(ConfigTypeError, match=r"cosine_reference is invalid: gradient mode 'implicit': "
                                              r"unknown"):
        TrainConfig(cosine_every=5, cosine_reference={"maxiter": 40})
    assert isinstance(ConfigTypeError("tol", "x"), TypeError)
    assert isinstance(ConfigTypeError("tol", "x"), ValueError)
    cfg = TrainConfig(train_limit=None, clip_norm=None, out=os.curdir)
    assert cfg.out == "." and cfg.train_limit is None


# --------------------------------------------------------------------------- data-size checks


@pytest.mark.parametrize("extra,message", [
    (["--train-limit", "64", "--batch-size", "100"], "--batch-size must be at most the 64 training images"),
    (["--train-limit", "70000"], "--train-limit is 70000, more than the 60000 training images"),
    (["--test-limit", "20000"], "--test-limit is 20000, more than the 10000 test images"),
    (["--model", "transformer", "--config", "micro", "--dataset", "tiny-shakespeare", "--train-limit", "100",
      "--batch-size", "16"],
     "--batch-size is too large: 100 training tokens (after --train-limit) in 16 rows"),
])
def test_data_size_errors_name_the_flag_and_write_nothing(capsys, tmp_path, data_root, extra, message):
    out = tmp_path / "run"
    base = ["--backend", SELECTED[0], "--config", "micro", "--train-limit", "64", "--test-limit", "32",
            "--batch-size", "32", "--no-progress"]
    rc, _, err = run_cli(capsys, ["train", *base, "--data", data_root, "--out", out, *extra])
    assert rc == 2 and message in one_error_line(err, "deqcore train")
    assert not out.exists()


# --------------------------------------------------------------------------- a real run to tamper with


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data_root):
    """A micro MDEQ trained 4 steps on torch (checkpoint at steps 2 and 4): the run folder."""
    run = tmp_path_factory.mktemp("trained") / "run"
    assert main(["train", "--backend", "torch", *MICRO, "--data", str(data_root), "--max-steps", "4",
                 "--checkpoint-every", "2", "--out", str(run)]) == 0
    return run


@pytest.fixture
def run_copy(trained, tmp_path):
    dest = tmp_path / "run"
    shutil.copytree(trained, dest)
    return dest


def _drop(name):
    def change(a, m):
        a.pop(name)
        return a, m
    return change


def _set(name, value):
    def change(a, m):
        a[name] = value(a[name]) if callable(value) else value
        return a, m
    return change


def _meta(edit):
    def change(a, m):
        edit(m)
        return a, m
    return change


BIAS = "params/head.classifier.bias"  # shape (10,)
TAMPERED = {
    "missing-param": (_drop(BIAS), ["parameters missing 1: head.classifier.bias"]),
    "broadcastable-shape": (_set(BIAS, lambda v: v[:1]),
                            ["parameters mismatched 1: head.classifier.bias: (1,) float32 where the model "
                             "has (10,)"]),
    "retyped": (_set(BIAS, lambda v: v.astype(np.float64)),
                ["head.classifier.bias: (10,) float64 where the model has (10,) float32"]),
    "extra-param": (_set("params/head.extra.weight", np.zeros(3, np.float32)),
                    ["parameters unexpected 1: head.extra.weight"]),
    "missing-moment": (_drop("extra/opt.v/head.classifier.bias"),
                       ["optimizer state missing 1: opt.v/head.classifier.bias"]),
    "missing-buffer": (_drop("state/stem.bn1.running_var"), ["buffers missing 1: stem.bn1.running_var"]),
    "nan-weights": (_set(BIAS, lambda v: np.where(np.arange(10) < 3, np.nan, v).astype(np.float32)),
                    ["parameters with NaN or Inf values: head.classifier.bias (3 of 10 values)"]),
    "several": (lambda a, m: _drop(BIAS)(*_set("params/stem.bn1.weight", lambda v: v[:4])(a, m)),
                ["parameters missing 1: head.classifier.bias",
                 "stem.bn1.weight: (4,) float32 where the model has (8,) float32"]),
    "model-config": (_meta(lambda m: m["model_config"].update(final_channels=99)),
                     ["model_config.final_channels 99 there vs 16 now"]),
    "other-config": (_meta(lambda m: m["train_config"].update(config="cpu")),
                     ["config 'micro' there vs 'cpu' now", "parameters mismatched"]),
    "version": (_meta(lambda m: m.update(version=2)), ["format 'deqcore-checkpoint' version 2; expected"]),
    "format": (_meta(lambda m: m.update(format="something-else")), ["format 'something-else'"]),
    "not-json": (lambda a, m: (a, b"\xff{not json"), ["unreadable metadata, not JSON"]),
    "json-list": (lambda a, m: (a, b"[1, 2]"), ["its metadata is a JSON list, not an object"]),
    "no-train-config": (_meta(lambda m: m.pop("train_config")), ["its metadata has no train_config object"]),
    "bad-train-config": (_meta(lambda m: m["train_config"].update(tol="abc")),
                         ["its train_config is invalid: TrainConfig.tol (--tol) must be a finite float > 0, "
                          "got str 'abc'"]),
    "unknown-setting": (_meta(lambda m: m["train_config"].update(warp=9)),
                        ["its train_config has unknown settings warp"]),
    "bad-step": (_meta(lambda m: m.update(step=-4)), ["its metadata's step -4 is not an int >= 1"]),
    "stray-entry": (_set("weights/x", np.zeros(1)), ["unexpected entry 'weights/x'"]),
}


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.backend("torch")
@pytest.mark.parametrize("fault", [*TAMPERED, "truncated", "garbage"])
def test_eval_refuses_a_tampered_checkpoint(capsys, run_copy, fault):
    """`deqcore eval` prints no metric for a checkpoint that does not match its model; the
    error lists every difference."""
    path = run_copy / "checkpoint.npz"
    if fault == "truncated":
        _truncate(path)
        expected = ["not a readable .npz file"]
    elif fault == "garbage":
        path.write_bytes(b"PK\x03\x04" + os.urandom(300))
        expected = ["not a readable .npz file"]
    else:
        change, expected = TAMPERED[fault]
        rewrite_npz(path, change)
    rc, out, err = run_cli(capsys, ["eval", "--run", run_copy])
    line = one_error_line(err, "deqcore eval")
    assert rc == 2 and out == "", out
    for part in expected:
        assert part in line, line
    assert str(path) in line


@pytest.mark.backend("torch")
@pytest.mark.parametrize("fault", ["missing-param", "broadcastable-shape", "retyped", "missing-moment",
                                   "nan-weights", "version", "bad-train-config", "model-config", "truncated"])
def test_resume_refuses_a_tampered_checkpoint_and_changes_nothing(capsys, run_copy, data_root, fault):
    path = run_copy / "checkpoint.npz"
    if fault == "truncated":
        _truncate(path)
        expected = ["not a readable .npz file"]
    else:
        change, expected = TAMPERED[fault]
        rewrite_npz(path, change)
    before = {p.name: p.read_bytes() for p in run_copy.iterdir()}
    rc, _, err = run_cli(capsys, ["train", "--backend", "torch", *MICRO, "--data", data_root,
                                  "--max-steps", "6", "--checkpoint-every", "2", "--out", run_copy,
                                  "--resume"])
    line = one_error_line(err, "deqcore train")
    assert rc == 2 and all(part in line for part in expected), line
    assert {p.name: p.read_bytes() for p in run_copy.iterdir()} == before


@pytest.mark.backend("torch")
def test_resume_names_every_changed_setting(capsys, run_copy, data_root):
    rc, _, err = run_cli(capsys, ["train", "--backend", "torch", *MICRO, "--data", data_root,
                                  "--max-steps", "6", "--checkpoint-every", "2", "--out", run_copy,
                                  "--resume", "--lr", "0.01", "--seed", "3"])
    line = one_error_line(err, "deqcore train")
    assert rc == 2 and "train_config.lr 0.001 there vs 0.01 now" in line
    assert "train_config.seed 0 there vs 3 now" in line
    # the other family's checkpoint in this folder: the model and every array differ
    rc, _, err = run_cli(capsys, ["train", "--backend", "torch", "--model", "transformer", "--config",
                                  "micro", "--dataset", "tiny-shakespeare", "--data", data_root, "--out",
                                  run_copy, "--resume", "--no-progress"])
    line = one_error_line(err, "deqcore train")
    assert rc == 2 and "train_config.model 'mdeq' there vs 'transformer' now" in line


@pytest.mark.backend("torch")
def test_resume_without_a_checkpoint_is_refused_before_the_data(capsys, tmp_path, empty_data):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "steps.csv").write_text("step\n1\n")
    rc, _, err = run_cli(capsys, ["train", *MICRO, "--data", empty_data, "--out", tmp_path / "run",
                                  "--resume"])
    assert rc == 2 and "nothing to resume" in one_error_line(err, "deqcore train")
    assert (tmp_path / "run" / "steps.csv").read_text() == "step\n1\n"


@pytest.mark.backend("torch")
def test_engine_load_never_broadcasts_nor_keeps_initial_values(trained, data_root):
    """TorchEngine.load used to copy_ a (1,) array into a (C,) parameter (broadcast) and keep
    the initial value of a parameter left out; both are refused and nothing is changed."""
    from deqcore_models._training_engines import make_engine
    from deqcore_models.train import Trainer

    ck = load_checkpoint(trained / "checkpoint.npz")
    cfg = TrainConfig(backend="torch", config="micro", data=str(data_root), train_limit=64, test_limit=32,
                      batch_size=32)
    trainer = Trainer(cfg, progress=False)
    engine = make_engine("torch", trainer.task, trainer.params0, trainer.state0, 0.0)
    before = engine.export()
    for params in ({**ck.params, "head.classifier.bias": ck.params["head.classifier.bias"][:1]},
                   {k: v for k, v in ck.params.items() if k != "stem.conv1.weight"}):
        with pytest.raises(CheckpointError, match=r"TorchEngine.load does not match the model: parameters"):
            engine.load(params, ck.state, ck.extra)
        for group, ref in zip(engine.export(), before, strict=True):
            for k, v in ref.items():
                np.testing.assert_array_equal(group[k], v, err_msg=k)
    engine.load(ck.params, ck.state, ck.extra)
    for k, v in ck.params.items():
        np.testing.assert_array_equal(engine.export()[0][k], v, err_msg=k)


@pytest.mark.backend("jax")
def test_jax_engine_load_checks_the_schema(data_root):
    from deqcore_models._training_engines import make_engine
    from deqcore_models.train import Trainer

    cfg = TrainConfig(backend="jax", config="micro", data=str(data_root), train_limit=64, test_limit=32,
                      batch_size=32)
    trainer = Trainer(cfg, progress=False)
    engine = make_engine("jax", trainer.task, trainer.params0, trainer.state0, 0.0)
    params, state, extra = engine.export()
    bad = {**params, "head.classifier.bias": params["head.classifier.bias"][:1]}
    with pytest.raises(CheckpointError, match=r"JaxEngine.load .* mismatched 1: head.classifier.bias: "
                                              r"\(1,\)"):
        engine.load(bad, state, extra)
    extra.pop("opt.m/stem.conv1.weight")
    with pytest.raises(CheckpointError, match="optimizer state missing 1: opt.m/stem.conv1.weight"):
        engine.load(params, state, extra)


@pytest.mark.backend("torch")
@pytest.mark.parametrize("fault", ["missing-param", "nan-weights", "model-config", "version"])
def test_hypersolver_commands_refuse_a_tampered_checkpoint(capsys, run_copy, fault):
    change, expected = TAMPERED[fault]
    rewrite_npz(run_copy / "checkpoint.npz", change)
    for sub in ("train", "eval"):
        argv = ["hypersolver", sub, "--run", run_copy, "--no-progress"]
        if sub == "eval":
            (run_copy / "hypersolver.npz").write_bytes(b"")  # its existence is checked first
        rc, _, err = run_cli(capsys, argv)
        line = one_error_line(err, f"deqcore hypersolver {sub}")
        assert rc == 2 and all(part in line for part in expected), line
    assert not (run_copy / "hypersolver-eval").exists()


# --------------------------------------------------------------------------- earlier results kept


@pytest.mark.backend("torch")
def test_a_new_run_never_erases_an_old_one(capsys, run_copy, data_root):
    before = {p.name: p.read_bytes() for p in run_copy.iterdir()}
    args = ["train", "--backend", "torch", *MICRO, "--data", data_root, "--max-steps", "2", "--out", run_copy]
    rc, _, err = run_cli(capsys, args)
    line = one_error_line(err, "deqcore train")
    assert rc == 2 and "already holds checkpoint.npz" in line and "--resume" in line and "--overwrite" in line
    assert {p.name: p.read_bytes() for p in run_copy.iterdir()} == before
    # --overwrite, and the new run fails at its first step (its solves must converge, and do
    # not): the old run is intact
    rc, _, err = run_cli(capsys, [*args, "--overwrite", "--solver-option", "throw=True"])
    line = [ln for ln in err.splitlines() if "error:" in ln]
    assert rc == 1 and len(line) == 1 and "samples did not converge" in line[0], err
    assert {p.name: p.read_bytes() for p in run_copy.iterdir()} == before
    # --overwrite that succeeds replaces the run's files, and only those
    (run_copy / "notes.txt").write_text("mine")
    (run_copy / "cosine.csv").write_text("step,cosine\n0,0.5\n")
    assert run_cli(capsys, [*args, "--overwrite", "--max-steps", "1", "--checkpoint-every", "1"])[0] == 0
    with open(run_copy / "steps.csv") as fh:
        assert [r["step"] for r in csv.DictReader(fh)] == ["1"]
    assert load_checkpoint(run_copy / "checkpoint.npz").meta["step"] == 1
    assert (run_copy / "notes.txt").read_text() == "mine" and not (run_copy / "cosine.csv").exists()


@pytest.mark.backend("torch")
def test_a_diverging_run_names_a_checkpoint_that_exists_and_is_flagged(capsys, tmp_path, data_root):
    """lr 1e30: step 1's update leaves huge but finite weights (checkpointed), step 2's loss is
    not finite: the error names the step-1 checkpoint, which exists, and summary.json says the
    run failed. Before any checkpoint, the error says none was written."""
    base = ["train", "--backend", "torch", *MICRO, "--data", data_root, "--max-steps", "4", "--lr", "1e30",
            "--min-lr", "0"]
    rc, _, err = run_cli(capsys, [*base, "--checkpoint-every", "1", "--out", tmp_path / "a"])
    line = [ln for ln in err.splitlines() if "error:" in ln]
    assert rc == 1 and len(line) == 1, err
    ck_path = tmp_path / "a" / "checkpoint.npz"
    assert f"the last good state is {ck_path} (step 1)" in line[0]
    assert "step 2: the training loss is" in line[0]
    assert load_checkpoint(ck_path).meta["step"] == 1
    summary = strict_json((tmp_path / "a" / "summary.json").read_text())
    assert summary["status"] == "failed" and "step 2: the training loss is" in summary["flags"][0]
    rc, _, err = run_cli(capsys, [*base, "--checkpoint-every", "3", "--out", tmp_path / "b"])
    line = [ln for ln in err.splitlines() if "error:" in ln]
    assert rc == 1 and "step 2: the training loss is" in line[0]
    assert "no checkpoint of this run was written yet" in line[0]
    assert not (tmp_path / "b" / "checkpoint.npz").exists()


@pytest.mark.backend("torch")
def test_weights_that_become_infinite_are_never_saved(capsys, run_copy, data_root):
    """A resumed run whose optimizer state overflows at its first update (Adam's first moment at
    float32's limit, finite as saved): the step's loss is finite, its weights are not, so the
    checkpoint due after it is refused and the step-4 one stays."""
    def overflowing(a, m):
        return {k: np.full_like(v, 3e38) if k.startswith("extra/opt.m/") else v for k, v in a.items()}, m

    rewrite_npz(run_copy / "checkpoint.npz", overflowing)
    before = (run_copy / "checkpoint.npz").read_bytes()
    rc, _, err = run_cli(capsys, ["train", "--backend", "torch", *MICRO, "--data", data_root,
                                  "--max-steps", "6", "--checkpoint-every", "1", "--out", run_copy,
                                  "--resume"])
    line = [ln for ln in err.splitlines() if "error:" in ln]
    assert rc == 1 and len(line) == 1, err
    assert "step 5: the weights became NaN or Inf" in line[0]
    assert f"the last good state is {run_copy / 'checkpoint.npz'} (step 4)" in line[0]
    assert (run_copy / "checkpoint.npz").read_bytes() == before
    summary = strict_json((run_copy / "summary.json").read_text())
    assert summary["status"] == "failed" and "weights became NaN or Inf" in summary["flags"][0]


@pytest.mark.backend("torch")
def test_hypersolver_outputs_are_not_replaced_unless_asked(capsys, run_copy):
    for path in (run_copy / "hypersolver.npz", run_copy / "hypersolver-eval" / "results.json"):
        path.parent.mkdir(exist_ok=True)
        path.write_text("earlier results")
    rc, _, err = run_cli(capsys, ["hypersolver", "train", "--run", run_copy, "--steps", "1"])
    assert rc == 2 and "hypersolver.npz already exist" in one_error_line(err, "deqcore hypersolver train")
    rc, _, err = run_cli(capsys, ["hypersolver", "eval", "--run", run_copy, "--hypersolver",
                                  run_copy / "ck.npz"])
    assert rc == 2 and "no hypersolver file" in one_error_line(err, "deqcore hypersolver eval")
    rc, _, err = run_cli(capsys, ["hypersolver", "eval", "--run", run_copy])
    assert rc == 2 and "results.json already exist" in one_error_line(err, "deqcore hypersolver eval")
    assert (run_copy / "hypersolver.npz").read_text() == "earlier results"
    assert (run_copy / "hypersolver-eval" / "results.json").read_text() == "earlier results"
    # the hypersolver file itself is checked when loaded for the model: this one is no .npz at all
    rc, _, err = run_cli(capsys, ["hypersolver", "eval", "--run", run_copy, "--out", run_copy / "other"])
    line = one_error_line(err, "deqcore hypersolver eval")
    assert rc == 2 and f"{run_copy / 'hypersolver.npz'}: not a readable .npz file" in line
    assert not (run_copy / "other").exists()


def test_experiments_refuse_to_replace_results(capsys, tmp_path, empty_data):
    from deqcore_models.experiments import main as experiments

    out = tmp_path / "exp"
    out.mkdir()
    (out / "results.json").write_text("{}")
    for argv, message in (
            (["gdeq", "--data", empty_data, "--out", out],
             "--out " + str(out) + " already holds results.json"),
            (["gdeq", "--train-limit", "0", "--data", empty_data, "--out", tmp_path / "new"],
             "--train-limit must be an int >= 1"),
            (["gdeq", "--modes", "implicit,bogus", "--out", tmp_path / "new"], "--modes: unknown bogus"),
            (["gdeq", "--pretrain", "a", "--out", tmp_path / "new"], "expected comma-separated integers"),
            (["hyperdeq", "--run", tmp_path, "--out", out, "--steps", "0"], "--steps needs integers >= 1"),
            (["hyperdeq", "--run", tmp_path, "--out", out, "--lr", "nan"], "--lr must be a finite float > 0"),
            (["hyperdeq", "--run", tmp_path, "--out", out, "--variants", "bogus"],
             "--variants: unknown bogus"),
            (["hyperdeq", "--run", tmp_path, "--out", out], "has no checkpoint.npz")):
        try:
            rc = experiments([str(a) for a in argv])
        except SystemExit as exc:
            rc = exc.code
        err = capsys.readouterr().err
        assert rc == 2 and message in one_error_line(err, "python -m deqcore_models.experiments " + argv[0])
    assert (out / "results.json").read_text() == "{}" and not (tmp_path / "new").exists()
    (out / "backends.md").write_text("earlier")
    rc = experiments(["backends", str(tmp_path), str(tmp_path), "--out", str(out)])
    line = one_error_line(capsys.readouterr().err, "python -m deqcore_models.experiments backends")
    assert rc == 2 and "already holds backends.md" in line


# --------------------------------------------------------------------------- a full disk

_LIMITED = """
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit raise EFBIG instead of killing
resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))
sys.argv = ["deqcore"] + {argv!r}
from deqcore_models.cli import main
sys.exit(main())
"""


@pytest.mark.backend("torch")
def test_a_full_disk_while_checkpointing_leaves_the_previous_checkpoint(run_copy, data_root):
    """A file-size limit below the checkpoint's size (every other file fits): the resumed run
    fails to save, removes its temporary file, says which file and how much space is free, and
    the step-4 checkpoint is byte for byte the one before."""
    path = run_copy / "checkpoint.npz"
    before = path.read_bytes()
    limit = len(before) // 2
    argv = ["train", "--backend", "torch", *MICRO, "--data", str(data_root), "--max-steps", "6",
            "--checkpoint-every", "2", "--out", str(run_copy), "--resume"]
    proc = subprocess.run([sys.executable, "-c", _LIMITED.format(limit=limit, argv=argv)],
                          capture_output=True, text=True, timeout=300)
    line = [ln for ln in proc.stderr.splitlines() if "error:" in ln]
    assert proc.returncode == 2 and len(line) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert f"could not write {path}: File too large" in line[0] and " free on " in line[0]
    assert "the previous file is unchanged" in line[0]
    assert path.read_bytes() == before and not (run_copy / "checkpoint.npz.tmp").exists()
    assert load_checkpoint(path).meta["step"] == 4


def test_save_arrays_on_a_full_disk_removes_its_temporary_file(tmp_path):
    """The writer shared by checkpoints and hypersolver weights, under a real file-size limit."""
    target = tmp_path / "weights.npz"
    save_arrays(target, {"w": np.arange(10.0)}, {"format": "x"})
    before = target.read_bytes()
    code = (
        "import resource, signal, sys, numpy as np\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))\n"
        "from deqcore._arrays_io import WriteError, save_arrays\n"
        f"try:\n    save_arrays({str(target)!r}, {{'w': np.zeros(100000)}}, {{'format': 'x'}})\n"
        "except WriteError as exc:\n    print(exc.errno, exc); sys.exit(3)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 3, proc.stderr
    assert f"could not write {target}: File too large" in proc.stdout and str(27) in proc.stdout.split()[0]
    assert target.read_bytes() == before and not (tmp_path / "weights.npz.tmp").exists()
    assert issubclass(WriteError, OSError)
    np.testing.assert_array_equal(load_arrays(target)[0]["w"], np.arange(10.0))


# --------------------------------------------------------------------------- strict, flagged results


def test_json_is_strict_and_non_finite_results_are_flagged():
    text = dumps_json({"test_residual": float("inf"), "loss": np.float32("nan"), "n": np.int64(3),
                       "rows": [(1.5, float("-inf"))]})
    assert strict_json(text) == {"test_residual": None, "loss": None, "n": 3, "rows": [[1.5, None]]}
    with pytest.raises(TypeError, match="cannot write a object as JSON"):
        dumps_json({"x": object()})
    cfg = TrainConfig(tol=1e-3, max_iter=7)
    flags, warns = result_flags([{"test_loss": float("nan"), "test_acc": 0.1, "test_residual": 0.5}], cfg)
    assert flags == ["test_loss is nan: the model's outputs are not finite and these metrics mean nothing"]
    assert warns == ["the forward solves did not converge on the test set: worst relative residual 0.5 > "
                     "--tol 0.001 after at most --max-iter 7 steps"]
    assert result_flags([{"test_loss": 1.0, "test_residual": 1e-4}], cfg) == ([], [])


@pytest.mark.backend("torch")
def test_eval_of_overflowing_weights_is_flagged_not_plausible(capsys, run_copy, trained):
    """Finite weights whose logits overflow: eval prints strict JSON with null metrics, a flag
    on stderr, and exits 1; the untouched run prints finite metrics, a warning that its solves
    did not converge, and exits 0."""
    rc, out, err = run_cli(capsys, ["eval", "--run", trained])
    result = strict_json(out)
    assert rc == 0 and result["flags"] == [] and math.isfinite(result["test_loss"]) and result["step"] == 4
    assert "warning: the forward solves did not converge" in err and result["warnings"]
    rewrite_npz(run_copy / "checkpoint.npz", _set("params/head.classifier.weight",
                                              lambda v: np.full_like(v, 3e38)))
    rc, out, err = run_cli(capsys, ["eval", "--run", run_copy])
    result = strict_json(out)
    assert rc == 1 and result["test_loss"] is None and result["flags"]
    assert "flagged: test_loss is nan" in err
