"""The run-cost settings of SequenceMatch (model batch size, length buckets, rollout cap): their
defaults, exact with their neutral values, and in effect when set."""

from __future__ import annotations

import copy
import dataclasses
import itertools
from typing import Any

import numpy as np
import pytest
import torch

from agents.algorithms.sequencematch import SequenceMatch, rollout_step_cap
from agents.config import TrainConfig
from agents.training.trainer import Trainer
from seqenv.trajectory import Trajectory
from tests.agents.conftest import tiny_run


def _config(**settings: Any) -> TrainConfig:
    sequencematch = {
        "agent": "sequencematch", "task": "arithmetic", "steps": 6, "sm_warmup": 2,
        "k_sample": 2, "rollouts": 8, "buffer_size": 32, "num_demonstrations": 64,
        "eval_episodes": 2, "log_interval": 3,
    }  # fmt: skip
    return tiny_run(**{**sequencematch, **settings})


def _sm(trainer: Trainer) -> SequenceMatch:
    """The run's SequenceMatch algorithm: its replay buffer, model batches and rollout cap."""
    assert isinstance(trainer.algorithm, SequenceMatch)
    return trainer.algorithm


def _weights(trainer: Trainer) -> list[torch.Tensor]:
    return [p.detach().clone() for p in trainer.policy.parameters()]


OFF = {"model_batch_size": 8, "model_batch_buckets": 1, "rollout_length_factor": None}
"""A model batch as large as the data batch (8), one uniform draw, no cap: the first version."""


def test_defaults() -> None:
    config = TrainConfig()
    assert config.model_batch_size is None and config.resolved_model_batch_size == 8
    assert config.model_batch_buckets == 4
    assert config.rollout_length_factor == 2.0
    # Never more than the data batch, and a whole number of micro-batches.
    assert TrainConfig(batch_size=4).resolved_model_batch_size == 4
    assert TrainConfig(batch_size=36, grad_accum=3).resolved_model_batch_size == 9
    assert TrainConfig(model_batch_size=32).resolved_model_batch_size == 32
    trainer = Trainer(_config(batch_size=32))
    assert _sm(trainer).model_batch_size == 8
    assert _sm(trainer).rollout_max_steps < trainer.max_steps
    off = Trainer(_config(**OFF))
    assert _sm(off).model_batch_size == off.config.batch_size
    assert _sm(off).rollout_max_steps == off.max_steps


def test_neutral_settings_give_the_plain_run_exactly() -> None:
    default = Trainer(_config(model_batch_buckets=1, rollout_length_factor=None))  # 8 = batch
    default.train()
    neutral = Trainer(_config(**OFF))
    neutral.train()
    for a, b in zip(_weights(default), _weights(neutral), strict=True):
        assert torch.equal(a, b)
    assert _sm(default).buffer.to_json() == _sm(neutral).buffer.to_json()


def test_default_model_batch_is_one_uniform_draw() -> None:
    """The draw the trainer made before these settings existed: one sample of batch_size."""
    trainer = Trainer(_config(**OFF))
    _sm(trainer).refresh_buffer()
    rng = copy.deepcopy(trainer.data_rng)
    expected = _sm(trainer).buffer.sample(trainer.config.batch_size, rng)
    assert _sm(trainer).draw_model_batch() == expected
    assert trainer.data_rng.bit_generator.state == rng.bit_generator.state


def test_model_batch_size_takes_effect() -> None:
    trainer = Trainer(_config(model_batch_size=4, grad_accum=2))
    _sm(trainer).refresh_buffer()
    assert len(_sm(trainer).draw_model_batch()) == 4
    seen: list[int] = []
    original = _sm(trainer).mixture

    class Spy:
        def __call__(self, policy: Any, batch: Any) -> Any:
            seen.append(batch.model.input_ids.shape[0])
            return original(policy, batch)  # type: ignore[misc]

    _sm(trainer).mixture = Spy()  # type: ignore[assignment]
    trainer.train()
    assert seen and set(seen) == {2}  # 4 rollouts in 2 micro-batches


def test_model_batch_size_must_divide_into_micro_batches() -> None:
    with pytest.raises(ValueError, match="model-batch-size"):
        _config(model_batch_size=3, grad_accum=2).validate()
    with pytest.raises(ValueError, match="model-batch-buckets"):
        _config(model_batch_buckets=0).validate()
    with pytest.raises(ValueError, match="rollout-length-factor"):
        _config(rollout_length_factor=0.0).validate()


def _length(t: Trajectory) -> int:
    return t.num_steps + len(t.prompt)


def test_length_buckets_group_one_uniform_draw_by_length() -> None:
    k = 4
    trainer = Trainer(_config(model_batch_buckets=k))
    _sm(trainer).refresh_buffer()
    rng = copy.deepcopy(trainer.data_rng)
    drawn = _sm(trainer).buffer.sample(k * trainer.config.batch_size, rng)
    batches = [_sm(trainer).draw_model_batch() for _ in range(k)]
    assert all(len(b) == trainer.config.batch_size for b in batches)
    # The k batches are the same rollouts as one uniform draw of k batches' worth ...
    assert sorted(id(t) for b in batches for t in b) == sorted(map(id, drawn))
    # ... split by length: no two batches' length ranges overlap beyond a shared endpoint.
    ranges = sorted((min(map(_length, b)), max(map(_length, b))) for b in batches)
    for (_, high), (low, _) in itertools.pairwise(ranges):
        assert high <= low
    # A refresh of the buffer empties the pool: the next batch is drawn afresh.
    _sm(trainer).draw_model_batch()
    assert _sm(trainer)._model_pool
    _sm(trainer).refresh_buffer()
    assert not _sm(trainer)._model_pool


def test_length_buckets_train() -> None:
    trainer = Trainer(_config(model_batch_buckets=4, steps=8))
    trainer.train()
    losses = [h["losses/loss"] for h in trainer.history if "losses/loss" in h]
    assert losses and all(np.isfinite(losses))


def test_rollout_step_cap() -> None:
    trainer = Trainer(_config())
    demos = trainer.demonstrations
    steps = np.array([t.num_steps for t in demos])
    assert rollout_step_cap(demos, 270, None, 0.99) == 270
    assert rollout_step_cap(demos, 270, 1.0, 1.0) == steps.max()
    assert rollout_step_cap(demos, 270, 2.0, 0.5) == int(np.ceil(2 * np.quantile(steps, 0.5)))
    assert rollout_step_cap(demos, 5, 100.0, 1.0) == 5  # never above the budget
    assert rollout_step_cap(demos, 270, 1e-6, 0.5) == 1


def test_rollout_cap_takes_effect() -> None:
    capped = Trainer(_config(rollout_length_factor=0.5, rollouts=16))
    cap = _sm(capped).rollout_max_steps
    assert cap < capped.max_steps
    _sm(capped).refresh_buffer()
    rollouts = _sm(capped).buffer.sample(64, np.random.default_rng(0))
    assert max(t.num_steps for t in rollouts) <= cap
    assert any(t.truncated for t in rollouts)
    # The evaluation keeps the full budget: the cap is the training rollouts' only.
    assert dataclasses.replace(capped.config).max_steps is None


def test_gradient_shares_are_a_diagnostic_at_their_own_interval() -> None:
    """Measured every grad_share_interval updates (and at the last); training is unchanged."""
    never = Trainer(_config(grad_share_interval=0, steps=7))
    never.train()
    often = Trainer(_config(grad_share_interval=2, steps=7))
    often.train()
    assert not any("train/grad_share_sm" in row for row in never.history)
    measured = [row["step"] for row in often.history if "train/grad_share_sm" in row]
    # Rows are logged after updates 3, 6 and 7; the shares are measured at updates 4 and 6 (the
    # SequenceMatch phase starts at update 3) and at the last, so they reach rows 6 and 7.
    assert measured == [6, 7]
    for a, b in zip(_weights(never), _weights(often), strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="grad-share-interval"):
        _config(grad_share_interval=-1).validate()
