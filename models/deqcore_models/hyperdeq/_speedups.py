"""Speedups at equal quality: cost ratios between a hypersolver's and a classic solver's rows
of :func:`~deqcore_models.hyperdeq.compare`, and their markdown tables."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from ..families import Metric

#: the costs :func:`speedups` compares: the whole test pass, its solve phase, and f evaluations
COSTS = ("seconds", "solve_seconds", "nfe")


def speedups(rows: Sequence[Mapping[str, Any]], method: str, baselines: Sequence[str], metric: Metric,
             slack: float | None = None, cost: str = "seconds") -> dict[str, Any]:
    """Cost ratios at equal quality. For each baseline the target is its best quality over the
    budgets, loosened by ``slack`` (default the metric's: 0.5 accuracy points, 2 % of the perplexity) so that
    test-set noise between neighbouring budgets does not decide it; the speedup is the
    baseline's cheapest row reaching the target divided by ``method``'s cheapest row reaching it.
    ``cost`` is a row field of :data:`COSTS`: ``"seconds"`` (the whole test pass),
    ``"solve_seconds"`` (up to the equilibrium state) or ``"nfe"`` (f evaluations per item,
    free of timing noise). Returns ``{baseline: {"target", "baseline_cost", "method_cost",
    "speedup"}}``; ``method_cost`` and ``speedup`` are None when the method never reaches the
    target."""
    if cost not in COSTS:
        raise ValueError(f"cost must be one of {', '.join(COSTS)}; got {cost!r}")
    out: dict[str, Any] = {}
    mine = sorted((r for r in rows if r["method"] == method), key=lambda r: r[cost])
    for base in baselines:
        theirs = sorted((r for r in rows if r["method"] == base), key=lambda r: r[cost])
        if not theirs or not mine:
            continue
        target = metric.loosened(metric.best(r["metric"] for r in theirs), slack)
        c_base = next(r[cost] for r in theirs if metric.at_least(r["metric"], target))
        hit = next((r for r in mine if metric.at_least(r["metric"], target)), None)
        out[base] = {"target": target, "baseline_cost": c_base,
                     "method_cost": None if hit is None else hit[cost],
                     "speedup": None if hit is None else c_base / hit[cost]}
    return out


def all_speedups(rows: Sequence[Mapping[str, Any]], methods: Sequence[str], baselines: Sequence[str],
                 metric: Metric) -> dict[str, Any]:
    """:func:`speedups` of every method against every baseline for every cost in :data:`COSTS`:
    ``{cost: {method: {baseline: ...}}}``."""
    return {cost: {m: speedups(rows, m, baselines, metric, cost=cost) for m in methods} for cost in COSTS}


def operating_points(rows: Sequence[Mapping[str, Any]], method: str, baseline: str, metric: Metric,
                     cost: str = "solve_seconds") -> list[dict[str, Any]]:
    """The Pareto view of :func:`speedups`: for each of ``baseline``'s rows (by budget), the
    cheapest row of ``method`` at least as good (no slack), and the cost ratio. Each item:
    ``{"budget", "metric", "baseline_cost", "method_budget", "method_cost", "speedup"}`` (the
    last three None when ``method`` never gets there)."""
    if cost not in COSTS:
        raise ValueError(f"cost must be one of {', '.join(COSTS)}; got {cost!r}")
    mine = sorted((r for r in rows if r["method"] == method), key=lambda r: r[cost])
    out = []
    for base in sorted((r for r in rows if r["method"] == baseline), key=lambda r: r["budget"]):
        good = [r for r in mine if metric.at_least(r["metric"], base["metric"])]
        hit = good[0] if good else None
        out.append({"budget": base["budget"], "metric": base["metric"], "baseline_cost": base[cost],
                    "method_budget": None if hit is None else hit["budget"],
                    "method_cost": None if hit is None else hit[cost],
                    "speedup": None if hit is None else base[cost] / hit[cost]})
    return out


def operating_points_table(rows: Sequence[Mapping[str, Any]], methods: Sequence[str],
                           baselines: Sequence[str], metric: Metric) -> list[str]:
    """Markdown: one line per hypersolver and baseline, one column per budget of the baseline;
    a cell is the solve-phase speedup at that budget's quality and the hypersolver's budget
    reaching it ("—": never)."""
    budgets = sorted({r["budget"] for r in rows})
    lines = ["| hypersolver | vs | " + " | ".join(f"@{b}" for b in budgets) + " |",
             "|---|---|" + "---|" * len(budgets)]
    for m in methods:
        for base in baselines:
            cells = {p["budget"]: "—" if p["speedup"] is None
                     else f"{p['speedup']:.2f}× (@{p['method_budget']})"
                     for p in operating_points(rows, m, base, metric)}
            lines.append(f"| {m} | {base} | " + " | ".join(cells.get(b, "") for b in budgets) + " |")
    return lines


def speedup_table(table: Mapping[str, Any], metric: Metric) -> list[str]:
    """Markdown rows of :func:`all_speedups`'s result: one line per hypersolver and baseline with
    the target and the speedup in f evaluations, solve time and whole-pass time ("—" where the
    hypersolver never reaches the target)."""
    lines = ["| hypersolver | vs | target | NFE (classic → hyper) | solve phase | whole test pass |",
             "|---|---|---|---|---|---|"]
    by_nfe = table["nfe"]
    for name, per in by_nfe.items():
        for base, v in per.items():
            target = f"{100 * v['target']:.2f} %" if metric.percent else f"{v['target']:.1f}"
            cells = []
            for cost in COSTS:
                w = table[cost][name][base]
                if w["speedup"] is None:
                    cells.append("—")
                elif cost == "nfe":
                    cells.append(f"{w['speedup']:.2f}× ({w['baseline_cost']} → {w['method_cost']})")
                else:
                    cells.append(f"{w['speedup']:.2f}× ({w['baseline_cost']:.2f} → {w['method_cost']:.2f} s)")
            nfe, solve_phase, whole = cells[2], cells[1], cells[0]
            lines.append(f"| {name} | {base} | {target} | {nfe} | {solve_phase} | {whole} |")
    return lines


