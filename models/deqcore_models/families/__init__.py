"""The model families, in one table: the command line, the training loop and the experiments
read :data:`FAMILIES` and nothing else to know which models exist.

Adding a family is one new module that builds a :class:`Family` (see
:mod:`deqcore_models.families.mdeq`) and one line here.
"""

from collections.abc import Mapping
from typing import Any

from ._base import ACCURACY, PERPLEXITY, Batch, Family, FrozenPieces, Metric, Workload, jacobian_probe
from .mdeq import MDEQ
from .transformer import TRANSFORMER

#: family name -> :class:`Family`
FAMILIES: dict[str, Family] = {f.name: f for f in (MDEQ, TRANSFORMER)}


def family(name: str) -> Family:
    """The family called ``name`` (a ``ValueError`` listing the families otherwise)."""
    try:
        return FAMILIES[name]
    except KeyError:
        raise ValueError(f"unknown model family {name!r}; available: {', '.join(FAMILIES)}") from None


def metric_in(results: Mapping[str, Any]) -> Metric:
    """The metric test ``results`` (a row of ``epochs.csv``, a summary's ``final``) are judged
    by: every run records its accuracy, and a family judged by another metric adds its key."""
    held = [f.metric for f in FAMILIES.values() if f.metric.key in results]
    return next((m for m in held if m.beside_accuracy), ACCURACY)


def hypersolver_defaults(size: str) -> str:
    """The default of a hypersolver size (``iterations``, ``width``, ``hidden``) in each family,
    as a help text says it."""
    return ", ".join(f"{f.hypersolver_sizes[size]} for {f.name}" for f in FAMILIES.values())


__all__ = ["ACCURACY", "FAMILIES", "PERPLEXITY", "Batch", "Family", "FrozenPieces", "Metric", "Workload",
           "family", "hypersolver_defaults", "jacobian_probe", "metric_in"]
