"""Environment throughput: the batched torch vector env against gymnasium's SyncVectorEnv."""

from __future__ import annotations

import time

import numpy as np
import torch
from gymnasium.vector import SyncVectorEnv

from seqenv.env import SequenceGenEnv
from seqenv.vector import SequenceGenVectorEnv


def _steps_per_second(step, seconds: float) -> float:
    """Call ``step`` (which returns the number of env steps it took) for about ``seconds``."""
    steps, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds:
        steps += step()
    return steps / elapsed


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
        actions = torch.multinomial(state["mask"].float(), 1, generator=generator).squeeze(1)
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

    vector_rate = _steps_per_second(vector_step, seconds)
    sync_rate = _steps_per_second(sync_step, seconds)
    return {
        "vector_vs_sync_env": vector_rate / sync_rate,
        "vector_env_steps_per_s": vector_rate,
        "sync_env_steps_per_s": sync_rate,
    }
