"""Option validators for :class:`deqcore.extend.Option`, public for plugin authors.

Each validator takes the value a user passed and returns ``None`` when it is acceptable, else a
phrase saying what is expected; deqcore turns that phrase into
``ValueError: <owner>: option 'restart' must be an int >= 1, got 0``. Booleans are never accepted
as numbers, and non-finite floats never as reals.

    from deqcore.extend import Option, Solver, validators

    class GMRESSolver(Solver):
        restart = Option(10, "Krylov basis size", validators.positive_int)
        fd_eps = Option(None, "step factor; None: automatic",
                        validators.optional(validators.positive_float))
"""

from ._options import (
    boolean,
    nonempty_str,
    nonnegative_float,
    nonnegative_int,
    one_of,
    open_unit_interval,
    optional,
    positive_float,
    positive_int,
    unit_interval,
)

__all__ = [
    "boolean",
    "nonempty_str",
    "nonnegative_float",
    "nonnegative_int",
    "one_of",
    "open_unit_interval",
    "optional",
    "positive_float",
    "positive_int",
    "unit_interval",
]
