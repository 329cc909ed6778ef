"""Per-framework training glue: gradients of a task's loss and the Adam update.

Both engines implement the same optimizer: optional clipping of the gradient's global norm to
``clip_norm``, then Adam (betas 0.9/0.999, eps 1e-8) with L2 weight decay added to the (clipped)
gradient (torch's ``Adam(weight_decay=...)``), and a learning rate passed in per step (the
schedule lives in the framework-neutral training loop). PyTorch uses ``clip_grad_norm_`` and
``torch.optim.Adam``; JAX uses optax (``clip_by_global_norm``, ``add_decayed_weights``, then
``scale_by_adam``). The two clips differ only in torch's 1e-6 added to the norm. Optimizer
moments export to the same names on both (``opt.m/<param>``, ``opt.v/<param>``, ``opt.step``), so
a checkpoint resumes on either backend. ``load`` accepts only arrays of exactly the engine's
names, shapes and dtypes (:func:`~deqcore_models.checkpoint.check_checkpoint` against
:meth:`schema`): nothing is broadcast, and no parameter silently keeps its initial value.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ._equilibrium_layer import DEQSettings, collect_backward_reports, worst_backward_residual
from ._ops import ops_for
from .checkpoint import Checkpoint, Schema, array_specs, check_checkpoint


def optimizer_specs(params: dict[str, np.ndarray]) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """The names, shapes and dtypes of the optimizer state both engines export for ``params``
    (NumPy): Adam's moments like each parameter and the step count, an int64 scalar."""
    specs = {}
    for k, (shape, dtype) in array_specs(params).items():
        specs[f"opt.m/{k}"] = specs[f"opt.v/{k}"] = (shape, dtype)
    specs["opt.step"] = ((), np.dtype(np.int64))
    return specs


class _Engine:
    """What both engines share: their checkpoint schema and the check before ``load``."""

    params: dict[str, Any]
    state: dict[str, Any]

    def export(self) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], dict[str, np.ndarray]]:
        raise NotImplementedError

    def schema(self) -> Schema:
        """The arrays :meth:`load` takes: the engine's parameters and state as they are, and the
        optimizer state of :func:`optimizer_specs`."""
        params, state, _ = self.export()
        return Schema({"params": array_specs(params), "state": array_specs(state),
                       "extra": optimizer_specs(params)})

    def _check_load(self, params, state, extra) -> None:
        check_checkpoint(Checkpoint({}, dict(params), dict(state), dict(extra)), self.schema(),
                         f"{type(self).__name__}.load")


class TorchEngine(_Engine):
    def __init__(self, task: Any, params: dict[str, np.ndarray], state: dict[str, np.ndarray],
                 weight_decay: float, clip_norm: float | None = None) -> None:
        import torch

        self._torch = torch
        self.clip_norm = clip_norm
        self.ops = ops_for("torch")
        self.task = task
        self.params = {k: self.ops.asarray(v).requires_grad_(True) for k, v in params.items()}
        self.state = {k: self.ops.asarray(v) for k, v in state.items()}
        self.opt = torch.optim.Adam(list(self.params.values()), lr=1e-3, weight_decay=weight_decay)

    def train_step(self, x, y, masks, settings: DEQSettings, lr: float, probe=None) -> dict[str, float]:
        """One Adam step on a batch; ``probe`` (NumPy Hutchinson noise or None) adds the Jacobian
        penalty. Returns loss, correct count, NFE, worst residual and the penalty (NaN without)."""
        torch = self._torch
        for group in self.opt.param_groups:
            group["lr"] = lr
        self.opt.zero_grad(set_to_none=True)
        M = _framework(self.ops, masks)
        with collect_backward_reports() as reports:
            loss, (new_state, correct, nfe, res, jac, _) = self.task.loss(
                self.ops, self.params, self.state, self.ops.asarray(x), self.ops.asarray(y), M, settings,
                True, _framework(self.ops, probe))
        loss.backward()
        if self.clip_norm is not None:
            torch.nn.utils.clip_grad_norm_(list(self.params.values()), self.clip_norm)
        self.opt.step()
        with torch.no_grad():
            self.state = {k: v.detach() for k, v in new_state.items()}
        return {"loss": float(loss.detach()), "correct": int(correct), "nfe": int(nfe),
                "residual": float(res), "jac": float(jac.detach()),
                "bwd_residual": worst_backward_residual(reports)}

    def gradients(self, x, y, masks, settings: DEQSettings) -> dict[str, np.ndarray]:
        """Parameter gradients of the batch loss, with no update and no state change."""
        M = _framework(self.ops, masks)
        loss, _ = self.task.loss(self.ops, self.params, self.state, self.ops.asarray(x), self.ops.asarray(y),
                                 M, settings, True)
        names = list(self.params)
        grads = self._torch.autograd.grad(loss, [self.params[k] for k in names], allow_unused=True)
        return {k: (np.zeros(self.params[k].shape, np.float32) if g is None else self.ops.to_numpy(g))
                for k, g in zip(names, grads, strict=True)}

    def evaluate(self, x, y, settings: DEQSettings, state: dict[str, Any] | None = None) -> dict[str, Any]:
        """Loss, correct count, NFE and residual of a batch without dropout; ``state`` (NumPy or
        framework arrays) replaces the engine's for this call; ``"state"`` in the result is the
        model state after it (a language model's memory)."""
        S = self.state if state is None else _framework(self.ops, state)
        with self._torch.no_grad():
            loss, (new_state, correct, nfe, res, _, _) = self.task.loss(
                self.ops, self.params, S, self.ops.asarray(x), self.ops.asarray(y), None, settings, False)
        return {"loss": float(loss), "correct": int(correct), "nfe": int(nfe), "residual": float(res),
                "state": new_state}

    def set_state(self, state: dict[str, np.ndarray]) -> None:
        self.state = _framework(self.ops, state)

    def export(self) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], dict[str, np.ndarray]]:
        params = {k: self.ops.to_numpy(v).copy() for k, v in self.params.items()}
        state = {k: self.ops.to_numpy(v).copy() for k, v in self.state.items()}
        extra: dict[str, np.ndarray] = {}
        step = 0
        for k, p in self.params.items():
            st = self.opt.state.get(p)
            if st:
                extra[f"opt.m/{k}"] = self.ops.to_numpy(st["exp_avg"]).copy()
                extra[f"opt.v/{k}"] = self.ops.to_numpy(st["exp_avg_sq"]).copy()
                step = int(st["step"])
            else:  # no step yet, or a parameter without a gradient: Adam's moments are zero
                extra[f"opt.m/{k}"] = np.zeros_like(params[k])
                extra[f"opt.v/{k}"] = np.zeros_like(params[k])
        extra["opt.step"] = np.asarray(step, np.int64)
        return params, state, extra

    def load(self, params, state, extra) -> None:
        """Set parameters, state and optimizer state from NumPy arrays of exactly the engine's
        :meth:`schema` (a :class:`~deqcore_models.checkpoint.CheckpointError` lists every
        difference; nothing is changed then)."""
        self._check_load(params, state, extra)
        torch = self._torch
        with torch.no_grad():
            for k, v in params.items():
                self.params[k].copy_(torch.from_numpy(np.asarray(v)))
        self.state = {k: self.ops.asarray(v) for k, v in state.items()}
        step = int(extra.get("opt.step", 0))
        if step:
            for k, p in self.params.items():
                self.opt.state[p] = {"step": torch.tensor(float(step)),
                                     "exp_avg": self.ops.asarray(extra[f"opt.m/{k}"]),
                                     "exp_avg_sq": self.ops.asarray(extra[f"opt.v/{k}"])}


class JaxEngine(_Engine):
    def __init__(self, task: Any, params: dict[str, np.ndarray], state: dict[str, np.ndarray],
                 weight_decay: float, clip_norm: float | None = None) -> None:
        import jax
        import optax

        self._jax, self._optax = jax, optax
        self.ops = ops_for("jax")
        self.task = task
        self.params = {k: self.ops.asarray(v) for k, v in params.items()}
        self.state = {k: self.ops.asarray(v) for k, v in state.items()}
        clip = [] if clip_norm is None else [optax.clip_by_global_norm(clip_norm)]
        self.tx = optax.chain(*clip, optax.add_decayed_weights(weight_decay), optax.scale_by_adam())
        self.opt_state = self.tx.init(self.params)
        self._steps: dict[str, Any] = {}
        self._evals: dict[str, Any] = {}
        self._reports: dict[tuple[str, bool], list[Any]] = {}

    def _train_fn(self, settings: DEQSettings):
        key = repr(settings)
        if key not in self._steps:
            jax, ops, task, tx = self._jax, self.ops, self.task, self.tx

            def step(params, state, opt_state, x, y, masks, lr, probe):
                def lossf(p):
                    return task.loss(ops, p, state, x, y, masks, settings, True, probe)

                value_and_grad = jax.value_and_grad(lossf, has_aux=True)
                (loss, (new_state, correct, nfe, res, jac, _)), grads = value_and_grad(params)
                updates, opt_state = tx.update(grads, opt_state, params)
                params = jax.tree_util.tree_map(lambda p, u: p - lr * u, params, updates)
                return params, new_state, opt_state, loss, correct, nfe, res, jac

            self._steps[key] = jax.jit(step)
        return self._steps[key]

    def train_step(self, x, y, masks, settings: DEQSettings, lr: float, probe=None) -> dict[str, float]:
        """As :meth:`TorchEngine.train_step` (a step with a probe and one without compile apart)."""
        M = _framework(self.ops, masks)
        # the reports are made while the step is traced and filled each time it runs
        with collect_backward_reports() as traced:
            out = self._train_fn(settings)(self.params, self.state, self.opt_state, self.ops.asarray(x),
                                           self.ops.asarray(y), M, np.float32(lr),
                                           _framework(self.ops, probe))
        key = (repr(settings), probe is None)
        if traced:
            self._reports[key] = traced
        self.params, self.state, self.opt_state, loss, correct, nfe, res, jac = out
        return {"loss": float(loss), "correct": int(correct), "nfe": int(nfe), "residual": float(res),
                "jac": float(jac), "bwd_residual": worst_backward_residual(self._reports.get(key, []))}

    def evaluate(self, x, y, settings: DEQSettings, state: dict[str, Any] | None = None) -> dict[str, Any]:
        """As :meth:`TorchEngine.evaluate`."""
        key = repr(settings)
        if key not in self._evals:
            ops, task = self.ops, self.task

            def ev(params, state, x, y):
                loss, (new_state, correct, nfe, res, _, _) = task.loss(ops, params, state, x, y, None,
                                                                       settings, False)
                return loss, correct, nfe, res, new_state

            self._evals[key] = self._jax.jit(ev)
        S = self.state if state is None else _framework(self.ops, state)
        loss, correct, nfe, res, new_state = self._evals[key](self.params, S, self.ops.asarray(x),
                                                              self.ops.asarray(y))
        return {"loss": float(loss), "correct": int(correct), "nfe": int(nfe), "residual": float(res),
                "state": new_state}

    def set_state(self, state: dict[str, np.ndarray]) -> None:
        self.state = _framework(self.ops, state)

    def gradients(self, x, y, masks, settings: DEQSettings) -> dict[str, np.ndarray]:
        """Parameter gradients of the batch loss, with no update and no state change."""
        key = "grad:" + repr(settings)
        if key not in self._evals:
            jax, ops, task = self._jax, self.ops, self.task

            def grads(params, state, x, y, masks):
                return jax.grad(lambda p: task.loss(ops, p, state, x, y, masks, settings, True)[0])(params)

            self._evals[key] = jax.jit(grads)
        M = _framework(self.ops, masks)
        g = self._evals[key](self.params, self.state, self.ops.asarray(x), self.ops.asarray(y), M)
        return {k: np.asarray(v) for k, v in g.items()}

    def _adam_index(self) -> int:
        return next(i for i, s in enumerate(self.opt_state) if isinstance(s, self._optax.ScaleByAdamState))

    def _adam_state(self):
        return self.opt_state[self._adam_index()]

    def export(self):
        params = {k: np.asarray(v).copy() for k, v in self.params.items()}
        state = {k: np.asarray(v).copy() for k, v in self.state.items()}
        adam = self._adam_state()
        extra = {f"opt.m/{k}": np.asarray(v).copy() for k, v in adam.mu.items()}
        extra.update({f"opt.v/{k}": np.asarray(v).copy() for k, v in adam.nu.items()})
        extra["opt.step"] = np.asarray(int(adam.count), np.int64)
        return params, state, extra

    def load(self, params, state, extra) -> None:
        """As :meth:`TorchEngine.load`."""
        self._check_load(params, state, extra)
        jnp = self.ops.xp
        self.params = {k: jnp.asarray(v) for k, v in params.items()}
        self.state = {k: jnp.asarray(v) for k, v in state.items()}
        self.opt_state = self.tx.init(self.params)
        step = int(extra.get("opt.step", 0))
        if step:
            adam = self._adam_state()
            adam = adam._replace(count=jnp.asarray(step, dtype=adam.count.dtype),
                                 mu={k: jnp.asarray(extra[f"opt.m/{k}"]) for k in self.params},
                                 nu={k: jnp.asarray(extra[f"opt.v/{k}"]) for k in self.params})
            i = self._adam_index()
            self.opt_state = (*self.opt_state[:i], adam, *self.opt_state[i + 1:])


def _framework(ops: Any, tree: Any) -> Any:
    """NumPy masks or state (None, a list or a dict of arrays) as framework arrays; framework
    arrays pass through unchanged."""
    if tree is None:
        return None
    if isinstance(tree, dict):
        return {k: ops.asarray(v) if isinstance(v, np.ndarray) else v for k, v in tree.items()}
    return [ops.asarray(v) if isinstance(v, np.ndarray) else v for v in tree]


_ENGINES: dict[str, tuple[tuple[str, ...], str, str]] = {
    "torch": (("torch",), "'torch==2.13.0'", "PyTorch"),
    "jax": (("jax", "optax"), "'deqcore[jax]'", "JAX and optax"),
}


def require_framework(backend: str) -> None:
    """Raise ``ImportError`` (saying what to install) unless ``backend``'s framework is installed;
    looks for the packages without importing them."""
    import importlib.util

    if backend not in _ENGINES:
        raise ValueError(f"unknown backend {backend!r}; training supports 'torch' and 'jax'")
    modules, extra, what = _ENGINES[backend]
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise ImportError(f"backend {backend!r} needs {what}, which is not installed (no module "
                          f"{', '.join(missing)}); install it with pip install {extra}")


def make_engine(backend: str, task: Any, params, state, weight_decay: float, clip_norm: float | None = None):
    """The training engine of ``backend`` (``"torch"`` or ``"jax"``): Adam with L2
    ``weight_decay``, after clipping the gradient's global norm to ``clip_norm`` (None: no
    clipping). A missing framework is an ``ImportError`` saying what to install."""
    require_framework(backend)
    cls = {"torch": TorchEngine, "jax": JaxEngine}[backend]
    _, extra, what = _ENGINES[backend]
    try:
        return cls(task, params, state, weight_decay, clip_norm)
    except ModuleNotFoundError as exc:
        raise ImportError(f"backend {backend!r} needs {what}, which is not installed ({exc}); "
                          f"install it with pip install {extra}") from exc
