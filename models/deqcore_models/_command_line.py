"""What every command of the applications shares: one-line argument errors, ``KEY=VALUE`` flags,
and the mapping from errors to exit statuses (:func:`run_command`), used by the ``deqcore``
command (:mod:`deqcore_models.cli`) and ``python -m deqcore_models.experiments``."""

from __future__ import annotations

import argparse
import ast
import math
import sys
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

from deqcore import ConvergenceError

from .checkpoint import CheckpointError
from .data import DataError
from .train import ConfigError, WorkerLost


class UsageError(Exception):
    """A command-line mistake: ``main`` prints it as one ``error:`` line and exits with status 2."""


class CommandParser(argparse.ArgumentParser):
    """argparse with its errors on one line (the flag, what is wrong, where the help is)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def key_values(items: Sequence[str] | None, flag: str) -> dict[str, Any]:
    """``["memory=8", "line_search=True"]`` -> ``{"memory": 8, "line_search": True}``."""
    out: dict[str, Any] = {}
    for item in items or ():
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"{flag} expects KEY=VALUE, got {item!r}")
        if key.strip() in out:
            raise UsageError(f"{flag} sets {key.strip()!r} twice")
        try:
            value = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            value = raw  # a bare word such as anderson
        if isinstance(value, float) and not math.isfinite(value):
            raise UsageError(f"{flag} {item}: the value must be finite")
        out[key.strip()] = value
    return out


def one_line(text: str) -> str:
    return " ".join(str(text).split())


def check_ints(args: argparse.Namespace, names: tuple[str, ...], minimum: int) -> None:
    """A :class:`UsageError` for the first flag of ``names`` (attributes of ``args``) given below
    ``minimum``."""
    for name in names:
        value = getattr(args, name)
        if value is not None and value < minimum:
            raise UsageError(f"--{name.replace('_', '-')} must be an int >= {minimum}, got {value}")


def run_command(prog: str, command: Callable[[], int]) -> int:
    """``command()``'s exit status, with the errors a user can cause turned into one ``error:``
    line on stderr: status 2 for a user error (a bad setting or flag, a data, checkpoint or
    framework problem, a file that cannot be written), 1 for a run that failed (a diverged loss,
    a solve that did not converge with ``throw=True``, a data-parallel peer that stopped). Other
    exceptions are bugs and keep their traceback."""
    try:
        return command()
    except ConfigError as exc:
        print(f"{prog}: error: {one_line(exc.for_cli())}", file=sys.stderr)
        return 2
    except (UsageError, DataError, CheckpointError, ImportError, OSError) as exc:
        print(f"{prog}: error: {one_line(str(exc))}", file=sys.stderr)
        return 2
    except (FloatingPointError, ConvergenceError, WorkerLost) as exc:
        print(f"{prog}: error: {one_line(str(exc))}", file=sys.stderr)
        return 1


def report_flags(result: dict[str, Any]) -> int:
    """Print a result's ``flags`` and ``warnings`` on stderr, one line each; 1 if it has flags."""
    for line in result.get("flags", []):
        print(f"flagged: {one_line(line)}", file=sys.stderr)
    for line in result.get("warnings", []):
        print(f"warning: {one_line(line)}", file=sys.stderr)
    return 1 if result.get("flags") else 0
