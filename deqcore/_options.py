"""Declared, validated options: every solver lists its options; unknown keys are errors."""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Callable, Mapping
from typing import Any


@dataclasses.dataclass(frozen=True)
class Option:
    """One option: its default, a one-line description, and a validator.

    ``check(value)`` returns None when the value is acceptable, else a phrase saying what is
    expected (for example ``"a float in (0, 1]"``).
    """

    default: Any
    doc: str
    check: Callable[[Any], str | None]


def _is_real(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(float(v))


def _is_int(v: Any) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def positive_float(v: Any) -> str | None:
    return None if _is_real(v) and v > 0 else "a finite float > 0"


def nonnegative_float(v: Any) -> str | None:
    return None if _is_real(v) and v >= 0 else "a finite float >= 0"


def positive_int(v: Any) -> str | None:
    return None if _is_int(v) and v >= 1 else "an int >= 1"


def nonnegative_int(v: Any) -> str | None:
    return None if _is_int(v) and v >= 0 else "an int >= 0"


def unit_interval(v: Any) -> str | None:
    return None if _is_real(v) and 0 < v <= 1 else "a float in (0, 1]"


def open_unit_interval(v: Any) -> str | None:
    return None if _is_real(v) and 0 < v < 1 else "a float in (0, 1)"


def bool_or_nonnegative_int(v: Any) -> str | None:
    return None if isinstance(v, bool) or (_is_int(v) and v >= 0) else "True, False or an int >= 0"


def bool_or_nonempty_str(v: Any) -> str | None:
    return None if isinstance(v, bool) or (isinstance(v, str) and v) else "True, False or a mode name"


def boolean(v: Any) -> str | None:
    return None if isinstance(v, bool) else "True or False"


def one_of(*choices: Any) -> Callable[[Any], str | None]:
    def check(v: Any) -> str | None:
        return None if v in choices else "one of " + ", ".join(repr(c) for c in choices)

    return check


def optional(check: Callable[[Any], str | None]) -> Callable[[Any], str | None]:
    def wrapped(v: Any) -> str | None:
        if v is None:
            return None
        msg = check(v)
        return None if msg is None else f"None or {msg}"

    return wrapped


def resolve(owner: str, spec: Mapping[str, Option], given: Mapping[str, Any],
            also_valid: Mapping[str, Option] | None = None) -> dict[str, Any]:
    """Merge ``given`` over the defaults of ``spec``, rejecting unknown keys and bad values.

    ``also_valid`` lists options accepted elsewhere (for the error message only).
    """
    unknown = sorted(set(given) - set(spec))
    if unknown:
        valid = sorted(spec)
        extra = sorted(also_valid or {})
        listing = ", ".join(valid) if valid else "(none)"
        if extra:
            listing += "; and for every solver: " + ", ".join(extra)
        raise TypeError(
            f"{owner}: unknown option{'s' if len(unknown) > 1 else ''} "
            f"{', '.join(repr(k) for k in unknown)}. Valid options: {listing}"
        )
    values = {}
    for key, opt in spec.items():
        value = given.get(key, opt.default)
        problem = opt.check(value)
        if problem is not None:
            raise ValueError(f"{owner}: option {key!r} must be {problem}, got {value!r}")
        values[key] = value
    return values


def describe(spec: Mapping[str, Option]) -> str:
    """A reST-ish listing of options with defaults, for docstrings and ``--help``."""
    return "\n".join(f"{k} (default {o.default!r}): {o.doc}" for k, o in spec.items())
