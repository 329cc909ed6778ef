"""The models' hypersolver pieces: MDEQ and DEQ-Transformer compressions and initialisers, a
hypersolver trained on a frozen (micro) MDEQ layer, the transformer split around its layer, each on
one backend and across backends; and ``deqcore hypersolver train|eval`` on a trained run."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from conftest import SELECTED
from deqcore_models._equilibrium_layer import DEQSettings
from deqcore_models._ops import ops_for
from deqcore_models.families import ACCURACY, PERPLEXITY
from deqcore_models.families.mdeq import MDEQCompression, MDEQInitialiser
from deqcore_models.families.transformer import TransformerCompression, TransformerInitialiser
from deqcore_models.mdeq import MDEQ_CONFIGS, equilibrium_shapes, init_mdeq, mdeq_parts
from deqcore_models.transformer import (
    TRANSFORMER_CONFIGS,
    init_transformer,
    transformer_apply,
    transformer_parts,
)
from models_helpers import rewrite_npz

import deqcore
from deqcore.hypersolvers import HyperAnderson, train_hypersolver

MICRO = MDEQ_CONFIGS["micro"]


def _model(h, dtype="float64"):
    params, state = init_mdeq(MICRO, in_channels=1, seed=0)
    ops = ops_for(h.name)
    P = {k: h.asarray(v, dtype) for k, v in params.items()}
    S = {k: h.asarray(v, dtype) for k, v in state.items()}
    return params, P, mdeq_parts(ops, MICRO, P, S)


def _images(h, n, seed):
    return h.asarray(np.random.default_rng(seed).standard_normal((n, 1, 28, 28)))


def _hyper(seed=0):
    return HyperAnderson(MDEQCompression(MICRO.channels), MDEQInitialiser(MICRO.channels[0], MICRO.channels),
                         iterations=4, width=16, seed=seed)


def test_pieces_shapes_and_meaning(h):
    _, _, parts = _model(h)
    inj = parts.inject(_images(h, 3, 0))
    hs = _hyper()
    rng = np.random.default_rng(1)
    hs = hs.with_params({k: rng.standard_normal(v.shape) for k, v in hs.params.items()})
    z0 = hs.initial_state(h.backend, inj, inj)
    shapes = [tuple(s) for s in equilibrium_shapes(MICRO, (3, 1, 28, 28))]
    assert [tuple(a.shape) for a in z0] == shapes
    # branch 1 is branch 0's hidden map pooled by 2 before the 1x1 map: check one pixel by hand
    P = {k[5:]: h.numpy(v) for k, v in hs.arrays(h.backend, inj).items() if k.startswith("init.")}
    x = h.numpy(inj)
    pad = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    conv = np.zeros((3, P["conv.weight"].shape[0], x.shape[2], x.shape[3]))
    for i in range(x.shape[2]):
        for j in range(x.shape[3]):
            conv[:, :, i, j] = np.einsum("bcuv,ocuv->bo", pad[:, :, i:i + 3, j:j + 3], P["conv.weight"])
    hidden = np.maximum(conv + P["conv.bias"][None, :, None, None], 0)
    pooled = hidden.reshape(3, hidden.shape[1], x.shape[2] // 2, 2, x.shape[3] // 2, 2).mean(axis=(3, 5))
    expect = np.einsum("bphw,cp->bchw", pooled, P["out1.weight"]) + P["out1.bias"][None, :, None, None]
    np.testing.assert_allclose(h.numpy(z0[1]), expect, rtol=1e-10, atol=1e-12)
    g = tuple(h.asarray(np.random.default_rng(2).standard_normal(s)) for s in shapes)
    np.testing.assert_allclose(h.numpy(MDEQCompression(MICRO.channels)(h.backend, g)),
                               h.numpy(g[-1]).mean(axis=(2, 3)), rtol=1e-13)


def test_training_runs_on_a_frozen_mdeq_layer(h):
    params, P, parts = _model(h)

    def batches():
        seed = 10
        while True:
            seed += 1
            yield parts.inject(_images(h, 4, seed))

    hs = _hyper()
    # a randomly initialised MDEQ layer has no fixed point to speak of (its targets stay at rel
    # residual ~0.4), so this checks the mechanics on the real model; the quality of a hypersolver
    # for a trained MDEQ is measured by the experiment in docs/hypersolvers.md
    trained, history = train_hypersolver(hs, parts.layer, batches(), steps=6, target_max_iter=20)
    assert len(history) == 6 and all(np.isfinite(r["loss"]) for r in history)
    assert all(not np.array_equal(trained.params[k], hs.params[k]) for k in hs.params if k != "mixer.b2")
    for k, v in params.items():  # the model is frozen
        np.testing.assert_array_equal(h.numpy(P[k]), v.astype(np.float64))
    inj = parts.inject(_images(h, 4, 99))
    sol = deqcore.solve(parts.layer, inj, solver=trained, max_iter=4, tol=1e-30)
    assert isinstance(sol.z, tuple) and int(h.numpy(sol.nfe)) == 5
    assert h.numpy(parts.head(sol.z)).shape == (4, 10)


def test_pieces_agree_across_backends(both):
    t, j = both
    hs = _hyper()
    rng = np.random.default_rng(3)
    hs = hs.with_params({k: 0.3 * rng.standard_normal(v.shape) for k, v in hs.params.items()})
    out = []
    for k in (t, j):
        _, _, parts = _model(k)
        inj = parts.inject(_images(k, 2, 5))
        sol = deqcore.solve(parts.layer, inj, solver=hs, max_iter=5, tol=1e-30)
        out.append((k.numpy(sol.abs_trace), [k.numpy(a) for a in sol.z]))
    np.testing.assert_allclose(out[0][0], out[1][0], rtol=1e-9)
    for a, b in zip(out[0][1], out[1][1], strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-11)


TMICRO = TRANSFORMER_CONFIGS["micro"]
VOCAB = 30


def _transformer(h, length=TMICRO.tgt_len):
    params, _ = init_transformer(TMICRO, VOCAB, seed=0)
    P = {k: h.asarray(v) for k, v in params.items()}
    return P, transformer_parts(ops_for(h.name), TMICRO, P, length)


def _tokens(h, shape, seed):
    return h.asarray(np.random.default_rng(seed).integers(0, VOCAB, shape), "int64")


def _thyper(seed=0):
    d = TMICRO.d_model
    hs = HyperAnderson(TransformerCompression(d), TransformerInitialiser(3 * d, d, hidden=6), iterations=3,
                       width=8, seed=seed)
    rng = np.random.default_rng(seed + 1)
    return hs.with_params({k: 0.3 * rng.standard_normal(v.shape) for k, v in hs.params.items()})


def test_transformer_parts_are_the_model(h):
    """inject -> solve layer from zeros -> head gives transformer_apply's logits (evaluation)."""
    P, parts = _transformer(h)
    tokens = _tokens(h, (3, TMICRO.tgt_len), 0)
    settings = DEQSettings(solver="anderson", tol=1e-30, max_iter=7, grad=None)
    logits, _, _ = transformer_apply(ops_for(h.name), TMICRO, P, {}, tokens, train=False, settings=settings)
    u = parts.inject(tokens)
    z0 = h.xp.zeros((3, TMICRO.tgt_len, TMICRO.d_model), dtype=u.dtype)
    sol = deqcore.solve(parts.layer, u, z0, solver="anderson", tol=1e-30, max_iter=7, grad=None)
    np.testing.assert_allclose(h.numpy(parts.head(sol.z)), h.numpy(logits), rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="8-token segments, got 5"):
        parts.inject(_tokens(h, (3, 5), 0))
    params, _ = init_transformer(TRANSFORMER_CONFIGS["micro-mem"], VOCAB, seed=0)
    with pytest.raises(ValueError, match="segment memory"):
        transformer_parts(ops_for(h.name), TRANSFORMER_CONFIGS["micro-mem"], params, 8)


def test_transformer_pieces_by_hand_and_causal(h):
    _, parts = _transformer(h)
    u = parts.inject(_tokens(h, (2, TMICRO.tgt_len), 1))
    hs = _thyper()
    z0 = h.numpy(hs.initial_state(h.backend, u, u))
    P = {k[5:]: v for k, v in hs.params.items() if k.startswith("init.")}
    x = h.numpy(u)
    padded = np.concatenate([np.zeros((2, 2, x.shape[2])), x], axis=1)
    for t in range(x.shape[1]):  # position t sees t-2, t-1, t
        window = padded[:, t:t + 3]
        hidden = np.maximum(np.einsum("bkc,kch->bh", window, P["conv.weight"]) + P["conv.bias"], 0)
        np.testing.assert_allclose(z0[:, t], hidden @ P["out.weight"] + P["out.bias"], rtol=1e-10,
                                   atol=1e-12)
    later = x.copy()
    later[:, 5:] += 1.0  # changing positions 5.. leaves the guess at 0..4 alone
    z1 = h.numpy(hs.initial_state(h.backend, h.asarray(later), u))
    np.testing.assert_array_equal(z1[:, :5], z0[:, :5])
    assert np.all(np.abs(z1[:, 5:] - z0[:, 5:]).max(axis=-1) > 0)
    g = h.asarray(np.random.default_rng(2).standard_normal((2, TMICRO.tgt_len, TMICRO.d_model)))
    np.testing.assert_array_equal(h.numpy(TransformerCompression(TMICRO.d_model)(h.backend, g)),
                                  h.numpy(g)[:, -1])
    untrained = HyperAnderson(TransformerCompression(16), TransformerInitialiser(48, 16), iterations=2)
    assert np.all(h.numpy(untrained.initial_state(h.backend, u, u)) == 0)  # the classic zero start


def test_transformer_hypersolver_agrees_across_backends(both):
    hs = _thyper(4)
    out = []
    for k in both:
        _, parts = _transformer(k)
        u = parts.inject(_tokens(k, (2, TMICRO.tgt_len), 3))
        sol = deqcore.solve(parts.layer, u, solver=hs, max_iter=6, tol=1e-30)
        out.append((k.numpy(sol.abs_trace), k.numpy(parts.head(sol.z))))
    np.testing.assert_allclose(out[0][0], out[1][0], rtol=1e-9)
    np.testing.assert_allclose(out[0][1], out[1][1], rtol=1e-9, atol=1e-10)


def _cli(args, check=True):
    proc = subprocess.run([sys.executable, "-m", "deqcore_models.cli", *args], capture_output=True, text=True,
                          timeout=600)
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_hypersolver_cli_trains_and_evaluates_on_a_run(data_root, tmp_path):
    """deqcore train (a micro MDEQ, a few steps) -> hypersolver train -> hypersolver eval; the
    model checkpoint is untouched, and the results hold every method at every budget."""
    run = tmp_path / "run"
    backend = SELECTED[0]
    _cli(["train", "--backend", backend, "--config", "micro", "--data", str(data_root),
          "--train-limit", "128", "--test-limit", "40", "--batch-size", "32", "--epochs", "1",
          "--max-iter", "5", "--grad", "jfb", "--out", str(run), "--no-progress"])
    before = (run / "checkpoint.npz").read_bytes()
    proc = _cli(["hypersolver", "train", "--run", str(run), "--steps", "3", "--batch-size", "4",
                 "--iterations", "2", "--width", "4", "--train-option", "target_max_iter=10",
                 "--no-progress"])
    assert "% of the model's" in proc.stdout and (run / "hypersolver.npz").exists()
    assert len((run / "hypersolver.csv").read_text().splitlines()) == 4  # header + 3 steps
    _cli(["hypersolver", "train", "--run", str(run), "--steps", "2", "--batch-size", "4", "--iterations", "2",
          "--no-initialiser", "--normalisation", "softmax", "--out", str(tmp_path / "noinit.npz"),
          "--train-option", "target_max_iter=10", "--no-progress"])
    assert (run / "checkpoint.npz").read_bytes() == before  # the model is frozen
    out = tmp_path / "eval"
    _cli(["hypersolver", "eval", "--run", str(run), "--hypersolver", f"hyper={run / 'hypersolver.npz'}",
          "--hypersolver", f"noinit={tmp_path / 'noinit.npz'}", "--solvers", "anderson,broyden",
          "--budgets", "1,3", "--from-init", "--repeats", "2", "--out", str(out), "--no-progress"])
    results = json.loads((out / "results.json").read_text())
    got = {(r["method"], r["budget"]) for r in results["rows"]}
    methods = ["hyper", "noinit", "anderson", "anderson+init", "broyden", "broyden+init"]
    assert got == {(m, b) for m in methods for b in (1, 3)}
    assert all(0 <= r["accuracy"] <= 1 and r["residual"] > 0 and r["items"] == 40 for r in results["rows"])
    assert set(results["speedups"]) == {"seconds", "solve_seconds", "nfe"}
    assert all(set(v) == {"hyper", "noinit"} for v in results["speedups"].values())
    assert all(0 < r["solve_seconds"] < r["seconds"] for r in results["rows"])
    assert results["parameters"]["hyper"] < results["parameters"]["model"]
    assert {p.name for p in out.glob("*.png")} == {"residual.png", "pareto.png"}
    _check_scores(run, backend, results["rows"])

    for args, message in (
            (["train", "--run", str(tmp_path / "none")], "has no checkpoint.npz"),
            (["train", "--run", str(run), "--steps", "0"], "--steps must be an int >= 1"),
            (["train", "--run", str(run), "--steps", "1", "--train-option", "lambda1=2"],
             "unknown option 'lambda1'"),
            (["eval", "--run", str(run), "--budgets", "0,2"], "--budgets needs integers >= 1"),
            (["eval", "--run", str(run), "--repeats", "0"], "--repeats must be an int >= 1"),
            (["eval", "--run", str(run), "--solvers", "anderson,bogus"], "unknown solver(s) bogus"),
            (["eval", "--run", str(run), "--hypersolver", str(tmp_path / "missing.npz")],
             "no hypersolver file"),
            (["eval", "--run", str(run), "--hypersolver", str(tmp_path / "noinit.npz"), "--from-init"],
             "--from-init needs the first hypersolver to have an initialiser")):
        proc = _cli(["hypersolver", *args, "--no-progress"], check=False)
        assert proc.returncode == 2 and message in proc.stderr, (args, proc.stderr[-2000:])
        assert len(proc.stderr.splitlines()) == 1, proc.stderr


def _check_scores(run, backend, rows):
    """compare's on-device loss and accuracy equal NumPy's from the head's logits of a plain
    solve at the same budget; make_hypersolver's per-model defaults."""
    from deqcore_models.hyperdeq import load_frozen, make_hypersolver

    model = load_frozen(run, backend=backend)
    hs = make_hypersolver(model)
    assert (hs.iterations, hs.mixer.width, hs.initialiser.hidden) == (3, 8, 8) == tuple(
        model.defaults[k] for k in ("iterations", "width", "hidden"))
    assert make_hypersolver(model, hidden=None).initialiser is None
    assert make_hypersolver(model, hidden=3, width=5).initialiser.hidden == 3
    loss = correct = count = 0.0
    for x, y, _ in model.work.eval_batches():
        inj = model.inject(model.ops.asarray(x))
        sol = deqcore.solve(model.layer, inj, model.zeros(inj), backend=backend, solver="anderson",
                            max_iter=3, tol=1e-30, grad=None)
        s = model.ops.to_numpy(model.head(sol.z)).astype(np.float64)
        logp = s - s.max(-1, keepdims=True)
        logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
        labels = y.argmax(-1)
        loss -= logp[np.arange(len(labels)), labels].sum()
        correct += (s.argmax(-1) == labels).sum()
        count += len(labels)
    row = next(r for r in rows if (r["method"], r["budget"]) == ("anderson", 3))
    assert row["accuracy"] == correct / count
    assert row["loss"] == pytest.approx(loss / count, rel=1e-5)


def test_speedups_by_hand():
    from deqcore_models.hyperdeq import (
        all_speedups,
        operating_points,
        operating_points_table,
        speedup_table,
        speedups,
    )

    def row(method, budget, metric, seconds):
        return {"method": method, "budget": budget, "nfe": budget + 1, "metric": metric, "seconds": seconds,
                "solve_seconds": seconds - 1.0}

    rows = [row("classic", 2, 0.80, 3.0), row("classic", 4, 0.905, 5.0), row("classic", 8, 0.91, 9.0),
            row("hyper", 1, 0.85, 2.5), row("hyper", 2, 0.906, 3.5), row("hyper", 4, 0.92, 5.5),
            row("slow", 8, 0.70, 9.0)]
    got = speedups(rows, "hyper", ["classic"], metric=ACCURACY)["classic"]
    # target 0.91 - 0.005: classic first reaches it at 4 steps (5 s), hyper at 2 (3.5 s)
    assert got == {"target": pytest.approx(0.905), "baseline_cost": 5.0, "method_cost": 3.5,
                   "speedup": pytest.approx(5.0 / 3.5)}
    assert speedups(rows, "hyper", ["classic"], metric=ACCURACY, cost="nfe")["classic"]["speedup"] == 5 / 3
    assert speedups(rows, "hyper", ["classic"], metric=ACCURACY, cost="solve_seconds")["classic"][
        "speedup"] == pytest.approx(4.0 / 2.5)
    assert speedups(rows, "slow", ["classic"], metric=ACCURACY)["classic"]["speedup"] is None
    assert speedups(rows, "hyper", ["missing"], metric=ACCURACY) == {}
    ppl = [dict(r, metric=1.0 / r["metric"]) for r in rows]  # lower is better for text
    target = (1 / 0.91) * 1.02
    got = speedups(ppl, "hyper", ["classic"], metric=PERPLEXITY)["classic"]["target"]
    assert got == pytest.approx(target)
    with pytest.raises(ValueError, match="cost must be one of"):
        speedups(rows, "hyper", ["classic"], metric=ACCURACY, cost="wall")
    table = all_speedups(rows, ["hyper", "slow"], ["classic"], metric=ACCURACY)
    lines = speedup_table(table, metric=ACCURACY)
    assert lines[2] == ("| hyper | classic | 90.50 % | 1.67× (5 → 3) | 1.60× (4.00 → 2.50 s) "
                        "| 1.43× (5.00 → 3.50 s) |")
    assert lines[3] == "| slow | classic | 90.50 % | — | — | — |"
    points = operating_points(rows, "hyper", "classic", metric=ACCURACY)
    assert [(p["budget"], p["method_budget"]) for p in points] == [(2, 1), (4, 2), (8, 4)]
    assert [p["speedup"] for p in points] == pytest.approx([2.0 / 1.5, 4.0 / 2.5, 8.0 / 4.5])
    assert operating_points(rows, "hyper", "classic", metric=ACCURACY, cost="nfe")[2]["speedup"] == 9 / 5
    assert operating_points(ppl, "hyper", "classic", metric=PERPLEXITY)[1]["method_budget"] == 2
    assert all(p["speedup"] is None for p in operating_points(rows, "slow", "classic", metric=ACCURACY))
    assert operating_points_table(rows, ["hyper", "slow"], ["classic"], metric=ACCURACY)[2:] == [
        "| hyper | classic |  | 1.33× (@1) | 1.60× (@2) | 1.78× (@4) |",
        "| slow | classic |  | — | — | — |"]


def test_hyperdeq_experiment_writes_its_tables_and_plots(data_root, tmp_path):
    from deqcore_models.experiments import main as experiment

    run = tmp_path / "run"
    _cli(["train", "--backend", SELECTED[0], "--config", "micro", "--data", str(data_root),
          "--train-limit", "64", "--test-limit", "20", "--batch-size", "32", "--epochs", "1",
          "--max-iter", "4", "--grad", "jfb", "--out", str(run), "--no-progress"])
    out = tmp_path / "exp"
    assert experiment(["hyperdeq", "--run", str(run), "--variants", "hyper,no-init", "--steps", "2",
                       "--batch-size", "4", "--iterations", "2", "--width", "4", "--budgets", "1,2",
                       "--out", str(out), "--no-progress"]) == 0
    result = json.loads((out / "results.json").read_text())
    assert {(r["method"], r["budget"]) for r in result["rows"]} == {
        (m, b) for m in ("hyper", "no-init", "anderson", "broyden", "anderson+init") for b in (1, 2)}
    cost = result["training"]["hyper"]
    assert cost["parameters"] > result["training"]["no-init"]["parameters"]  # the initialiser's weights
    assert cost["time_ratio"] == pytest.approx(cost["seconds"] / cost["model_train_seconds"])
    table = (out / "results.md").read_text()
    assert "| hyper | anderson |" in table and "## Mean relative residual" in table
    assert {p.name for p in out.glob("*.png")} == {"residual.png", "pareto.png", "training.png"}
    assert experiment(["hyperdeq", "--run", str(run), "--variants", "bogus", "--out", str(out)]) == 2
    # the results are not replaced unless asked
    assert experiment(["hyperdeq", "--run", str(run), "--variants", "hyper", "--steps", "1", "--out",
                       str(out)]) == 2
    assert (out / "results.md").read_text() == table


def test_hypersolver_files_are_checked_against_the_model(tmp_path):
    """load_hypersolver refuses weights that do not fit the model they are loaded for, whatever
    is wrong with the file, naming it: another model's compression, a weight's shape or dtype,
    a missing or extra weight, NaN weights, missing settings, a truncated file."""
    from deqcore.hypersolvers import load_hypersolver

    hs = _hyper(seed=3)
    path = hs.save(tmp_path / "hs.npz", meta={"run": "x"})
    pieces = (MDEQCompression(MICRO.channels), MDEQInitialiser(MICRO.channels[0], MICRO.channels))
    loaded = load_hypersolver(path, *pieces)
    for k, v in hs.params.items():
        np.testing.assert_array_equal(loaded.params[k], v)
    name = sorted(hs.params)[0]
    cases = {
        "another model": (None, "the hypersolver was trained with compression"),
        "shape": (lambda a, m: ({**a, name: a[name][..., :1]}, m), f"weight {name!r} has shape"),
        "dtype": (lambda a, m: ({**a, name: a[name].astype(np.int64)}, m),
                  f"weights {name} are not floating"),
        "missing": (lambda a, m: ({k: v for k, v in a.items() if k != name}, m), f"missing ['{name}']"),
        "extra": (lambda a, m: ({**a, "mixer.extra": np.zeros(2)}, m), "unexpected ['mixer.extra']"),
        "nan": (lambda a, m: ({**a, name: np.full_like(a[name], np.nan)}, m), "contains NaN or Inf"),
        "no settings": (lambda a, m: (a, {"format": m["format"]}), "its metadata has no settings"),
        "no mixer kind": (lambda a, m: (a, {**m, "config": {**m["config"], "mixer": {"width": 4}}}),
                          "its settings lack mixer.kind"),
        "not json": (lambda a, m: (a, b"{oops"), "unreadable metadata, not JSON"),
        "truncated": (None, "not a readable .npz file"),
    }
    for case, (change, message) in cases.items():
        target = tmp_path / f"{case.replace(' ', '-')}.npz"
        target.write_bytes(path.read_bytes())
        use = pieces
        if case == "another model":
            use = (MDEQCompression((16, 16)), MDEQInitialiser(16, (16, 16)))
        elif case == "truncated":
            target.write_bytes(path.read_bytes()[:200])
        else:
            rewrite_npz(target, change)
        with pytest.raises(ValueError, match=str(target)) as info:
            load_hypersolver(target, *use)
        assert message in str(info.value), (case, str(info.value))
