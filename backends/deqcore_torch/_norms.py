"""Weight and spectral normalisation of a DEQ layer's weights: :func:`apply_norm`,
:func:`reset_norm`, :func:`remove_norm`.

Each normalised weight is a :mod:`torch.nn.utils.parametrize` parametrization of its module:
``module.weight`` is computed from the stored ``parametrizations.weight.original`` on access,
so it is always the current parameters' normalised weight (after ``optimizer.step()``, after
``load_state_dict``), it moves with ``.to()``, and ``torch.nn.utils.parametrize.cached()``
computes it once for everything run inside the context. The parametrization is this module's
own rather than ``torch.nn.utils.parametrizations.weight_norm``/``spectral_norm``: TorchDEQ's
behaviour, the reference, has a fixed-target and a clipped form of weight norm and a learnt
scale on spectral norm, which torch's have not, and torch's spectral norm advances its power
iteration at every read in training mode (see :func:`reset_norm` for why a DEQ must not).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import nn
from torch.nn.utils import parametrize

from deqcore.validators import positive_int

NORMS = ("weight_norm", "spectral_norm")
"""The normalisations :func:`apply_norm` applies."""

DEFAULT_TARGETS: Mapping[type, tuple[tuple[str, ...], int]] = {
    nn.Linear: (("weight",), 0),
    nn.Conv1d: (("weight",), 0),
    nn.Conv2d: (("weight",), 0),
    nn.Conv3d: (("weight",), 0),
    nn.ConvTranspose1d: (("weight",), 1),
    nn.ConvTranspose2d: (("weight",), 1),
    nn.ConvTranspose3d: (("weight",), 1),
}
"""Module type -> (parameter names, output dimension): what :func:`apply_norm` normalises by
default. The output dimension indexes the rows whose norms weight norm fixes (the
output channels: dimension 1 of a transposed convolution's weight)."""

_POWER_STEPS_AT_APPLY = 15  # a converged start (as torch's spectral_norm): sigma is accurate at once


class _Rescaled(nn.Module):
    """``weight * factor``, ``factor = min(clip_value, scale / measure(weight))`` per output row.

    ``scale`` is the learnt ``g`` (one per output row) or the fixed ``target_norm``; ``measure``
    is the row's 2-norm (weight norm) or the weight's largest singular value (spectral norm).
    """

    u: torch.Tensor  # spectral norm's singular-vector estimates (buffers)
    v: torch.Tensor
    g: nn.Parameter | None

    def __init__(self, weight: torch.Tensor, kind: str, dim: int, learn_scale: bool,
                 target_norm: float, clip_value: float | None, n_power_iterations: int,
                 eps: float) -> None:
        super().__init__()
        self.kind, self.dim, self.clip_value = kind, dim, clip_value
        self.target_norm, self.n_power_iterations, self.eps = target_norm, n_power_iterations, eps
        shape = [1] * weight.ndim
        shape[dim] = weight.shape[dim]
        with torch.no_grad():
            if kind == "spectral_norm":
                matrix = self._matrix(weight)
                u = torch.randn(matrix.shape[0], dtype=weight.dtype, device=weight.device)
                v = torch.randn(matrix.shape[1], dtype=weight.dtype, device=weight.device)
                self.register_buffer("u", nn.functional.normalize(u, dim=0, eps=eps))
                self.register_buffer("v", nn.functional.normalize(v, dim=0, eps=eps))
                self.power_iteration(weight, _POWER_STEPS_AT_APPLY)
                g0 = torch.full(shape, float(target_norm), dtype=weight.dtype, device=weight.device)
            else:
                g0 = self._row_norms(weight)
        self.g = nn.Parameter(g0) if learn_scale else None

    def _matrix(self, weight: torch.Tensor) -> torch.Tensor:
        return weight.movedim(self.dim, 0).reshape(weight.shape[self.dim], -1)

    def _row_norms(self, weight: torch.Tensor) -> torch.Tensor:
        shape = [1] * weight.ndim
        shape[self.dim] = weight.shape[self.dim]
        return torch.linalg.vector_norm(self._matrix(weight), dim=1).reshape(shape)

    @torch.no_grad()
    def power_iteration(self, weight: torch.Tensor, steps: int) -> None:
        """``steps`` power-iteration steps on the singular vectors ``u``, ``v`` (in place)."""
        matrix = self._matrix(weight)
        for _ in range(steps):
            nn.functional.normalize(matrix.mT @ self.u, dim=0, eps=self.eps, out=self.v)
            nn.functional.normalize(matrix @ self.v, dim=0, eps=self.eps, out=self.u)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if self.kind == "spectral_norm":
            u, v = self.u.clone(), self.v.clone()  # reset_norm updates them in place
            measure = torch.dot(u, self._matrix(weight) @ v)
        else:
            measure = self._row_norms(weight)
        factor = (self.g if self.g is not None else self.target_norm) / measure
        if self.clip_value is not None:
            factor = torch.clamp(factor, max=self.clip_value)
        return weight * factor


def apply_norm(
    model: nn.Module,
    norm: str = "weight_norm",
    *,
    targets: Mapping[type, tuple[Iterable[str] | str, int]] | None = None,
    skip: Iterable[str] = (),
    skip_prefix: Iterable[str] = (),
    learn_scale: bool = True,
    target_norm: float = 1.0,
    clip_value: float | None = None,
    n_power_iterations: int = 1,
    eps: float = 1e-12,
) -> list[str]:
    """Normalise the weights of ``model``'s submodules (TorchDEQ's ``apply_norm`` semantics).

    Every submodule whose type is exactly a key of ``targets`` (default :data:`DEFAULT_TARGETS`:
    ``Linear``, ``Conv1d/2d/3d`` and their transposes) gets each named parameter replaced by
    ``W = V * factor`` with ``V`` the stored original (``parametrizations.<name>.original``) and,
    per output row, ``factor = min(clip_value, g / measure)``:

    - ``"weight_norm"``: ``measure`` is the row's 2-norm ``||V_row||``, so ``||W_row|| = g``
      (Salimans and Kingma); ``g`` starts at ``||V_row||``, so ``W`` is unchanged at first.
    - ``"spectral_norm"``: ``measure`` is ``sigma``, the largest singular value of ``V`` (as a
      matrix with the output rows as rows) estimated by power iteration, so ``||W||_2 = g``
      for a uniform ``g``; ``g`` starts at ``target_norm``.

    A module whose name contains an entry of ``skip`` or starts with one of ``skip_prefix`` is
    left alone (TorchDEQ's ``filter_out`` and ``prefix_filter_out``).

    Args:
        model: the layer (any ``nn.Module``); normalised in place.
        norm: ``"weight_norm"`` or ``"spectral_norm"``.
        targets: module type -> (parameter name or names, output dimension).
        skip: substrings of module names to leave alone.
        skip_prefix: prefixes of module names to leave alone.
        learn_scale: ``g`` is a learnt parameter (``parametrizations.<name>.0.g``), one per
            output row; False fixes it to ``target_norm``.
        target_norm: the fixed scale (``learn_scale=False``) or, for spectral norm, the start
            of the learnt one.
        clip_value: an upper bound on the factor (only shrink weights: ``clip_value=1``); None
            for no bound.
        n_power_iterations: spectral norm's power-iteration steps per :func:`reset_norm`.
        eps: spectral norm's guard against dividing by zero when normalising ``u`` and ``v``.

    Returns:
        The qualified names (``"layer.conv1.weight"``) of the normalised parameters.

    Raises:
        ValueError: an unknown ``norm``, a bad number, a parameter that is already
            parametrized, or a named parameter the module does not have.
    """
    if norm not in NORMS:
        raise ValueError(f"apply_norm: norm must be one of {', '.join(map(repr, NORMS))}, got {norm!r}")
    if positive_int(n_power_iterations) is not None:
        raise ValueError(f"apply_norm: n_power_iterations must be an int >= 1, got {n_power_iterations!r}")
    if not target_norm > 0 or (clip_value is not None and not clip_value > 0) or not eps > 0:
        raise ValueError(f"apply_norm: target_norm, clip_value and eps must be > 0, got {target_norm!r}, "
                         f"{clip_value!r}, {eps!r}")
    skip, skip_prefix = _names(skip, "skip"), _names(skip_prefix, "skip_prefix")
    plan = []  # checked in full before anything changes
    for module_name, module in model.named_modules():
        if any(s in module_name for s in skip) or any(module_name.startswith(p) for p in skip_prefix):
            continue
        names, dim = (DEFAULT_TARGETS if targets is None else targets).get(_module_type(module), ((), 0))
        for name in (names,) if isinstance(names, str) else tuple(names):
            qualified = f"{module_name}.{name}" if module_name else name
            if parametrize.is_parametrized(module, name):
                raise ValueError(f"apply_norm: {qualified} is already parametrized (normalised "
                                 "twice?); remove_norm first")
            if not isinstance(getattr(module, name, None), nn.Parameter):
                raise ValueError(f"apply_norm: {_module_type(module).__name__} {module_name!r} has no "
                                 f"parameter {name!r}")
            plan.append((qualified, module, name, dim))
    for _, module, name, dim in plan:
        weight = getattr(module, name).detach()
        rescale = _Rescaled(weight, norm, dim % weight.ndim, learn_scale, target_norm, clip_value,
                            n_power_iterations, eps)
        parametrize.register_parametrization(module, name, rescale)
    return [qualified for qualified, *_ in plan]


def reset_norm(model: nn.Module) -> None:
    """Advance spectral norm's estimate of ``sigma`` once per training step; call it before
    each step's forward.

    Spectral norm estimates ``sigma`` by power iteration. A DEQ evaluates its layer tens of
    times per forward solve (and again in the backward solve): iterating at every evaluation,
    as ``torch.nn.utils.parametrizations.spectral_norm`` does in training mode, would change
    ``f`` while the solver looks for its fixed point. Here the singular vectors move only when
    this function runs (``n_power_iterations`` steps per spectral-normalised weight, in training
    mode only; in eval mode nothing changes), so ``f`` is one function for the whole step.
    Weight norm has no such state: nothing to do for it.

    The normalised weights are recomputed from the current parameters whenever they are read.
    To compute each once per step, as TorchDEQ does, run the step's forward and backward inside
    ``torch.nn.utils.parametrize.cached()``.
    """
    for rescale, original in _parametrizations(model):
        if rescale.kind == "spectral_norm" and rescale.training:
            rescale.power_iteration(original, rescale.n_power_iterations)


def remove_norm(model: nn.Module) -> list[str]:
    """Undo :func:`apply_norm`: each normalised parameter becomes a plain parameter holding the
    current normalised weight. Returns the qualified names of the parameters restored."""
    done = []
    for module_name, module in list(model.named_modules()):
        for name in list(getattr(module, "parametrizations", {}) or {}):
            if any(isinstance(p, _Rescaled) for p in module.parametrizations[name]):
                parametrize.remove_parametrizations(module, name, leave_parametrized=True)
                done.append(f"{module_name}.{name}" if module_name else name)
    return done


def _parametrizations(model: nn.Module) -> list[tuple[_Rescaled, torch.Tensor]]:
    """Each :class:`_Rescaled` in ``model`` with the original weight it rescales."""
    return [(p, plist.original) for module in model.modules()
            for plist in (getattr(module, "parametrizations", None) or {}).values()
            for p in plist if isinstance(p, _Rescaled)]


def _module_type(module: nn.Module) -> type:
    """The module's own class (parametrizing a module swaps in a subclass of it)."""
    cls = type(module)
    return cls.__bases__[0] if parametrize.is_parametrized(module) else cls


def _names(value: Iterable[str] | str, what: str) -> tuple[str, ...]:
    names = (value,) if isinstance(value, str) else tuple(value)
    if not all(isinstance(n, str) for n in names):
        raise TypeError(f"apply_norm: {what} must be a string or strings, got {value!r}")
    return names
