"""Losses and metrics of a model, written once over ``xp``: what an engine differentiates."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ._equilibrium_layer import DEQSettings
from ._layers import cross_entropy, output_cross_entropy, token_cross_entropy

#: Positions per chunk of a language model's softmax (``--softmax-chunk``): at 32, a 33K-word
#: vocabulary's chunk of logits is 4 MB, and torch trains faster than with the whole softmax
#: (docs/models.md, "Training memory").
DEFAULT_SOFTMAX_CHUNK = 32

#: The weight of the loss on correction state i of k (the k-th is ``z*``) is
#: ``CORRECTION_GAMMA ** (k - i)``, DEQ-Flow's.
CORRECTION_GAMMA = 0.8

#: ``apply(ops, params, state, x, *, train, settings, masks, probe) -> (outputs, new_state, LayerStats)``
Apply = Callable[..., tuple[Any, dict[str, Any], Any]]


@dataclass(frozen=True)
class ClassifierTask:
    """Image classification: mean cross-entropy of the logits against one-hot labels."""

    apply: Apply

    def loss(self, ops: Any, params: dict[str, Any], state: dict[str, Any], x: Any, y: Any,
             masks: Any, settings: DEQSettings, train: bool, probe: Any = None
             ) -> tuple[Any, tuple[Any, ...]]:
        """``(loss, (new_state, correct, nfe, worst_rel_residual, jac_penalty, logits))``; ``y``
        is one-hot. With a Hutchinson ``probe`` (see :func:`run_layer`) the loss includes
        ``settings.jac_weight * jac_penalty``; without, ``jac_penalty`` is NaN."""
        xp = ops.xp
        logits, new_state, stats = self.apply(ops, params, state, x, train=train, settings=settings,
                                              masks=masks, probe=probe)
        loss = _corrected(cross_entropy(xp, logits, y), stats, lambda out: cross_entropy(xp, out, y))
        correct = xp.sum(xp.astype(xp.argmax(logits, axis=-1) == xp.argmax(y, axis=-1), xp.int32))
        loss, jac = _regularised(xp, loss, stats, settings)
        return loss, (new_state, correct, stats.nfe, stats.rel_residual, jac, logits)


@dataclass(frozen=True)
class LanguageModelTask:
    """Next-token prediction: mean cross-entropy over every position of (B, L) integer targets.

    ``output``: None when ``apply`` returns logits; or the names of the (V, d) weight and (V,)
    bias of the output layer when ``apply`` returns hidden states, in which case the loss is
    :func:`output_cross_entropy` over ``chunk`` positions at a time (the logits are never formed
    whole, in training or evaluation)."""

    apply: Apply
    output: tuple[str, str] | None = None
    chunk: int = DEFAULT_SOFTMAX_CHUNK

    def loss(self, ops: Any, params: dict[str, Any], state: dict[str, Any], x: Any, y: Any,
             masks: Any, settings: DEQSettings, train: bool, probe: Any = None
             ) -> tuple[Any, tuple[Any, ...]]:
        """As :meth:`ClassifierTask.loss`; ``correct`` counts tokens whose argmax prediction is
        the target. With ``output`` set, the last aux item is the hidden states, not logits."""
        outputs, new_state, stats = self.apply(ops, params, state, x, train=train, settings=settings,
                                               masks=masks, probe=probe)

        def mean_loss(out: Any) -> tuple[Any, Any]:
            if self.output is None:
                total, correct = token_cross_entropy(ops.xp, out, y, ops.stop_gradient)
            else:
                weight, bias = (params[name] for name in self.output)
                total, correct = output_cross_entropy(ops, out, weight, bias, y, self.chunk)
            return total / (y.shape[0] * y.shape[1]), correct

        loss, correct = mean_loss(outputs)
        loss = _corrected(loss, stats, lambda out: mean_loss(out)[0])
        loss, jac = _regularised(ops.xp, loss, stats, settings)
        return loss, (new_state, correct, stats.nfe, stats.rel_residual, jac, outputs)


def _corrected(loss: Any, stats: Any, loss_of: Callable[[Any], Any]) -> Any:
    """``loss`` (on ``z*``, the k-th state) plus ``CORRECTION_GAMMA ** (k - i)`` times the loss of
    the i-th of the k - 1 correction outputs of ``stats``: DEQ-Flow's fixed-point correction."""
    k = len(stats.correction_outputs) + 1
    for i, out in enumerate(stats.correction_outputs, start=1):
        loss = loss + CORRECTION_GAMMA ** (k - i) * loss_of(out)
    return loss


def _regularised(xp: Any, loss: Any, stats: Any, settings: DEQSettings) -> tuple[Any, Any]:
    """The loss plus the weighted Jacobian penalty when one was computed, and the penalty (NaN
    when not)."""
    if stats.jac_penalty is None:
        return loss, xp.asarray(float("nan"), dtype=loss.dtype)
    return loss + settings.jac_weight * stats.jac_penalty, stats.jac_penalty
