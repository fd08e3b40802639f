"""The vector env on CUDA equals single envs step for step (as tests/seqenv/test_env.py on the CPU).

Everything here is integer and boolean state, and rewards computed on the host: equality is exact.
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium.vector import SyncVectorEnv

import seqenv
from seqenv.env import SequenceGenEnv
from tests.gpu.helpers import requires_cuda

pytestmark = requires_cuda


@pytest.mark.parametrize("task", ["arithmetic", "dyck"])
def test_vector_env_on_cuda_equals_single_envs(
    task: str, task_kwargs: dict[str, dict[str, Any]]
) -> None:
    num_envs, seed = 16, 123
    kwargs = {"task": task, **task_kwargs[task]}
    vector = gym.make_vec(seqenv.ENV_ID, num_envs=num_envs, device="cuda", **kwargs)
    sync = SyncVectorEnv([lambda: SequenceGenEnv(**kwargs) for _ in range(num_envs)])
    obs_v, info_v = vector.reset(seed=seed)
    obs_s, info_s = sync.reset(seed=seed)
    assert obs_v.device.type == "cuda" and info_v["action_mask"].device.type == "cuda"
    np.testing.assert_array_equal(obs_v.cpu().numpy(), obs_s)
    rng = np.random.default_rng(0)
    episodes = 0
    while episodes < 300:
        masks = info_v["action_mask"].cpu().numpy()
        np.testing.assert_array_equal(masks, info_s["action_mask"].astype(bool))
        actions = np.array([rng.choice(np.flatnonzero(m)) for m in masks])
        obs_v, rew_v, term_v, trunc_v, info_v = vector.step(torch.from_numpy(actions).cuda())
        obs_s, rew_s, term_s, trunc_s, info_s = sync.step(actions)
        assert rew_v.device.type == "cuda"
        np.testing.assert_array_equal(obs_v.cpu().numpy(), obs_s)
        np.testing.assert_array_equal(rew_v.cpu().numpy(), rew_s.astype(np.float32))
        np.testing.assert_array_equal(term_v.cpu().numpy(), term_s)
        np.testing.assert_array_equal(trunc_v.cpu().numpy(), trunc_s)
        episodes += int((term_s | trunc_s).sum())
    vector.close()


def test_the_oracle_of_the_vector_env_on_cuda_equals_the_cpu_one() -> None:
    from seqenv.vector import SequenceGenVectorEnv

    envs = [SequenceGenVectorEnv(num_envs=8, task="dyck", device=d) for d in ("cuda", "cpu")]
    rng = np.random.default_rng(0)
    for env in envs:
        env.reset(seed=5)
    for _ in range(20):
        probs = [env.expert_action_probs() for env in envs]
        assert probs[0].device.type == "cuda" and probs[0].dtype == torch.float32
        torch.testing.assert_close(probs[0].cpu(), probs[1], rtol=0, atol=0)
        actions = torch.from_numpy(rng.integers(0, 5, size=8))  # brackets and ^: no episode ends
        for env in envs:
            env.step(actions)
