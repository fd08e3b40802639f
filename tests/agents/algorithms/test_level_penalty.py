"""SequenceMatch's warm start pins the logits' level (docs/method.md §3, "The logits' level")."""

from __future__ import annotations

from typing import Any

import pytest

from agents.algorithms import SequenceMatch
from agents.config import TrainConfig
from agents.objectives import BCLoss, MLELoss
from agents.training.logger import Logger
from agents.training.trainer import Trainer


def _config(**settings: Any) -> TrainConfig:
    base: dict[str, Any] = {
        "agent": "sequencematch", "task": "dyck", "steps": 40, "sm_warmup": 40,
        "batch_size": 16, "layers": 1, "width": 32, "heads": 2, "num_demonstrations": 256,
        "eval_interval": 0, "eval_episodes": 2, "log_interval": 40, "logdir": None,
        "save": None, "progress": False, "device": "cpu", "lr": 0.01, "lr_warmup": 1,
    }  # fmt: skip
    base.update(settings)
    return TrainConfig(**base)


def test_bc_and_sequencematch_share_the_penalty_and_mle_has_none() -> None:
    assert TrainConfig().level_penalty == 0.01
    sm = Trainer(_config(level_penalty=0.05)).algorithm
    assert isinstance(sm, SequenceMatch)
    assert isinstance(sm.warm_objective, BCLoss) and sm.warm_objective.level_penalty == 0.05
    assert sm.mixture.bc.level_penalty == 0.05
    bc = Trainer(_config(agent="bc", level_penalty=0.05)).algorithm.loss(0)
    assert isinstance(bc, BCLoss) and bc.level_penalty == 0.05  # the same penalty as SM's BC
    mle = Trainer(_config(agent="mle", level_penalty=0.05)).algorithm.loss(0)
    assert isinstance(mle, MLELoss) and mle.level_penalty == 0.0


def test_bad_level_penalty_is_refused() -> None:
    with pytest.raises(ValueError, match=r"--level-penalty must be finite and >= 0, got -1.0"):
        TrainConfig(level_penalty=-1.0).validate()


def _mean_level(level_penalty: float) -> float:
    trainer = Trainer(_config(level_penalty=level_penalty))
    logger = Logger(None)
    trainer.policy.train()
    while trainer.step < trainer.config.steps:
        if trainer.step == trainer.config.steps - 10:
            logger.dump(trainer.step)  # the mean of the last 10 updates only
        trainer.train_step(logger)
    return logger.dump(trainer.step)["losses/level"]


def test_the_penalty_brings_the_level_down() -> None:
    free, pinned = _mean_level(0.0), _mean_level(0.1)
    assert free > 1.0  # plain BC lets the level grow with its confidence
    assert abs(pinned) < 0.5 * free
