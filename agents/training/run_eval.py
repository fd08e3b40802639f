"""A run's evaluation at its eval intervals: held-out episodes, clean and disturbed, and d_hat.

Every agent is measured the same way, so that their curves overlay: the task's metrics on
held-out prompts (``eval/...``; ``eval/disturbed/...`` in the training disturbance), and the
occupancy-divergence estimate d_hat of the run's own episodes (``eval/divergence``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch

from agents.evaluation.evaluate import divergence_estimate, evaluate, sample_lines
from agents.training.logger import Logger
from seqenv.disturbance import KEY_BOUND
from seqenv.trajectory import Trajectory, disturbed_demonstrations

if TYPE_CHECKING:
    from agents.algorithms.base import TrainablePolicy
    from agents.config import TrainConfig
    from agents.objectives import SequenceMatchLoss
    from seqenv.disturbance import Disturbance, NoiseFn
    from seqenv.tasks import Task
    from seqenv.vocab import Vocab


class EvaluatedRun(Protocol):
    """What the evaluation reads of a run (the trainer)."""

    config: TrainConfig
    task: Task
    vocab: Vocab
    heldout: list[Trajectory]
    divergence_probe: SequenceMatchLoss
    disturbance: Disturbance | None
    noise_fn: NoiseFn | None
    max_length: int
    max_steps: int
    step: int

    @property
    def policy(self) -> TrainablePolicy:
        """The network being trained."""


@torch.no_grad()
def evaluate_run(trainer: EvaluatedRun, logger: Logger | None = None) -> dict[str, float]:
    """A run's evaluation: episodes on held-out prompts (task score, backspace use, samples).

    Sampled episodes draw from their own seeded stream, so evaluating never changes the
    course of training (and a resumed run stays exact).
    """
    settings: dict[str, Any] = {
        "max_length": trainer.max_length,
        "max_steps": trainer.max_steps,
        "allow_backspace": trainer.config.backspace,
        "greedy": trainer.config.eval_greedy,
        "temperature": trainer.config.temperature,
        "episodes": trainer.config.eval_episodes,
        "seed": trainer.config.seed + 3,
        "prompt_seed": trainer.config.seed,
    }
    trainer.policy.eval()
    try:
        result = evaluate(trainer.policy, trainer.task, **settings)
        disturbed = None
        if trainer.disturbance is not None:  # robustness: repairing errors it did not choose
            disturbed = evaluate(
                trainer.policy,
                trainer.task,
                **settings,
                disturbance=trainer.disturbance,
                noise_fn=trainer.noise_fn,
            )
    finally:
        trainer.policy.train()
    metrics = {f"eval/{key}": value for key, value in result.metrics.items()}
    if disturbed is not None:
        metrics.update({f"eval/disturbed/{k}": v for k, v in disturbed.metrics.items()})
    metrics["eval/divergence"] = divergence_of(trainer, (disturbed or result).episodes)
    if logger is not None:
        for key, value in metrics.items():
            logger.record(key, value)
        logger.text("eval/samples", sample_lines(trainer.vocab, result), trainer.step)
    return metrics


@torch.no_grad()
def divergence_of(trainer: EvaluatedRun, episodes: list[Trajectory]) -> float:
    """d_hat of the agent's own evaluation ``episodes`` against the held-out demonstrations.

    Both in the agent's environment (disturbed when it trains with a disturbance).
    """
    demos = trainer.heldout
    if trainer.disturbance is not None:  # fixed keys: the same demonstrations at every eval
        keys = np.random.default_rng([trainer.config.seed, 4]).integers(0, KEY_BOUND, len(demos))
        demos = disturbed_demonstrations(
            demos,
            trainer.disturbance,
            trainer.max_length,
            trainer.max_steps,
            noise_fn=trainer.noise_fn,
            keys=keys.tolist(),
        )
    trainer.policy.eval()
    try:
        return divergence_estimate(trainer.policy, trainer.divergence_probe, demos, episodes)
    finally:
        trainer.policy.train()
