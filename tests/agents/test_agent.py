"""The SB3-style facade and the SB3 features extractor, on tiny models."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import pytest
import torch

import seqenv
from agents import BC, MLE, SequenceMatch
from agents.config import TrainConfig
from agents.models.sb3 import SequenceFeaturesExtractor
from agents.training.checkpoint import CheckpointError, resolve_checkpoint
from agents.training.trainer import Trainer

TINY = {
    "layers": 1,
    "width": 32,
    "heads": 2,
    "batch_size": 8,
    "eval_episodes": 8,
    "eval_interval": 0,
    "num_demonstrations": 64,
    "lr_warmup": 2,
}


def test_learn_predict_save_load(tmp_path: Path) -> None:
    env = gym.make(seqenv.ENV_ID, task="dyck")
    model = SequenceMatch(env, seed=1, sm_warmup=2, k_sample=2, rollouts=8, buffer_size=16, **TINY)
    assert model.learn(total_timesteps=300) is model
    assert model.num_timesteps >= 300
    assert model.trainer.step > model.trainer.config.sm_warmup  # SequenceMatch really ran
    obs, info = env.reset(seed=0)
    action, state = model.predict(obs, deterministic=True, action_masks=info["action_mask"])
    assert state is None and env.action_space.contains(np.int64(action))
    assert action != env.unwrapped.vocab.backspace_id  # masked: nothing generated yet
    actions, _ = model.predict(np.stack([obs, obs]), deterministic=True)
    assert actions.shape == (2,) and actions[0] == actions[1]
    model.save(tmp_path / "sm")
    loaded = SequenceMatch.load(tmp_path / "sm", device="cpu")
    for a, b in zip(
        model.policy.state_dict().values(), loaded.policy.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b)
    assert loaded.trainer.step == model.trainer.step
    assert loaded.predict(obs, deterministic=True)[0] == model.predict(obs, deterministic=True)[0]


def _edit_stored_config(checkpoint: Path, edit: Callable[[dict[str, Any]], object]) -> None:
    """Apply ``edit`` to ``checkpoint``'s stored config, as another version might have it."""
    meta_path = resolve_checkpoint(checkpoint) / "checkpoint.json"
    metadata = json.loads(meta_path.read_text())
    edit(metadata["config"])
    meta_path.write_text(json.dumps(metadata))


def test_load_takes_what_seqmatch_train_saved(tmp_path: Path) -> None:
    # `seqmatch train` stores the task's arguments and lengths as given (here: none); the facade
    # stores its environment's. Loading must not re-derive them from an environment.
    config = TrainConfig(
        agent="bc", task="dyck", steps=2, device="cpu", progress=False, save=str(tmp_path / "cli"),
        **TINY,
    )  # fmt: skip
    trainer = Trainer(config)
    trainer.train()
    loaded = BC.load(tmp_path / "cli", device="cpu")
    assert loaded.trainer.config.task_args == "{}" and loaded.trainer.step == 2
    assert loaded.trainer.config.save is None  # trains on without touching the checkpoint
    saved, restored = trainer.policy.state_dict(), loaded.policy.state_dict()
    assert saved.keys() == restored.keys()
    assert all(torch.equal(saved[k], restored[k]) for k in saved)
    assert loaded.env.unwrapped.max_length == trainer.max_length
    loaded.learn(total_timesteps=loaded.num_timesteps + 1)
    with pytest.raises(ValueError, match="holds a 'bc' agent"):
        MLE.load(tmp_path / "cli")
    with pytest.raises(ValueError, match="env's task: 'arithmetic'"):
        BC.load(tmp_path / "cli", env=gym.make(seqenv.ENV_ID, task="arithmetic"))


def test_a_checkpoint_from_before_the_level_penalty_loads_without_it(tmp_path: Path) -> None:
    env = gym.make(seqenv.ENV_ID, task="dyck")
    model = SequenceMatch(env, sm_warmup=1, k_sample=2, rollouts=4, buffer_size=8, **TINY)
    model.trainer.config.steps = 2
    model.trainer.train()
    model.save(tmp_path / "old")
    _edit_stored_config(tmp_path / "old", lambda config: config.pop("level_penalty"))
    loaded = SequenceMatch.load(tmp_path / "old", device="cpu")
    assert loaded.trainer.config.level_penalty == 0.0  # as it was trained, not today's default
    loaded.learn(total_timesteps=loaded.num_timesteps + 1)  # and it trains on
    _edit_stored_config(tmp_path / "old", lambda config: config.update(retired=1))
    with pytest.raises(CheckpointError, match="does not know: \\['retired'\\]"):
        SequenceMatch.load(tmp_path / "old")


def test_mle_and_bc_facades() -> None:
    env = gym.make(seqenv.ENV_ID, task="arithmetic", base=10, max_digits=1)
    for cls in (MLE, BC):
        model = cls(env, **TINY).learn(total_timesteps=200)
        assert model.trainer.config.agent == cls.agent_name
        assert model.num_timesteps >= 200


def test_ppo_with_the_transformer_features_extractor() -> None:
    from stable_baselines3 import PPO

    env = gym.make(seqenv.ENV_ID, task="dyck")
    model = PPO(
        "MlpPolicy",
        env,
        n_steps=64,
        batch_size=32,
        n_epochs=1,
        seed=0,
        device="cpu",
        policy_kwargs={
            "features_extractor_class": SequenceFeaturesExtractor,
            "features_extractor_kwargs": {
                "special": env.unwrapped.vocab.special,
                "width": 32,
                "layers": 1,
                "heads": 2,
            },
        },
    )
    extractor = model.policy.features_extractor
    before = [p.detach().clone() for p in extractor.parameters()]
    model.learn(128)
    # PPO's gradient reaches the transformer: its weights moved.
    moved = [not torch.equal(a, p) for a, p in zip(before, extractor.parameters(), strict=True)]
    assert any(moved)


def test_features_read_the_last_live_token() -> None:
    env = gym.make(seqenv.ENV_ID, task="dyck")
    special = env.unwrapped.vocab.special
    extractor = SequenceFeaturesExtractor(
        env.observation_space, special=special, width=32, layers=1, heads=2
    )
    pad = env.unwrapped.vocab.pad_id
    obs = np.full((2, env.observation_space.shape[0]), pad)
    obs[:, :3] = [0, 1, 2]
    obs[1, 3] = 1  # a longer state: different features
    features = extractor(torch.as_tensor(obs, dtype=torch.float32))
    assert features.shape == (2, 32)
    assert not torch.allclose(features[0], features[1])
    # A state's features do not depend on the other rows of the batch (their lengths differ).
    alone = extractor(torch.as_tensor(obs[:1], dtype=torch.float32))
    assert torch.allclose(alone, features[:1], atol=1e-6)
    with pytest.raises(TypeError, match="special"):
        SequenceFeaturesExtractor(env.observation_space)  # type: ignore[call-arg]


def test_the_facade_trains_in_the_environment_s_disturbance() -> None:
    """An env made with a disturbance sets the run's (unless the caller names one)."""
    from agents import BC

    env = gym.make(seqenv.ENV_ID, task="dyck", disturbance=0.2, disturbance_type="ground_truth")
    agent = BC(env, **TINY)
    config = agent.trainer.config
    assert (config.disturbance, config.disturbance_type) == (0.2, "ground_truth")
    assert agent.trainer.disturbance is not None and agent.trainer.disturbance.disturbance == 0.2
    assert BC(env, disturbance=0.05, **TINY).trainer.config.disturbance == 0.05


def test_ppo_policy_scores_each_state_of_a_refeed_batch() -> None:
    """The PPO wrapper's re-feed pass gives, at every state row, the logits SB3 gives that state
    as an observation of its own (so the divergence estimate measures PPO like the others)."""
    from stable_baselines3 import PPO

    from agents.algorithms.ppo import PPOPolicyModel
    from agents.collate import collate
    from seqenv.trajectory import Trajectory

    env = gym.make(seqenv.ENV_ID, task="dyck")
    special = env.unwrapped.vocab.special
    model = PPO("MlpPolicy", env, n_steps=32, batch_size=16, seed=0, device="cpu")
    max_length = env.observation_space.shape[0]
    policy = PPOPolicyModel(model.policy, special, max_length)
    open_, close = env.unwrapped.vocab.encode("()")
    trajectory = Trajectory([0], [open_, open_, special.backspace_id, close, special.eos_id],
                            True, False, special)  # fmt: skip
    batch = collate([trajectory])
    with torch.no_grad():
        logits = policy.forward_batch(batch)[0]  # (T, A)
        for t, state in enumerate(
            [[0], [0, open_], [0, open_, open_], [0, open_], [0, open_, close]]
        ):
            obs = torch.full((1, max_length), special.pad_id, dtype=torch.float32)
            obs[0, : len(state)] = torch.tensor(state, dtype=torch.float32)
            alone = model.policy.get_distribution(obs).distribution.logits[0]
            torch.testing.assert_close(logits[batch.state_rows[0, t]], alone)
