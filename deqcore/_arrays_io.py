"""Framework-neutral files: named NumPy arrays plus JSON metadata in one ``.npz``.

Used for hypersolver weights here and for model checkpoints in ``deqcore_models``. Files are
written under a temporary name and renamed, so an interrupted save never leaves a half-written
file; loading never unpickles.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

META_KEY = "__meta__"


def save_arrays(path: str | os.PathLike[str], arrays: Mapping[str, Any], meta: Mapping[str, Any]) -> Path:
    """Write ``arrays`` and the JSON-able ``meta`` to ``path`` (``.npz`` appended if missing)."""
    path = Path(path)
    if path.suffix != ".npz":
        path = path.with_name(path.name + ".npz")
    path.parent.mkdir(parents=True, exist_ok=True)
    if META_KEY in arrays:
        raise ValueError(f"an array may not be named {META_KEY!r}")
    out = {name: np.asarray(value) for name, value in arrays.items()}
    out[META_KEY] = np.frombuffer(json.dumps(dict(meta), sort_keys=True).encode(), dtype=np.uint8)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        np.savez(fh, **out)  # type: ignore[arg-type]  # numpy stubs: allow_pickle kwarg
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    return path


def load_arrays(path: str | os.PathLike[str]) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Read a file written by :func:`save_arrays`: ``(arrays, meta)``. A missing or foreign file
    is a ``ValueError`` saying what is wrong."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"file not found: {path}")
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except Exception as exc:  # zip, header and pickle errors all mean "not our format"
        raise ValueError(f"{path}: not a readable .npz file ({type(exc).__name__}: {exc})") from exc
    if META_KEY not in arrays:
        raise ValueError(f"{path}: no {META_KEY} entry; not written by deqcore")
    try:
        meta = json.loads(arrays.pop(META_KEY).tobytes().decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: unreadable metadata ({exc})") from exc
    return arrays, meta
