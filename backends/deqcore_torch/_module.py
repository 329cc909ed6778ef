"""``DEQ``: a deep equilibrium layer as a ``torch.nn.Module``, holding its solve settings."""

from __future__ import annotations

import dataclasses
import types
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_map_only

import deqcore
from deqcore.extend import SOLUTION_DATA_FIELDS
from deqcore.internal import check_solve_settings

_MODES = ("train", "eval")
_MODE_NAMES = {"train": "training", "eval": "evaluation"}


class DEQ(nn.Module):
    """The fixed point ``z* = f(z*, x)`` of a layer ``f``, as a module.

    ``DEQ(f, solver="broyden", tol=1e-6, train=dict(max_iter=12), eval=dict(max_iter=50))``
    solves with :func:`deqcore.solve` and these settings; ``deq(x)`` returns ``(z_star,
    solution)``, ``z_star`` differentiable by the gradient mode of the settings (``grad``,
    implicit by default).

    Args:
        f: the layer, called as ``f(z, x)`` (an array or a tuple of arrays, returned with the
            same structure). An ``nn.Module`` is registered as the submodule ``f``: its
            parameters and buffers are the DEQ's (``parameters()``, ``state_dict()``,
            ``.to()``, DDP). Any other callable is kept as it is; tensors it closes over are not
            the module's.
        train: settings used instead of the shared ones while the module is in training mode
            (``.train()``, the default), for example fewer iterations or a cheaper gradient.
        eval: likewise, in evaluation mode (``.eval()``).
        **settings: keyword arguments of :func:`deqcore.solve` shared by both modes: ``solver``
            (a name or an instance), ``tol``, ``max_iter``, ``stop_mode``, ``grad``,
            ``grad_options``, the solver's own options (``memory``, ``beta``, ...) and any other
            keyword the solve takes. A setting not given takes the solve's default.

    Settings are checked when the module is built and when :meth:`configure` changes them, with
    deqcore's own validators: unknown names are a ``TypeError``, bad values a ``ValueError``,
    for the shared settings and for each mode's. ``backend`` is always ``"torch"``; ``f``, ``x``
    and ``z0`` are not settings.

    The solve runs outside ``torch.compile``: compiling a model that holds a DEQ breaks its graph
    at the solve, once, and nowhere else; ``f`` runs eagerly inside it. The settings are
    construction arguments, like ``nn.Linear``'s sizes, not part of ``state_dict()``.

    Attributes:
        last_solution: the :class:`deqcore.Solution` of the latest forward pass (None before
            one), for logging (``nfe``, ``rel_residual``, ``summary()``): its tensors are
            detached, so it keeps no autograd graph alive. Its ``backward`` report fills in when
            the backward pass runs.
    """

    last_solution: deqcore.Solution | None

    def __init__(self, f: nn.Module | Callable[[Any, Any], Any], *, train: Mapping[str, Any] | None = None,
                 eval: Mapping[str, Any] | None = None, **settings: Any) -> None:
        super().__init__()
        if not callable(f):
            raise TypeError(f"DEQ: f must be a module or a callable f(z, x), got {type(f).__name__}")
        self.f = f
        self._shared: dict[str, Any] = {}
        self._modes: dict[str, dict[str, Any]] = {mode: {} for mode in _MODES}
        self.last_solution = None
        self.configure(train=train, eval=eval, **settings)

    @property
    def settings(self) -> Mapping[str, Any]:
        """The settings the next forward pass solves with: the shared ones updated by those of the
        current mode (``training``). Read-only; change them with :meth:`configure`."""
        return self.settings_for(self.training)

    def settings_for(self, training: bool) -> Mapping[str, Any]:
        """The settings of training (``True``) or evaluation mode, whatever the current mode is."""
        return types.MappingProxyType({**self._shared, **self._modes[_MODES[not training]]})

    def configure(self, *, train: Mapping[str, Any] | None = None, eval: Mapping[str, Any] | None = None,
                  replace: bool = False, **settings: Any) -> DEQ:
        """Update settings, checked as at construction; ``self`` is returned.

        ``**settings`` update the shared settings, ``train`` and ``eval`` those of each mode
        (names not given keep their values). With ``replace=True`` the settings given replace
        all current ones, shared and per mode (what is not given takes the solve's default):
        the way to drop a solver option when changing solver. Nothing changes when a check fails.
        """
        kept = not replace
        shared = {**(self._shared if kept else {}), **settings}
        modes = {}
        for mode, given in zip(_MODES, (train, eval), strict=True):
            if given is not None and not isinstance(given, Mapping):
                raise TypeError(f"DEQ: {mode}= must be a dict of settings, got {type(given).__name__}")
            modes[mode] = {**(self._modes[mode] if kept else {}), **(given or {})}
        for mode in _MODES:
            try:
                check_solve_settings("deqcore.solve", "torch", {**shared, **modes[mode]})
            except (TypeError, ValueError) as error:
                raise type(error)(f"DEQ ({_MODE_NAMES[mode]} mode): {error}") from None
        self._shared, self._modes = shared, modes
        return self

    def forward(self, x: Any, z0: Any = None) -> tuple[Any, deqcore.Solution]:
        """``(z_star, solution)`` for the input injection ``x`` (a tensor, a tuple, or what ``f``
        takes) from ``z0`` (default: zeros shaped like ``x``; see :func:`deqcore.solve`)."""
        return self._solve(x, z0)

    @torch.compiler.disable(reason="deqcore_torch.DEQ: the fixed-point solve runs eagerly (its loop "
                                   "is data-dependent); the model's graph resumes after it")
    def _solve(self, x: Any, z0: Any) -> tuple[Any, deqcore.Solution]:
        solution = deqcore.solve(self.f, x, z0, backend="torch", **self.settings)
        self.last_solution = dataclasses.replace(solution, **{
            name: tree_map_only(torch.Tensor, torch.Tensor.detach, getattr(solution, name))
            for name in SOLUTION_DATA_FIELDS})
        return solution.z, solution

    def extra_repr(self) -> str:
        parts = [f"{k}={v!r}" for k, v in self._shared.items()]
        parts += [f"{mode}={settings!r}" for mode, settings in self._modes.items() if settings]
        return ", ".join(parts)
