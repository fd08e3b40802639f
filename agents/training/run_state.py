"""What a checkpoint holds of a run besides the weights, and how a run resumes from it."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from agents.config import saved_settings
from agents.training.checkpoint import (
    CheckpointError,
    load_training_state,
    load_weights,
    model_metadata,
)

if TYPE_CHECKING:
    import numpy as np
    import torch

    from agents.algorithms.base import Algorithm
    from agents.config import TrainConfig
    from seqenv.tasks import Task
    from seqenv.trajectory import Trajectory
    from seqenv.vocab import Vocab


class CheckpointedRun(Protocol):
    """What a checkpoint keeps of a run (the trainer) besides its weights, and restores."""

    config: TrainConfig
    task: Task
    vocab: Vocab
    heldout: list[Trajectory]
    algorithm: Algorithm
    scheduler: torch.optim.lr_scheduler.LambdaLR
    data_rng: np.random.Generator
    rollout_generator: torch.Generator
    max_length: int
    max_steps: int
    step: int
    num_timesteps: int
    num_labelled_states: int
    last_eval: dict[str, float]
    history: list[dict[str, float]]

    @property
    def policy(self) -> torch.nn.Module:
        """The network being trained."""

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        """Its optimizer."""


# Settings that may change between a run and its resume (where things go, how they are shown).
_RESUMABLE = {
    "resume", "overwrite", "json", "progress", "logdir", "name", "save", "steps", "device",
}  # fmt: skip


def run_metadata(trainer: CheckpointedRun) -> dict[str, Any]:
    """What a checkpoint stores besides the weights: step, config, vocabulary, task."""
    return {
        "step": trainer.step,
        "num_timesteps": trainer.num_timesteps,
        "num_labelled_states": trainer.num_labelled_states,
        "config": dataclasses.asdict(trainer.config),
        "vocab": trainer.vocab.to_json(),
        "task": {
            "name": trainer.config.task,  # as given: a module:Class spec reloads
            "kwargs": trainer.task.config(),
        },
        "model": model_metadata(trainer.policy),
        "max_length": trainer.max_length,
        "max_steps": trainer.max_steps,
        # Evaluation and generation read these instead of the task's data (a text corpus).
        "test_prompts": [d.prompt.tolist() for d in trainer.heldout],
        "data_rng": trainer.data_rng.bit_generator.state,
        **trainer.algorithm.state(),  # a replay buffer, for an algorithm with rollouts
        "eval": trainer.last_eval,
        "history": trainer.history,  # a resumed run's learning curves start at update 0
    }


def restore_run(trainer: CheckpointedRun, path: str | Path, metadata: dict[str, Any]) -> None:
    """Put a checkpoint's state into ``trainer``: weights, optimizer, step, streams, algorithm.

    Raises:
        CheckpointError: for another vocabulary, settings that differ (each named with both
            values), or an algorithm state that does not fit.
    """
    if metadata["vocab"] != trainer.vocab.to_json():
        raise CheckpointError(
            f"{path}: the checkpoint's vocabulary does not match task {trainer.task.name!r}"
        )
    saved = saved_settings(metadata["config"])
    current = {k: v for k, v in dataclasses.asdict(trainer.config).items() if k not in _RESUMABLE}
    changed = [
        f"{k} (checkpoint {saved.get(k)!r}, now {v!r})"
        for k, v in sorted(current.items())
        if saved.get(k) != v
    ]
    if changed:
        raise CheckpointError(
            f"{path}: cannot resume with different settings: {'; '.join(changed)}"
        )
    load_weights(path, trainer.policy)
    rng = load_training_state(path, trainer.optimizer, metadata)
    trainer.step = int(metadata["step"])
    trainer.num_timesteps = int(metadata.get("num_timesteps", 0))
    trainer.num_labelled_states = int(metadata.get("num_labelled_states", trainer.num_timesteps))
    trainer.scheduler.last_epoch = trainer.step
    trainer.scheduler._last_lr = [g["lr"] for g in trainer.optimizer.param_groups]
    trainer.data_rng.bit_generator.state = metadata["data_rng"]
    trainer.rollout_generator.set_state(rng["rollout"])
    try:
        trainer.algorithm.load_state(metadata)
    except ValueError as err:
        raise CheckpointError(f"{path}: {err}") from None
    trainer.last_eval = metadata.get("eval", {})
    trainer.history = list(metadata.get("history", []))
