"""PPO (Stable-Baselines3) on the task reward, as the comparison's reinforcement-learning peer.

It learns from the reward, not from demonstrations, with SB3's own training loop
(:meth:`PPO.train_own_loop`); the trainer never builds it. The SB3 policy is wrapped as a
:class:`~agents.models.interface.PolicyModel` (no cache), so the same generation and
:func:`agents.evaluation.evaluate.evaluate` measure it like every other agent. Its settings
(``timesteps``, ``n_steps``, ``width``, ...) come from a comparison config's ``agents.ppo``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, cast

import torch
from stable_baselines3.common.callbacks import BaseCallback
from torch import nn

from agents.algorithms.base import Algorithm
from agents.collate import TrajectoryBatch
from agents.config import TrainConfig
from agents.evaluation.evaluate import divergence_estimate, evaluate
from agents.models.interface import PolicyModel
from agents.objectives import SequenceMatchLoss
from seqenv.rules import step_budget
from seqenv.tasks import Task


class PPO(Algorithm):
    """Stable-Baselines3 PPO on the task's reward (arithmetic and dyck; no pretrained model)."""

    label = "PPO (task reward)"
    short_label = "PPO"
    own_loop: ClassVar[bool] = True
    loop_settings: ClassVar[dict[str, Any]] = {
        "timesteps": 8000,
        "n_steps": 256,
        "batch_size": 64,
        "width": 64,
        "layers": 1,
        "heads": 2,
        "lr": 3e-4,
        "ent_coef": 0.01,
    }

    @classmethod
    def unavailable(cls, task: str, pretrained: bool) -> str | None:
        """Its own small network on the task reward: no text task, no pretrained model."""
        if task == "text" or pretrained:
            return "trains its own small network on a task reward: not on text, nor with --model"
        return None

    @classmethod
    def train_own_loop(
        cls, config: dict[str, Any], task: Task, seed: int, out: Path, device: torch.device
    ) -> tuple[PPOPolicyModel, list[dict[str, float]]]:
        """Train with SB3's loop; the policy (as a PolicyModel) and its learning curve."""
        return train_ppo(config, task, seed, out, device)


class PPOPolicyModel(nn.Module):
    """An SB3 policy seen as a :class:`PolicyModel` (no cache).

    Its logits are those of the SB3 action distribution for each state, so that the same
    generation and metrics code evaluates it.
    """

    def __init__(self, sb3_policy: Any, special: Any, max_length: int) -> None:
        super().__init__()
        self.sb3_policy = sb3_policy
        self.special = special
        self.max_length = max_length

    @property
    def max_positions(self) -> int | None:
        """None: the SB3 policy reads whole observation rows, not positions."""
        return None

    def forward(
        self, input_ids: torch.Tensor, position_ids: torch.Tensor, attention: Any = None
    ) -> torch.Tensor:
        """Logits (B, T, A): each row is one state, so every position gets the row's logits.

        ``position_ids`` and ``attention`` are ignored.
        """
        B, T = input_ids.shape
        obs = torch.full((B, self.max_length), self.special.pad_id, device=input_ids.device)
        obs[:, :T] = input_ids
        # Rows hold one state each (right padded): SB3 reads the state from the whole row.
        logits = self.sb3_policy.get_distribution(obs.float()).distribution.logits  # (B, A)
        return logits[:, None, :].expand(B, T, logits.shape[-1])

    def forward_batch(self, batch: TrajectoryBatch) -> torch.Tensor:
        """Logits (B, T, A) of a re-feed batch: row r's state is the rows it attends to.

        SB3 reads whole states, so each row's state is rebuilt from the attention structure (the
        re-feed rows it sees, in order) and scored as one observation.
        """
        B, T = batch.input_ids.shape
        sees = batch.attention.dense()  # (B, T, T), [b, query row, key row]
        obs = torch.full((B * T, self.max_length), self.special.pad_id, dtype=torch.int64)
        for b in range(B):
            for r in range(T):
                if not batch.row_mask[b, r]:
                    continue
                state = batch.input_ids[b][sees[b, r]][: self.max_length]
                obs[b * T + r, : len(state)] = state
        obs = obs.to(batch.input_ids.device)
        logits = self.sb3_policy.get_distribution(obs.float()).distribution.logits  # (B*T, A)
        return logits.reshape(B, T, -1)


def train_ppo(
    config: dict[str, Any], task: Task, seed: int, out: Path, device: torch.device
) -> tuple[PPOPolicyModel, list[dict[str, float]]]:
    """PPO with the transformer features extractor on the task reward."""
    import gymnasium as gym
    import stable_baselines3

    import seqenv
    from agents.models.sb3 import SequenceFeaturesExtractor

    settings = {**PPO.loop_settings, **config.get("agents", {}).get("ppo", {})}
    max_length = config["train"].get("max_length") or task.default_max_length
    env = gym.make(seqenv.ENV_ID, task=task, max_length=max_length)
    model = stable_baselines3.PPO(
        "MlpPolicy",
        env,
        n_steps=settings["n_steps"],
        batch_size=settings["batch_size"],
        learning_rate=settings["lr"],
        ent_coef=settings["ent_coef"],
        seed=seed,
        device=str(device),
        tensorboard_log=str(out / "runs"),
        verbose=0,
        policy_kwargs={
            "features_extractor_class": SequenceFeaturesExtractor,
            "features_extractor_kwargs": {
                "special": task.vocab.special,
                "width": settings["width"],
                "layers": settings["layers"],
                "heads": settings["heads"],
            },
        },
    )
    history: list[dict[str, float]] = []
    evaluation = _EvalCallback(
        task,
        max_length,
        every=int(settings.get("eval_interval", max(1, settings["timesteps"] // 4))),
        episodes=int(config["train"].get("eval_episodes", 100)),
        seed=seed,
        history=history,
        probe=SequenceMatchLoss.from_settings(
            TrainConfig(
                **{
                    k: config["train"][k]
                    for k in ("divergence", "c", "alpha", "gamma")
                    if k in config["train"]
                }
            ),
            normaliser_length=step_budget(max_length),
            value_source="mix",
        ),
    )
    model.learn(settings["timesteps"], tb_log_name=f"ppo-s{seed}", callback=evaluation)
    model.policy.set_training_mode(False)
    return PPOPolicyModel(model.policy, task.vocab.special, max_length), history


class _EvalCallback(BaseCallback):
    """Every ``every`` timesteps, the imitation agents' evaluation.

    Logged under the same ``eval/`` keys (into SB3's TensorBoard run) and kept as a learning curve.
    """

    def __init__(
        self,
        task: Task,
        max_length: int,
        every: int,
        episodes: int,
        seed: int,
        history: list[dict[str, float]],
        probe: Any,
    ) -> None:
        super().__init__()
        self.task, self.max_length, self.every = task, max_length, every
        self.episodes, self.seed, self.history = episodes, seed, history
        self.probe = probe  # the SequenceMatch objective that measures d_hat
        self.demos = task.demonstrations("test", episodes, max_length, seed=seed)
        self.next_eval = every

    def _on_step(self) -> bool:
        if self.num_timesteps < self.next_eval:
            return True
        self.next_eval += self.every
        self.model.policy.set_training_mode(False)
        policy = PPOPolicyModel(self.model.policy, self.task.vocab.special, self.max_length)
        result = evaluate(
            cast(PolicyModel, policy),  # a policy without a cache: use_cache=False below
            self.task,
            max_length=self.max_length,
            max_steps=step_budget(self.max_length),
            episodes=self.episodes,
            seed=self.seed + 3,
            prompt_seed=self.seed,
            use_cache=False,
        )
        row = {f"eval/{key}": value for key, value in result.metrics.items()}
        row["eval/divergence"] = divergence_estimate(
            policy, self.probe, self.demos, result.episodes
        )
        self.model.policy.set_training_mode(True)
        for key, value in row.items():
            self.logger.record(key, value)
        self.history.append({"step": float(self.num_timesteps), **row})
        return True
