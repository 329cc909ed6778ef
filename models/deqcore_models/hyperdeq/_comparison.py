"""Classic solvers and hypersolvers on a frozen model's test set, at equal budgets and timed."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

import deqcore
from deqcore.hypersolvers import Hypersolver

from ._frozen_model import FrozenModel


def _test_batches(model: FrozenModel) -> list[tuple[Any, Any, int]]:
    """``(x, y, items)`` of the test set as framework arrays, as the family's
    ``comparison_batch`` takes them."""
    out = []
    for x, y, _ in model.work.eval_batches():
        taken = model.family.comparison_batch(model.work, x, y)
        if taken is not None:
            out.append((model.ops.asarray(x), model.ops.asarray(taken[0]), taken[1]))
    return out


def _phases(model: FrozenModel, spec: Any, budget: int) -> tuple[Callable[..., Any], ...]:
    """The two timed phases of one method at one budget, each compiled on JAX and taking the
    model's arrays as arguments: ``solve(x, P, S) -> (z, rel residual (B,))``: the injection,
    the hypersolver's initialiser (or the start) and exactly ``budget`` solver steps;
    ``score(z, y, P, S) -> (summed cross-entropy, correct predictions)``: the output layer and
    loss, on the device (a language model's vocabulary-sized scores never leave it)."""
    be = deqcore.registry().backend(model.backend)
    xp = model.ops.xp
    name, start = (spec, None) if not isinstance(spec, tuple) else spec

    def solve(x: Any, P: dict[str, Any], S: dict[str, Any]) -> tuple[Any, Any]:
        parts = model.rebuild(P, S)
        inj = parts.inject(x)
        if isinstance(name, Hypersolver) and getattr(name, "initialiser", None) is not None:
            z0 = None  # the hypersolver's own initialiser
        elif start is not None:
            z0 = start.initial_state(be, inj, inj)
        else:
            z0 = model.zeros(inj)
        sol = deqcore.solve(parts.layer, inj, z0, backend=model.backend, solver=name, max_iter=budget,
                            tol=1e-30, grad=None)
        return sol.z, sol.rel_residual

    def score(z: Any, y: Any, P: dict[str, Any], S: dict[str, Any]) -> tuple[Any, Any]:
        return model.family.score(xp, model.rebuild(P, S).head(z), y)

    return be.jit(solve), be.jit(score)


def compare(model: FrozenModel, methods: Mapping[str, Any], budgets: Sequence[int], repeats: int = 1,
            progress: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """Every method at every budget on the model's test set: one row each with ``method``,
    ``budget`` (solver steps; NFE = budget + 1), ``metric`` (the family's: test accuracy,
    perplexity), ``loss``, ``residual`` (mean relative residual), ``seconds`` (wall time of the whole
    test pass) and ``solve_seconds`` (its part up to the equilibrium state: injection,
    initialiser or start, solver steps; the rest is the output layer and the loss).
    Times are the fastest of ``repeats`` passes, each after a warm-up batch that compiles on
    JAX; every phase is synchronised before its clock stops.

    A method is a classic solver name, a hypersolver, or ``(solver name, hypersolver)``: that
    solver started from the hypersolver's initialiser. Every solve runs exactly ``budget`` steps
    (no early stop)."""
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats must be an int >= 1, got {repeats!r}")
    batches = _test_batches(model)
    if not batches:
        raise ValueError("the test set is empty (or shorter than one segment)")
    to_numpy = model.ops.to_numpy
    metric = model.family.metric
    rows = []
    for label, spec in methods.items():
        for budget in budgets:
            solve, score = _phases(model, spec, int(budget))
            x0, y0, _ = batches[0]
            P, S = model.arrays
            z, rel = solve(x0, P, S)
            to_numpy(score(z, y0, P, S)[0])  # warm-up / compile
            best_total = best_solve = math.inf
            for _ in range(repeats):
                loss = correct = res = 0.0
                t_solve = t_other = 0.0
                for x, y, _ in batches:
                    t0 = time.perf_counter()
                    z, rel = solve(x, P, S)
                    r = to_numpy(rel)
                    t1 = time.perf_counter()
                    total, hits = score(z, y, P, S)
                    total, hits = float(to_numpy(total)), float(to_numpy(hits))
                    t2 = time.perf_counter()
                    t_solve += t1 - t0
                    t_other += t2 - t1
                    loss += total
                    correct += hits
                    res += float(np.asarray(r, np.float64).sum())
                best_total = min(best_total, t_solve + t_other)
                best_solve = min(best_solve, t_solve)
            count = sum(n for _, _, n in batches)
            items = sum(int(x.shape[0]) for x, _, _ in batches)
            mean_loss, accuracy = loss / count, correct / count
            row: dict[str, Any] = {
                "method": label, "budget": int(budget), "nfe": int(budget) + 1, "items": int(count),
                "loss": mean_loss, "accuracy": accuracy, "residual": res / items, "seconds": best_total,
                "solve_seconds": best_solve,
                "metric": metric.value(mean_loss, accuracy)}
            rows.append(row)
            if progress is not None:
                progress(f"{label} @ {budget}: {metric.short} {metric.shown(row['metric']):.2f}"
                         f"{' %' if metric.percent else ''}, residual {row['residual']:.3e}, "
                         f"{best_total:.2f} s (solve {best_solve:.2f} s)")
    return rows


