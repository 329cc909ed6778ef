"""Framework-neutral checkpoints: one ``.npz`` of NumPy arrays plus JSON metadata.

A checkpoint written from PyTorch loads in JAX and the other way round, because both backends use
the same parameter names and shapes. Layout: ``params/<name>``, ``state/<name>`` (buffers such as
BatchNorm running statistics), ``extra/<name>`` (optimizer moments, RNG state ...) and
``__meta__`` (UTF-8 JSON: format, version, model, config, step, anything the caller adds). Files
are written to a temporary name and renamed, so a run killed while saving never leaves a
half-written checkpoint behind. Loading never unpickles.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from deqcore._arrays_io import load_arrays, save_arrays

FORMAT = "deqcore-checkpoint"
VERSION = 1
_GROUPS = ("params", "state", "extra")


class CheckpointError(ValueError):
    """A checkpoint is unreadable or does not match the model it is loaded into."""


@dataclass
class Checkpoint:
    """The contents of a checkpoint file (all arrays NumPy)."""

    meta: dict[str, Any]
    params: dict[str, np.ndarray]
    state: dict[str, np.ndarray] = field(default_factory=dict)
    extra: dict[str, np.ndarray] = field(default_factory=dict)


def save_checkpoint(path: str | os.PathLike[str], ckpt: Checkpoint) -> Path:
    """Write ``ckpt`` to ``path`` (``.npz`` appended if missing) atomically; returns the path."""
    arrays = {f"{group}/{name}": value for group in _GROUPS for name, value in getattr(ckpt, group).items()}
    return save_arrays(path, arrays, {"format": FORMAT, "version": VERSION, **ckpt.meta})


def load_checkpoint(path: str | os.PathLike[str]) -> Checkpoint:
    """Read a checkpoint written by :func:`save_checkpoint`; a bad file is a :class:`CheckpointError`."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        arrays, meta = load_arrays(path)
    except ValueError as exc:
        raise CheckpointError(str(exc).replace("not written by deqcore", "not a deqcore checkpoint")) from exc
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise CheckpointError(f"{path}: format {meta.get('format')!r} version {meta.get('version')!r}; "
                              f"expected {FORMAT!r} version {VERSION}")
    groups: dict[str, dict[str, np.ndarray]] = {g: {} for g in _GROUPS}
    for key, value in arrays.items():
        group, _, name = key.partition("/")
        if group not in groups or not name:
            raise CheckpointError(f"{path}: unexpected entry {key!r}")
        groups[group][name] = value
    return Checkpoint(meta, groups["params"], groups["state"], groups["extra"])


def check_schema(expected: Mapping[str, Any], got: Mapping[str, np.ndarray], what: str,
                 source: str = "checkpoint") -> None:
    """Raise :class:`CheckpointError` unless ``got`` has exactly the names, shapes and dtypes of
    ``expected``; the message lists every missing, unexpected and mismatched entry."""
    missing = sorted(set(expected) - set(got))
    unexpected = sorted(set(got) - set(expected))
    wrong = [f"{k}: {tuple(np.shape(got[k]))} {np.asarray(got[k]).dtype} where the model has "
             f"{tuple(np.shape(expected[k]))} {np.asarray(expected[k]).dtype}"
             for k in sorted(set(expected) & set(got))
             if tuple(np.shape(got[k])) != tuple(np.shape(expected[k]))
             or np.asarray(got[k]).dtype != np.asarray(expected[k]).dtype]
    if missing or unexpected or wrong:
        parts = []
        for label, items in ((f"missing {len(missing)}", missing),
                             (f"unexpected {len(unexpected)}", unexpected), ("mismatched", wrong)):
            if items:
                parts.append(f"{label}: " + "; ".join(items[:8]) + (" ..." if len(items) > 8 else ""))
        raise CheckpointError(f"{source} {what} do not match the model: " + " | ".join(parts))
