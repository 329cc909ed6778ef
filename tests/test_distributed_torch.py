"""deqcore under PyTorch DistributedDataParallel: 2 gloo processes (one thread each) against one
process on the concatenated batch, float64.

The network (tests/ddp_equilibrium.py) has parameters before, inside and after the solve; rank
0's samples contract fast and rank 1's slowly, so the ranks' solves take different numbers of
iterations. Guarantees: the all-reduced gradients of every gradient mode, with and without the
Jacobian penalty, equal the one-process gradients of the mean loss; training steps keep the ranks
identical and equal to one process; no solve or backward pass calls a collective; which
``find_unused_parameters`` / ``static_graph`` settings work (docs/distributed.md).
"""

from __future__ import annotations

import numpy as np
import pytest
from process_group import RanksFailed, run_ranks

pytestmark = pytest.mark.backend("torch")

N_PER_RANK = 3
SOLVERS = {name: dict(solver=name, tol=1e-11, max_iter=300)
           for name in ("anderson", "broyden", "fixed_point")}
STATIC, UNUSED = dict(static_graph=True), dict(find_unused_parameters=True)


def case(solver: str, grad: str, grad_options: dict | None = None, tol: float | None = None, **kw):
    """A worker's case: deqcore.solve's options and the rest (see tests/ddp_equilibrium.py)."""
    solve = dict(SOLVERS[solver], grad=grad, grad_options=grad_options)
    return dict(solve=solve if tol is None else dict(solve, tol=tol), **kw)


#: (case id, case): every gradient mode registered on torch, under the solvers it makes sense
#: with, with the three DDP settings spread over them; the tuple state and the penalty on several.
GRADIENT_CASES = [
    ("implicit-anderson", case("anderson", "implicit")),
    ("implicit-broyden-tuple", case("broyden", "implicit", tuple_state=True)),
    ("implicit-fixed_point-static", case("fixed_point", "implicit", ddp=STATIC)),
    ("jfb-anderson-unused", case("anderson", "jfb", ddp=UNUSED)),
    ("jfb-fixed_point", case("fixed_point", "jfb")),
    ("npg-anderson-tuple", case("anderson", "npg", tuple_state=True)),
    ("npg-broyden-static", case("broyden", "npg", dict(k=8), ddp=STATIC)),
    ("upg-anderson", case("anderson", "upg")),
    ("upg-fixed_point-tuple-unused", case("fixed_point", "upg", tuple_state=True, ddp=UNUSED)),
    ("gdeq-broyden", case("broyden", "gdeq")),
    ("gdeq-broyden-tuple-static", case("broyden", "gdeq", tuple_state=True, ddp=STATIC)),
    ("unroll-anderson", case("anderson", "unroll")),
    ("unroll-broyden-unused", case("broyden", "unroll", ddp=UNUSED)),
    ("unroll-fixed_point-tuple", case("fixed_point", "unroll", tuple_state=True)),
    # the Jacobian penalty differentiates f's VJP (create_graph) inside the forward
    ("penalty-implicit-anderson", case("anderson", "implicit", penalty=0.7)),
    ("penalty-implicit-anderson-tuple-static", case("anderson", "implicit", tuple_state=True, penalty=0.7,
                                                    ddp=STATIC)),
    ("penalty-gdeq-broyden-unused", case("broyden", "gdeq", penalty=0.7, ddp=UNUSED)),
    ("penalty-npg-fixed_point", case("fixed_point", "npg", penalty=0.7)),
    ("penalty-unroll-anderson-tuple", case("anderson", "unroll", tuple_state=True, penalty=0.7)),
    ("penalty-after-forward", case("anderson", "implicit", penalty=0.7, penalty_after_forward=True)),
    ("penalty-after-forward-unused", case("broyden", "npg", penalty=0.7, penalty_after_forward=True,
                                          ddp=UNUSED)),
    # the pitfall the documentation warns of: the penalty's gradient in a second backward pass
    ("penalty-separate-backward", case("anderson", "implicit", penalty=0.7, separate_backward=True)),
]
IDS = [name for name, _ in GRADIENT_CASES]


def _network():
    """tests/ddp_equilibrium.py, imported when a test runs: it imports torch, which the JAX-only
    environment that collects (and deselects) this file does not have."""
    import ddp_equilibrium

    return ddp_equilibrium


@pytest.fixture(scope="module")
def gradients():
    """Per case: (rank 0's DDP gradients, rank 1's, the one-process gradients, the parameter names)."""
    net = _network()
    ranks = run_ranks(net.gradients_worker, 2, [case for _, case in GRADIENT_CASES], net.batch(N_PER_RANK, 2))
    return {name: (ranks[0][i]["ddp"], ranks[1][i]["ddp"], ranks[0][i]["reference"], ranks[0][i]["names"])
            for i, name in enumerate(IDS)}


def _assert_close(got: dict[str, np.ndarray], want: dict[str, np.ndarray], rtol: float = 1e-10) -> None:
    assert got.keys() == want.keys()
    for name in want:
        scale = np.abs(want[name]).max()
        assert scale > 1e-6, f"{name}: a vanishing gradient compares nothing"
        np.testing.assert_allclose(got[name], want[name], rtol=0, atol=rtol * scale, err_msg=name)


@pytest.mark.parametrize("case", [name for name in IDS if name != "penalty-separate-backward"])
def test_all_reduced_gradients_equal_one_process_on_the_whole_batch(gradients, case):
    rank0, rank1, reference, names = gradients[case]
    assert sorted(reference) == sorted(names)  # encoder, f (W; A and C with the tuple state), head
    _assert_close(rank0, reference)
    _assert_close(rank1, reference)


def test_a_separate_backward_for_the_penalty_is_not_all_reduced(gradients):
    """DDP all-reduces once per forward, when the first backward pass has produced every
    gradient; a second backward pass (here the penalty's) only adds each rank's own gradient, so
    the ranks silently differ. The recipe is one loss, one backward (the penalty cases above)."""
    rank0, rank1, reference, _ = gradients["penalty-separate-backward"]
    assert not np.allclose(rank0["W"], rank1["W"], rtol=1e-6, atol=0)
    assert not np.allclose(rank0["W"], reference["W"], rtol=1e-6, atol=0)
    # the head does not enter the penalty: its first, all-reduced gradient is the whole one
    head = ("head.weight", "head.bias")
    _assert_close({k: rank0[k] for k in head}, {k: reference[k] for k in head})


#: the penalty is in the loss of every other step, so each case trains with and without it
TRAINING_CASES = [
    ("sgd-unroll-broyden-tuple-static", case("broyden", "unroll", optimizer="sgd", tuple_state=True,
                                             penalty=0.7, ddp=STATIC)),
    # GDEQ with a looser forward tolerance: Broyden's last pairs come from differences of nearly
    # equal iterates, so GDEQ's gradient amplifies the rounding-level difference between the
    # all-reduced and the one-process parameters after a step: 7e-8 after three Adam steps with
    # tol=1e-11, 7e-13 with tol=1e-6 (relative)
    ("adam-gdeq-broyden", case("broyden", "gdeq", tol=1e-6, optimizer="adam", penalty=0.7)),
    ("sgd-npg-anderson", case("anderson", "npg", optimizer="sgd", penalty=0.7)),
    # two pretraining steps that leave f's parameters out, then the solve: find_unused_parameters
    ("adam-implicit-pretrain-unused", case("anderson", "implicit", optimizer="adam", penalty=0.7,
                                           skip_solve_steps=2, ddp=UNUSED)),
]
#: the same pretraining steps under the two other settings: DDP refuses them (a clear error, no
#: silently wrong step), the message of the error each raises
PRETRAIN_ERRORS = [
    (case("anderson", "implicit", optimizer="adam", skip_solve_steps=2, expect_error=True),
     "Expected to have finished reduction in the prior iteration"),
    (case("anderson", "implicit", optimizer="adam", skip_solve_steps=2, expect_error=True, ddp=STATIC),
     "Your training graph has changed in this iteration"),
]
STEPS = 3
TRAINING_IDS = [name for name, _ in TRAINING_CASES]


@pytest.fixture(scope="module")
def training():
    """Per case, (rank 0's DDP run, rank 1's, the one-process run); per PRETRAIN_ERRORS case,
    the two ranks' error messages. See ``training_worker``."""
    cases = [c for _, c in TRAINING_CASES] + [c for c, _ in PRETRAIN_ERRORS]
    net = _network()
    rank0, rank1 = run_ranks(net.training_worker, 2, cases, net.batch(N_PER_RANK, 2), STEPS)
    assert (rank0["rank"], rank0["threads"], rank1["rank"], rank1["threads"]) == (0, 1, 1, 1)
    assert rank0["counted"] == rank1["counted"] == ["barrier"]  # the count sees a collective
    runs = {name: (rank0["cases"][i]["ddp"], rank1["cases"][i]["ddp"], rank0["cases"][i]["reference"])
            for i, name in enumerate(TRAINING_IDS)}
    errors = [(rank0["cases"][i]["error"], rank1["cases"][i]["error"])
              for i in range(len(TRAINING_IDS), len(cases))]
    return runs, errors


@pytest.mark.parametrize("case", TRAINING_IDS)
def test_ranks_with_different_iteration_counts_train_like_one_process(training, case):
    """Rank 1's samples need more solver iterations than rank 0's; after every step both
    ranks hold the same parameters, those of one process on the whole batch (1e-10), and no
    forward or backward pass made a collective of its own (DDP's gradient all-reduce is its
    reducer's)."""
    rank0, rank1, reference = training[0][case]
    solved = slice(dict(TRAINING_CASES)[case].get("skip_solve_steps", 0), None)
    easy, hard = rank0["solver_steps"][solved], rank1["solver_steps"][solved]
    assert len(easy) == STEPS
    assert all(0 < mine < other for mine, other in zip(easy, hard, strict=True))  # the easy rank stops first
    assert rank0["calls"] == rank1["calls"] == reference["calls"] == []
    first, last = reference["params"][0], reference["params"][-1]
    assert all(not np.allclose(first[name], last[name], rtol=1e-6, atol=0) for name in first)  # all trained
    for step, want_step in enumerate(reference["params"]):
        for name, want in want_step.items():
            got = rank0["params"][step][name]
            np.testing.assert_array_equal(got, rank1["params"][step][name])
            np.testing.assert_allclose(got, want, rtol=0, atol=1e-10 * np.abs(want).max(),
                                       err_msg=f"step {step}: {name}")


def test_steps_that_leave_parameters_out_need_find_unused_parameters(training):
    """Pretraining steps without the solve leave f's parameters without gradient: with the
    default setting or static_graph=True, DDP stops the run with its error on both ranks."""
    for (_, message), errors in zip(PRETRAIN_ERRORS, training[1], strict=True):
        assert errors[0] is not None and errors[1] is not None
        assert message in errors[0] and message in errors[1]


def failing_worker(rank: int, world_size: int, mode: str) -> None:
    """Rank 0 waits in a collective; rank 1 raises (``mode="raise"``) or never joins it."""
    import time

    import torch
    import torch.distributed as dist

    if rank == 1 and mode == "raise":
        raise ValueError("rank 1 fails on purpose")
    if rank == 1:
        time.sleep(300)
    dist.all_reduce(torch.zeros(1))


def test_run_ranks_fails_instead_of_hanging():
    """run_ranks itself: a worker that raises, or a collective one rank never joins, fails the
    call with the ranks' output (the other tests check the results come back in rank order)."""
    with pytest.raises(RanksFailed, match="(?s)a worker failed.*rank 1 fails on purpose"):
        run_ranks(failing_worker, 2, "raise")
    with pytest.raises(RanksFailed, match="(?s)a worker failed.*rank 0.*Timed out waiting 3000ms"):
        run_ranks(failing_worker, 2, "hang", collective_timeout=3)
