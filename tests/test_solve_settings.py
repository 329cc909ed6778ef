"""``deqcore.internal.check_solve_settings``, what the DEQ modules check when they are built:
the settings ``deqcore.solve`` rejects, it rejects with the same error; the ones ``solve``
accepts, it returns unchanged (defaults stay ``solve``'s)."""

from __future__ import annotations

import numpy as np
import pytest

import deqcore
from deqcore.internal import check_solve_settings

BAD = [
    {"memroy": 4},
    {"tol": 0.0},
    {"max_iter": 2.5},
    {"stop_mode": "max"},
    {"solver": "nope"},
    {"solver": "broyden", "memory": -1},
    {"solver": deqcore.solvers.Anderson(), "memory": 3},
    {"grad": "gdeq"},
    {"grad": "nope"},
    {"grad": "npg", "grad_options": {"k": 0}},
    {"grad": "implicit", "grad_options": {"tol": 1e-6, "bogus": 1}},
    {"grad": None, "grad_options": {"k": 1}},
    {"grad_options": [("k", 1)]},
    {"options": {"memory": 2}},  # the name of solve's **options is not an argument
]


def _problem(h):
    A = np.random.default_rng(0).standard_normal((4, 4)) * 0.1
    return h.affine_layer(A, np.zeros(4)), h.asarray(np.ones((2, 4)))


@pytest.mark.parametrize("settings", BAD, ids=lambda s: ",".join(s))
def test_bad_settings_fail_as_solve_fails(h, settings):
    f, x = _problem(h)
    with pytest.raises((TypeError, ValueError, KeyError, LookupError)) as from_solve:
        deqcore.solve(f, x, **settings)
    with pytest.raises(type(from_solve.value)) as from_check:
        check_solve_settings("deqcore.solve", h.name, settings)
    assert str(from_check.value) == str(from_solve.value)


def test_good_settings_are_returned_as_given_and_solve_accepts_them(h):
    f, x = _problem(h)
    settings = {"solver": "broyden", "memory": 4, "tol": 1e-9, "grad": "gdeq", "trace": 3}
    checked = check_solve_settings("DEQ", h.name, settings)
    assert checked == settings and checked is not settings
    assert check_solve_settings("DEQ", h.name, {}) == {}  # no defaults written in
    sol = deqcore.solve(f, x, **checked)
    assert sol.solver == "broyden" and bool(np.all(h.numpy(sol.converged)))


@pytest.mark.parametrize("name", ["f", "x", "z0", "backend"])
def test_what_the_module_passes_itself_cannot_be_set(h, name):
    with pytest.raises(TypeError, match=rf"^DEQ: '{name}' cannot be a setting: the module passes it"):
        check_solve_settings("DEQ", h.name, {name: None, "tol": 1e-3})
