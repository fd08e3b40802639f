"""MLE: teacher forcing on the clean demonstrations, the usual language-model training.

The backspace is never a target of clean data, so the name ``mle`` fixes ``backspace=False``:
its ``<bkspc>`` row is masked in training and in generation. ``untuned`` is a pretrained model
built as MLE would be and evaluated as loaded, never updated: the baseline a fine-tune must beat.
"""

from __future__ import annotations

from typing import ClassVar

from agents.algorithms.base import Algorithm, DataKind, Run
from agents.objectives import MLELoss, Objective


class MLE(Algorithm):
    """Teacher-forced cross entropy on the clean demonstrations."""

    label = "MLE"
    short_label = "MLE"
    learns_from: ClassVar[DataKind] = "clean"

    def __init__(self, trainer: Run) -> None:
        super().__init__(trainer)
        self.objective = MLELoss(
            normaliser_length=trainer.max_steps, allow_backspace=self.config.backspace
        )

    def loss(self, step: int) -> Objective:
        """The cross entropy of the data batch, at every update."""
        return self.objective


class Untuned(MLE):
    """The pretrained model as loaded (its fresh LoRA adapter is a no-op), never updated."""

    label = "the pretrained model, untuned"
    short_label = "untuned"
    trains = False

    @classmethod
    def unavailable(cls, task: str, pretrained: bool) -> str | None:
        """Only where there is a pretrained model to leave untuned (``--model``)."""
        return None if pretrained else "needs a pretrained model: pass --model PATH"
