"""Losses and metrics of a model, written once over ``xp``: what an engine differentiates."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ._deq import DEQSettings
from ._layers import cross_entropy, token_cross_entropy

#: ``apply(ops, params, state, x, *, train, settings, masks) -> (outputs, new_state, LayerStats)``
Apply = Callable[..., tuple[Any, dict[str, Any], Any]]


@dataclass(frozen=True)
class ClassifierTask:
    """Image classification: mean cross-entropy of the logits against one-hot labels."""

    apply: Apply

    def loss(self, ops: Any, params: dict[str, Any], state: dict[str, Any], x: Any, y: Any,
             masks: Any, settings: DEQSettings, train: bool) -> tuple[Any, tuple[Any, ...]]:
        """``(loss, (new_state, correct, nfe, worst_rel_residual, logits))``; ``y`` is one-hot."""
        xp = ops.xp
        logits, new_state, stats = self.apply(ops, params, state, x, train=train, settings=settings,
                                              masks=masks)
        loss = cross_entropy(xp, logits, y)
        correct = xp.sum(xp.astype(xp.argmax(logits, axis=-1) == xp.argmax(y, axis=-1), xp.int32))
        return loss, (new_state, correct, stats.nfe, stats.rel_residual, logits)


@dataclass(frozen=True)
class LanguageModelTask:
    """Next-token prediction: mean cross-entropy over every position of (B, L) integer targets."""

    apply: Apply

    def loss(self, ops: Any, params: dict[str, Any], state: dict[str, Any], x: Any, y: Any,
             masks: Any, settings: DEQSettings, train: bool) -> tuple[Any, tuple[Any, ...]]:
        """``(loss, (new_state, correct, nfe, worst_rel_residual, logits))``; ``correct`` counts
        tokens whose argmax prediction is the target."""
        logits, new_state, stats = self.apply(ops, params, state, x, train=train, settings=settings,
                                              masks=masks)
        total, correct = token_cross_entropy(ops.xp, logits, y, ops.stop_gradient)
        return total / (y.shape[0] * y.shape[1]), (new_state, correct, stats.nfe, stats.rel_residual, logits)
