"""The trainer's fixed-point correction (``--correction-states K``): the loss and its gradient are
the hand-weighted sum over the states, for MDEQ and the DEQ-Transformer on each engine."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import SELECTED
from deqcore_models import data as D
from deqcore_models._equilibrium_layer import DEQSettings
from deqcore_models._losses import CORRECTION_GAMMA
from deqcore_models._training_engines import make_engine
from deqcore_models.cli import build_parser
from deqcore_models.cli._run_flags import train_config
from deqcore_models.families.mdeq import mdeq_task
from deqcore_models.families.transformer import transformer_task
from deqcore_models.mdeq import MDEQ_CONFIGS, init_mdeq
from deqcore_models.transformer import TransformerConfig, empty_memory, init_transformer
from models_helpers import grad_rel_diff


def _mdeq(data_root):
    ds = D.fashion_mnist(data_root, limit=16)
    x = D.to_float_nchw(ds.train_x, [0.286], [0.353])
    params, state = init_mdeq(MDEQ_CONFIGS["micro"], 1, seed=0)
    return mdeq_task(MDEQ_CONFIGS["micro"]), params, state, x, np.eye(10, dtype=np.float32)[ds.train_y], None


def _transformer(data_root):
    corpus = D.wikitext2(data_root, limit=400)
    rows = D.batchify(corpus.train, 2)
    cfg = TransformerConfig(d_model=16, n_head=2, d_head=8, d_inner=32, tgt_len=8, mem_len=0,
                            dropout=0.0, emb_dropout=0.0)
    params, state = init_transformer(cfg, corpus.vocab_size, seed=0, batch_size=2)
    return transformer_task(cfg, chunk=4), params, state, rows[:, :8], rows[:, 1:9], empty_memory(cfg, 2)


@pytest.mark.backend("torch")
def test_mdeq_loss_and_gradient_are_the_hand_weighted_sums(data_root):
    """The loss at z* plus 0.8 times the loss at the state of step 3, which is what a solve
    stopped after 3 steps returns, and its gradient that of the upg (phantom) mode; two steps
    train."""
    task, params, state, x, y, _ = _mdeq(data_root)
    base = dict(solver="anderson", max_iter=6, grad="jfb")
    corrected = DEQSettings(**base, correction_states=2)  # states after steps 3 and 6 (= z*)

    def engine():
        return make_engine("torch", task, params, state, weight_decay=0.0)

    at_z = engine().train_step(x, y, None, DEQSettings(**base), 1e-3)["loss"]
    at_3 = engine().train_step(x, y, None, DEQSettings(**{**base, "max_iter": 3}), 1e-3)["loss"]
    e = engine()
    first = e.train_step(x, y, None, corrected, 1e-3)
    assert first["loss"] == pytest.approx(at_z + CORRECTION_GAMMA * at_3, rel=1e-5)
    g_z = engine().gradients(x, y, None, DEQSettings(**base))
    g_3 = engine().gradients(x, y, None, DEQSettings(**{**base, "max_iter": 3, "grad": "upg"}))
    g = engine().gradients(x, y, None, corrected)
    assert grad_rel_diff(g, {k: g_z[k] + CORRECTION_GAMMA * g_3[k] for k in g}) < 1e-4
    second = e.train_step(x, y, None, corrected, 1e-3)
    assert np.isfinite(second["loss"]) and second["loss"] < first["loss"]


@pytest.mark.parametrize("backend", SELECTED)
def test_transformer_two_correction_steps_on_the_hand_weighted_loss(data_root, backend):
    """The same sum for the transformer on each engine (its loss does not depend on the train
    flag, so the engine's evaluation gives the terms); two steps train."""
    task, params, state, x, y, memory = _transformer(data_root)
    base = dict(solver="fixed_point", max_iter=6, grad="jfb")
    e = make_engine(backend, task, params, state, weight_decay=0.0)
    at_z = e.evaluate(x, y, DEQSettings(**base), state=memory)["loss"]
    at_3 = e.evaluate(x, y, DEQSettings(**{**base, "max_iter": 3}), state=memory)["loss"]
    corrected = DEQSettings(**base, correction_states=2)
    losses = []
    for _ in range(2):
        e.set_state(memory)
        losses.append(e.train_step(x, y, None, corrected, 3e-3)["loss"])
    assert losses[0] == pytest.approx(at_z + CORRECTION_GAMMA * at_3, rel=1e-5)
    assert np.isfinite(losses[1]) and losses[1] < losses[0]


def test_the_flag_reaches_the_training_solve(data_root):
    args = build_parser().parse_args(["train", "--data", str(data_root), "--correction-states", "3",
                                      "--max-iter", "12"])
    cfg = train_config(args)
    assert cfg.correction_states == 3
    assert cfg.deq_settings().correction_steps() == (4, 8)  # the third state is z*
    assert cfg.eval_settings().correction_steps() == ()
    assert cfg.pretrain_settings().correction_steps() == ()
    with pytest.raises(ValueError, match=r"\(--correction-states\) must be <= --max-iter 12"):
        train_config(build_parser().parse_args(["train", "--data", str(data_root), "--correction-states",
                                                "13", "--max-iter", "12"]))
    with pytest.raises(ValueError, match=r"--correction-states\) must be an int >= 0"):
        train_config(build_parser().parse_args(["train", "--data", str(data_root), "--correction-states",
                                                "-1"]))
