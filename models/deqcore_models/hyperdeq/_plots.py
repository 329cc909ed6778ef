"""The plots of a solver comparison: residual against f evaluations, quality against time."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .._results_files import pyplot, save_figure
from ..families import Metric


def write_plots(rows: Sequence[Mapping[str, Any]], out: Path, metric: Metric, title: str = "") -> list[str]:
    """``residual.png`` (mean relative residual vs NFE) and ``pareto.png`` (accuracy or
    perplexity vs seconds, of the whole test pass and of its solve phase; zoomed to the
    quality range near the best, the full numbers are in the rows) of :func:`compare`'s rows;
    [] without matplotlib."""
    plt = pyplot()
    if plt is None:
        return []
    out.mkdir(parents=True, exist_ok=True)
    methods = list(dict.fromkeys(r["method"] for r in rows))

    def series(m: str, x_key: str, y_key: str) -> tuple[list[float], list[float]]:
        pts = [(r[x_key], r[y_key]) for r in sorted(rows, key=lambda r: r["budget"]) if r["method"] == m]
        return [p[0] for p in pts], [metric.shown(p[1]) if y_key == "metric" else p[1] for p in pts]

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for m in methods:
        ax.plot(*series(m, "nfe", "residual"), "o-", ms=3, label=m)
    ax.set_yscale("log")
    ax.set(xlabel="NFE (f evaluations)", ylabel="mean relative residual", title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, out / "residual.png")

    metrics = [r["metric"] for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.4), sharey=True)
    for ax, key, label in ((axes[0], "seconds", "seconds per test pass"),
                           (axes[1], "solve_seconds", "seconds of its solve phase")):
        for m in methods:
            ax.plot(*series(m, key, "metric"), "o-", ms=3, label=m)
        ax.set(xlabel=label)
        ax.grid(alpha=0.3)
    if metric.higher_is_better:  # zoomed to 8 points below the best
        shown = [metric.shown(v) for v in metrics]
        best = max(shown)
        axes[0].set_ylim(max(min(shown), best - 8.0) - 0.3, best + 0.3)
    else:  # on a log scale, up to 3 times the best
        best = min(metrics)
        axes[0].set_yscale("log")
        axes[0].set_ylim(0.97 * best, min(max(metrics), 3.0 * best) * 1.03)
    axes[0].set_ylabel(f"test {metric.label()} (zoomed)")
    axes[1].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    save_figure(fig, out / "pareto.png")
    return [str(out / "residual.png"), str(out / "pareto.png")]
