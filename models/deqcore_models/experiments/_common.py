"""What the experiments share: their output-folder rule and list-valued flags."""

from __future__ import annotations

import argparse
from pathlib import Path

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
