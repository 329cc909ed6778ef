"""What the experiments share: their output-folder rule and list-valued flags."""

from __future__ import annotations

import argparse
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from .._command_line import UsageError


def refuse_existing(out: Path, overwrite: bool, names: tuple[str, ...] | None = None) -> None:
    """Refuse an output folder that already holds results (any file, or one of ``names``)
    unless ``overwrite``."""
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file, not a folder")
    held = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if names is not None:
        held = [n for n in held if n in names]
    if held and not overwrite:
        raise UsageError(f"--out {out} already holds {', '.join(held[:6])}"
                         f"{' ...' if len(held) > 6 else ''}: pass --overwrite to replace, or choose another "
                         f"--out")


def int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one integer")
    return values


def names(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


def check_names(flag: str, given: list[str], known: Iterable[str]) -> None:
    """A :class:`UsageError` unless ``given`` is a non-empty list of ``known`` names."""
    known = list(known)
    unknown = [v for v in given if v not in known]
    if unknown or not given:
        raise UsageError(f"{flag}: unknown {', '.join(unknown) or '(none given)'}; available: "
                         f"{', '.join(known)}")


def add_output_flags(p: argparse.ArgumentParser, out: str | None = None) -> None:
    """``--out`` (required unless it has a default), ``--overwrite`` and ``--no-progress``."""
    p.add_argument("--out", default=out, required=out is None,
                   help="output folder" + ("" if out is None else f" (default {out})"))
    p.add_argument("--overwrite", action="store_true", help="replace the results in a non-empty --out")
    p.add_argument("--no-progress", action="store_true", help="no progress lines")


def command_line(experiment: str, args: Mapping[str, Any], skip: Iterable[str] = ()) -> str:
    """The command that reproduces an experiment from its saved arguments (``vars(args)``): flags
    left at None or False and the names in ``skip`` are left out, the data folder is written as
    DATA."""
    words = [f"python -m deqcore_models.experiments {experiment}"]
    for key, value in args.items():
        if key == "experiment" or key in skip or value is None or value is False:
            continue
        flag = "--" + key.replace("_", "-")
        if key == "data":
            value = "DATA"
        words.append(flag if value is True else
                     f"{flag} {','.join(map(str, value)) if isinstance(value, list) else value}")
    return " ".join(words)
