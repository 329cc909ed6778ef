"""The demo (python -m deqcore_models.demo) end to end on the real Fashion-MNIST files, at a tiny
size: it trains, solves the trained layer with every solver deqcore ships on the selected
frameworks, reports consistent numbers, writes its files and refuses to overwrite a run."""

from __future__ import annotations

import importlib.util
import json
import math

import numpy as np
import pytest
from deqcore_models import demo

import deqcore

#: A few steps of the smallest MDEQ on a few images: the whole pipeline, not the accuracy.
TINY = ["--config", "micro", "--train-limit", "64", "--test-limit", "40", "--batch-size", "32",
        "--max-steps", "1", "--pretrain-steps", "1", "--images", "12", "--max-iter", "6", "--tol", "1e-2"]
SHIPPED = [n for n in deqcore.available()["solvers"]
           if deqcore.registry().get("solvers", n).plugin == "deqcore"]


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    status = demo.main(list(argv))
    out, err = capsys.readouterr()
    return status, out, err


def _check_run(out_dir, stdout: str, backends: list[str]) -> dict:
    results = json.loads((out_dir / "demo.json").read_text())
    summary = json.loads((out_dir / "summary.json").read_text())
    # the accuracy reported is the training loop's own evaluation on the (limited) test set
    assert results["train"]["test_acc"] == summary["final"]["test_acc"]
    assert f"test accuracy {100 * summary['final']['test_acc']:.2f} % on 40 test images" in stdout
    runs = results["solve"]["runs"]
    assert [(r["backend"], r["solver"]) for r in runs] == [(b, s) for b in backends for s in SHIPPED]
    assert {"anderson", "broyden", "fixed_point"} <= set(SHIPPED)
    for r in runs:
        line = next(ln for ln in stdout.splitlines() if ln.split()[:2] == [r["backend"], r["solver"]])
        assert line.split()[2:5] == [f"{r['converged']}/12", str(r["steps"]), str(r["nfe"])]
        per_step = 2 if r["solver"] == "reversible" else 1  # the reversible step evaluates f twice
        assert 1 <= r["steps"] <= 6 and r["nfe"] == per_step * r["steps"] + 1  # plus f(z0)
        assert len(r["worst_rel_trace"]) == r["steps"] + 1
        assert r["worst_rel_trace"][0] == pytest.approx(1.0)  # from z = 0: ||f(0) - 0|| / ||f(0)||
        assert 0 <= r["converged"] <= 12 and 0 <= r["accuracy"] <= 1
        assert (r["converged"] == 12) == (r["max_rel_residual"] <= 1e-2)
        assert all(math.isfinite(v) for v in r["worst_rel_trace"])
    assert (out_dir / "demo.png").stat().st_size > 0 and (out_dir / "checkpoint.npz").is_file()
    return results


def test_demo_trains_and_solves_with_every_solver(h, tmp_path, data_root, capsys):
    out_dir = tmp_path / "demo"
    status, stdout, err = _run(capsys, *TINY, "--data", str(data_root), "--backend", h.name,
                               "--backends", h.name, "--out", str(out_dir))
    assert status == 0, err
    assert f"{h.name}/npg 1/1" in err  # the training loop's progress
    results = _check_run(out_dir, stdout, [h.name])
    assert results["agreement"] == []

    before = {p.name: p.stat().st_mtime_ns for p in out_dir.iterdir()}
    status, stdout, err = _run(capsys, *TINY, "--data", str(data_root), "--backend", h.name,
                               "--backends", h.name, "--out", str(out_dir))
    assert status == 2 and stdout == ""
    assert err.count("\n") == 1 and "already holds" in err and "--overwrite" in err
    assert {p.name: p.stat().st_mtime_ns for p in out_dir.iterdir()} == before


def test_demo_agrees_across_frameworks(both, tmp_path, data_root, capsys):
    out_dir = tmp_path / "demo"
    status, stdout, err = _run(capsys, *TINY, "--data", str(data_root), "--backend", "torch",
                               "--out", str(out_dir))
    assert status == 0, err
    results = _check_run(out_dir, stdout, ["torch", "jax"])
    agree = {a["solver"]: a for a in results["agreement"]}
    assert list(agree) == SHIPPED
    runs = {(r["backend"], r["solver"]): r for r in results["solve"]["runs"]}
    for solver, a in agree.items():
        # the same float32 checkpoint solved in two frameworks: rounding apart, the same states
        assert 0 <= a["max_abs_diff"] < 1e-3 and a["max_rel_diff"] < 1e-3
        assert a["same_prediction"] >= 11 / 12
        assert a["steps"] == [runs["torch", solver]["steps"], runs["jax", solver]["steps"]]
        np.testing.assert_allclose(runs["torch", solver]["worst_rel_trace"][:3],
                                   runs["jax", solver]["worst_rel_trace"][:3], rtol=1e-3)
        assert f"{a['max_abs_diff']:.2e}" in stdout


@pytest.mark.parametrize("argv, message", [
    (["--images", "0"], "--images must be >= 1, got 0"),
    (["--tol", "2"], "--tol must be in (0, 1), got 2.0"),
    (["--backends", "torch,mxnet"], "--backends must list some of torch, jax"),
    (["--solvers", "newton"], "--solvers must list some of"),
    (["--batch-size", "0"], "--batch-size must be"),
    (["--frobnicate"], "unrecognized arguments: --frobnicate"),
    (["--resume", "--overwrite"], "pass one of them"),
    (["--backend", "numpy"], "argument --backend: invalid choice"),
])
def test_demo_bad_flags_are_one_line_errors(argv, message, h, tmp_path, data_root, capsys):
    status, stdout, err = _run(capsys, "--data", str(data_root), "--out", str(tmp_path / "demo"),
                               "--backend", h.name, "--backends", h.name, *argv)
    assert status == 2 and stdout == ""
    assert err.startswith("python -m deqcore_models.demo: error: ") and err.count("\n") == 1
    assert message in err
    assert not (tmp_path / "demo").exists()


def test_demo_needs_a_data_folder(h, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("DEQCORE_DATA", raising=False)
    frameworks = ("--backend", h.name, "--backends", h.name)  # only the selected one is installed
    status, _, err = _run(capsys, "--out", str(tmp_path / "demo"), *frameworks)
    assert status == 2 and "no data folder given" in err and err.count("\n") == 1
    status, _, err = _run(capsys, "--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "demo"),
                          *frameworks)
    assert status == 2 and "does not exist" in err
    assert not (tmp_path / "demo").exists()


def test_demo_names_a_missing_framework_before_training(tmp_path, data_root, monkeypatch, capsys):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "jax" else find_spec(name, *a))
    status, stdout, err = _run(capsys, "--data", str(data_root), "--out", str(tmp_path / "demo"),
                               "--backend", "torch", "--backends", "torch,jax")
    assert status == 2 and stdout == "" and err.count("\n") == 1
    assert "jax not installed" in err and "--backends" in err
    assert not (tmp_path / "demo").exists()
