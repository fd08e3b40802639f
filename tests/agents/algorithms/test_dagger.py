"""DAgger: the oracle's labels on the learner's own states (agents/algorithms/dagger.py)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from agents.algorithms.dagger import DAgger
from agents.config import TrainConfig
from agents.training.trainer import Trainer
from seqenv.expert import trajectory_expert_probs
from tests.agents.conftest import tiny_run

SMALL_DYCK = '{"num_types": 1, "max_depth": 3, "min_brackets": 0, "max_brackets": 6}'


def _config(**settings: Any) -> TrainConfig:
    dagger = {
        "agent": "dagger", "task": "dyck", "task_args": SMALL_DYCK, "max_length": 10, "steps": 8,
        "num_demonstrations": 128, "eval_episodes": 8, "lr": 0.01, "dagger_warmup": 2,
        "dagger_rollouts": 4, "dagger_round": 1, "dagger_buffer_size": 10,
    }  # fmt: skip
    return tiny_run(**{**dagger, **settings})


def _dagger(trainer: Trainer) -> DAgger:
    assert isinstance(trainer.algorithm, DAgger)
    return trainer.algorithm


def test_buffer_grows_by_the_rollouts_and_stays_bounded() -> None:
    torch.set_num_threads(1)
    for round_, expected in ((1, [0, 0, 4, 8, 10, 10, 10, 10]), (2, [0, 0, 8, 8, 10, 10, 10, 10])):
        trainer = Trainer(_config(dagger_round=round_))
        dagger = _dagger(trainer)
        sizes = []
        for step in range(8):
            trainer.step = step
            dagger.model_batch(step)
            sizes.append(len(dagger.buffer))
        # Nothing in the warm start (2 updates), then 4 rollouts an update (a round's at its
        # start), up to 10.
        assert sizes == expected, round_


def test_demonstrations_are_relabelled_by_the_oracle() -> None:
    """After the warm start every episode of a batch carries the oracle's distribution at each
    state it visited, demonstrations (with random noise) as well as rollouts."""
    trainer = Trainer(_config(disturbance=0.3, dagger_demo_share=0.5))
    dagger = _dagger(trainer)
    trainer.step = 2
    data = trainer._data_batch()
    model = dagger.model_batch(2)
    assert model is not None and len(model) == 4  # half of the batch of 8
    batch = dagger.batch(data, model)
    assert batch.data_targets is not None
    episodes = data[:4] + model
    assert batch.data.step_mask.shape[0] == 8
    for b, episode in enumerate(episodes):
        expected = trajectory_expert_probs(trainer.task, episode)
        got = batch.data_targets[b, : len(expected)].numpy()
        np.testing.assert_allclose(got, expected, atol=1e-7)
        assert not batch.data_targets[b, len(expected) :].any()
    # Where the demonstrator deleted valid-looking noise the oracle continues: the targets say
    # so, not the demonstrator's backspace.
    bk = trainer.special.backspace_id
    disagree = [
        (b, t)
        for b, episode in enumerate(data[:4])
        for t, (intended, executed) in enumerate(
            zip(episode.intended_actions.tolist(), episode.actions.tolist(), strict=True)
        )
        if intended == bk and batch.data_targets[b, t, bk] < 1
    ]
    assert all(batch.data_targets[b, t].sum() == pytest.approx(1) for b, t in disagree)
    # Before it, the warm start's batch is BC's: no targets.
    trainer.step = 1
    assert dagger.batch(data, None).data_targets is None


@pytest.mark.parametrize("beta", [0.0, 0.3, 1.0])
def test_beta_hook_takes_the_oracles_action_at_the_stated_rate(beta: float) -> None:
    trainer = Trainer(_config(dagger_beta=beta, dagger_beta_decay=1.0))
    dagger = _dagger(trainer)
    trajectories = dagger.rollouts(step=2, count=256)
    steps = sum(t.num_steps for t in trajectories)
    assert dagger.rollout_steps == steps
    share = dagger.expert_steps / steps
    # A binomial share over ~1,000 steps: within 4 standard deviations.
    assert abs(share - beta) <= 4 * np.sqrt(beta * (1 - beta) / steps) + 1e-12
    if beta == 1.0:  # the oracle alone: every episode is a valid dyck word, ended
        assert all(t.terminated for t in trajectories)
        assert all(trainer.task.is_valid(t.generated()) for t in trajectories)


def test_beta_decays_after_the_warm_start() -> None:
    dagger = _dagger(Trainer(_config(dagger_beta=0.5, dagger_beta_decay=0.9)))
    assert dagger.beta(0) == dagger.beta(2) == 0.5
    assert dagger.beta(4) == pytest.approx(0.5 * 0.81)


def test_the_control_reads_as_many_oracle_labelled_states_without_rollouts() -> None:
    control = Trainer(_config(agent="dagger_demos", dagger_demo_share=1.0))
    control.train()
    assert len(_dagger(control).buffer) == 0 and _dagger(control).rollout_steps == 0
    dagger = Trainer(_config())
    dagger.train()
    # Both read batch_size episodes an update, every one labelled by an expert.
    assert control.num_labelled_states > 0 and dagger.num_labelled_states > 0
    assert len(_dagger(dagger).buffer) == 10


def test_a_task_without_an_oracle_refuses_it_in_one_line() -> None:
    with pytest.raises(ValueError, match=r"agent 'dagger' needs a task with an expert oracle; "):
        Trainer(_config(task="text", task_args="{}", max_length=None))
    with pytest.raises(ValueError, match="needs the backspace"):
        Trainer(_config(backspace=False))


def test_dagger_learns_a_tiny_dyck() -> None:
    """Within the default suite's budget: a low invalid rate on the small grammar."""
    torch.set_num_threads(1)
    config = _config(
        steps=150, batch_size=32, num_demonstrations=1000, dagger_warmup=50,
        dagger_rollouts=16, dagger_buffer_size=256, eval_episodes=200, width=48, lr=0.01,
    )  # fmt: skip
    metrics = Trainer(config).train()
    assert metrics["eval/invalid_rate"] <= 0.05
