"""Declared, validated options: every solver lists its options; unknown keys are errors."""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Callable, Mapping
from typing import Any, ClassVar, Generic, TypeVar, overload

T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class Option(Generic[T]):
    """One option: its default, a one-line description, and a validator.

    ``check(value)`` returns None when the value is acceptable, else a phrase saying what is
    expected (for example ``"a float in (0, 1]"``).

    Declared as a class attribute of a solver or gradient mode (``damping = Option(1.0, ...)``)
    it is the option's only declaration: the class's ``options`` mapping is collected from such
    attributes, the constructor validates and stores the values, and ``self.damping`` reads the
    instance's value (typed ``T``). On the class, ``Cls.damping`` is the ``Option`` itself.
    """

    default: T
    doc: str
    check: Callable[[Any], str | None]

    @overload
    def __get__(self, obj: None, owner: type | None = None) -> Option[T]: ...

    @overload
    def __get__(self, obj: object, owner: type | None = None) -> T: ...

    def __get__(self, obj: object | None, owner: type | None = None) -> Option[T] | T:
        return self if obj is None else self.default


class Configurable:
    """Base of classes whose options are :class:`Option` class attributes (solvers, gradient modes).

    ``options`` (name -> Option, inherited ones first) is collected when the class is created,
    unless the class body sets ``options`` itself (a dict, the older declaration form). The
    constructor takes the options as keywords, rejects unknown names and bad values
    (``TypeError`` / ``ValueError`` naming the owner) and stores them as attributes.
    """

    options: ClassVar[Mapping[str, Option[Any]]] = {}
    #: how errors name the owner: "<kind> '<name>'"
    kind: ClassVar[str] = "component"
    #: options accepted elsewhere (listed in the unknown-option error only)
    also_valid: ClassVar[Mapping[str, Option[Any]] | None] = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "options" not in vars(cls):
            collected: dict[str, Option[Any]] = {}
            for klass in reversed(cls.__mro__):  # mixins holding Option attributes included
                declared = vars(klass).get("options")
                if isinstance(declared, Mapping):
                    collected.update(declared)
                collected.update({k: v for k, v in vars(klass).items() if isinstance(v, Option)})
            cls.options = collected

    def __init__(self, **options: Any) -> None:
        owner = f"{self.kind} {getattr(self, 'name', type(self).__name__)!r}"
        for key, value in resolve(owner, type(self).options, options, self.also_valid).items():
            setattr(self, key, value)


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


def nonempty_str(v: Any) -> str | None:
    return None if isinstance(v, str) and v else "a non-empty string"


def boolean(v: Any) -> str | None:
    return None if isinstance(v, bool) else "True or False"


def count_or_increasing_steps(v: Any) -> str | None:
    if _is_int(v) and v >= 0:
        return None
    ok = (isinstance(v, (tuple, list)) and len(v) > 0 and all(_is_int(s) and s >= 1 for s in v)
          and all(a < b for a, b in zip(v[:-1], v[1:], strict=True)))
    return None if ok else "an int >= 0 or a non-empty sequence of increasing ints >= 1"


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


def resolve(owner: str, spec: Mapping[str, Option[Any]], given: Mapping[str, Any],
            also_valid: Mapping[str, Option[Any]] | None = None) -> dict[str, Any]:
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


def describe(spec: Mapping[str, Option[Any]]) -> str:
    """A reST-ish listing of options with defaults, for docstrings and ``--help``."""
    return "\n".join(f"{k} (default {o.default!r}): {o.doc}" for k, o in spec.items())
