"""HyperDEQ on trained models: fit a hypersolver to a training run's frozen checkpoint, and compare
it with classic solvers on held-out data at equal budgets.

    model = load_frozen("runs/mdeq")                      # the run's checkpoint and data
    hs = make_hypersolver(model)                          # K = 3, sizes per model family
    hs, history = fit(model, hs, steps=300)
    rows = compare(model, {"anderson": "anderson", "hyper": hs}, budgets=[2, 4, 8])

Used by ``deqcore hypersolver train|eval`` and ``python -m deqcore_models.experiments hyperdeq``.
The model runs in evaluation mode (BatchNorm running statistics, no dropout) on either backend,
whatever backend trained it (checkpoints are framework-neutral).

Loading (:func:`load_frozen`), fitting (:func:`fit`), comparison (:func:`compare`), the speedup
arithmetic (:func:`speedups`) and the plots (:func:`write_plots`) each have a module here.
"""

from ._comparison import compare
from ._fitting import fit, save_history, training_cost, training_inputs
from ._frozen_model import FrozenModel, load_for, load_frozen, make_hypersolver
from ._plots import write_plots
from ._speedups import COSTS, all_speedups, operating_points, operating_points_table, speedup_table, speedups

__all__ = ["COSTS", "FrozenModel", "all_speedups", "compare", "fit", "load_for", "load_frozen",
           "make_hypersolver", "operating_points", "operating_points_table", "save_history", "speedup_table",
           "speedups", "training_cost", "training_inputs", "write_plots"]
