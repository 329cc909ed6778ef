"""The benchmark scripts start, and the ones that import each other run end to end.

Every ``benchmarks/*.py`` answers ``--help`` in a fresh interpreter; ``bench_gradients.py`` and
``bench_gdeq_fidelity.py`` (which import ``bench_solvers.py``'s problems and each other) run on a
tiny problem, and their output is checked against the exact gradient and read by the renderer of
docs/benchmarks-gradients.md. A missing anchor library (TorchDEQ, jaxopt, optimistix, lineax) stops
a script at the start with a message naming it: the tests hide the library from the interpreter,
so they hold whether or not it is installed.
"""

from __future__ import annotations

import ast
import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks"
sys.path.insert(0, str(BENCH))

SCRIPTS = sorted(BENCH.glob("*.py"))
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(str(ROOT / d) for d in ("", "backends", "models"))}

# Runs a script as ``python SCRIPT ARGS`` would, with the modules named in argv[1] hidden:
# ``import`` fails for them and ``importlib.util.find_spec`` answers None, as when not installed.
HIDING = ("import runpy, sys\n"
          "sys.modules.update(dict.fromkeys(sys.argv[1].split(',')))\n"
          "sys.argv = sys.argv[2:]\n"
          "runpy.run_path(sys.argv[0], run_name='__main__')\n")


def _run(script: str | Path, *args: str, hide: tuple[str, ...] = (), timeout: float = 300):
    cmd = [sys.executable, "-c", HIDING, ",".join(hide), str(BENCH / script), *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=timeout)


def _script(name: str):
    """A benchmark script as a module (imported in the test, so that a script that does not
    import fails its own tests, not the collection of this file)."""
    return importlib.import_module(name)


def _frameworks_imported_at_load(path: Path) -> list[str]:
    """torch / jax where the script imports them at module level (``--help`` then needs them)."""
    names = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module.split(".")[0])
    return sorted(names & {"torch", "jax"})


def test_the_scripts_are_found():
    names = {p.name for p in SCRIPTS}
    assert {"bench_solvers.py", "bench_gradients.py", "bench_gdeq_fidelity.py", "render_docs.py",
            "gpu_check.py"} <= names


@pytest.mark.parametrize("script", [
    pytest.param(p, id=p.name, marks=[pytest.mark.backend(fw) for fw in _frameworks_imported_at_load(p)])
    for p in SCRIPTS])
def test_every_script_answers_help(script):
    run = _run(script, "--help", timeout=120)
    assert run.returncode == 0, f"{script.name} --help fails:\n{run.stderr[-3000:]}"
    assert "Traceback" not in run.stderr, run.stderr[-3000:]
    assert run.stdout.startswith("usage:"), run.stdout[:500]


@pytest.mark.parametrize("script, args, hide", [
    ("bench_gradients.py", ("--frameworks", "torch"), ("torchdeq",)),
    ("bench_gradients.py", ("--frameworks", "jax"), ("jaxopt", "optimistix", "lineax")),
    ("bench_gradients.py", ("--frameworks", "torch,jax"), ("torchdeq", "jaxopt", "optimistix", "lineax")),
    ("bench_solvers.py", ("--frameworks", "torch"), ("torchdeq",)),
    ("bench_solvers.py", ("--frameworks", "jax"), ("jaxopt", "optimistix")),
    ("gpu_check.py", ("--device", "cpu"), ("torchdeq",)),
])
def test_a_missing_anchor_library_stops_the_script_naming_it(tmp_path, script, args, hide):
    out = (["--out", str(tmp_path)] if script == "gpu_check.py"
           else ["--quick", "--json", str(tmp_path / "r.json")])
    run = _run(script, *args, *out, hide=hide, timeout=120)
    assert run.returncode == 1, (run.stdout[-2000:], run.stderr[-2000:])
    assert "Traceback" not in run.stderr, run.stderr[-3000:]
    message = run.stderr.strip().splitlines()[-1]
    assert message.startswith(f"{script[:-3]}: the anchor package")
    assert f"pip install {' '.join(hide)}" in message, message
    for name in hide:
        assert name in message
    if script == "bench_gradients.py":
        assert "--no-anchors" in message
    assert not list(tmp_path.iterdir()), "nothing is written before the check"


@pytest.mark.parametrize("args, expected", [
    (("--problems", "conv"), "--problems takes gaussian, symmetric, got 'conv'"),
    (("--sizes", "32,abc"), "--sizes wants items like N, got 'abc'"),
    (("--sizes", "0"), "--sizes wants items like N, got '0'"),
    (("--sizes", ","), "--sizes is empty"),
    (("--frameworks", "numpy"), "--frameworks takes torch,jax (got 'numpy')"),
    (("--repeats", "0"), "--repeats >= 1 (got 0)"),
])
def test_bench_gradients_rejects_bad_flags_by_name(tmp_path, args, expected):
    run = _run("bench_gradients.py", *args, "--no-anchors", "--json", str(tmp_path / "r.json"), timeout=120)
    assert run.returncode == 1 and "Traceback" not in run.stderr, run.stderr[-3000:]
    assert run.stderr.strip().startswith("bench_gradients: ") and expected in run.stderr, run.stderr


@pytest.mark.backend("torch")
def test_bench_eager_floor_names_itself_in_a_bad_shape_error():
    run = _run("bench_eager_floor.py", "--dense", "12", timeout=120)
    assert run.returncode == 1 and "Traceback" not in run.stderr, run.stderr[-3000:]
    assert run.stderr.strip() == "bench_eager_floor: --dense wants items like NxN, got '12'"


def test_bench_gradients_keeps_an_existing_results_file(tmp_path):
    results = tmp_path / "gradients.json"
    results.write_text('{"kept": true}')
    run = _run("bench_gradients.py", "--no-anchors", "--json", str(results), timeout=120)
    assert run.returncode == 1 and "Traceback" not in run.stderr, run.stderr[-3000:]
    assert f"{results} exists; pass --overwrite" in run.stderr
    assert results.read_text() == '{"kept": true}'


def test_exact_gradient_matches_finite_differences_of_the_fixed_point():
    """The benchmark's yardstick: dL/dW by dense adjoint solves against central differences of
    L(W) = sum(c * z*(W)), z* from plain float64 iteration (bench_solvers' Problem.reference)."""
    bg = _script("bench_gradients")
    p = bg.make_problem("symmetric", 6)
    c = bg.cotangent(p)
    G = bg.exact_gradient(p, p.reference(), c)
    W = p.arrays["W"]
    eps = 1e-6
    fd = np.empty_like(W)
    for i in range(W.shape[0]):
        for j in range(W.shape[1]):
            loss = []
            for step in (eps, -eps):
                p.arrays["W"] = W.copy()
                p.arrays["W"][i, j] += step
                loss.append(float(np.sum(c * p.reference())))
            fd[i, j] = (loss[0] - loss[1]) / (2 * eps)
    p.arrays["W"] = W
    assert np.linalg.norm(G - fd) <= 1e-6 * np.linalg.norm(fd), (G, fd)


@pytest.mark.backend("torch")
def test_bench_gradients_tiny_run_on_torch(tmp_path):
    bg, render_docs = _script("bench_gradients"), _script("render_docs")
    results = tmp_path / "gradients.json"
    run = _run("bench_gradients.py", "--sizes", "24", "--repeats", "1", "--frameworks", "torch",
               "--no-anchors", "--wait-idle", "0", "--json", str(results))
    assert run.returncode == 0, run.stderr[-3000:]
    assert "Traceback" not in run.stderr, run.stderr[-3000:]
    assert "anchors not run (--no-anchors)" in run.stdout
    data = json.loads(results.read_text())
    cfg = data["config"]
    assert (cfg["batch"], cfg["injection"], cfg["sizes"], cfg["anchors"]) == (64, 0.1, [24], False)
    rows = {(r["problem"], r["method"]): r for r in data["rows"]}
    modes = [m[0] for m in bg.DEQCORE_MODES]
    assert set(rows) == {(k, m) for k in bg.PROBLEMS for m in modes}
    assert {r["library"] for r in data["rows"]} == {"deqcore"}
    for kind in bg.PROBLEMS:
        # the exact modes agree with the float64 dense gradient; the counted VJPs are the modes'
        implicit = rows[kind, "implicit"]
        assert implicit["fwd_converged"] and implicit["cos"] > 0.99999, implicit
        assert implicit["bwd_rel_err"] < 1e-4 and implicit["vjps"] == implicit["vjps_reported"], implicit
        assert rows[kind, "unroll"]["cos"] > 0.999
        refined = rows[kind, "gdeq_refined"]
        assert refined["cos"] > 0.99999 and refined["vjps"] == refined["vjps_reported"], refined
        assert {m: rows[kind, m]["vjps"] for m in ("jfb", "gdeq", "npg", "upg")} == {
            "jfb": 1, "gdeq": 1, "npg": bg.K, "upg": bg.K}
        assert rows[kind, "jfb"]["cos"] < rows[kind, "npg"]["cos"] < 0.9999
    skipped = [g for g in data["goals"] if g["goal"] == "implicit-vs-ift"]
    assert len(skipped) == 2 and all(g["pass"] is None and g["line"].startswith("[SKIP]") for g in skipped)
    memory = {m["method"]: m for m in data["memory"]}
    assert memory["implicit"]["bytes_10"] == memory["implicit"]["bytes_40"] > 0
    assert memory["unroll"]["bytes_40"] > 2 * memory["unroll"]["bytes_10"]
    # the renderer of docs/benchmarks-gradients.md reads this file as it reads the published one
    assert "batch 64, d ∈ {24}, 1 repeats" in render_docs.gradients_run(results)
    assert render_docs.gradients_goals(results).count("- `[SKIP] implicit backward") == 2
    refined = [g for g in data["goals"] if g["goal"] == "refined-vjps"]
    assert len(refined) == 2 and all(g["pass"] is not None for g in refined)
    for kind in bg.PROBLEMS:
        assert render_docs.gradients_table(results, kind).count("| 24 | torch | deqcore ") == len(modes)
    assert render_docs.gradients_memory(results).count("| torch |") == len(bg.MEM_MODES)


@pytest.mark.backend("torch")
def test_bench_gdeq_fidelity_tiny_run_on_torch():
    bg, fidelity = _script("bench_gradients"), _script("bench_gdeq_fidelity")
    run = _run("bench_gdeq_fidelity.py", "--d", "24")
    assert run.returncode == 0, run.stderr[-3000:]
    assert "Traceback" not in run.stderr, run.stderr[-3000:]
    lines = run.stdout.strip().splitlines()
    assert lines[0].split() == ["problem", "setting", "steps", "cos"]
    cos = {}
    for line in lines[1:]:
        head, steps, value = line.rsplit(None, 2)
        kind, label = head.split(None, 1)
        assert 1 <= int(steps) <= 200 and -1 <= float(value) <= 1, line
        cos[kind, label] = float(value)
    assert set(cos) == {(k, label) for k in bg.PROBLEMS for label, _ in fidelity.SETTINGS}
    for kind in bg.PROBLEMS:
        # NPG's five terms of the Neumann series beat JFB's one on both problems
        assert cos[kind, "npg k=5 (anderson, tol 1e-4)"] > cos[kind, "jfb (anderson, tol 1e-4)"]
