"""The pages of a training run: its ``epochs.csv`` as a table."""

from __future__ import annotations

from pathlib import Path

from ..doc_blocks import load, renderer
from ..families import metric_in


@renderer("run.epochs")
def render_run_epochs(source: Path) -> str:
    """A training run's ``epochs.csv`` as a table: the test metric of its family, the training
    accuracy (or loss, for a family judged by another metric) and the seconds of training steps
    per epoch."""
    rows = load(source)
    metric = metric_in(rows[0] if rows else {})
    by_accuracy = not metric.beside_accuracy
    second = "train accuracy" if by_accuracy else "train loss"
    lines = [f"| epoch | test {metric.name} | {second} | seconds (training steps) |", "|---|---|---|---|"]
    for r in rows:
        test = f"{metric.shown(r[metric.key]):.2f} %" if metric.percent else f"{r[metric.key]:.1f}"
        train = f"{100 * r['train_acc']:.2f} %" if by_accuracy else f"{r['train_loss']:.3f}"
        lines.append(f"| {r['epoch']} | {test} | {train} | {r['train_seconds']:.0f} |")
    return "\n".join(lines) + "\n"
