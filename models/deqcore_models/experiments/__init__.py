"""The model experiments, one command each; results, tables and plots go to ``--out``.

    python -m deqcore_models.experiments gdeq --data ../shared/data --out docs/experiments/gdeq-fmnist

``gdeq``: MDEQ trained with every gradient mode, with and without unrolled pre-training
(:mod:`~deqcore_models.experiments.gdeq`).

    python -m deqcore_models.experiments backends RUN_A RUN_B --out DIR

    python -m deqcore_models.experiments hyperdeq --run RUN --out docs/experiments/hyperdeq-fmnist

``hyperdeq``: HyperDEQ on a trained run: fits the hypersolver and its ablations (no initialiser,
softmax weights, the "newest" prior) to the frozen model, then runs them, Anderson, Broyden and
Anderson from the learned initialiser at every budget on the test set: residual vs NFE and
accuracy (perplexity) vs time plots, the speedup at equal quality, parameter and training-time
ratios; writes results.md, results.json, residual.png, pareto.png, training.png.

Every table these commands write is a generated block (:mod:`deqcore_models.docs_numbers`) rendered
from the results files they write, and a rerun renders the blocks of an existing ``README.md`` in
``--out`` again, so a report's hand-written reading never disagrees with its numbers.

    python -m deqcore_models.experiments reversible --model mdeq --seconds 600 --out DIR

``reversible``: the reversible solver with its reversed gradient against Broyden with the implicit
and the GDEQ gradient, each trained for the same wall time (a pilot run measures each setting's
step time): test metric, NFE, step time, bytes kept for backward, loss over time
(:mod:`~deqcore_models.experiments.reversible`).

``backends``: compares two training runs of the same command on different backends (their
``steps.csv`` and ``summary.json``): per-step loss difference, final test metrics, median step
time ratio; writes ``backends.md``, ``backends.json`` and ``backends.png`` (both loss curves).

Each experiment is a module here that owns its parser and its handler (``add_parser(sub)``,
``run(args)``) and registers the renderers of its pages.
"""

from __future__ import annotations

import argparse

from .._command_line import CommandParser, run_command
from . import backends, gdeq, hyperdeq, reversible, training_runs
from .backends import BACKEND_FILES, compare_backends
from .gdeq import MODES, gdeq_configs, run_gdeq
from .hyperdeq import HYPERDEQ_GOALS, VARIANTS, run_hyperdeq

PROG = "python -m deqcore_models.experiments"
#: experiment name -> its module
EXPERIMENTS = {"gdeq": gdeq, "hyperdeq": hyperdeq, "reversible": reversible, "backends": backends}


def build_parser() -> argparse.ArgumentParser:
    parser = CommandParser(prog=PROG, description=__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="experiment", required=True)
    for experiment in EXPERIMENTS.values():
        experiment.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run an experiment; a user error (a bad flag, data or checkpoint, an output folder that
    already holds results, a file that cannot be written) is one ``error:`` line and exit
    status 2, checked before any run starts where it can be."""
    args = build_parser().parse_args(argv)
    return run_command(f"{PROG} {args.experiment}", lambda: EXPERIMENTS[args.experiment].run(args))


__all__ = ["BACKEND_FILES", "EXPERIMENTS", "HYPERDEQ_GOALS", "MODES", "VARIANTS", "build_parser",
           "compare_backends", "gdeq_configs", "main", "run_gdeq", "run_hyperdeq", "training_runs"]
