"""The same f with the same weights gives the same answer on torch and on JAX."""

from __future__ import annotations

import numpy as np
import pytest
from problems import tanh_deq

pytestmark = pytest.mark.equivalence

CASES = [
    ("fixed_point", {}),
    ("fixed_point", {"damping": 0.7}),
    ("anderson", {}),
    ("anderson", {"memory": 3, "beta": 0.8, "lam": 1e-6}),
    ("broyden", {}),
    ("broyden", {"memory": 4}),
    ("broyden", {"line_search": True}),
]


@pytest.mark.parametrize("sym", [False, True], ids=["gaussian", "symmetric"])
@pytest.mark.parametrize(("solver", "options"), CASES, ids=lambda v: str(v) if v else "")
def test_same_fixed_point_on_torch_and_jax(both, solver, options, sym):
    t, j = both
    W, U, b, x = tanh_deq(seed=30, d=24, batch=6, rho=0.9, sym=sym)
    kw = dict(solver=solver, tol=1e-10, max_iter=60, **options)
    st = t.solve(t.tanh_layer(W, U, b), t.asarray(x), **kw)
    sj = j.solve(j.tanh_layer(W, U, b), j.asarray(x), jit=True, **kw)
    np.testing.assert_allclose(t.numpy(st.z), j.numpy(sj.z), atol=1e-6, rtol=0)
    np.testing.assert_array_equal(t.numpy(st.status), j.numpy(sj.status))
    np.testing.assert_array_equal(t.numpy(st.iterations), j.numpy(sj.iterations))
    assert int(t.numpy(st.nfe)) == int(j.numpy(sj.nfe))
    np.testing.assert_allclose(t.numpy(st.rel_trace), j.numpy(sj.rel_trace), rtol=1e-6, atol=1e-12)


def test_same_broyden_state_on_torch_and_jax(both):
    t, j = both
    W, U, b, x = tanh_deq(seed=31, d=16, batch=3)
    kw = dict(solver="broyden", tol=1e-8, max_iter=30, memory=5)
    st = t.solve(t.tanh_layer(W, U, b), t.asarray(x), **kw)
    sj = j.solve(j.tanh_layer(W, U, b), j.asarray(x), **kw)
    # the factors U, V are ill-conditioned near convergence (tiny secant denominators); the
    # operator they represent, B = -I + sum_i U_i V_i^T, is what the GDEQ gradient uses
    def dense(s, h):
        return -np.eye(16) + np.einsum("bmi,bmj->bij", h.numpy(s.solver_state.U), h.numpy(s.solver_state.V))

    Bt, Bj = dense(st, t), dense(sj, j)
    assert np.linalg.norm(Bt - Bj) <= 1e-6 * np.linalg.norm(Bt)
