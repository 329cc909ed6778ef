"""``deqcore`` command line: train and evaluate DEQ models on local data, on PyTorch or JAX.

    deqcore train --backend torch --dataset fashion-mnist --data ../shared/data --epochs 1
    deqcore eval --run runs/mdeq                 # test accuracy of a run's latest checkpoint
    deqcore bench --backend jax                  # step time and NFE on a few batches
    deqcore hypersolver train --run runs/mdeq    # fit a HyperDEQ solver to the run's frozen model
    deqcore hypersolver eval --run runs/mdeq     # it against Anderson and Broyden on the test set

Run ``deqcore <command> --help`` for every flag.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from .._command_line import CommandParser, UsageError, report_flags, run_command
from . import bench, evaluate, hypersolver, train

#: The commands, each a module with ``add_parser(subparsers)`` and ``run(args) -> exit status``
#: (and ``prog(args)`` when its name has a second word).
COMMANDS = {"train": train, "eval": evaluate, "bench": bench, "hypersolver": hypersolver}


def build_parser() -> argparse.ArgumentParser:
    parser = CommandParser(prog="deqcore", description=__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True,
                                help=f"{', '.join(COMMANDS)} (each has --help)")
    for command in COMMANDS.values():
        command.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``deqcore`` with ``argv``; returns the exit status. A user error (a bad flag or
    combination, a data or checkpoint problem, a file that cannot be written) is one ``error:``
    line on stderr and status 2, before any data is loaded or file written where the check
    allows; a run that fails (a non-finite loss) or whose results are non-finite is status 1."""
    args = build_parser().parse_args(argv)
    command = COMMANDS[args.command]
    name = command.prog(args) if hasattr(command, "prog") else args.command
    return run_command(f"deqcore {name}", lambda: command.run(args))


__all__ = ["COMMANDS", "UsageError", "build_parser", "main", "report_flags", "run_command"]
