"""Environment throughput: the batched torch vector env against gymnasium's SyncVectorEnv."""

from __future__ import annotations

import numpy as np
import torch
from gymnasium.vector import SyncVectorEnv

from agents.experiments.timing import interleaved_rates
from seqenv.env import SequenceGenEnv
from seqenv.vector import SequenceGenVectorEnv


def measure(quick: bool = False, num_envs: int = 256, task: str = "arithmetic") -> dict[str, float]:
    """Steps per second of both vector envs on the same task, random allowed actions.

    Returns ``vector_vs_sync_env`` (the ratio) and both rates. Actions are drawn uniformly among
    the allowed ones, in one vectorised call for each env, so the policy costs little in both.
    """
    seconds = 1.0 if quick else 5.0
    vector = SequenceGenVectorEnv(num_envs=num_envs, task=task)
    sync = SyncVectorEnv([lambda: SequenceGenEnv(task=task) for _ in range(num_envs)])
    generator = torch.Generator().manual_seed(0)
    rng = np.random.default_rng(0)

    _, info = vector.reset(seed=0)
    state = {"mask": info["action_mask"]}

    def vector_step() -> int:
        # Uniform among allowed actions, as for the sync env below: argmax of masked noise.
        noise = torch.rand(state["mask"].shape, generator=generator)
        actions = noise.masked_fill(~state["mask"], -1.0).argmax(dim=1)
        _, _, _, _, step_info = vector.step(actions)
        state["mask"] = step_info["action_mask"]
        return num_envs

    _, sync_info = sync.reset(seed=0)
    sync_state = {"mask": sync_info["action_mask"].astype(bool)}

    def sync_step() -> int:
        mask = sync_state["mask"]
        # Uniform among allowed actions: argmax of masked uniform noise.
        actions = np.argmax(np.where(mask, rng.random(mask.shape), -1.0), axis=1)
        _, _, _, _, step_info = sync.step(actions)
        sync_state["mask"] = step_info["action_mask"].astype(bool)
        return num_envs

    rates = interleaved_rates({"vector": vector_step, "sync": sync_step}, seconds)
    vector_rate, sync_rate = rates["vector"], rates["sync"]
    return {
        "vector_vs_sync_env": vector_rate / sync_rate,
        "vector_env_steps_per_s": vector_rate,
        "sync_env_steps_per_s": sync_rate,
    }
