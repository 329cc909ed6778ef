"""Training and evaluation of DEQ models (MDEQ classifiers, DEQ-Transformer language models) on
either backend, with checkpoints and resume.

One loop for both frameworks: batches, dropout masks and the learning-rate schedule come from
NumPy with seeds derived from ``(seed, epoch)`` and ``(seed, step)``, so the same command on
PyTorch and JAX sees the same data in the same order, and a run resumed from a checkpoint
continues exactly where the killed one stopped. Outputs in ``out_dir``: ``steps.csv`` (one row per
step), ``epochs.csv``, ``summary.json``, ``checkpoint.npz`` (latest; ``--resume`` continues from
it), ``ranks.csv`` (per-process solver statistics of a data-parallel run) and ``curves.png`` when
matplotlib is installed. Under ``torchrun`` every process trains on its equal share of each
batch (:mod:`deqcore_models._replicas`) and the first one writes the files. Nothing in an
existing folder is replaced unless asked (``overwrite``), and nothing is written before the first
step succeeded; every file is written atomically or appended to, and JSON is strict (non-finite
numbers are ``null``, and flagged).
"""

from __future__ import annotations

import contextlib
import csv
import math
import numbers
import os
import signal
import sys
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np

import deqcore
from deqcore.internal import dumps_json, resolve, write_error, write_text
from deqcore.validators import (
    boolean,
    nonnegative_float,
    nonnegative_int,
    one_of,
    positive_float,
    positive_int,
    unit_interval,
)

from ._equilibrium_layer import (
    PRECISIONS,
    DEQSettings,
    collect_forward_solves,
    mean_iterations,
    unconverged_samples,
)
from ._progress import Progress
from ._replicas import Replicas, WorkerLost
from ._results_files import csv_text, pyplot, read_csv, save_figure, write_csv
from ._training_engines import DeviceCountError, make_engine, optimizer_specs
from .checkpoint import (
    GROUPS,
    Checkpoint,
    CheckpointError,
    Schema,
    array_specs,
    check_checkpoint,
    load_checkpoint,
    nonfinite_arrays,
    save_checkpoint,
)
from .families import FAMILIES, Family, Workload, family

#: The implicit backward's default: the MDEQ papers' budget of 20 backward steps (b_thres of the
#: LARGE configurations), not a tolerance. On these models the adjoint equation is not solved to
#: a small tolerance in any affordable budget (the Fashion-MNIST MDEQ's 20-step backward missed
#: it on every training step of the GDEQ experiment, docs/models.md), so the unmet tolerance is
#: not warned about every step: steps.csv records the residual the backward reached
#: (``bwd_residual``). Options given with ``--grad-option`` override these.
IMPLICIT_BACKWARD: dict[str, Any] = {"max_iter": 20, "on_fail": "ignore"}
#: The modes that run implicit's backward solve and take its defaults above (gdeq_refined starts
#: the same solve from Broyden's estimate: same budget, so its steps compare with implicit's).
IMPLICIT_BACKWARD_MODES = ("implicit", "gdeq_refined")
#: Fault injection for resume tests: the process SIGKILLs itself right after this step is logged
#: (``"10"``); ``"10@1"``: only the data-parallel process of rank 1 does.
KILL_ENV = "DEQCORE_FAULT_KILL_AT_STEP"


class ConfigError(ValueError):
    """A :class:`TrainConfig` setting is invalid. ``setting`` names the field, ``flag`` the
    ``deqcore`` flag that sets it (None for a setting without one) and ``problem`` says what is
    wrong and how to fix it; ``str()`` names the field, :meth:`for_cli` the flag."""

    def __init__(self, setting: str, problem: str) -> None:
        self.setting, self.problem = setting, problem
        self.flag = flag_of(setting)
        super().__init__(f"TrainConfig.{setting}{'' if self.flag is None else f' ({self.flag})'} {problem}")

    def for_cli(self) -> str:
        return f"{self.flag or self.setting} {self.problem}"


class ConfigTypeError(ConfigError, TypeError):
    """A :class:`TrainConfig` setting of the wrong type, or an unknown option name in it."""


_INT: tuple[type, ...] = (numbers.Integral,)
_FLOAT: tuple[type, ...] = (numbers.Real,)
_STR: tuple[type, ...] = (str,)
_PATH: tuple[type, ...] = (str, os.PathLike)
_DICT: tuple[type, ...] = (Mapping,)


def _nonempty(v: Any) -> str | None:
    return None if isinstance(v, (str, os.PathLike)) and str(v).strip() else "a non-empty name"


#: The models compute in float32: a setting beyond its range means nothing.
_F32_MAX = float(np.finfo(np.float32).max)


def _float32(check: Callable[[Any], str | None]) -> Callable[[Any], str | None]:
    def checked(v: Any) -> str | None:
        problem = check(v)
        if problem is None and abs(v) > _F32_MAX:
            return f"{check(math.nan)} within float32's range (<= {_F32_MAX:.3g})"
        return problem

    return checked


def _learning_rate(v: Any) -> str | None:
    # Adam's first step is lr / (1 - beta1) = 10 lr, a float32 on both engines
    problem = positive_float(v)
    if problem is None and v > _F32_MAX / 10:
        return f"<= {_F32_MAX / 10:.3g} (Adam's first step, 10 lr, must be a float32)"
    return problem


def _options_dict(v: Any) -> str | None:
    return None if isinstance(v, Mapping) and all(isinstance(k, str) for k in v) else \
        "a dict of option names to values"


def _device_count(v: Any) -> str | None:
    ok = v == "all" or (isinstance(v, numbers.Integral) and not isinstance(v, bool) and int(v) >= 1)
    return None if ok else "an int >= 1 or 'all'"


def _family_name(v: Any) -> str | None:
    return None if v in FAMILIES else "one of " + ", ".join(repr(name) for name in FAMILIES)


def _setting(default: Any = None, check: Callable[[Any], str | None] = _nonempty,
             kind: tuple[type, ...] = _STR, hint: str = "", *, none_ok: bool = False,
             factory: Callable[[], Any] | None = None, flag: str | None = "") -> Any:
    """A :class:`TrainConfig` field with its validator (a ``deqcore.validators`` check), the Python
    types it takes, a hint appended to its error, whether None is valid (the hint should say
    what None means), and its ``deqcore`` flag ("" for the default ``--name-with-dashes``, None
    for none)."""
    meta = {"check": check, "kind": kind, "hint": hint, "none_ok": none_ok, "flag": flag}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


_ALL_DATA = "leave it out (None) to use all of it"


@dataclass
class TrainConfig:
    """Everything a training run depends on (saved in every checkpoint and in summary.json).

    Every field is checked when the config is made (also from a checkpoint's JSON): its type,
    its range (one validator per field, declared with it), the combinations (a config and a
    data set of the model, ``min_lr <= lr``, ``softmax_chunk`` only for the transformer) and the
    solve settings against deqcore's registry (the solver and gradient mode exist, their options
    are known and valid, and the mode works with the solver). A bad setting is a
    :class:`ConfigError` (a ``ValueError``; :class:`ConfigTypeError`, also a ``TypeError``, for
    a wrong type or an unknown option name) naming the field and its ``deqcore`` flag.
    """

    backend: str = _setting("torch", one_of("torch", "jax"))
    devices: int | str = _setting(1, _device_count, (numbers.Integral, str),
                                  "JAX only: 'all' is every local device")
    model: str = _setting("mdeq", _family_name)
    config: str = _setting("cpu")
    dataset: str = _setting("fashion-mnist")
    data: str | None = _setting(None, _nonempty, _PATH, none_ok=True)
    train_limit: int | None = _setting(None, positive_int, _INT, _ALL_DATA, none_ok=True)
    test_limit: int | None = _setting(None, positive_int, _INT, _ALL_DATA, none_ok=True)
    solver: str = _setting("broyden")
    tol: float = _setting(1e-3, _float32(positive_float), _FLOAT)
    max_iter: int = _setting(18, positive_int, _INT)
    solver_options: dict[str, Any] = _setting(check=_options_dict, kind=_DICT, factory=dict,
                                              flag="--solver-option")
    grad: str = _setting("implicit")
    grad_options: dict[str, Any] = _setting(check=_options_dict, kind=_DICT, factory=dict,
                                            flag="--grad-option")
    correction_states: int = _setting(0, nonnegative_int, _INT, "0 (or 1) trains on the fixed point alone")
    pretrain_steps: int = _setting(0, nonnegative_int, _INT)
    unrolled_layers: int = _setting(6, positive_int, _INT)
    jac_weight: float = _setting(0.0, _float32(nonnegative_float), _FLOAT, "0 turns the penalty off")
    jac_freq: float = _setting(1.0, unit_interval, _FLOAT, "it is the probability that a step is penalised")
    softmax_chunk: int | None = _setting(None, nonnegative_int, _INT,
                                         "0: the whole softmax at once; None: the default chunk",
                                         none_ok=True)
    bn_groups: int | None = _setting(None, positive_int, _INT, "None: 1, statistics over the whole batch",
                                     none_ok=True)
    epochs: int = _setting(1, positive_int, _INT)
    max_steps: int | None = _setting(None, positive_int, _INT, "leave it out (None) to run every epoch",
                                     none_ok=True)
    batch_size: int = _setting(64, positive_int, _INT)
    lr: float = _setting(1e-3, _learning_rate, _FLOAT)
    min_lr: float = _setting(1e-6, nonnegative_float, _FLOAT)
    weight_decay: float = _setting(0.0, _float32(nonnegative_float), _FLOAT)
    clip_norm: float | None = _setting(None, _float32(positive_float), _FLOAT,
                                       "leave it out (None) for no clipping", none_ok=True)
    seed: int = _setting(0, nonnegative_int, _INT)
    out: str = _setting("runs/mdeq", _nonempty, _PATH)
    checkpoint_every: int = _setting(100, positive_int, _INT)
    eval_batch_size: int | None = _setting(None, positive_int, _INT, none_ok=True)
    cosine_every: int = _setting(0, nonnegative_int, _INT, "0 turns the probe off")
    cosine_reference: dict[str, Any] = _setting(check=_options_dict, kind=_DICT,
                                                factory=lambda: {"max_iter": 40}, flag=None)
    precision: str = _setting("float32", one_of(*PRECISIONS), _STR,
                              "bfloat16 runs the convolutions and matrix products in bfloat16, the "
                              "equilibrium state and the solver's arithmetic in float32")
    warm_start: bool = _setting(False, boolean, (bool,), "True starts each sample's solve from its "
                                "last fixed point (deqcore.FixedPointCache)")
    warm_start_max_age: int | None = _setting(None, nonnegative_int, _INT, "None: cached fixed points do not "
                                              "expire by age", none_ok=True)
    warm_start_keep: str = _setting("converged", one_of("converged", "best"), _STR,
                                    "best also keeps the lowest-residual iterate of solves stopped by "
                                    "--max-iter")

    def __post_init__(self) -> None:
        for f in fields(self):
            _check_setting(f, getattr(self, f.name))
        for name in ("data", "out"):
            if isinstance(getattr(self, name), os.PathLike):
                setattr(self, name, os.fspath(getattr(self, name)))
        fam = self.family
        others = [f for f in FAMILIES.values() if f is not fam]
        if self.config not in fam.configs:
            other = [f.name for f in others if self.config in f.configs]
            hint = f" ({self.config!r} is a {other[0]} config: add --model {other[0]})" if other else ""
            raise ConfigError("config", f"must be one of {', '.join(sorted(fam.configs))} for model "
                                        f"{self.model}, got {self.config!r}{hint}")
        if self.dataset not in fam.datasets:
            other = [f.name for f in others if self.dataset in f.datasets]
            hint = f" ({self.dataset!r} is for model {other[0]}: add --model {other[0]})" if other else ""
            raise ConfigError("dataset", f"must be one of {', '.join(fam.datasets)} for model {self.model}, "
                                         f"got {self.dataset!r}{hint}")
        for other_family in others:
            for name in set(other_family.settings) - set(fam.settings):
                if getattr(self, name) is not None:
                    raise ConfigError(name, f"is an option of model {other_family.name}; model "
                                            f"{self.model} has none: leave it out")
        if self.bn_groups is not None and self.batch_size % self.bn_groups:
            raise ConfigError("bn_groups", f"must divide --batch-size {self.batch_size} (groups of equal "
                                           f"size), got {self.bn_groups}")
        self._check_devices()
        for name, default in (("warm_start_max_age", None), ("warm_start_keep", "converged")):
            if getattr(self, name) != default and not self.warm_start:
                raise ConfigError(name, "is a warm-start setting: add --warm-start")
        if self.min_lr > self.lr:
            raise ConfigError("min_lr", f"must be <= lr (--lr {self.lr:g}), got {self.min_lr:g}: the "
                                        f"schedule anneals from lr down to min_lr")
        self._check_solve()
        self._check_precision()

    def _check_precision(self) -> None:
        """float16 needs a GPU, which the torch engine does not use; JAX computes only MDEQ's
        convolutions in a half dtype (the transformer has none)."""
        if self.precision == "float16" and self.backend == "torch":
            raise ConfigError("precision", "float16 needs a GPU and the torch trainer runs on the CPU: "
                                           "use bfloat16")
        if self.precision == "float16" and self.backend == "jax" and _jax_platform() == "cpu":
            raise ConfigError("precision", "float16 needs a GPU and JAX runs on the CPU here: use bfloat16")
        if self.precision != "float32" and self.backend == "jax" and self.model != "mdeq":
            raise ConfigError("precision", f"{self.precision} on JAX is for model mdeq (its convolutions); "
                                           f"train the {self.model} in {self.precision} with --backend torch")

    def _check_devices(self) -> None:
        """``devices`` is a JAX setting, and an int count must split the batch evenly (``"all"``
        is checked once the devices are known, by the trainer)."""
        if self.devices != 1 and self.backend != "jax":
            raise ConfigError("devices", f"is a JAX setting (got {self.devices!r} with --backend "
                                         f"{self.backend}): on PyTorch launch one process per device with "
                                         f"torchrun --nproc-per-node N, or add --backend jax")
        if isinstance(self.devices, numbers.Integral) and self.batch_size % int(self.devices):
            raise ConfigError("devices", f"must divide --batch-size {self.batch_size} (each device takes an "
                                         f"equal share of every batch), got {self.devices}")

    @property
    def family(self) -> Family:
        """The :class:`~deqcore_models.families.Family` of :attr:`model`."""
        return family(self.model)

    def error(self, setting: str, problem: str) -> ConfigError:
        """The :class:`ConfigError` of ``setting`` (for the checks that need the data: a
        workload raises it)."""
        return ConfigError(setting, problem)

    def _check_solve(self) -> None:
        """The forward solve and gradient mode against deqcore's registry, as ``deqcore.solve``
        would check them at the first step."""
        reg = deqcore.registry()
        try:
            solver_cls = reg.get("solvers", self.solver).obj
        except ValueError as exc:
            raise ConfigError("solver", f"{self.solver!r} is not a solver: {exc}") from None
        fixed = sorted(set(self.solver_options) & _FLAGGED_SOLVE)
        if fixed:
            raise ConfigError("solver_options", f"may not set {', '.join(fixed)}: use "
                              + ", ".join(flag_of(k) or k for k in fixed))
        common = {k: v for k, v in self.solver_options.items() if k in deqcore.COMMON_OPTIONS}
        own = {k: v for k, v in self.solver_options.items() if k not in deqcore.COMMON_OPTIONS}
        _resolve("solver_options", f"solver {self.solver!r}", solver_cls.options, own, deqcore.COMMON_OPTIONS)
        _resolve("solver_options", "deqcore.solve", deqcore.COMMON_OPTIONS,
                 {**common, "tol": self.tol, "max_iter": self.max_iter})
        self._check_grad("grad", self.grad, "grad_options", self.grad_options_used())
        if self.correction_states > self.max_iter:
            raise ConfigError("correction_states", f"must be <= --max-iter {self.max_iter} (one state per "
                                                   f"step at most), got {self.correction_states}")
        if self.cosine_every:
            self._check_grad("cosine_every", "implicit", "cosine_reference", dict(self.cosine_reference))

    def _check_grad(self, setting: str, grad: str, options_setting: str, options: dict[str, Any]) -> None:
        try:
            cls = deqcore.registry().get("gradients", grad).obj
        except ValueError as exc:
            raise ConfigError(setting, f"{grad!r} is not a gradient mode: {exc}") from None
        resolved = _resolve(options_setting, f"gradient mode {grad!r}", cls.options, options)
        try:
            mode = cls(**resolved)
        except (TypeError, ValueError) as exc:  # the implicit mode checks its backward solver here
            error = ConfigTypeError if isinstance(exc, TypeError) else ConfigError
            raise error(options_setting, f"is invalid: {exc}") from None
        try:
            mode.check(self.solver)
        except ValueError as exc:
            raise ConfigError(setting, f"{grad} does not work with --solver {self.solver}: {exc}") from None

    def grad_options_used(self) -> dict[str, Any]:
        """The gradient mode's options: the trainer's defaults for the mode, then ``grad_options``."""
        defaults = IMPLICIT_BACKWARD if self.grad in IMPLICIT_BACKWARD_MODES else {}
        return {**defaults, **self.grad_options}

    def deq_settings(self) -> DEQSettings:
        return DEQSettings(solver=self.solver, tol=self.tol, max_iter=self.max_iter,
                           solver_options=dict(self.solver_options), grad=self.grad,
                           grad_options=self.grad_options_used(), jac_weight=self.jac_weight,
                           correction_states=self.correction_states, precision=self.precision)

    def pretrain_settings(self) -> DEQSettings:
        return DEQSettings(unrolled=self.unrolled_layers, jac_weight=self.jac_weight,
                           precision=self.precision)

    def reference_settings(self) -> DEQSettings:
        """The implicit gradient the cosine probe compares against (same forward solve)."""
        return DEQSettings(solver=self.solver, tol=self.tol, max_iter=self.max_iter,
                           solver_options=dict(self.solver_options), grad="implicit",
                           grad_options=dict(self.cosine_reference), precision=self.precision)

    def eval_settings(self) -> DEQSettings:
        return DEQSettings(solver=self.solver, tol=self.tol, max_iter=self.max_iter,
                           solver_options=dict(self.solver_options), grad=None, precision=self.precision)


#: Solve settings with flags of their own, so not accepted in ``solver_options``.
_FLAGGED_SOLVE = {"tol", "max_iter", "stop_mode", "batched", "backend", "solver", "grad", "grad_options",
                  "correction_states"}
#: Settings that define the model a checkpoint holds (with its ``model_config``).
MODEL_SETTINGS = ("model", "config", "dataset")
#: Settings ``--resume`` may change: the stopping point, where it runs and reads, and how often
#: it saves; every other setting must equal the checkpoint's.
RESUME_FREE = ("epochs", "max_steps", "backend", "devices", "checkpoint_every", "data", "out")


def _jax_platform() -> str:
    import jax

    return str(jax.default_backend())


def flag_of(setting: str) -> str | None:
    """The ``deqcore train`` flag of a :class:`TrainConfig` field (None when it has none)."""
    for f in fields(TrainConfig):
        if f.name == setting:
            flag = f.metadata.get("flag", "")
            return None if flag is None else flag or "--" + setting.replace("_", "-")
    return None


def _check_setting(f: Any, value: Any) -> None:
    if value is None and f.metadata["none_ok"]:
        return
    problem = f.metadata["check"](value)
    if problem is None:
        return
    hint = f.metadata["hint"]
    text = f"must be {problem}, got {value!r}" + (f" ({hint})" if hint else "")
    kind = f.metadata["kind"]
    wrong_type = value is not None and (not isinstance(value, kind) or isinstance(value, bool))
    if wrong_type:
        raise ConfigTypeError(f.name, f"must be {problem}, got {type(value).__name__} {value!r}")
    raise ConfigError(f.name, text)


def _resolve(setting: str, owner: str, spec: Mapping[str, Any], given: Mapping[str, Any],
             also_valid: Mapping[str, Any] | None = None) -> dict[str, Any]:
    try:
        return resolve(owner, spec, given, also_valid)
    except TypeError as exc:
        raise ConfigTypeError(setting, f"is invalid: {exc}") from None
    except ValueError as exc:
        raise ConfigError(setting, f"is invalid: {exc}") from None


def config_from_checkpoint(ck: Checkpoint, source: str, **overrides: Any) -> TrainConfig:
    """The :class:`TrainConfig` saved in ``ck`` with ``overrides`` (None values ignored), on one
    device unless ``overrides`` say otherwise (the saved ``devices`` says where that run ran).
    Saved settings that are missing, unknown or invalid are a :class:`CheckpointError` naming
    ``source``; an invalid override is the :class:`ConfigError` of its flag."""
    saved = ck.meta.get("train_config")
    if not isinstance(saved, Mapping):
        raise CheckpointError(f"{source}: its metadata has no train_config object (got "
                              f"{type(saved).__name__}); not written by deqcore train")
    known = {f.name for f in fields(TrainConfig)}
    unknown = sorted(set(saved) - known)
    if unknown:
        raise CheckpointError(f"{source}: its train_config has unknown settings {', '.join(unknown)} "
                              f"(written by another version of deqcore?)")
    try:
        stored = TrainConfig(**{**saved, "devices": 1})
    except ConfigError as exc:
        raise CheckpointError(f"{source}: its train_config is invalid: {exc}") from None
    given = {k: v for k, v in overrides.items() if v is not None}
    return replace(stored, **given) if given else stored


def cosine_lr(step: int, total: int, base: float, minimum: float) -> float:
    """Cosine annealing stepped per iteration from ``base`` to ``minimum`` over ``total`` steps."""
    t = min(step, total) / max(total, 1)
    return minimum + (base - minimum) * 0.5 * (1.0 + math.cos(math.pi * t))


#: The columns of steps.csv.
STEP_COLUMNS = ("step", "epoch", "phase", "loss", "acc", "nfe", "residual", "jac", "bwd_residual",
                "bwd_unconverged", "lr", "seconds", "warm_hits", "iterations")
#: The files a run writes in its folder; ``--overwrite`` replaces exactly these.
RUN_FILES = ("steps.csv", "epochs.csv", "cosine.csv", "ranks.csv", "summary.json", "checkpoint.npz",
             "curves.png")
#: The columns of ranks.csv: each data-parallel process's share of a step (``unconverged``: its
#: samples whose forward solve did not reach --tol).
RANK_COLUMNS = ("step", "rank", "loss", "acc", "nfe", "residual", "unconverged", "seconds")
#: How a step's per-process results combine into the step's (means of equal shares, sums of
#: counts, the slowest solve): ``(key, NumPy reduction over the processes)``.
_STEP_REDUCTIONS: tuple[tuple[str, Callable[[np.ndarray], Any]], ...] = (
    ("loss", np.mean), ("correct", np.sum), ("nfe", np.max), ("residual", np.max), ("jac", np.mean),
    ("bwd_residual", np.max), ("unconverged", np.sum), ("bwd_unconverged", np.max), ("seconds", np.max),
    ("warm_hits", np.mean), ("iterations", np.mean))


class RunFolderError(FileExistsError):
    """The output folder already holds files and neither resuming nor overwriting was asked."""


def check_out_dir(out: str | os.PathLike[str], *, resume: bool, overwrite: bool) -> None:
    """Refuse to start a run that would lose files: ``out`` must be missing or empty unless the
    run resumes it (it must then hold ``checkpoint.npz``) or ``overwrite`` replaces its run
    (nothing is removed before the new run's first step succeeds). Reads only the folder."""
    out = Path(out)
    if resume and overwrite:
        raise ValueError("resume and overwrite exclude each other: --resume continues the run in --out, "
                         "--overwrite replaces it")
    if out.exists() and not out.is_dir():
        raise RunFolderError(f"--out {out} is a file, not a folder: choose another --out")
    if resume:
        if not (out / "checkpoint.npz").is_file():
            raise CheckpointError(f"--resume: nothing to resume, {out / 'checkpoint.npz'} does not exist "
                                  f"(a run stopped before its first checkpoint): start it again with "
                                  f"--overwrite, or drop --resume")
        return
    held = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if held and not overwrite:
        shown = ", ".join(held[:6]) + (f" and {len(held) - 6} more" if len(held) > 6 else "")
        raise RunFolderError(f"--out {out} already holds {shown}: pass --resume to continue that run, "
                             f"--overwrite to replace it, or choose another --out")


class _CsvLog:
    """A CSV file a run appends rows to, opened only when the run's first step succeeded.

    ``keep_through`` (a resumed run): rows of a step after it are dropped first, and the file's
    own columns are kept. A failed write is a :class:`WriteError`."""

    def __init__(self, path: Path, fields: list[str]) -> None:
        self.path, self.fields = path, fields
        self._fh: Any = None
        self._writer: Any = None

    def open(self, keep_through: int | None) -> None:
        try:
            if keep_through is not None:
                _truncate_csv(self.path, keep_through)
            new = not self.path.exists() or self.path.stat().st_size == 0
            if not new:
                with open(self.path, newline="") as fh:
                    self.fields = next(csv.reader(fh), self.fields)
            self._fh = open(self.path, "a", newline="")
            self._writer = csv.DictWriter(self._fh, fieldnames=self.fields, extrasaction="ignore")
            if new:
                self._writer.writeheader()
        except OSError as exc:
            raise write_error(self.path, exc) from exc

    def write(self, row: Mapping[str, Any]) -> None:
        try:
            self._writer.writerow(row)
            self._fh.flush()
        except OSError as exc:
            raise write_error(self.path, exc) from exc

    def close(self) -> None:
        if self._fh is not None:
            with contextlib.suppress(OSError):
                self._fh.close()
            self._fh = None


def result_flags(rows: Sequence[Mapping[str, Any]], cfg: TrainConfig) -> tuple[list[str], list[str]]:
    """``(flags, warnings)`` of evaluation results (one mapping per epoch, or one): a flag for
    every non-finite number (the model's outputs overflowed: the metrics mean nothing), a
    warning when the forward solves did not reach ``cfg.tol`` on the test set."""
    flags, warns = [], []
    for row in rows:
        where = f"epoch {row['epoch']}: " if "epoch" in row and len(rows) > 1 else ""
        # None: a non-finite number read back from JSON (a resumed run's earlier epochs)
        bad = [k for k, v in row.items() if v is None or (isinstance(v, float) and not math.isfinite(v))]
        if bad:
            shown = ", ".join(f"{k} is {'null' if row[k] is None else row[k]}" for k in bad)
            flags.append(f"{where}{shown}: the model's outputs are not finite and these metrics mean nothing")
    final = rows[-1] if rows else {}
    res = final.get("test_residual")
    if isinstance(res, float) and math.isfinite(res) and res > cfg.tol:
        warns.append(f"the forward solves did not converge on the test set: worst relative residual "
                     f"{res:.3g} > --tol {cfg.tol:g} after at most --max-iter {cfg.max_iter} steps")
    return flags, warns


class Trainer:
    """Runs a :class:`TrainConfig`; :meth:`run` trains (resuming if asked) and returns the summary.

    ``work`` is the config's workload when already made (:func:`make_workload`); data-size
    problems (a batch larger than the data, a limit beyond it) are :class:`ConfigError` s of the
    flag at fault, raised before anything is written."""

    def __init__(self, cfg: TrainConfig, *, progress: bool = True, work: Any = None,
                 replicas: Replicas | None = None) -> None:
        self.cfg = cfg
        self.replicas = replicas or Replicas()
        self.progress = progress and self.replicas.writes
        self.out = Path(cfg.out)
        self._check_replicas()
        self.work = make_workload(cfg) if work is None else work
        self.metric = cfg.family.metric
        self.model_cfg = self.work.model_cfg
        self.params0, self.state0 = self.work.params0, self.work.state0
        self.task = self.work.task
        self.batch_state = tuple(getattr(self.work, "batch_state", ()))
        try:
            state = self.replicas.shard_state(self.state0, self.batch_state)
            self.engine = make_engine(cfg.backend, self.task, self.params0, state, cfg.weight_decay,
                                      cfg.clip_norm, cfg.devices, replicas=self.replicas,
                                      batch_state=self.batch_state)
        except DeviceCountError as exc:
            raise ConfigError("devices", str(exc)) from None
        if cfg.batch_size % self.engine.device_count:
            raise ConfigError("devices", f"is {cfg.devices!r}, {self.engine.device_count} devices, which do "
                                         f"not divide --batch-size {cfg.batch_size}")
        self.cache = self._warm_start_cache()
        self.steps_per_epoch = self.work.steps_per_epoch
        self.total_steps = cfg.epochs * self.steps_per_epoch
        if cfg.max_steps is not None:
            self.total_steps = min(self.total_steps, cfg.max_steps)
        self._saved_step: int | None = None

    def _check_replicas(self) -> None:
        """The settings a data-parallel run of ``replicas.size`` processes needs."""
        n, cfg = self.replicas.size, self.cfg
        if cfg.batch_size % n:
            raise ConfigError("batch_size", f"is the global batch, split equally among the {n} workers: it "
                                            f"must be divisible by {n}, got {cfg.batch_size}")
        if cfg.bn_groups is not None and cfg.bn_groups != 1 and cfg.bn_groups % n:
            raise ConfigError("bn_groups", f"must be 1 (statistics over the whole batch) or a multiple of "
                                           f"the {n} workers (each worker's groups are its own), got "
                                           f"{cfg.bn_groups}")

    def _warm_start_cache(self) -> deqcore.FixedPointCache | None:
        """The cache of each training sample's last fixed point (``--warm-start``; None without).
        It is not saved in checkpoints: a resumed run starts cold."""
        if not self.cfg.warm_start:
            return None
        samples = getattr(self.work, "train_samples", None)
        if samples is None:
            raise ConfigError("warm_start", f"needs batches of samples that come back, with their indices; "
                                            f"model {self.cfg.model}'s have none")
        return deqcore.FixedPointCache(samples, max_age=self.cfg.warm_start_max_age,
                                       keep=self.cfg.warm_start_keep)

    # ------------------------------------------------------------------ checkpoints
    def _meta(self, step: int, epoch_acc: dict[str, float], history: list[dict]) -> dict[str, Any]:
        return {"model": self.cfg.model, "config": self.cfg.config, "train_config": asdict(self.cfg),
                "step": step, "epoch_acc": epoch_acc, "history": history,
                "model_config": asdict(self.model_cfg)}

    def schema(self) -> Schema:
        """:func:`model_schema` of this trainer's config and workload."""
        return model_schema(self.cfg, self.work)

    def load(self, ck: Checkpoint, source: str) -> None:
        """Load ``ck`` into the engine after :func:`check_checkpoint` against :meth:`schema`."""
        check_checkpoint(ck, self.schema(), source)
        self.engine.load(ck.params, self.replicas.shard_state(ck.state, self.batch_state), ck.extra)

    def save(self, step: int, epoch_acc: dict[str, float], history: list[dict]) -> Path:
        """checkpoint.npz of the run at ``step`` (the whole batch's state, whatever the number of
        processes; written by the first)."""
        params, state, extra = self.engine.export()
        state = self.replicas.gather_state(state, self.batch_state)
        bad = [f"{label} {item}" for group, label in zip((params, state, extra), GROUPS.values(), strict=True)
               for item in nonfinite_arrays(group)]
        if bad:
            shown = ", ".join(bad[:5]) + (" ..." if len(bad) > 5 else "")
            raise FloatingPointError(self._failure(step - 1, f"the weights became NaN or Inf ({shown})"))
        path = self.out / "checkpoint.npz"
        if self.replicas.writes:
            save_checkpoint(path, Checkpoint(self._meta(step, epoch_acc, history), params, state, extra))
        self._saved_step = step
        return path

    def restore(self) -> tuple[int, dict[str, float], list[dict]]:
        """Load ``out/checkpoint.npz`` to resume: the same run (see :meth:`schema`), a valid
        step within this run, finite arrays."""
        path = self.out / "checkpoint.npz"
        ck = load_checkpoint(path)
        check_resumable(self.cfg, ck)
        self.load(ck, str(path))
        step = checkpoint_step(ck, str(path))
        self._saved_step = step
        return step, dict(ck.meta.get("epoch_acc") or {}), list(ck.meta.get("history") or [])

    def _failure(self, step: int, what: str) -> str:
        """The message of a run that failed at (0-based) ``step``: what happened and where the
        last good state is."""
        if self._saved_step is not None:
            where = (f"the last good state is {self.out / 'checkpoint.npz'} (step {self._saved_step}); "
                     f"resuming it repeats the same steps")
        else:
            where = "no checkpoint of this run was written yet"
        return (f"step {step + 1}: {what}; {where}. Start again with a lower --lr or with --clip-norm "
                f"(and --overwrite)")

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, settings: DEQSettings | None = None) -> dict[str, float]:
        """Test loss, accuracy (of images, or of next tokens), mean NFE per batch and the worst
        residual; ``test_ppl`` (perplexity) too for language models. A language model's memory
        runs along the test stream from empty. Non-finite values are returned as they are (see
        :func:`result_flags`)."""
        settings = settings or self.cfg.eval_settings()
        state = self.work.eval_state(self.engine.state)
        loss = correct = count = 0.0
        worst, nfes = 0.0, list[float]()
        for x, y, n in self.work.eval_batches():
            rows = self.replicas.eval_rows(len(x))  # data-parallel: this process's share
            if state is not None and not nfes:
                state = self.replicas.shard_state(state, self.batch_state, rows)
            if not len(rows):
                nfes.append(0.0)
                continue
            r = self.engine.evaluate(x[rows], y[rows], settings, state=state)
            if state is not None:
                state = r["state"]
            items = n * len(rows) // len(x)
            loss += r["loss"] * items
            correct += r["correct"]
            count += items
            nfes.append(r["nfe"])
            worst = max(worst, r["residual"]) if math.isfinite(r["residual"]) else r["residual"]
        # one collective: the sums, the worst residual and each batch's NFE (its slowest share's)
        every = self.replicas.gather([loss, correct, count, worst, *nfes])
        loss, correct, count = (float(every[:, i].sum()) for i in range(3))
        out = {"test_loss": loss / count, "test_acc": correct / count,
               "test_nfe": float(every[:, 4:].max(axis=0).mean()), "test_residual": float(every[:, 3].max())}
        out[self.metric.key] = self.metric.value(out["test_loss"], out["test_acc"])
        return out

    # ------------------------------------------------------------------ training
    def run(self, resume: bool = False, overwrite: bool = False) -> dict[str, Any]:
        """Train to ``total_steps`` and return the summary (also written to summary.json).

        A new run needs an empty or missing ``out`` unless ``overwrite``; ``resume`` continues
        from ``out/checkpoint.npz`` (see :func:`check_out_dir`). No file is written or removed
        before the first step succeeded, so a run that fails at once leaves the folder as it
        was. A non-finite loss, or weights that became non-finite, stop the run with a
        ``FloatingPointError`` naming the last good checkpoint; summary.json then says
        ``"status": "failed"``. The summary's ``flags`` list non-finite metrics and its
        ``warnings`` unconverged test solves (:func:`result_flags`)."""
        cfg = self.cfg
        check_out_dir(self.out, resume=resume, overwrite=overwrite)
        start_step, epoch_acc, history = 0, dict[str, float](), list[dict[str, Any]]()
        if resume:
            start_step, epoch_acc, history = self.restore()
        if start_step >= self.total_steps:
            return {"config": asdict(cfg), "status": "complete", "steps": start_step, "epochs": history,
                    "final": history[-1] if history else None, "written": [],
                    "parameters": int(sum(v.size for v in self.params0.values())),
                    "note": f"the run is already at step {start_step} of {self.total_steps}: nothing to "
                            f"train (raise --epochs or --max-steps to continue it)"}
        steps_log = _CsvLog(self.out / "steps.csv", list(STEP_COLUMNS))
        cosine_log = _CsvLog(self.out / "cosine.csv", ["step", "cosine"])
        ranks_log = _CsvLog(self.out / "ranks.csv", list(RANK_COLUMNS))
        kill_at = _kill_step(self.replicas.rank)
        bar = Progress(self.total_steps, f"{cfg.backend}/{cfg.grad}") if self.progress else None
        writes = self.replicas.writes
        step, started = start_step, False
        try:
            while step < self.total_steps:
                epoch, pos = divmod(step, self.steps_per_epoch)
                if pos == 0:
                    epoch_acc = {"loss": 0.0, "correct": 0.0, "count": 0.0, "seconds": 0.0, "nfe": 0.0}
                fresh = self.work.fresh_state(step)
                if fresh is not None:
                    self.engine.set_state(self.replicas.shard_state(fresh, self.batch_state))
                batch = self.work.train_batch(step)
                mine = self.replicas.shard_batch(batch)
                pre = step < cfg.pretrain_steps
                settings = cfg.pretrain_settings() if pre else cfg.deq_settings()
                lr = cosine_lr(step, self.total_steps, cfg.lr, cfg.min_lr)
                cosine = None
                if cfg.cosine_every and not pre and step % cfg.cosine_every == 0:
                    cosine = self._cosine(mine.x, mine.y, mine.masks)
                t0 = time.perf_counter()
                # an unconverged implicit backward warns every step: count it in the CSV instead
                with warnings.catch_warnings(record=True) as caught, collect_forward_solves() as solves:
                    warnings.simplefilter("always", deqcore.BackwardWarning)
                    warm = None if pre else self.cache  # pre-training starts its unrolled steps at zero
                    z0, hits = warm.lookup(mine.indices) if warm is not None else (None, np.zeros(0, bool))
                    r = self.engine.train_step(mine.x, mine.y, mine.masks, settings, lr, mine.probe, z0,
                                               keep_solution=warm is not None)
                kept = r.pop("solution", None)
                if warm is not None:
                    warm.store(mine.indices, kept)
                eager = [kept] if kept is not None else solves if self.engine.eager else []
                r["iterations"] = mean_iterations(eager)
                if self.cache is not None:
                    self.cache.advance()
                r["warm_hits"] = float(hits.mean()) if warm is not None else math.nan
                dt = time.perf_counter() - t0
                for w in caught:
                    if not issubclass(w.category, deqcore.BackwardWarning):
                        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
                r["bwd_unconverged"] = sum(issubclass(w.category, deqcore.BackwardWarning) for w in caught)
                r["seconds"] = dt
                # per-sample convergence of a data-parallel step (under jax.jit the solves are traced)
                r["unconverged"] = unconverged_samples(solves) if self.replicas.distributed else 0
                r, shares = self._combine(r)
                dt, bwd_bad = r["seconds"], int(r["bwd_unconverged"])
                if not math.isfinite(r["loss"]):
                    raise FloatingPointError(self._failure(step, f"the training loss is {r['loss']}"))
                if not started and writes:  # the first step succeeded: only now touch the folder
                    self._start_files(resume, start_step, steps_log, cosine_log, ranks_log)
                started = True
                if cosine is not None and writes:
                    cosine_log.write({"step": step, "cosine": f"{cosine:.6f}"})
                step += 1
                for key, val in (("loss", r["loss"] * batch.count), ("correct", r["correct"]),
                                 ("count", batch.count), ("seconds", dt), ("nfe", r["nfe"])):
                    epoch_acc[key] = epoch_acc.get(key, 0.0) + val
                if writes:
                    for rank, share in enumerate(shares if self.replicas.distributed else []):
                        ranks_log.write({"step": step, "rank": rank, "loss": f"{share['loss']:.6f}",
                                         "acc": f"{share['correct'] / len(mine.x):.4f}",
                                         "nfe": int(share["nfe"]), "residual": f"{share['residual']:.4e}",
                                         "unconverged": int(share["unconverged"]),
                                         "seconds": f"{share['seconds']:.4f}"})
                    steps_log.write({"step": step, "epoch": epoch + 1, "phase": "pretrain" if pre else "deq",
                                     "loss": f"{r['loss']:.6f}", "acc": f"{r['correct'] / batch.count:.4f}",
                                     "nfe": r["nfe"], "residual": f"{r['residual']:.4e}",
                                     "jac": "" if batch.probe is None else f"{r['jac']:.4e}",
                                     "bwd_residual": _blank_nan(r.get("bwd_residual", float("nan"))),
                                     "bwd_unconverged": bwd_bad, "lr": f"{lr:.3e}", "seconds": f"{dt:.4f}",
                                     "warm_hits": _blank_nan(r["warm_hits"]),
                                     "iterations": _blank_nan(r["iterations"])})
                if kill_at is not None and step == kill_at:
                    os.kill(os.getpid(), signal.SIGKILL)
                if bar:
                    shown = {"ep": f"{epoch + 1}/{cfg.epochs}", "loss": f"{r['loss']:.3f}"}
                    if self.metric.beside_accuracy:
                        shown[self.metric.short] = f"{self.metric.value(r['loss'], math.nan):.1f}"
                    shown.update({"acc": f"{100 * r['correct'] / batch.count:.1f}%", "nfe": str(r["nfe"]),
                                  "res": f"{r['residual']:.1e}"})
                    if batch.probe is not None:
                        shown["jac"] = f"{r['jac']:.2e}"
                    bar.update(step, shown)
                end_of_epoch = step % self.steps_per_epoch == 0 or step == self.total_steps
                if end_of_epoch:
                    row = {"epoch": epoch + 1, "step": step,
                           "train_loss": epoch_acc["loss"] / epoch_acc["count"],
                           "train_acc": epoch_acc["correct"] / epoch_acc["count"],
                           "train_nfe": epoch_acc["nfe"] / max(pos + 1, 1),
                           "train_seconds": epoch_acc["seconds"], **self.evaluate()}
                    history.append(row)
                    if writes:
                        write_csv(self.out / "epochs.csv", history)
                if end_of_epoch or step % cfg.checkpoint_every == 0:
                    self.save(step, epoch_acc, history)
                    if bar is None and writes:  # --no-progress: a line per checkpoint shows life
                        print(f"step {step}/{self.total_steps} epoch {epoch + 1}: loss {r['loss']:.4f}, "
                              f"nfe {r['nfe']}, {dt:.3f} s/step; checkpoint saved", file=sys.stderr,
                              flush=True)
        except (FloatingPointError, deqcore.ConvergenceError) as exc:  # the latter with throw=True
            if started:
                self._write_summary(step, history, "failed", [str(exc)])
            raise
        except RuntimeError as exc:
            if self.replicas.distributed and not isinstance(exc, WorkerLost):  # a collective failed
                raise self.replicas.lost(exc) from exc
            raise
        finally:
            for log in (steps_log, cosine_log, ranks_log):
                log.close()
            if bar:
                bar.close()
        summary = self._write_summary(step, history, "complete", [])
        summary["plots"] = write_plots(self.out) if writes else []
        summary["written"] = [str(self.out / n) for n in RUN_FILES if (self.out / n).exists()]
        return summary

    def _start_files(self, resume: bool, start_step: int, steps_log: _CsvLog, cosine_log: _CsvLog,
                     ranks_log: _CsvLog) -> None:
        """Make the folder this run's: a new run removes the files of the run it replaces
        (:data:`RUN_FILES`, nothing else), a resumed one drops log rows written after its
        checkpoint; then the logs open."""
        self.out.mkdir(parents=True, exist_ok=True)
        if not resume:
            for name in RUN_FILES:
                with contextlib.suppress(FileNotFoundError):
                    (self.out / name).unlink()
        steps_log.open(start_step if resume else None)
        if self.cfg.cosine_every:  # its rows carry the 0-based step probed: after s steps keep < s
            cosine_log.open(start_step - 1 if resume else None)
        if self.replicas.distributed:
            ranks_log.open(start_step if resume else None)
        elif resume:  # of a data-parallel run resumed in one process
            _truncate_csv(ranks_log.path, start_step)

    def _combine(self, r: dict[str, Any]) -> tuple[dict[str, Any], list[dict[str, float]]]:
        """The step's results from every process's share (``r``, this process's): one
        collective; returns them and each process's (:data:`_STEP_REDUCTIONS`)."""
        every = self.replicas.gather([float(r[key]) for key, _ in _STEP_REDUCTIONS])
        shares = [{key: float(v) for (key, _), v in zip(_STEP_REDUCTIONS, row, strict=True)} for row in every]
        combined = {key: float(reduce(every[:, i])) for i, (key, reduce) in enumerate(_STEP_REDUCTIONS)}
        for key in ("correct", "nfe", "unconverged", "bwd_unconverged"):
            combined[key] = int(combined[key])
        return {**r, **combined}, shares

    def _write_summary(self, step: int, history: list[dict[str, Any]], status: str,
                       failures: list[str]) -> dict[str, Any]:
        flags, warns = result_flags(history, self.cfg)
        summary = {"config": asdict(self.cfg), "status": status, "steps": step, "epochs": history,
                   "final": history[-1] if history else None,
                   "parameters": int(sum(v.size for v in self.params0.values())),
                   "flags": failures + flags, "warnings": warns}
        if self.replicas.distributed:
            summary["workers"] = self.replicas.size
        if self.replicas.writes:
            write_text(self.out / "summary.json", dumps_json(summary, indent=2))
        return summary

    def _cosine(self, x: np.ndarray, y: np.ndarray, masks: Any) -> float:
        """The cosine between this run's gradient and the implicit one (same batch, same masks,
        same weights)."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", deqcore.BackwardWarning)
            mine = self.engine.gradients(x, y, masks, self.cfg.deq_settings())
            ref = self.engine.gradients(x, y, masks, self.cfg.reference_settings())
        # data-parallel: each process has its share's gradient; the batch's is their mean
        return _cosine(self.replicas.mean(mine), self.replicas.mean(ref))


def checkpoint_step(ck: Checkpoint, source: str) -> int:
    """The number of steps the run of ``ck`` had taken (a :class:`CheckpointError` unless an
    int >= 1)."""
    step = ck.meta.get("step")
    if isinstance(step, bool) or not isinstance(step, int) or step < 1:
        raise CheckpointError(f"{source}: its metadata's step {step!r} is not an int >= 1")
    return step


def model_schema(cfg: TrainConfig, work: Any) -> Schema:
    """What a checkpoint must hold to load into the model of ``cfg`` and its workload ``work``:
    its parameters and buffers as initialised, the optimizer state of both engines
    (:func:`~deqcore_models._training_engines.optimizer_specs`), the code's ``model_config`` of
    ``cfg.config``, and the settings that define the model (:data:`MODEL_SETTINGS`)."""
    mine = asdict(cfg)
    meta = {"model": cfg.model, "config": cfg.config, "model_config": asdict(work.model_cfg),
            "train_config": {k: mine[k] for k in MODEL_SETTINGS}}
    return Schema({"params": array_specs(work.params0), "state": array_specs(work.state0),
                   "extra": optimizer_specs(work.params0)}, meta)


def check_resumable(cfg: TrainConfig, ck: Checkpoint) -> None:
    """The checks of a resume that need no data: ``ck`` holds a valid train_config, it equals
    ``cfg`` in every setting but :data:`RESUME_FREE`, and its arrays are finite. A
    :class:`CheckpointError` lists every difference."""
    source = str(Path(cfg.out) / "checkpoint.npz")
    saved = config_from_checkpoint(ck, source)
    mine, theirs = asdict(cfg), asdict(saved)
    raw = ck.meta["train_config"]
    wanted = {k: mine[k] for k in mine if k not in RESUME_FREE and (k in raw or mine[k] != theirs[k])}
    try:
        check_checkpoint(ck, Schema({}, {"train_config": wanted}), source)
    except CheckpointError as exc:
        raise CheckpointError(f"--resume: {exc} (the checkpoint was written by a run with other "
                              f"settings; only {', '.join(flag_of(k) or k for k in RESUME_FREE)} may "
                              f"change)") from None


def _kill_step(rank: int) -> int | None:
    """The step after which :data:`KILL_ENV` asks this process (of ``rank``) to kill itself."""
    raw = os.environ.get(KILL_ENV, "")
    if not raw:
        return None
    step, _, only = raw.partition("@")
    return int(step) if not only or int(only) == rank else None


def _blank_nan(v: float) -> str:
    return f"{v:.4e}" if math.isfinite(v) else ""


def _cosine(a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray]) -> float:
    dot = sum(float(np.vdot(a[k].astype(np.float64), b[k])) for k in a)
    na = math.sqrt(sum(float(np.vdot(a[k].astype(np.float64), a[k])) for k in a))
    nb = math.sqrt(sum(float(np.vdot(b[k].astype(np.float64), b[k])) for k in b))
    return dot / (na * nb) if na > 0 and nb > 0 else float("nan")


def _truncate_csv(path: Path, step: int) -> None:
    """Drop rows after ``step`` (written by a run killed after its last checkpoint), and rows cut
    short by a failed write; rewritten atomically."""
    if not path.exists():
        return
    with open(path, newline="") as fh:
        rows = list(csv.reader(fh))
    if not rows:
        return

    def keep(r: list[str]) -> bool:
        try:
            return len(r) == len(rows[0]) and int(r[0]) <= step
        except ValueError:
            return False

    kept = [rows[0]] + [r for r in rows[1:] if keep(r)]
    write_text(path, csv_text(kept))


def _num(v: Any) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return float("nan")


def write_plots(out: Path) -> list[str]:
    """curves.png (loss/accuracy per step and per epoch, NFE and residual per step) from the
    CSVs in ``out``; returns the files written ([] without matplotlib)."""
    plt = pyplot(warn="no plots written; the CSV files hold the same data")
    if plt is None:
        return []
    steps = read_csv(out / "steps.csv")
    epochs = read_csv(out / "epochs.csv")
    if not steps:
        return []
    s = np.array([_num(r["step"]) for r in steps])
    fig, ax = plt.subplots(2, 2, figsize=(10, 7))
    ax[0, 0].plot(s, [_num(r["loss"]) for r in steps], lw=0.8, label="train (batch)")
    if epochs:
        ax[0, 0].plot([_num(r["step"]) for r in epochs], [_num(r["test_loss"]) for r in epochs], "o-",
                      label="test")
    ax[0, 0].set(title="loss", xlabel="step")
    ax[0, 0].legend()
    ax[0, 1].plot(s, [100 * _num(r["acc"]) for r in steps], lw=0.8, label="train (batch)")
    if epochs:
        ax[0, 1].plot([_num(r["step"]) for r in epochs], [100 * _num(r["test_acc"]) for r in epochs], "o-",
                      label="test")
    ax[0, 1].set(title="accuracy %", xlabel="step")
    ax[0, 1].legend()
    ax[1, 0].plot(s, [_num(r["nfe"]) for r in steps], lw=0.8)
    ax[1, 0].set(title="forward NFE", xlabel="step")
    def positive(values):
        return [v if v > 0 and math.isfinite(v) else np.nan for v in values]

    ax[1, 1].semilogy(s, positive([_num(r["residual"]) for r in steps]), lw=0.8, label="forward")
    backward = [_num(r.get("bwd_residual")) for r in steps]
    if not all(np.isnan(backward)):
        ax[1, 1].semilogy(s, positive(backward), lw=0.8, label="implicit backward")
        ax[1, 1].legend()
    ax[1, 1].set(title="worst relative residual (DEQ steps)", xlabel="step")
    fig.tight_layout()
    save_figure(fig, out / "curves.png")
    return [str(out / "curves.png")]


def make_workload(cfg: TrainConfig) -> Workload:
    """The workload of ``cfg`` (its family's): its data loaded and checked against the settings
    that depend on its size (a limit beyond the data, a batch larger than it: the
    :class:`ConfigError` of the flag at fault)."""
    return cfg.family.workload(cfg)
