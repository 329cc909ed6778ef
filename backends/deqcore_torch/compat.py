"""TorchDEQ's entry points on deqcore: change ``from torchdeq import get_deq`` to
``from deqcore_torch.compat import get_deq`` (and likewise ``apply_norm``, ``reset_norm``).

:func:`get_deq` takes TorchDEQ's argument names and defaults (:data:`ARGUMENTS`) and returns a
module called as TorchDEQ's is, ``z_out, info = deq(func, z_init, solver_kwargs=...)``, which
solves with :func:`deqcore.solve`. Unlike TorchDEQ it rejects names it does not know, and
arguments whose TorchDEQ behaviour it cannot give. Where deqcore's meaning differs from TorchDEQ's
it warns once per process with a :class:`TorchDEQCompatWarning` saying how. Every argument's
mapping is listed in the documentation page "Migrating from TorchDEQ".
"""

from __future__ import annotations

import argparse
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

import deqcore
from deqcore.extend import Option
from deqcore.internal import resolve
from deqcore.validators import boolean, nonnegative_int, one_of, positive_float

from . import _norms

__all__ = ["ARGUMENTS", "TorchDEQCompatWarning", "apply_norm", "get_deq", "reset_norm"]


class TorchDEQCompatWarning(UserWarning):
    """A TorchDEQ argument whose meaning on deqcore differs from TorchDEQ's (issued once per
    process and difference)."""


def _steps(v: Any) -> str | None:
    ok = isinstance(v, int) and not isinstance(v, bool) and v >= 1
    seq = isinstance(v, (list, tuple)) and v and all(isinstance(k, int) and not isinstance(k, bool) and k >= 1
                                                     for k in v)
    return None if ok or seq else "an int >= 1 or a list of them"


def _increasing_steps(v: Any) -> str | None:
    good = isinstance(v, (list, tuple)) and all(isinstance(k, int) and not isinstance(k, bool) and k >= 2
                                                for k in v) and list(v) == sorted(set(v))
    return None if v is None or good else "None or an increasing list of ints >= 2"


def _int_list(v: Any) -> str | None:
    good = v is None or (isinstance(v, (list, tuple)) and all(isinstance(k, int) for k in v))
    return None if good else "None or a list of ints"


def _unit(v: Any) -> str | None:
    return None if positive_float(v) is None and v <= 1 else "a float in (0, 1]"


def _solver_name(v: Any) -> str | None:
    return None if v in _SOLVERS else "one of " + ", ".join(map(repr, _SOLVERS))


def _ignored(doc: str) -> Option[Any]:
    return Option(None, doc, lambda v: None)


_SOLVERS = {"anderson": "anderson", "broyden": "broyden", "fixed_point_iter": "fixed_point",
            "simple_fixed_point_iter": "fixed_point"}

ARGUMENTS: Mapping[str, Option[Any]] = {
    "core": Option("sliced", "'sliced' or 'indexing' (the states of one solve either way)",
                   one_of("sliced", "indexing")),
    "f_solver": Option("fixed_point_iter", "forward solver", _solver_name),
    "b_solver": Option("fixed_point_iter", "backward solver of ift", _solver_name),
    "no_stat": _ignored("skip solver statistics (deqcore always keeps them)"),
    "f_max_iter": Option(40, "forward f evaluations", lambda v: None if isinstance(v, int) and v >= 2
                         and not isinstance(v, bool) else "an int >= 2"),
    "b_max_iter": Option(40, "backward solver steps", lambda v: None if isinstance(v, int) and v >= 1
                         and not isinstance(v, bool) else "an int >= 1"),
    "f_tol": Option(1e-3, "forward stop tolerance", positive_float),
    "b_tol": Option(1e-6, "backward stop tolerance", positive_float),
    "f_stop_mode": Option("abs", "forward stop residual", one_of("abs", "rel")),
    "b_stop_mode": Option("abs", "backward stop residual", one_of("abs", "rel")),
    "eval_factor": Option(1.0, "eval-mode f_max_iter factor", positive_float),
    "eval_f_max_iter": Option(0, "eval-mode f_max_iter (0: f_max_iter * eval_factor)", nonnegative_int),
    "ift": Option(False, "implicit differentiation", boolean),
    "hook_ift": Option(False, "implicit differentiation through a backward hook", boolean),
    "grad": Option(1, "phantom gradient steps", _steps),
    "tau": Option(1.0, "phantom gradient damping", _unit),
    "sup_gap": Option(-1, "return every sup_gap-th phantom gradient step (-1: none)",
                      lambda v: None if v == -1 else "-1 (returning phantom gradient steps is not "
                      "supported)"),
    "sup_loc": Option(None, "phantom gradient steps to return", lambda v: None if not v else
                      "None or [] (returning phantom gradient steps is not supported)"),
    "n_states": Option(1, "evenly spaced trajectory states returned for fixed-point correction",
                       lambda v: None if isinstance(v, int) and not isinstance(v, bool) and v >= 1
                       else "an int >= 1"),
    "indexing": Option(None, "solver steps (f evaluations) of the states returned for fixed-point "
                       "correction", _increasing_steps),
    "norm_type": _ignored("read by apply_norm"),
    "norm_no_scale": _ignored("read by apply_norm"),
    "norm_clip": _ignored("read by apply_norm"),
    "norm_clip_value": _ignored("read by apply_norm"),
    "norm_target_norm": _ignored("read by apply_norm"),
    "sn_n_power_iters": _ignored("read by apply_norm"),
    "gamma": _ignored("fixed-point correction loss weight, read by the training loop"),
    "jac_loss_weight": _ignored("Jacobian regularisation weight, read by the training loop"),
    "jac_loss_freq": _ignored("Jacobian regularisation frequency, read by the training loop"),
    "jac_incremental": _ignored("Jacobian regularisation schedule, read by the training loop"),
    "sradius_mode": _ignored("TorchDEQ's command-line flag for the forward argument of that name"),
}
"""Every argument :func:`get_deq` accepts (TorchDEQ's ``get_deq`` keywords and the settings of
its ``add_deq_args``): name -> :class:`deqcore.extend.Option` with TorchDEQ's default. Those
documented as read elsewhere are accepted so that one configuration can feed ``get_deq`` and
``apply_norm``, and have no effect here."""

_SOLVER_KWARGS = {  # TorchDEQ solver keyword -> deqcore option, per deqcore solver
    "anderson": {"m": "memory", "tau": "beta", "lam": "lam"},
    "broyden": {"LBFGS_thres": "memory", "ls": "line_search"},
    "fixed_point": {"tau": "damping"},
}

_DIFFERENCES = {
    "phantom": "grad=k: the returned z is the fixed point z*; TorchDEQ returns the k-th damped step "
               "from it, which differs from z* by about the residual. The gradient is the same: "
               "that of the k damped steps (deqcore's 'upg' mode, lam=tau)",
    "ift": "ift: the returned z is the fixed point z*; TorchDEQ returns f(z*), which differs from z* by "
           "the residual. The gradient is the same: the implicit one, solved to b_tol",
    "hook_ift": "hook_ift: deqcore's implicit gradient keeps only f's graph at z* already; no backward "
                "hook is registered (the same gradient as ift=True)",
    "stop": "f_tol: deqcore freezes each sample when its own residual reaches tol; TorchDEQ iterates the "
            "whole batch until the largest residual is below tol",
    "simple": "simple_fixed_point_iter: deqcore's fixed-point iteration stops at f_tol and returns the "
              "lowest-residual iterate; TorchDEQ's runs all f_max_iter steps and returns the last",
    "return_final": "return_final: deqcore returns each sample's lowest-residual iterate, never the last "
                    "one; the option is ignored",
    "states": "n_states/indexing: TorchDEQ's state at f evaluation s is f of the lowest-residual iterate "
              "among its first s evaluations; deqcore returns that iterate itself (solver step s - 1), "
              "which differs from it by its residual, with the phantom gradient taken from there. A state "
              "after the solve stopped (tol reached) is the final z on deqcore; TorchDEQ leaves it out "
              "and returns a shorter list",
    "sliced": "core='sliced': TorchDEQ restarts the solver at each returned state from its phantom "
              "gradient output (f_max_iter + n_states * grad evaluations in all); deqcore records the "
              "states of one uninterrupted solve, as core='indexing' does",
    "lam": "lam: deqcore's Anderson regularisation is relative to the mean squared residual; "
           "TorchDEQ's is absolute",
}
_warned: set[str] = set()


def _warn_once(key: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(f"deqcore_torch.compat: {_DIFFERENCES[key]}", TorchDEQCompatWarning, stacklevel=4)


def _config(args: Any, kwargs: Mapping[str, Any], owner: str) -> dict[str, Any]:
    """TorchDEQ's configuration merge: ``args`` (a dict, ``argparse.Namespace`` or None), then
    ``kwargs`` over it."""
    if args is None:
        merged: dict[str, Any] = {}
    elif isinstance(args, Mapping):
        merged = dict(args)
    elif isinstance(args, argparse.Namespace):
        merged = dict(vars(args))
    else:
        raise TypeError(f"{owner}: args must be a dict, an argparse.Namespace or None, got "
                        f"{type(args).__name__}")
    merged.update(kwargs)
    return merged


class _TorchDEQStyleDEQ(nn.Module):
    """The module :func:`get_deq` returns; see there."""

    def __init__(self, config: Mapping[str, Any]) -> None:
        super().__init__()
        c = self.config = dict(config)
        self.solver = _SOLVERS[c["f_solver"]]
        self.f_max_iter = c["f_max_iter"]
        self.eval_f_max_iter = c["eval_f_max_iter"] or int(c["f_max_iter"] * c["eval_factor"])
        grads = [c["grad"]] if isinstance(c["grad"], int) else list(c["grad"])
        n_out = len(self._torchdeq_steps(self.f_max_iter))
        if len(grads) not in (1, n_out):
            raise ValueError(f"get_deq: grad gives {len(grads)} values for {n_out} returned states; give one "
                             f"value or one per state")
        if len(set(grads[:-1])) > 1:
            raise ValueError(f"get_deq: grad={grads} gives the states before the last different phantom "
                             f"gradient steps; deqcore gives them one (the last state's may differ)")
        steps = grads[-1]
        self.correction_grad_options = {"k": grads[0], "lam": c["tau"]}
        if n_out > 1:
            _warn_once("states")
            if c["core"] == "sliced":
                _warn_once("sliced")
        if c["ift"] or c["hook_ift"]:
            self.grad, self.grad_options = "implicit", {
                "solver": _SOLVERS[c["b_solver"]], "tol": c["b_tol"], "max_iter": c["b_max_iter"],
                "stop_mode": c["b_stop_mode"]}
            _warn_once("ift")
            if c["hook_ift"]:
                _warn_once("hook_ift")
        else:
            self.grad, self.grad_options = "upg", {"k": steps, "lam": c["tau"]}
            _warn_once("phantom")
        if c["f_solver"] == "simple_fixed_point_iter":
            _warn_once("simple")
        _warn_once("stop")
        self.last_solution: deqcore.Solution | None = None

    def _torchdeq_steps(self, f_max_iter: int) -> list[int]:
        """TorchDEQ's steps (f evaluations) of the returned states for ``f_max_iter``, the last
        being ``f_max_iter``: ``n_states`` evenly spaced ones ending there, else ``indexing``."""
        n_states, indexing = min(self.config["n_states"], f_max_iter), self.config["indexing"] or []
        if n_states > 1:
            steps = [f_max_iter - (n_states - i) * (f_max_iter // n_states) for i in range(1, n_states + 1)]
        else:
            steps = [*indexing, f_max_iter]
        if steps[0] < 2 or steps != sorted(set(steps)):
            raise ValueError(f"get_deq: the states at f evaluations {steps} (n_states="
                             f"{self.config['n_states']}, indexing={indexing}, f_max_iter={f_max_iter}) "
                             f"must increase, end at f_max_iter and start after the second evaluation at "
                             f"the earliest: deqcore's first state follows one solver step")
        return steps

    def forward(self, func: Callable[..., Any], z_init: Any, solver_kwargs: Mapping[str, Any] | None = None,
                sradius_mode: bool = False, backward_writer: Callable[..., Any] | None = None,
                **kwargs: Any) -> tuple[list[Any], dict[str, torch.Tensor]]:
        """Solve ``z* = func(z*)`` from ``z_init`` (a tensor, or a list of tensors that ``func``
        takes as separate arguments and returns as a list).

        Returns ``(z_out, info)``: ``z_out`` is ``[z]`` in eval mode (no gradient); in training
        mode the states at the configured f evaluations (``n_states`` / ``indexing``, each with
        the phantom gradient) followed by ``z`` (the configured gradient), as many and in the
        order TorchDEQ returns (a state after the solve stopped repeats ``z``); each with
        ``z_init``'s structure. ``info`` has TorchDEQ's keys:
        ``abs_lowest``, ``rel_lowest`` (B,) at the returned ``z``, ``abs_trace``, ``rel_trace``
        (B, steps + 1; column 0: ``z_init``), ``nstep`` (B,) the steps each sample ran, ``sradius`` -1
        (not computed). The whole :class:`deqcore.Solution` is ``self.last_solution``.
        """
        if kwargs:
            raise TypeError(f"get_deq module: unknown argument{'s' if len(kwargs) > 1 else ''} "
                            f"{', '.join(sorted(kwargs))}; it takes func, z_init, solver_kwargs")
        if sradius_mode:
            raise ValueError("get_deq module: sradius_mode=True is not supported (deqcore does not "
                             "estimate the spectral radius of the layer's Jacobian)")
        if backward_writer is not None:
            raise ValueError("get_deq module: backward_writer is not supported; after backward(), "
                             "the backward solve's statistics are in module.last_solution.backward")
        options = dict(solver_kwargs or {})
        max_iter = options.pop("f_max_iter", self.f_max_iter if self.training else self.eval_f_max_iter)
        if isinstance(max_iter, bool) or not isinstance(max_iter, (int, float)) or max_iter < 2:
            raise ValueError(f"get_deq module: f_max_iter must be a number >= 2, got {max_iter!r}")
        if options.pop("return_final", False):
            _warn_once("return_final")
        names = _SOLVER_KWARGS[self.solver]
        unknown = sorted(set(options) - set(names))
        if unknown:
            raise TypeError(f"get_deq module: solver_kwargs {', '.join(unknown)} are not options of "
                            f"{self.config['f_solver']!r} here (valid: f_max_iter, return_final, "
                            f"{', '.join(names)})")
        if "lam" in options:
            _warn_once("lam")
        solver_options = {names[k]: v for k, v in options.items()}
        if self.solver == "anderson":
            solver_options.setdefault("memory", 6)  # TorchDEQ's m
        if isinstance(z_init, (list, tuple)):
            def f(z: Any, _: Any) -> Any:
                return tuple(func(*z))
            z0: Any = tuple(z_init)
        else:
            def f(z: Any, _: Any) -> Any:
                return func(z)
            z0 = z_init
        c = self.config
        # TorchDEQ's f_max_iter counts every evaluation of f; deqcore's max_iter counts the steps
        # after the first evaluation, f(z0)
        if self.training:  # TorchDEQ's state at f evaluation s is deqcore's at step s - 1
            correction = [s - 1 for s in self._torchdeq_steps(int(max_iter))[:-1]]
            if correction:
                solver_options.update(correction_states=correction,
                                      correction_grad_options=self.correction_grad_options)
        solution = deqcore.solve(
            f, None, z0, backend="torch", solver=self.solver, tol=c["f_tol"], stop_mode=c["f_stop_mode"],
            max_iter=int(max_iter) - 1, grad=self.grad if self.training else None,
            grad_options=self.grad_options if self.training else None, **solver_options)
        self.last_solution = solution
        as_given = list if isinstance(z_init, (list, tuple)) else lambda z: z
        z_out = [as_given(z) for z in (*solution.correction_states, solution.z)]
        info = {
            "abs_lowest": solution.abs_residual,
            "rel_lowest": solution.rel_residual,
            "abs_trace": solution.abs_trace.T,
            "rel_trace": solution.rel_trace.T,
            "nstep": solution.iterations.to(solution.abs_residual.dtype),
            "sradius": torch.full((1,), -1.0, device=solution.abs_residual.device),
        }
        return z_out, info


def get_deq(args: Any = None, **kwargs: Any) -> nn.Module:
    """TorchDEQ's ``get_deq`` on deqcore: the DEQ module for TorchDEQ's configuration.

    Args:
        args: TorchDEQ's configuration as a dict or an ``argparse.Namespace`` (for example
            from ``torchdeq.utils.add_deq_args``), or None.
        **kwargs: TorchDEQ's arguments, over ``args`` (names and defaults: :data:`ARGUMENTS`).

    Returns:
        An ``nn.Module`` called as ``z_out, info = deq(func, z_init, solver_kwargs=None)`` with
        ``func(z)`` the layer (the input injection closed over). ``z_out`` is a list ending with
        the fixed point, differentiable with the configured gradient in training mode: ``ift=True``
        (or ``hook_ift``) is deqcore's ``implicit`` mode with ``b_solver``, ``b_tol``,
        ``b_max_iter``, ``b_stop_mode``; otherwise ``grad=k`` with ``tau`` is ``upg`` (k damped
        steps from z*). In training mode ``n_states > 1`` or ``indexing`` put before it the
        states at those f evaluations: TorchDEQ's evaluation ``s`` is deqcore's solver step
        ``s - 1`` (``correction_states``), each state with ``upg``'s gradient (``grad``'s value for
        it, ``tau``). In eval mode ``z_out`` has no gradient and the solve runs up to
        ``eval_f_max_iter`` (or ``f_max_iter * eval_factor``) evaluations of ``func``.
        ``solver_kwargs`` per call: ``f_max_iter``, ``return_final`` and the solver's own
        options (Anderson ``m``, ``lam``, ``tau``; Broyden ``LBFGS_thres``, ``ls``; fixed-point
        ``tau``). ``info`` has TorchDEQ's keys.

    Raises:
        TypeError: a name TorchDEQ does not have (TorchDEQ ignores those), or ``args`` of
            another type. Keep only these names from a larger namespace with
            ``{k: v for k, v in vars(args).items() if k in ARGUMENTS}``.
        ValueError: a bad value, or an argument whose TorchDEQ behaviour is not available:
            ``sup_gap`` or ``sup_loc`` (phantom gradient steps returned as extra states), a
            state at the first f evaluation, or different ``grad`` values for the states
            before the last.
    """
    config = resolve("get_deq", ARGUMENTS, _config(args, kwargs, "get_deq"))
    return _TorchDEQStyleDEQ(config)


_NORM_ARGS = {  # TorchDEQ's configuration keys for normalisation -> its apply_norm keyword
    "norm_no_scale": "learn_scale", "norm_target_norm": "target_norm", "norm_clip": "clip",
    "norm_clip_value": "clip_value", "sn_n_power_iters": "n_power_iterations"}
_NORM_KWARGS = {"names": None, "dims": None, "learn_scale": True, "target_norm": 1.0, "clip": False,
                "clip_value": 1.0, "n_power_iterations": 1, "eps": 1e-12}


def apply_norm(model: nn.Module, norm_type: str = "weight_norm", prefix_filter_out: Any = None,
               filter_out: Any = None, args: Any = None, **norm_kwargs: Any) -> None:
    """TorchDEQ's ``apply_norm`` on :func:`deqcore_torch.apply_norm`.

    ``norm_type`` (``"weight_norm"``, ``"spectral_norm"`` or ``"none"``), ``filter_out`` (skip
    modules whose name contains one of these) and ``prefix_filter_out`` (whose name starts with
    one) as in TorchDEQ. ``**norm_kwargs`` are TorchDEQ's normalisation keywords (``names``,
    ``dims``: the parameters to normalise in every target module; ``learn_scale``,
    ``target_norm``, ``clip``, ``clip_value``, ``n_power_iterations``, ``eps``); ``args`` (a dict
    or ``argparse.Namespace`` of :data:`ARGUMENTS`) overrides them with ``norm_type``,
    ``norm_no_scale``, ``norm_target_norm``, ``norm_clip``, ``norm_clip_value`` and
    ``sn_n_power_iters``, as in TorchDEQ. Unknown keys are a ``TypeError``.
    """
    config = _config(args, {}, "apply_norm")
    unknown = sorted(set(config) - set(ARGUMENTS)) + sorted(set(norm_kwargs) - set(_NORM_KWARGS))
    if unknown:
        raise TypeError(f"apply_norm: unknown argument{'s' if len(unknown) > 1 else ''} "
                        f"{', '.join(unknown)}; keywords: {', '.join(_NORM_KWARGS)}; args keys: "
                        f"{', '.join(ARGUMENTS)}")
    setting = {**_NORM_KWARGS, **norm_kwargs}
    for key, name in _NORM_ARGS.items():
        if config.get(key) is not None:
            setting[name] = not config[key] if key == "norm_no_scale" else config[key]
    norm_type = config.get("norm_type") or norm_type
    if norm_type == "none":
        return
    targets = None
    if setting["names"] is not None or setting["dims"] is not None:
        dims = setting["dims"] if isinstance(setting["dims"], (list, tuple)) else [setting["dims"]]
        if len(set(dims)) != 1 or None in dims:
            raise ValueError(f"apply_norm: dims must be one output dimension for all names, got {dims!r}")
        targets = {t: (setting["names"] or "weight", dims[0]) for t in _norms.DEFAULT_TARGETS}
    _norms.apply_norm(
        model, norm_type, targets=targets, skip=filter_out or (), skip_prefix=prefix_filter_out or (),
        learn_scale=setting["learn_scale"], target_norm=setting["target_norm"],
        clip_value=setting["clip_value"] if setting["clip"] else None,
        n_power_iterations=setting["n_power_iterations"], eps=setting["eps"])


def reset_norm(model: nn.Module) -> None:
    """TorchDEQ's ``reset_norm``: :func:`deqcore_torch.reset_norm` (one step of spectral norm's
    power iteration in training mode; normalised weights are always current)."""
    _norms.reset_norm(model)

