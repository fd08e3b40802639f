"""Stable-Baselines3-style agents: ``SequenceMatch(env).learn(total_timesteps)``, MLE and BC alike.

    import gymnasium as gym
    import seqenv
    from agents import SequenceMatch

    env = gym.make("SequenceGen-v0", task="dyck")
    model = SequenceMatch(env, eta=0.3, c=0.25, alpha=0.01, verbose=1)
    model.learn(total_timesteps=100_000)
    action, _ = model.predict(obs, deterministic=True)
    model.save("checkpoints/sm-dyck")
    model = SequenceMatch.load("checkpoints/sm-dyck")

Imitation agents learn from the task's demonstrations, not from reward: the environment gives
them the task, the buffer size and the step budget. A timestep is one action of a demonstration
trained on (the unit SB3 counts in is an environment step; an imitation update consumes
``batch_size`` demonstrations at once). Hyperparameters are the fields of
:class:`agents.config.TrainConfig`; for SequenceMatch ``alpha`` is the soft-Q
temperature (Q = alpha * logits), apart from the rollouts' sampling ``temperature``.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any, ClassVar

import gymnasium as gym
import numpy as np
import torch

from agents.algorithms import resolve_algorithm
from agents.config import TrainConfig, saved_settings
from agents.deprecated import renamed_settings
from agents.models.interface import mask_logits
from agents.training.checkpoint import CheckpointError, read_metadata
from agents.training.trainer import Trainer
from seqenv.env import SequenceGenEnv
from seqenv.tasks import make_task


class ImitationAgent:
    """The common body of :class:`MLE`, :class:`BC` and :class:`SequenceMatch`.

    Args:
        env: a SequenceGen-v0 environment (or its id); its task, ``max_length`` and
            ``max_steps`` define what is learnt.
        seed: seed of the weights, data order, noise and rollouts.
        device: ``auto`` (cuda when available), ``cpu`` or ``cuda``.
        tensorboard_log: folder for TensorBoard runs; none if unset.
        verbose: 1 shows a progress bar.
        model: a pretrained causal LM to fine-tune (a local transformers folder or a .gguf file);
            the environment's task is then rebuilt on its tokenizer (``self.env``), so that
            observations and actions use the model's ids.
        data: your demonstrations (JSONL, text file or a `datasets` folder) instead of the
            task's.
        **hyperparameters: any other field of :class:`agents.config.TrainConfig`
            (``lora_r``, ``lora_alpha``, ``gradient_checkpointing``, ...).
    """

    agent_name: ClassVar[str]
    """The registered algorithm (:data:`agents.algorithms.ALGORITHMS`) this facade trains."""

    def __init__(
        self,
        env: gym.Env | str = "SequenceGen-v0",
        *,
        seed: int = 0,
        device: str = "auto",
        tensorboard_log: str | None = None,
        verbose: int = 0,
        model: str | None = None,
        data: str | None = None,
        **hyperparameters: Any,
    ) -> None:
        env = gym.make(env) if isinstance(env, str) else env
        base = env.unwrapped
        if not isinstance(base, SequenceGenEnv):
            raise TypeError(f"expected a SequenceGen-v0 environment, got {type(base).__name__}")
        if model is not None:
            from agents.models.hf import load_hf_vocab

            vocab = load_hf_vocab(model)
            if base.vocab.special != vocab.special:
                task = make_task(base.task.name, vocab=vocab, **base.task.config())
                base = SequenceGenEnv(
                    task=task, max_length=base.max_length, max_steps=base.max_steps
                )
                env = base
        self.env = env
        hyperparameters = renamed_settings(hyperparameters, type(self).__name__)
        if base.disturbance.active:  # train in the environment's own disturbance
            hyperparameters.setdefault("disturbance", base.disturbance.disturbance)
            hyperparameters.setdefault("disturbance_type", base.disturbance.disturbance_type)
        spec = resolve_algorithm(self.agent_name)
        config = TrainConfig(
            agent=self.agent_name,
            task=base.task.name,
            task_args=json.dumps(base.task.config()),
            max_length=base.max_length,
            max_steps=base.max_steps,
            seed=seed,
            device=device,
            logdir=tensorboard_log,
            progress=verbose > 0,
            model=model,
            data=data,
            **hyperparameters,
        )
        config = spec.configure(config)  # the settings the name fixes (mle: no backspace)
        self.trainer = Trainer(config, task=base.task)

    @property
    def policy(self) -> torch.nn.Module:
        """The trained network (the trainer's policy)."""
        return self.trainer.policy

    @property
    def num_timesteps(self) -> int:
        """Demonstration actions trained on so far, over all updates and ranks."""
        return self.trainer.num_timesteps

    def learn(self, total_timesteps: int) -> ImitationAgent:
        """Train until ``total_timesteps`` demonstration actions have been trained on."""
        if total_timesteps < 1:
            raise ValueError(f"total_timesteps must be >= 1, got {total_timesteps}")
        trainer = self.trainer
        per_update = (
            trainer.config.batch_size
            * trainer.world_size
            * float(np.mean([d.num_steps for d in trainer.demonstrations]))
        )
        remaining = max(0, total_timesteps - trainer.num_timesteps)
        trainer.config.steps = trainer.step + max(1, math.ceil(remaining / per_update))
        trainer.train()
        return self

    @torch.no_grad()
    def predict(
        self,
        observation: np.ndarray,
        state: Any = None,
        episode_start: np.ndarray | None = None,
        deterministic: bool = False,
        action_masks: np.ndarray | None = None,
    ) -> tuple[np.ndarray, None]:
        """Actions for observations of SequenceGen-v0 (one (L,) or a batch (N, L)).

        ``action_masks`` (``info["action_mask"]``) keeps the policy from choosing a backspace with
        nothing generated; without it that no-op stays possible (the observation alone does not
        say where the prompt ends).
        """
        policy = self.trainer.policy
        special = policy.special
        obs = np.asarray(observation, dtype=np.int64)
        single = obs.ndim == 1
        ids = torch.as_tensor(obs.reshape(-1, obs.shape[-1]), device=self.trainer.device)
        B, L = ids.shape
        positions = torch.arange(L, device=ids.device).expand(B, L)  # (B, L)
        policy.eval()
        logits = policy(ids, positions)  # (B, L, A)
        policy.train()
        last = ((ids != special.pad_id).sum(dim=1) - 1).clamp(min=0)
        logits = logits[torch.arange(B, device=ids.device), last].float()  # (B, A)
        if action_masks is not None:
            allowed = torch.as_tensor(np.asarray(action_masks).reshape(B, -1), device=ids.device)
            logits = mask_logits(logits, allowed.bool())
        if deterministic:
            actions = logits.argmax(dim=-1)
        else:
            actions = torch.multinomial(logits.softmax(dim=-1), 1).squeeze(-1)
        out = actions.cpu().numpy()
        return (out[0] if single else out), None

    def save(self, path: str | Path) -> None:
        """A checkpoint folder (weights, optimizer, RNG, config); ``load`` resumes from it."""
        self.trainer.save(path)

    @classmethod
    def load(
        cls, path: str | Path, env: gym.Env | None = None, device: str = "auto"
    ) -> ImitationAgent:
        """An agent restored from ``save``: same weights, optimizer and random streams.

        Takes every setting from the checkpoint, so it loads what ``seqmatch train --save``
        wrote as well as what ``save`` did. ``env``, when given, must hold the same task; by
        default the task's environment is rebuilt (without disturbance).
        """
        metadata = read_metadata(path)
        saved = saved_settings(metadata["config"])
        if saved.get("agent") != cls.agent_name:
            raise ValueError(f"{path} holds a {saved.get('agent')!r} agent, not {cls.agent_name!r}")
        unknown = sorted(set(saved) - {f.name for f in dataclasses.fields(TrainConfig)})
        if unknown:
            raise CheckpointError(f"{path}: settings this version does not know: {unknown}")
        # Where the run wrote its checkpoints and metrics is not the loaded agent's business:
        # it trains on in memory until ``save`` is called, as a new agent does.
        where = {"save": None, "json": None, "resume": False, "overwrite": False}
        config = TrainConfig(**{**saved, **where, "device": device})
        task = None
        if env is not None:
            base = env.unwrapped
            if not isinstance(base, SequenceGenEnv):
                raise TypeError(f"expected a SequenceGen-v0 environment, got {type(base).__name__}")
            task = base.task
            if task.name != config.task:
                raise ValueError(f"{path} holds a {config.task!r} agent; env's task: {task.name!r}")
        agent = cls.__new__(cls)
        agent.trainer = Trainer(config, task=task)
        agent.env = env or SequenceGenEnv(
            task=agent.trainer.task,
            max_length=agent.trainer.max_length,
            max_steps=agent.trainer.max_steps,
        )
        agent.trainer.load(path)
        return agent


class MLE(ImitationAgent):
    """Teacher forcing on clean demonstrations: the usual language-model training."""

    agent_name = "mle"


class BC(ImitationAgent):
    """Behaviour cloning on noise-augmented demonstrations (learns to backspace noise away)."""

    agent_name = "bc"


class SequenceMatch(ImitationAgent):
    """SequenceMatch (docs/method.md): BC warm start, then (1 - eta) BC + eta occupancy matching."""

    agent_name = "sequencematch"
