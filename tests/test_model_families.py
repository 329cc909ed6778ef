"""A model family is one module and one line in the table of families: a tiny third family,
registered here in that table only, is trained, evaluated and given a hypersolver through the
``deqcore`` command, and its speedup table and run page come out in its metric, with no other
code told about it. Also: the table is what the command line offers and what TrainConfig accepts."""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
from conftest import SELECTED
from deqcore_models._equilibrium_layer import run_layer
from deqcore_models._layers import cross_entropy
from deqcore_models._losses import ClassifierTask
from deqcore_models.cli import build_parser, main
from deqcore_models.families import ACCURACY, FAMILIES, Batch, Family, family, jacobian_probe
from deqcore_models.train import ConfigError, TrainConfig

BACKEND = SELECTED[0] if SELECTED else "torch"


@dataclass(frozen=True)
class BlobsConfig:
    width: int = 6
    features: int = 4
    classes: int = 3


def blobs(seed: int, count: int, cfg: BlobsConfig) -> tuple[np.ndarray, np.ndarray]:
    """``count`` points around one centre per class (a problem a tiny DEQ learns in a few steps)."""
    rng = np.random.default_rng(seed)
    centres = 3.0 * np.eye(cfg.classes, cfg.features)
    y = rng.integers(0, cfg.classes, count)
    return (centres[y] + rng.standard_normal((count, cfg.features))).astype(np.float32), y


CONFIGS = {"blob-micro": BlobsConfig()}
DATASETS = {"blobs": lambda root: (blobs(1, 96, CONFIGS["blob-micro"]), blobs(2, 48, CONFIGS["blob-micro"]))}


def layer(xp: Any, params: Mapping[str, Any]):
    def f(z, inj):
        return xp.tanh(0.5 * xp.matmul(z, params["deq.weight"]) + inj)

    return f


def apply(ops, params, state, x, *, train, settings, masks, probe=None):
    xp = ops.xp
    inj = xp.matmul(x, params["inject.weight"])
    z, stats = run_layer(ops.name, layer(xp, params), inj, xp.zeros_like(inj), settings, xp, probe)
    return xp.matmul(z, params["head.weight"]) + params["head.bias"], state, stats


class BlobsWorkload:
    def __init__(self, cfg: Any) -> None:
        self.cfg = cfg
        (tx, ty), (ex, ey) = DATASETS[cfg.dataset](None)
        if cfg.batch_size > len(tx):
            raise cfg.error("batch_size", f"must be at most the {len(tx)} points")
        self.model_cfg = mc = CONFIGS[cfg.config]
        rng = np.random.default_rng(cfg.seed)
        def normal(scale: float, *shape: int) -> np.ndarray:
            return (scale * rng.standard_normal(shape)).astype(np.float32)

        self.params0 = {"inject.weight": normal(0.5, mc.features, mc.width),
                        "deq.weight": normal(0.3, mc.width, mc.width),
                        "head.weight": normal(0.5, mc.width, mc.classes),
                        "head.bias": np.zeros(mc.classes, np.float32)}
        self.state0: dict[str, np.ndarray] = {}
        self.task = ClassifierTask(apply)
        onehot = np.eye(mc.classes, dtype=np.float32)
        self.train, self.test = (tx, onehot[ty]), (ex, onehot[ey])
        self.steps_per_epoch = len(tx) // cfg.batch_size

    def describe(self) -> str:
        return f"{len(self.train[0])} train, {len(self.test[0])} test points"

    def train_batch(self, step: int) -> Batch:
        bs = self.cfg.batch_size
        pos = step % self.steps_per_epoch
        x, y = (a[pos * bs:(pos + 1) * bs] for a in self.train)
        return Batch(x, y, None, len(x), jacobian_probe(self.cfg, step, [(len(x), self.model_cfg.width)]))

    def fresh_state(self, step: int) -> None:
        return None

    def eval_state(self, state: dict[str, Any]) -> None:
        return None

    def eval_batches(self) -> Iterator[tuple[np.ndarray, np.ndarray, int]]:
        yield self.test[0], self.test[1], len(self.test[0])


class Compression:
    def __init__(self, width: int) -> None:
        self.features = width

    def config(self) -> dict[str, Any]:
        return {"kind": "blobs", "width": self.features}

    def __call__(self, backend: Any, g: Any) -> Any:
        return g


class Initialiser:
    def __init__(self, features: int, width: int, hidden: int) -> None:
        self.features, self.width, self.hidden = features, width, hidden

    def config(self) -> dict[str, Any]:
        return {"kind": "blobs", "features": self.features, "width": self.width, "hidden": self.hidden}

    def init_params(self, rng: np.random.Generator) -> dict[str, np.ndarray]:
        return {"in.weight": rng.normal(0.0, 0.5, (self.width, self.hidden)),
                "out.weight": np.zeros((self.hidden, self.width))}

    def __call__(self, backend: Any, params: Mapping[str, Any], inj: Any) -> Any:
        xp = backend.xp
        return xp.matmul(xp.tanh(xp.matmul(inj, params["in.weight"])), params["out.weight"])


@dataclass(frozen=True)
class Parts:
    inject: Any
    layer: Any
    head: Any


def parts(ops: Any, mc: BlobsConfig, P: dict[str, Any], S: dict[str, Any]) -> Parts:
    xp = ops.xp
    return Parts(lambda x: xp.matmul(x, P["inject.weight"]), layer(xp, P),
                 lambda z: xp.matmul(z, P["head.weight"]) + P["head.bias"])


def score(xp: Any, logits: Any, y: Any) -> tuple[Any, Any]:
    correct = xp.sum(xp.astype(xp.argmax(logits, axis=-1) == xp.argmax(y, axis=-1), xp.int32))
    return cross_entropy(xp, logits, y) * logits.shape[0], correct


BLOBS = Family(name="blobs", summary="a test family", configs=CONFIGS, config_help="blob-micro = for tests",
               datasets=DATASETS, dataset_help="blobs", metric=ACCURACY, items="points",
               workload=BlobsWorkload, parts=parts, start=lambda xp, mc, inj: xp.zeros_like(inj),
               compression=lambda mc: Compression(mc.width),
               initialiser=lambda mc, hidden: Initialiser(mc.features, mc.width, hidden), score=score,
               comparison_batch=lambda work, x, y: (np.asarray(y, np.float32), len(y)),
               hypersolver_sizes={"iterations": 2, "hidden": 4, "width": 4})


@pytest.fixture
def with_blobs(monkeypatch):
    monkeypatch.setitem(FAMILIES, "blobs", BLOBS)
    return BLOBS


def run(capsys, *argv) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def test_the_table_is_what_the_command_line_and_the_config_accept(with_blobs):
    train = build_parser()._subparsers._group_actions[0].choices["train"]  # type: ignore[union-attr]
    flags = {a.dest: a for a in train._actions}
    assert flags["model"].choices == list(FAMILIES) and "blobs" in FAMILIES
    assert "blob-micro" in flags["config"].choices and "blobs" in flags["dataset"].choices
    assert family("blobs") is BLOBS
    with pytest.raises(ValueError, match="unknown model family 'nope'; available: mdeq, transformer, blobs"):
        family("nope")
    with pytest.raises(ConfigError, match="'blob-micro' is a blobs config: add --model blobs"):
        TrainConfig(model="mdeq", config="blob-micro")
    with pytest.raises(ConfigError, match="'blobs' is for model blobs: add --model blobs"):
        TrainConfig(dataset="blobs")
    with pytest.raises(ConfigError, match="softmax_chunk .*is an option of model transformer; model blobs"):
        TrainConfig(model="blobs", config="blob-micro", dataset="blobs", softmax_chunk=4)


@pytest.mark.skipif(not SELECTED, reason="needs a backend")
def test_a_family_registered_in_the_table_runs_through_every_command(with_blobs, capsys, tmp_path):
    run_dir = tmp_path / "run"
    rc, out, err = run(capsys, "train", "--model", "blobs", "--config", "blob-micro", "--dataset", "blobs",
                       "--backend", BACKEND, "--batch-size", "16", "--epochs", "3", "--lr", "0.05",
                       "--solver", "anderson", "--max-iter", "30", "--tol", "1e-5", "--grad", "jfb",
                       "--out", run_dir, "--no-progress")
    assert rc == 0, err
    assert "blobs/blob-micro on blobs (96 train, 48 test points)" in err
    summary = json.loads((run_dir / "summary.json").read_text())
    first, last = summary["epochs"][0], summary["epochs"][-1]
    assert last["train_loss"] < first["train_loss"] and last["test_acc"] > 0.8, summary["epochs"]

    rc, out, err = run(capsys, "eval", "--run", run_dir)
    assert rc == 0, err
    assert json.loads(out)["test_acc"] == pytest.approx(last["test_acc"])

    hs = tmp_path / "hs.npz"
    rc, out, err = run(capsys, "hypersolver", "train", "--run", run_dir, "--out", hs, "--steps", "20",
                       "--batch-size", "8", "--no-progress")
    assert rc == 0, err
    from deqcore._arrays_io import load_arrays

    arrays, meta = load_arrays(hs)
    assert meta["config"]["initialiser"]["hidden"] == 4  # the family's default size
    rc, out, err = run(capsys, "hypersolver", "eval", "--run", run_dir, "--hypersolver", hs,
                       "--budgets", "1,4", "--repeats", "1", "--out", tmp_path / "eval", "--no-progress")
    assert rc == 0, err
    rows = json.loads((tmp_path / "eval" / "results.json").read_text())["rows"]
    assert {r["method"] for r in rows} == {"hyper", "anderson", "broyden"}
    assert all(r["items"] == 48 and 0 <= r["metric"] <= 1 and r["metric"] == r["accuracy"] for r in rows)
    assert "acc %" in out


def test_a_run_page_and_a_speedup_table_speak_the_family_metric(with_blobs, tmp_path):
    from deqcore_models.experiments.training_runs import render_run_epochs
    from deqcore_models.families import PERPLEXITY, metric_in
    from deqcore_models.hyperdeq import all_speedups, speedup_table

    (tmp_path / "a.csv").write_text("epoch,test_acc,train_acc,train_loss,train_seconds\n1,0.5,0.25,1.5,3\n")
    assert render_run_epochs(tmp_path / "a.csv").splitlines()[2] == "| 1 | 50.00 % | 25.00 % | 3 |"
    (tmp_path / "p.csv").write_text("epoch,test_acc,test_ppl,train_acc,train_loss,train_seconds\n"
                                    "1,0.5,120.25,0.25,4.5,3\n")
    assert render_run_epochs(tmp_path / "p.csv").splitlines()[2] == "| 1 | 120.2 | 4.500 | 3 |"
    assert metric_in({"test_acc": 1}) is ACCURACY and metric_in({"test_acc": 1, "test_ppl": 2}) is PERPLEXITY
    rows = [{"method": m, "budget": b, "nfe": b + 1, "metric": v, "seconds": s, "solve_seconds": s}
            for m, b, v, s in (("classic", 4, 0.9, 4.0), ("hyper", 1, 0.9, 1.0))]
    table = speedup_table(all_speedups(rows, ["hyper"], ["classic"], BLOBS.metric), BLOBS.metric)
    assert table[2] == ("| hyper | classic | 89.50 % | 2.50× (5 → 2) | 4.00× (4.00 → 1.00 s) "
                        "| 4.00× (4.00 → 1.00 s) |")
