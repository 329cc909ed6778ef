"""The ``reversible`` experiment: settings trained for the same wall time, calibrated by a pilot
run, with the report, the bytes kept for backward and the plots; earlier results are kept."""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.backend("torch")


def test_settings_get_deq_steps_in_proportion_to_their_speed(data_root, tmp_path, capsys):
    from deqcore_models.experiments import main as experiments
    from deqcore_models.experiments.reversible import SETTINGS

    out = tmp_path / "exp"
    argv = ["reversible", "--config", "micro", "--data", str(data_root), "--train-limit", "128",
            "--test-limit", "64", "--batch-size", "32", "--max-iter", "4", "--reversible-max-iter", "3",
            "--pilot-steps", "3", "--seconds", "1.5", "--settings", ",".join(SETTINGS), "--out", str(out),
            "--no-progress"]
    assert experiments(argv) == 0
    res = json.loads((out / "results.json").read_text())
    rows = {r["setting"]: r for r in res["rows"]}
    assert set(rows) == set(SETTINGS)
    for name, r in rows.items():
        solver, _, grad, _, _ = SETTINGS[name]
        assert (r["solver"], r["grad"]) == (solver, grad)
        # the run got what fits into the budget at the pilot's step time, and its steps.csv has them
        assert r["deq_steps"] == max(1, int(1.5 / r["pilot_step_s"]))
        assert r["saved_bytes"] > 0 and 0 <= r["test_acc"] <= 1
        assert not (out / f"{name}-pilot").exists()
    assert rows["reversible"]["max_iter"] == 3 and rows["broyden-gdeq"]["max_iter"] == 4
    # the reversible gradient keeps no graph of f at z*, the implicit one does
    assert rows["reversible"]["saved_bytes"] < rows["broyden-implicit"]["saved_bytes"]
    page = (out / "README.md").read_text()
    assert "| reversible | 3 |" in page and "broyden-implicit" in page
    assert {"loss_vs_time.png", "summary.png"} <= {p.name for p in out.iterdir()}
    before = (out / "results.json").read_bytes()
    assert experiments(argv) == 2  # earlier results are kept unless asked
    assert "already holds" in capsys.readouterr().err
    assert (out / "results.json").read_bytes() == before


def test_bad_settings_are_refused_before_any_run(tmp_path, capsys):
    from deqcore_models.experiments import main as experiments

    for argv, message in ((["--settings", "reversible,bogus"], "--settings: unknown bogus"),
                          (["--seconds", "0"], "--seconds must be > 0"),
                          (["--pilot-steps", "-1"], "--pilot-steps must be > 0")):
        assert experiments(["reversible", *argv, "--out", str(tmp_path / "x")]) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
