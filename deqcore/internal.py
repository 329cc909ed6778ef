"""What deqcore's sister packages share with the core: its own backends solve Anderson's small
systems the way the core does, and the models and applications (``deqcore_models``) and the
benchmarks write files and validate settings the way the core does.

Not for plugin authors (their namespace is :mod:`deqcore.extend`) and without a stability promise
beyond this repository: names here change with the packages that use them.

- atomic, strict-JSON file writing: :func:`write_atomic`, :func:`write_text`, :func:`dumps_json`
  (non-finite numbers become null), :func:`json_safe`, :func:`write_error` and
  :class:`WriteError` (an ``OSError`` naming the file and the free space);
- framework-neutral arrays on disk: :func:`save_arrays`, :func:`load_arrays` (``.npz`` with JSON
  metadata);
- the unrolled Cholesky solve of tiny SPD systems, batched over samples:
  :func:`spd_solve_unrolled`, used up to ``UNROLLED_SPD_MAX`` unknowns;
- option resolution: :func:`resolve` (unknown names a ``TypeError``, bad values a ``ValueError``,
  with the validators of :mod:`deqcore.validators`);
- the solve settings a framework's DEQ module holds, checked when it is built:
  :func:`check_solve_settings`;
- the steps ``deqcore.solve(..., correction_states=k)`` records states at: :func:`correction_steps`.
"""

from ._arrays_io import (
    WriteError,
    dumps_json,
    json_safe,
    load_arrays,
    save_arrays,
    write_atomic,
    write_error,
    write_text,
)
from ._batched_linalg import UNROLLED_SPD_MAX, spd_solve_unrolled
from ._correction import correction_steps
from ._options import resolve
from ._solve_settings import check_solve_settings

__all__ = [
    "UNROLLED_SPD_MAX",
    "WriteError",
    "check_solve_settings",
    "correction_steps",
    "dumps_json",
    "json_safe",
    "load_arrays",
    "resolve",
    "save_arrays",
    "spd_solve_unrolled",
    "write_atomic",
    "write_error",
    "write_text",
]
