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

The JAX engine runs on one device, or data-parallel on a 1-D mesh of several local devices
(axis ``"batch"``): parameters, optimizer state and model state replicated, each step's inputs,
targets, dropout masks and Jacobian probe split along axis 0. The compiled step is the
one-device step (loss and BatchNorm statistics over the global batch), so any device count
computes the same step; XLA adds the collectives.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ._equilibrium_layer import (
    DEQSettings,
    collect_backward_reports,
    collect_forward_solves,
    fixed_points,
    starting_from,
    worst_backward_residual,
)
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
    """What both engines share: converting batches, masks and state to framework arrays, the
    result records of a step and an evaluation, the checkpoint schema and the check before
    ``load``. An engine implements the framework's part: ``_step``, ``_evaluate``,
    ``_gradients``, and the optimizer state's export and load."""

    backend: str
    #: How many devices share each batch.
    device_count = 1
    #: Whether the solves a step runs are eager arrays after it (not traced by a compiler).
    eager = True

    def __init__(self, task: Any, params: dict[str, np.ndarray], state: dict[str, np.ndarray],
                 weight_decay: float, clip_norm: float | None = None) -> None:
        self.ops = ops_for(self.backend)
        self.task = task
        self.clip_norm = clip_norm
        self.params = {k: self.ops.asarray(v) for k, v in params.items()}
        self.state = {k: self.ops.asarray(v) for k, v in state.items()}

    def _arrays(self, tree: Any) -> Any:
        """NumPy masks or state (None, a list or a dict of arrays) as framework arrays;
        framework arrays pass through unchanged."""
        if tree is None:
            return None
        if isinstance(tree, dict):
            return {k: self.ops.asarray(v) if isinstance(v, np.ndarray) else v for k, v in tree.items()}
        return [self.ops.asarray(v) if isinstance(v, np.ndarray) else v for v in tree]

    def train_step(self, x, y, masks, settings: DEQSettings, lr: float, probe=None, z0=None,
                   keep_solution: bool = False) -> dict[str, Any]:
        """One Adam step on a batch; ``probe`` (NumPy Hutchinson noise or None) adds the Jacobian
        penalty. Returns loss, correct count, NFE, worst residual, the penalty (NaN without) and
        the worst residual of the step's implicit backward solves (NaN without). ``z0``
        (framework arrays with the equilibrium state's structure, or None for the model's start)
        warm-starts the equilibrium solve; ``keep_solution`` adds its ``"solution"`` (the
        :func:`~deqcore_models._equilibrium_layer.fixed_points` a warm-start cache stores)."""
        loss, correct, nfe, res, jac, reports, solution = self._step(
            self.ops.asarray(x), self.ops.asarray(y), self._arrays(masks), settings, lr, self._arrays(probe),
            z0, keep_solution)
        out = {"loss": float(loss), "correct": int(correct), "nfe": int(nfe), "residual": float(res),
               "jac": float(jac), "bwd_residual": worst_backward_residual(reports)}
        if keep_solution:
            out["solution"] = solution
        return out

    def evaluate(self, x, y, settings: DEQSettings, state: dict[str, Any] | None = None) -> dict[str, Any]:
        """Loss, correct count, NFE and residual of a batch without dropout; ``state`` (NumPy or
        framework arrays) replaces the engine's for this call; ``"state"`` in the result is the
        model state after it (a language model's memory)."""
        S = self.state if state is None else self._arrays(state)
        loss, correct, nfe, res, new_state = self._evaluate(S, self.ops.asarray(x), self.ops.asarray(y),
                                                            settings)
        return {"loss": float(loss), "correct": int(correct), "nfe": int(nfe), "residual": float(res),
                "state": new_state}

    def gradients(self, x, y, masks, settings: DEQSettings) -> dict[str, np.ndarray]:
        """Parameter gradients of the batch loss, with no update and no state change (zeros for
        a parameter the loss does not use)."""
        grads = self._gradients(self.ops.asarray(x), self.ops.asarray(y), self._arrays(masks), settings)
        to_numpy = self.ops.to_numpy
        return {k: np.zeros(self.params[k].shape, np.float32) if g is None else np.asarray(to_numpy(g))
                for k, g in grads.items()}

    def set_state(self, state: dict[str, np.ndarray]) -> None:
        self.state = self._arrays(state)

    def export(self) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], dict[str, np.ndarray]]:
        """Parameters, state and optimizer state (:func:`optimizer_specs`) as NumPy copies."""
        params = {k: np.array(self.ops.to_numpy(v)) for k, v in self.params.items()}
        state = {k: np.array(self.ops.to_numpy(v)) for k, v in self.state.items()}
        moments, step = self._adam_moments()
        extra: dict[str, np.ndarray] = {}
        for k in params:  # no step yet, or a parameter without a gradient: Adam's moments are zero
            m, v = moments.get(k, (None, None))
            extra[f"opt.m/{k}"] = np.zeros_like(params[k]) if m is None else np.array(self.ops.to_numpy(m))
            extra[f"opt.v/{k}"] = np.zeros_like(params[k]) if v is None else np.array(self.ops.to_numpy(v))
        extra["opt.step"] = np.asarray(step, np.int64)
        return params, state, extra

    def schema(self) -> Schema:
        """The arrays :meth:`load` takes: the engine's parameters and state as they are, and the
        optimizer state of :func:`optimizer_specs`."""
        params, state, _ = self.export()
        return Schema({"params": array_specs(params), "state": array_specs(state),
                       "extra": optimizer_specs(params)})

    def load(self, params, state, extra) -> None:
        """Set parameters, state and optimizer state from NumPy arrays of exactly the engine's
        :meth:`schema` (a :class:`~deqcore_models.checkpoint.CheckpointError` lists every
        difference; nothing is changed then)."""
        check_checkpoint(Checkpoint({}, dict(params), dict(state), dict(extra)), self.schema(),
                         f"{type(self).__name__}.load")
        self._load_params(params)
        self.state = {k: self.ops.asarray(v) for k, v in state.items()}
        step = int(extra.get("opt.step", 0))
        moments = {k: (self.ops.asarray(extra[f"opt.m/{k}"]), self.ops.asarray(extra[f"opt.v/{k}"]))
                   for k in self.params} if step else {}
        self._load_adam(step, moments)

    # the framework's part
    def _step(self, x, y, masks, settings: DEQSettings, lr: float, probe, z0, keep_solution: bool
              ) -> tuple[Any, ...]:
        """``(loss, correct, nfe, residual, jac, backward reports, solution or None)`` of one Adam
        step from the warm start ``z0`` (None: the model's), applied."""
        raise NotImplementedError

    def _evaluate(self, state, x, y, settings: DEQSettings) -> tuple[Any, ...]:
        """``(loss, correct, nfe, residual, new state)`` in evaluation mode."""
        raise NotImplementedError

    def _gradients(self, x, y, masks, settings: DEQSettings) -> dict[str, Any]:
        """``{name: gradient or None}`` of the training loss."""
        raise NotImplementedError

    def _adam_moments(self) -> tuple[dict[str, tuple[Any, Any]], int]:
        """Adam's ``{name: (m, v)}`` (names without moments left out) and its step count."""
        raise NotImplementedError

    def _load_params(self, params: dict[str, np.ndarray]) -> None:
        raise NotImplementedError

    def _load_adam(self, step: int, moments: dict[str, tuple[Any, Any]]) -> None:
        """A fresh optimizer, then (``step`` > 0) Adam at ``step`` with these moments."""
        raise NotImplementedError


class TorchEngine(_Engine):
    """PyTorch. With ``replicas`` of several processes (:mod:`deqcore_models._replicas`) each
    process steps on its equal share of the batch: the loss runs inside
    ``DistributedDataParallel``, whose gradient all-reduce averages the shares' gradients, i.e.
    the gradient of the whole batch's mean loss; BatchNorm sums its statistics over the
    processes (``ops.replica_sum``), and after a step the state not in ``batch_state`` (rows of
    the batch, each process its own) is averaged over them."""

    backend = "torch"

    def __init__(self, task: Any, params: dict[str, np.ndarray], state: dict[str, np.ndarray],
                 weight_decay: float, clip_norm: float | None = None, replicas: Any = None,
                 batch_state: tuple[str, ...] = ()) -> None:
        import torch

        self._torch = torch
        super().__init__(task, params, state, weight_decay, clip_norm)
        self.replicas, self.batch_state = replicas, batch_state
        self._loss = task.loss
        if replicas is not None and replicas.distributed:
            self.params = {k: torch.nn.Parameter(v) for k, v in self.params.items()}
            self.ops.replicas, self.ops.replica_sum = replicas.size, replicas.replica_sum
            self._loss = _data_parallel(task, self.ops, self.params)
        for p in self.params.values():
            p.requires_grad_(True)
        self.opt = torch.optim.Adam(list(self.params.values()), lr=1e-3, weight_decay=weight_decay)

    def _step(self, x, y, masks, settings: DEQSettings, lr: float, probe, z0, keep_solution: bool
              ) -> tuple[Any, ...]:
        torch = self._torch
        for group in self.opt.param_groups:
            group["lr"] = lr
        self.opt.zero_grad(set_to_none=True)
        with collect_backward_reports() as reports, collect_forward_solves() as solves, starting_from(z0), \
                self.ops.precision(settings.precision):
            loss, (new_state, correct, nfe, res, jac, _) = self._loss(
                self.ops, self.params, self.state, x, y, masks, settings, True, probe)
        solution = fixed_points(solves, self.ops.stop_gradient) if keep_solution else None
        loss.backward()
        if self.clip_norm is not None:
            torch.nn.utils.clip_grad_norm_(list(self.params.values()), self.clip_norm)
        self.opt.step()
        self.state = {k: v.detach() for k, v in new_state.items()}
        if self.replicas is not None:
            self.state = self.replicas.average(self.state, skip=self.batch_state)
        return loss.detach(), correct, nfe, res, jac.detach(), reports, solution

    def _evaluate(self, state, x, y, settings: DEQSettings) -> tuple[Any, ...]:
        with self._torch.no_grad(), self.ops.precision(settings.precision):
            loss, (new_state, correct, nfe, res, _, _) = self.task.loss(
                self.ops, self.params, state, x, y, None, settings, False)
        return loss, correct, nfe, res, new_state

    def _gradients(self, x, y, masks, settings: DEQSettings) -> dict[str, Any]:
        with self.ops.precision(settings.precision):
            loss, _ = self.task.loss(self.ops, self.params, self.state, x, y, masks, settings, True)
        names = list(self.params)
        grads = self._torch.autograd.grad(loss, [self.params[k] for k in names], allow_unused=True)
        return dict(zip(names, grads, strict=True))

    def _adam_moments(self) -> tuple[dict[str, tuple[Any, Any]], int]:
        moments, step = {}, 0
        for k, p in self.params.items():
            st = self.opt.state.get(p)
            if st:
                moments[k] = (st["exp_avg"], st["exp_avg_sq"])
                step = int(st["step"])
        return moments, step

    def _load_params(self, params: dict[str, np.ndarray]) -> None:
        with self._torch.no_grad():
            for k, v in params.items():
                self.params[k].copy_(self._torch.from_numpy(np.asarray(v)))

    def _load_adam(self, step: int, moments: dict[str, tuple[Any, Any]]) -> None:
        for k, (m, v) in moments.items():
            self.opt.state[self.params[k]] = {"step": self._torch.tensor(float(step)), "exp_avg": m,
                                              "exp_avg_sq": v}


def _data_parallel(task: Any, ops: Any, params: dict[str, Any]) -> Any:
    """``task.loss`` run inside ``DistributedDataParallel`` over ``params`` (nn.Parameters, the
    engine's own): the backward pass that follows all-reduces their gradients (the mean over the
    processes). ``find_unused_parameters=False``: every parameter is used in every step of both
    families (pre-training, DEQ and Jacobian-penalty steps alike), which the reducer checks at
    the next step. ``static_graph=False``: the graph changes between pre-training and DEQ steps
    and between steps with and without the penalty. The penalty's double backward needs nothing
    more: its ``create_graph`` vector-Jacobian products differentiate with respect to the
    equilibrium state, not the parameters, so each parameter's gradient is accumulated, and
    all-reduced, once per backward pass."""
    import torch

    names = list(params)

    class TaskLoss(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weights = torch.nn.ParameterList([params[k] for k in names])

        def forward(self, state, x, y, masks, settings, probe):
            return task.loss(ops, dict(zip(names, self.weights, strict=True)), state, x, y, masks, settings,
                             True, probe)

    module = torch.nn.parallel.DistributedDataParallel(TaskLoss(), find_unused_parameters=False,
                                                       static_graph=False)

    def loss(ops_, params_, state, x, y, masks, settings, train, probe=None):
        return module(state, x, y, masks, settings, probe)

    return loss


class DeviceCountError(ValueError):
    """The JAX engine was asked for more devices than exist, or for a batch they cannot share."""


#: The mesh axis the JAX engine splits batches along.
BATCH_AXIS = "batch"
_HOST_DEVICES_FLAG = "--xla_force_host_platform_device_count"


def local_devices(devices: int | str) -> list[Any]:
    """The first ``devices`` local JAX devices (``"all"``: every one). More than exist is a
    :class:`DeviceCountError` saying how many there are, and on CPU which ``XLA_FLAGS`` setting
    makes more (it must be set before JAX starts)."""
    import jax

    have = jax.local_devices()
    if devices == "all":
        return list(have)
    if isinstance(devices, bool) or not isinstance(devices, int) or devices < 1:
        raise DeviceCountError(f"must be an int >= 1 or 'all', got {devices!r}")
    if devices > len(have):
        platform = have[0].platform
        hint = (f": on CPU, {devices} host devices need XLA_FLAGS={_HOST_DEVICES_FLAG}={devices} in the "
                f"environment before JAX starts" if platform == "cpu" else "")
        raise DeviceCountError(f"asks for {devices} devices but JAX sees {len(have)} {platform} "
                               f"device{'s' if len(have) != 1 else ''}{hint}")
    return list(have[:devices])


class JaxEngine(_Engine):
    """The JAX engine; ``devices`` (an int >= 1 or ``"all"``, see :func:`local_devices`) local
    devices train data-parallel (module docstring). With one device nothing is placed: arrays
    live on JAX's default device, as without a mesh. Evaluation batches are split the same way
    when their size divides the device count, and replicated (every device computes the whole
    batch) otherwise."""

    eager = False

    backend = "jax"

    def __init__(self, task: Any, params: dict[str, np.ndarray], state: dict[str, np.ndarray],
                 weight_decay: float, clip_norm: float | None = None, devices: int | str = 1) -> None:
        import jax
        import optax

        self._jax, self._optax = jax, optax
        self.devices = local_devices(devices)
        self.device_count = len(self.devices)
        self._mesh = None
        if len(self.devices) > 1:
            from jax.sharding import Mesh, NamedSharding, PartitionSpec

            self._mesh = Mesh(np.array(self.devices), (BATCH_AXIS,))
            self._whole = NamedSharding(self._mesh, PartitionSpec())
            self._rows = NamedSharding(self._mesh, PartitionSpec(BATCH_AXIS))
        super().__init__(task, params, state, weight_decay, clip_norm)
        clip = [] if clip_norm is None else [optax.clip_by_global_norm(clip_norm)]
        self.tx = optax.chain(*clip, optax.add_decayed_weights(weight_decay), optax.scale_by_adam())
        self.opt_state = self.tx.init(self.params)
        self._compiled: dict[tuple[str, str], Any] = {}
        self._reports: dict[tuple[str, str, bool, bool], list[Any]] = {}

    def _jitted(self, kind: str, settings: DEQSettings, make: Any) -> Any:
        """The compiled function of ``kind`` for ``settings`` (``make()`` builds it once); on a
        mesh every result is replicated."""
        key = (kind, repr(settings))
        if key not in self._compiled:
            jit, fn = self._jax.jit, make()
            self._compiled[key] = jit(fn) if self._mesh is None else jit(fn, out_shardings=self._whole)
        return self._compiled[key]

    def _replicated(self, tree: Any) -> Any:
        """``tree`` on every device of the mesh (as it is without one); a no-op for arrays
        already there."""
        return tree if self._mesh is None else self._jax.device_put(tree, self._whole)

    def _split(self, batch: int, tree: Any) -> Any:
        """``tree`` (inputs, targets, masks or probe: every array has the batch on axis 0) split
        along axis 0 over the mesh."""
        if self._mesh is None:
            return tree
        n = self.device_count
        for leaf in self._jax.tree_util.tree_leaves(tree):
            if not leaf.shape or leaf.shape[0] != batch:
                raise ValueError(f"an array of shape {tuple(leaf.shape)} has no batch of {batch} on axis 0 "
                                 f"to split over the devices")
        if batch % n:
            raise DeviceCountError(f"a batch of {batch} does not split evenly over {n} devices")
        return self._jax.device_put(tree, self._rows)

    def _step(self, x, y, masks, settings: DEQSettings, lr: float, probe, z0, keep_solution: bool
              ) -> tuple[Any, ...]:
        jax, ops, task, tx = self._jax, self.ops, self.task, self.tx

        def make():
            def step(params, state, opt_state, x, y, masks, lr, probe, z0):
                def lossf(p):
                    with ops.precision(settings.precision), collect_forward_solves() as solves, \
                            starting_from(z0):
                        loss, aux = task.loss(ops, p, state, x, y, masks, settings, True, probe)
                    return loss, (aux, fixed_points(solves, ops.stop_gradient) if keep_solution else None)

                value_and_grad = jax.value_and_grad(lossf, has_aux=True)
                (loss, ((new_state, correct, nfe, res, jac, _), solution)), grads = value_and_grad(params)
                updates, opt_state = tx.update(grads, opt_state, params)
                params = jax.tree_util.tree_map(lambda p, u: p - lr * u, params, updates)
                return params, new_state, opt_state, loss, correct, nfe, res, jac, solution

            return step

        # the reports are made while the step is traced (a step with a probe and one without,
        # or with a warm start and without, compile apart) and filled each time it runs
        params, state, opt_state = self._replicated((self.params, self.state, self.opt_state))
        x, y, masks, probe, z0 = self._split(x.shape[0], (x, y, masks, probe, z0))
        kind = "step+solution" if keep_solution else "step"
        with collect_backward_reports() as traced:
            out = self._jitted(kind, settings, make)(params, state, opt_state, x, y, masks, np.float32(lr),
                                                     probe, z0)
        key = (kind, repr(settings), probe is None, z0 is None)
        if traced:
            self._reports[key] = traced
        self.params, self.state, self.opt_state, loss, correct, nfe, res, jac, solution = out
        return loss, correct, nfe, res, jac, self._reports.get(key, []), solution

    def _evaluate(self, state, x, y, settings: DEQSettings) -> tuple[Any, ...]:
        ops, task = self.ops, self.task

        def make():
            def ev(params, state, x, y):
                with ops.precision(settings.precision):
                    loss, (new_state, correct, nfe, res, _, _) = task.loss(ops, params, state, x, y, None,
                                                                           settings, False)
                return loss, correct, nfe, res, new_state

            return ev

        n = self.device_count
        x, y = self._split(x.shape[0], (x, y)) if x.shape[0] % n == 0 else self._replicated((x, y))
        return self._jitted("eval", settings, make)(*self._replicated((self.params, state)), x, y)

    def _gradients(self, x, y, masks, settings: DEQSettings) -> dict[str, Any]:
        jax, ops, task = self._jax, self.ops, self.task

        def make():
            def grads(params, state, x, y, masks):
                def lossf(p):
                    with ops.precision(settings.precision):
                        return task.loss(ops, p, state, x, y, masks, settings, True)[0]

                return jax.grad(lossf)(params)

            return grads

        x, y, masks = self._split(x.shape[0], (x, y, masks))
        params, state = self._replicated((self.params, self.state))
        return dict(self._jitted("grad", settings, make)(params, state, x, y, masks))

    def _adam_index(self) -> int:
        return next(i for i, s in enumerate(self.opt_state) if isinstance(s, self._optax.ScaleByAdamState))

    def _adam_moments(self) -> tuple[dict[str, tuple[Any, Any]], int]:
        adam = self.opt_state[self._adam_index()]
        return {k: (adam.mu[k], adam.nu[k]) for k in adam.mu}, int(adam.count)

    def _load_params(self, params: dict[str, np.ndarray]) -> None:
        self.params = {k: self.ops.asarray(v) for k, v in params.items()}

    def _load_adam(self, step: int, moments: dict[str, tuple[Any, Any]]) -> None:
        self.opt_state = self.tx.init(self.params)
        if step:
            i = self._adam_index()
            adam = self.opt_state[i]
            adam = adam._replace(count=self.ops.xp.asarray(step, dtype=adam.count.dtype),
                                 mu={k: m for k, (m, _) in moments.items()},
                                 nu={k: v for k, (_, v) in moments.items()})
            self.opt_state = (*self.opt_state[:i], adam, *self.opt_state[i + 1:])


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


def make_engine(backend: str, task: Any, params, state, weight_decay: float, clip_norm: float | None = None,
                devices: int | str = 1, *, replicas: Any = None, batch_state: tuple[str, ...] = ()):
    """The training engine of ``backend`` (``"torch"`` or ``"jax"``): Adam with L2
    ``weight_decay``, after clipping the gradient's global norm to ``clip_norm`` (None: no
    clipping), on ``devices`` local devices (JAX only: an int or ``"all"``, see
    :class:`JaxEngine`; more than exist is a :class:`DeviceCountError`). ``replicas``
    (:class:`~deqcore_models._replicas.Replicas` of several processes, torch only) makes it
    data-parallel over processes; ``params`` are global, ``state`` this process's share
    (``batch_state``: the names of its arrays with one row per batch row). A missing framework
    is an ``ImportError`` saying what to install."""
    require_framework(backend)
    _, extra, what = _ENGINES[backend]
    if backend == "torch" and devices != 1:
        raise DeviceCountError(f"the torch engine trains on one device per process, got devices={devices!r}: "
                               f"launch one process per device with torchrun --nproc-per-node N")
    parallel: dict[str, Any] = {}
    if replicas is not None and replicas.distributed:
        if backend != "torch":
            raise ValueError(f"backend {backend!r} trains in one process; only 'torch' runs data-parallel "
                             f"over processes")
        parallel = {"replicas": replicas, "batch_state": tuple(batch_state)}
    try:
        if backend == "jax":
            return JaxEngine(task, params, state, weight_decay, clip_norm, devices)
        return TorchEngine(task, params, state, weight_decay, clip_norm, **parallel)
    except ModuleNotFoundError as exc:
        raise ImportError(f"backend {backend!r} needs {what}, which is not installed ({exc}); "
                          f"install it with pip install {extra}") from exc
