"""Framework-neutral files: named NumPy arrays plus JSON metadata in one ``.npz``, and the atomic
writer and strict JSON encoding every file deqcore writes goes through.

Used for hypersolver weights here and for model checkpoints, logs and results in
``deqcore_models``. Files are written under a temporary name and renamed, so an interrupted save
never leaves a half-written file; a failed write (a full disk, a file-size limit) removes the
temporary file and raises :class:`WriteError` naming the file and the free space. Loading never
unpickles. JSON is always valid JSON: non-finite floats are written as ``null``.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import IO, Any

import numpy as np

META_KEY = "__meta__"


class WriteError(OSError):
    """A file could not be written (disk full, file too large, no permission ...). The message
    names the file, the reason and the free space; no partial file is left behind, and a file
    of the same name written before is unchanged. ``errno`` and ``filename`` are those of the
    failed write."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else super().__str__()


def _free_space(folder: Path) -> str:
    try:
        free = float(shutil.disk_usage(folder).free)
    except OSError:
        return "free space unknown"
    for unit in ("bytes", "KB", "MB", "GB", "TB"):
        if free < 1024 or unit == "TB":
            return f"{free:.0f} {unit} free" if unit == "bytes" else f"{free:.1f} {unit} free"
        free /= 1024
    raise AssertionError("unreachable")


def write_error(path: str | os.PathLike[str], exc: OSError) -> WriteError:
    """The :class:`WriteError` for ``exc``, raised while writing ``path``: the file, the reason
    and the free space there."""
    path = Path(path)
    kept = "; the previous file is unchanged" if path.exists() else ""
    err = WriteError(f"could not write {path}: {exc.strerror or exc} ({_free_space(path.parent)} on "
                     f"{path.parent}){kept}")
    err.errno, err.filename = exc.errno, str(path)
    return err


def write_atomic(path: str | os.PathLike[str], write: Callable[[IO[bytes]], Any]) -> Path:
    """Call ``write(fh)`` on a temporary file beside ``path``, flush it to disk, then rename it to
    ``path``. On any failure the temporary file is removed and ``path`` is left as it was; an
    ``OSError`` (disk full, ``EFBIG``, permissions) becomes a :class:`WriteError` saying which
    file, why, and how much space is free there."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if isinstance(exc, OSError) and not isinstance(exc, WriteError):
            raise write_error(path, exc) from exc
        raise
    return path


def write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically (see :func:`write_atomic`)."""
    data = text.encode()
    return write_atomic(path, lambda fh: fh.write(data))


def json_safe(obj: Any) -> Any:
    """``obj`` with every non-finite float as None, NumPy scalars and arrays as Python numbers and
    lists, tuples as lists and paths as strings; anything else JSON cannot hold is a
    ``TypeError`` naming its type."""
    if isinstance(obj, bool) or obj is None or isinstance(obj, str):
        return obj
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(float(obj)) else None
    if isinstance(obj, np.bool_):
        return bool(obj)
    if isinstance(obj, np.ndarray):
        return json_safe(obj.tolist())
    if isinstance(obj, Mapping):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    raise TypeError(f"cannot write a {type(obj).__name__} as JSON: {obj!r}")


def dumps_json(obj: Any, **kwargs: Any) -> str:
    """Strict JSON text of ``obj`` (:func:`json_safe`: NaN and infinities become ``null``)."""
    return json.dumps(json_safe(obj), allow_nan=False, **kwargs)


def save_arrays(path: str | os.PathLike[str], arrays: Mapping[str, Any], meta: Mapping[str, Any]) -> Path:
    """Write ``arrays`` and the JSON-able ``meta`` to ``path`` (``.npz`` appended if missing)."""
    path = Path(path)
    if path.suffix != ".npz":
        path = path.with_name(path.name + ".npz")
    if META_KEY in arrays:
        raise ValueError(f"an array may not be named {META_KEY!r}")
    out = {name: np.asarray(value) for name, value in arrays.items()}
    out[META_KEY] = np.frombuffer(dumps_json(dict(meta), sort_keys=True).encode(), dtype=np.uint8)
    return write_atomic(path, lambda fh: np.savez(fh, **out))  # type: ignore[arg-type]


def load_arrays(path: str | os.PathLike[str]) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Read a file written by :func:`save_arrays`: ``(arrays, meta)``. A missing, truncated or
    foreign file, or metadata that is not a JSON object, is a ``ValueError`` saying what is
    wrong."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"file not found: {path}")
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except Exception as exc:  # zip, CRC, header and pickle errors all mean "not our format"
        raise ValueError(f"{path}: not a readable .npz file ({type(exc).__name__}: {exc})") from exc
    if META_KEY not in arrays:
        raise ValueError(f"{path}: no {META_KEY} entry; not written by deqcore")
    try:
        meta = json.loads(arrays.pop(META_KEY).tobytes().decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: unreadable metadata, not JSON ({exc})") from exc
    if not isinstance(meta, dict):
        raise ValueError(f"{path}: its metadata is a JSON {type(meta).__name__}, not an object; not "
                         f"written by deqcore")
    return arrays, meta
