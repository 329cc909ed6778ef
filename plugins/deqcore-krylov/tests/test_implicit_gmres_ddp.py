"""``implicit_gmres`` under PyTorch DistributedDataParallel: 2 gloo processes (one thread each)
give the one-process gradients on the concatenated batch, float64, with the network and workers of
deqcore's own DDP tests (tests/ddp_equilibrium.py in the deqcore repository): parameters before,
inside and after the solve, ranks whose solves take different numbers of iterations.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT / "tests"))

from krylov_testing import SELECTED  # noqa: E402

pytestmark = pytest.mark.skipif("torch" not in SELECTED, reason="torch not selected")

GMRES = dict(grad="implicit_gmres", grad_options=dict(tol=1e-12), tol=1e-11, max_iter=300)
CASES = [
    ("anderson", dict(solve=dict(GMRES, solver="anderson"))),
    ("broyden-tuple-penalty", dict(solve=dict(GMRES, solver="broyden"), tuple_state=True, penalty=0.7)),
    ("fixed_point-unused", dict(solve=dict(GMRES, solver="fixed_point"),
                                ddp=dict(find_unused_parameters=True))),
    ("anderson-static", dict(solve=dict(GMRES, solver="anderson"), ddp=dict(static_graph=True))),
]


def test_all_reduced_gradients_equal_one_process_on_the_whole_batch():
    from ddp_equilibrium import batch, gradients_worker
    from process_group import run_ranks

    ranks = run_ranks(gradients_worker, 2, [case for _, case in CASES], batch(3, 2))
    for i, (name, _) in enumerate(CASES):
        reference = ranks[0][i]["reference"]
        assert sorted(reference) == sorted(ranks[0][i]["names"]), name
        for rank in ranks:
            assert rank[i]["ddp"].keys() == reference.keys()
            for param, want in reference.items():
                scale = np.abs(want).max()
                assert scale > 1e-6, f"{name}: {param}: a vanishing gradient compares nothing"
                np.testing.assert_allclose(rank[i]["ddp"][param], want, rtol=0, atol=1e-10 * scale,
                                           err_msg=f"{name}: {param}")
