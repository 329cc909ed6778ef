"""deqcore.validators: the public option validators plugin authors build their Options from."""

from __future__ import annotations

import math

import pytest

from deqcore import validators as v

CASES = [
    # validator, accepted, rejected, expected phrase
    (v.positive_int, [1, 7], [0, -1, 1.0, True, None], "an int >= 1"),
    (v.nonnegative_int, [0, 3], [-1, 0.5, False], "an int >= 0"),
    (v.positive_float, [1e-300, 2, 0.5], [0, -1.0, math.inf, math.nan, True, "1"], "a finite float > 0"),
    (v.nonnegative_float, [0, 0.0, 3.5], [-1e-9, math.inf, True], "a finite float >= 0"),
    (v.unit_interval, [1, 0.5, 1e-9], [0, 1.5, math.nan], "a float in (0, 1]"),
    (v.open_unit_interval, [0.5, 1e-9], [0, 1, 1.0, -0.5], "a float in (0, 1)"),
    (v.boolean, [True, False], [0, 1, "yes", None], "True or False"),
    (v.one_of("warn", "raise"), ["warn", "raise"], ["WARN", None, 1], "one of 'warn', 'raise'"),
    (v.optional(v.positive_int), [None, 3], [0, 2.5], "None or an int >= 1"),
]


@pytest.mark.parametrize(("check", "good", "bad", "phrase"), CASES,
                         ids=[c[3] for c in CASES])
def test_validator_accepts_and_rejects(check, good, bad, phrase):
    for value in good:
        assert check(value) is None, value
    for value in bad:
        assert check(value) == phrase, value


def test_validators_are_what_the_builtin_solvers_use():
    """The public names are deqcore's own validators, not copies."""
    from deqcore import _options

    for name in v.__all__:
        assert getattr(v, name) is getattr(_options, name)
