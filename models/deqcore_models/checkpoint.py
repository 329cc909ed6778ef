"""Framework-neutral checkpoints: one ``.npz`` of NumPy arrays plus JSON metadata.

A checkpoint written from PyTorch loads in JAX and the other way round, because both backends use
the same parameter names and shapes. Layout: ``params/<name>``, ``state/<name>`` (buffers such as
BatchNorm running statistics), ``extra/<name>`` (optimizer moments, RNG state ...) and
``__meta__`` (UTF-8 JSON: format, version, model, config, step, anything the caller adds). Files
are written to a temporary name and renamed, so a run killed while saving never leaves a
half-written checkpoint behind, and a failed save (a full disk) removes its temporary file and
leaves the previous checkpoint as it was. Loading never unpickles.

Every path that loads a checkpoint into a model (``deqcore eval``, ``train --resume``, the
hypersolver commands, the experiments, and the engines' ``load`` itself) checks it with
:func:`check_checkpoint` against the model's :class:`Schema`: the names, shapes and dtypes of
every array, finite values, and the metadata that defines the model. The error lists every
difference at once.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from deqcore.internal import json_safe, load_arrays, save_arrays

FORMAT = "deqcore-checkpoint"
VERSION = 1
#: The groups of a checkpoint and what messages call them.
GROUPS = {"params": "parameters", "state": "buffers", "extra": "optimizer state"}
#: How many names of one kind an error lists before it says how many more there are.
_LISTED = 10


class CheckpointError(ValueError):
    """A checkpoint is unreadable or does not match the model it is loaded into."""


@dataclass
class Checkpoint:
    """The contents of a checkpoint file (all arrays NumPy)."""

    meta: dict[str, Any]
    params: dict[str, np.ndarray]
    state: dict[str, np.ndarray] = field(default_factory=dict)
    extra: dict[str, np.ndarray] = field(default_factory=dict)


Spec = tuple[tuple[int, ...], np.dtype]


def array_specs(arrays: Mapping[str, Any]) -> dict[str, Spec]:
    """``{name: (shape, dtype)}`` of NumPy arrays (or anything ``np.asarray`` reads)."""
    return {k: (tuple(np.shape(v)), np.asarray(v).dtype) for k, v in arrays.items()}


@dataclass(frozen=True)
class Schema:
    """What a checkpoint must hold to load into a model.

    ``arrays``: per group (``params``, ``state``, ``extra``) the exact names with their shape
    and dtype (see :func:`array_specs`); a group left out is not checked. ``meta``: metadata
    entries that must be equal; a mapping value is compared key by key (the checkpoint may hold
    more keys), so ``{"train_config": {"model": "mdeq"}}`` checks one setting of the run.
    """

    arrays: Mapping[str, Mapping[str, Spec]]
    meta: Mapping[str, Any] = field(default_factory=dict)


def save_checkpoint(path: str | os.PathLike[str], ckpt: Checkpoint) -> Path:
    """Write ``ckpt`` to ``path`` (``.npz`` appended if missing) atomically; returns the path. A
    failed write is a :class:`deqcore.internal.WriteError` (an ``OSError``) naming the file
    and the free space; the file written before, if any, is unchanged."""
    arrays = {f"{group}/{name}": value for group in GROUPS for name, value in getattr(ckpt, group).items()}
    return save_arrays(path, arrays, {"format": FORMAT, "version": VERSION, **ckpt.meta})


def load_checkpoint(path: str | os.PathLike[str]) -> Checkpoint:
    """Read a checkpoint written by :func:`save_checkpoint`. A missing, truncated or corrupted
    file, metadata that is not JSON, another format or version, or an entry outside the groups
    is a :class:`CheckpointError` naming the file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        arrays, meta = load_arrays(path)
    except ValueError as exc:
        raise CheckpointError(str(exc).replace("not written by deqcore", "not a deqcore checkpoint")) from exc
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise CheckpointError(f"{path}: format {meta.get('format')!r} version {meta.get('version')!r}; "
                              f"expected {FORMAT!r} version {VERSION} (written by another program or "
                              f"another version of deqcore)")
    groups: dict[str, dict[str, np.ndarray]] = {g: {} for g in GROUPS}
    for key, value in arrays.items():
        group, _, name = key.partition("/")
        if group not in groups or not name:
            raise CheckpointError(f"{path}: unexpected entry {key!r} (entries are params/, state/ or extra/)")
        groups[group][name] = value
    return Checkpoint(meta, groups["params"], groups["state"], groups["extra"])


def _listing(items: list[str]) -> str:
    more = len(items) - _LISTED
    return ", ".join(items[:_LISTED]) + (f" and {more} more" if more > 0 else "")


def _array_differences(expected: Mapping[str, Spec], got: Mapping[str, Any]) -> dict[str, list[str]]:
    missing = sorted(set(expected) - set(got))
    unexpected = sorted(set(got) - set(expected))
    wrong = []
    for k in sorted(set(expected) & set(got)):
        shape, dtype = tuple(np.shape(got[k])), np.asarray(got[k]).dtype
        if shape != tuple(expected[k][0]) or dtype != expected[k][1]:
            wrong.append(f"{k}: {shape} {dtype} where the model has {tuple(expected[k][0])} {expected[k][1]}")
    return {"missing": missing, "unexpected": unexpected, "mismatched": wrong}


def nonfinite_arrays(arrays: Mapping[str, Any]) -> list[str]:
    """``"name (k of n values)"`` for each floating array holding NaN or Inf."""
    out = []
    for k in sorted(arrays):
        a = np.asarray(arrays[k])
        if np.issubdtype(a.dtype, np.inexact):
            bad = int(a.size - np.count_nonzero(np.isfinite(a)))
            if bad:
                out.append(f"{k} ({bad} of {a.size} values)")
    return out


_MISSING = object()


def _meta_differences(expected: Mapping[str, Any], got: Mapping[str, Any], prefix: str = "") -> list[str]:
    out = []
    for key, want in expected.items():
        have = got.get(key, _MISSING) if isinstance(got, Mapping) else _MISSING
        name = f"{prefix}{key}"
        if isinstance(want, Mapping) and isinstance(have, Mapping):
            out += _meta_differences(want, have, f"{name}.")
        elif have is _MISSING:
            out.append(f"{name} missing there vs {json_safe(want)!r} now")
        elif json_safe(have) != json_safe(want):
            out.append(f"{name} {json_safe(have)!r} there vs {json_safe(want)!r} now")
    return out


def check_checkpoint(ck: Checkpoint, schema: Schema, source: str = "checkpoint") -> None:
    """Raise :class:`CheckpointError` unless ``ck`` matches ``schema`` exactly: the same array
    names, shapes and dtypes in each group the schema lists, only finite floats (a checkpoint
    of NaN or Inf weights is refused: nothing it computes means anything), and the metadata
    the schema names. The one-line message lists every difference (up to 10 names of each
    kind, then how many more), metadata first; ``source`` names the file."""
    problems = [f"settings differ: {_listing(d)}" for d in [_meta_differences(schema.meta, ck.meta)] if d]
    for group, label in GROUPS.items():
        got = getattr(ck, group)
        if group in schema.arrays:
            for kind, items in _array_differences(schema.arrays[group], got).items():
                if items:
                    problems.append(f"{label} {kind} {len(items)}: {_listing(items)}")
        bad = nonfinite_arrays(got)
        if bad:
            problems.append(f"{label} with NaN or Inf values: {_listing(bad)}")
    if problems:
        raise CheckpointError(f"{source} does not match the model: " + " | ".join(problems))
