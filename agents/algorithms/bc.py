"""BC: behaviour cloning on the demonstrations of the disturbed environment.

The expert acts in the environment that replaces a token action by noise with probability p,
and backspaces each disturbance (docs/method.md §5): cloning it teaches the backspace. The
``labels`` setting picks the targets: the intended actions (noise is never a target), or the
executed ones (noise tokens included, the paper's scheme; the ``bc_executed`` preset).
"""

from __future__ import annotations

from agents.algorithms.base import Algorithm, Run
from agents.objectives import BCLoss, Objective


class BC(Algorithm):
    """Cross entropy on disturbed demonstrations: MLE plus the repairs of the disturbances."""

    label = "BC (intended actions, disturbed data)"
    short_label = "BC"
    settings = ("disturbance", "disturbance_type", "labels", "noise_targets", "level_penalty")

    def __init__(self, trainer: Run) -> None:
        super().__init__(trainer)
        self.objective = BCLoss.from_settings(
            self.config, normaliser_length=trainer.max_steps, allow_backspace=self.config.backspace
        )

    def loss(self, step: int) -> Objective:
        """The cross entropy of the (disturbed) data batch, at every update."""
        return self.objective
