"""Checks every SequenceGen configuration must pass: gymnasium's and SB3's, plus our invariants.

``check_sequence_env(env)`` runs gymnasium's ``check_env``, SB3's ``check_env`` and these
backspace invariants, on random episodes whose actions include masked (invalid) backspaces:

1. the prompt is never deleted;
2. a backspace right after an append restores the previous observation;
3. the action mask matches what the MDP allows: backspace iff something is generated, and a
   masked backspace, taken anyway, changes nothing but the step count;
4. seeded resets are deterministic;
5. the disturbance: every step reports ``info["intended_action"]`` (the action taken) and
   ``info["executed_action"]``; only an ordinary token is ever replaced, by another ordinary token
   (never by itself), never when its append fills the buffer, and never without a disturbance;
   the observation holds the executed token.

A failure raises :class:`EnvCheckError` saying which invariant broke and where.
"""

from __future__ import annotations

import warnings

import gymnasium as gym
import numpy as np
import torch

from seqenv.env import SequenceGenEnv
from seqenv.rules import allowed_actions


class EnvCheckError(AssertionError):
    """An environment broke one of the invariants of the backspace MDP."""


def _unwrapped(env: gym.Env) -> SequenceGenEnv:
    base = env.unwrapped
    if not isinstance(base, SequenceGenEnv):
        raise TypeError(f"expected a SequenceGenEnv, got {type(base).__name__}")
    return base


def check_disturbance(
    env: SequenceGenEnv,
    episode: int,
    action: int,
    info: dict,
    before: np.ndarray,
    obs: np.ndarray,
) -> None:
    """Invariant 5 for one step from observation ``before`` to ``obs``."""
    special = env.vocab.special
    for key in ("intended_action", "executed_action"):
        if key not in info:
            raise EnvCheckError(f"episode {episode}: step info lacks {key!r}")
    intended, executed = int(info["intended_action"]), int(info["executed_action"])
    where = f"episode {episode}: action {action}"
    if intended != action:
        raise EnvCheckError(f"{where} reported as intended_action {intended}")
    if executed == intended:
        length = int((before != env.vocab.pad_id).sum())
        if special.is_token(action) and length < env.max_length and obs[length] != action:
            raise EnvCheckError(f"{where}: the observation does not hold the appended token")
        return
    if not env.disturbance.active:
        raise EnvCheckError(f"{where} executed as {executed} without a disturbance")
    if not special.is_token(intended):
        raise EnvCheckError(f"{where} is <eos> or <bkspc> but was replaced by {executed}")
    if not special.is_token(executed):
        raise EnvCheckError(f"{where} was replaced by {executed}, not an ordinary token")
    length = int((before != env.vocab.pad_id).sum())
    if length + 1 >= env.max_length:
        raise EnvCheckError(f"{where} fills the buffer but was replaced by {executed}")
    if obs[length] != executed:
        raise EnvCheckError(f"{where}: the observation does not hold the executed token")


def check_invariants(env: gym.Env, seed: int = 0, num_episodes: int = 20) -> None:
    """Run the five backspace invariants on ``num_episodes`` random episodes."""
    base = _unwrapped(env)
    vocab = base.vocab
    rng = np.random.default_rng(seed)

    # 4. Seeded resets are deterministic.
    obs_a, info_a = env.reset(seed=seed)
    obs_b, info_b = env.reset(seed=seed)
    if not np.array_equal(obs_a, obs_b) or info_a["text"] != info_b["text"]:
        raise EnvCheckError(f"reset(seed={seed}) gave two different starting states")

    for episode in range(num_episodes):
        obs, info = env.reset(seed=seed + 1 + episode)
        prompt_length = int((obs != vocab.pad_id).sum())
        prompt = obs[:prompt_length].copy()
        done = False
        while not done:
            generated = int((obs != vocab.pad_id).sum()) - prompt_length
            mask = np.asarray(info["action_mask"]).astype(bool)
            # 3. The mask allows everything but a backspace with nothing generated.
            expected = allowed_actions(torch.tensor(generated > 0), vocab.special).numpy()
            if not np.array_equal(mask, expected):
                raise EnvCheckError(
                    f"episode {episode}: action mask {mask.astype(int)} but the MDP allows "
                    f"{expected.astype(int)} ({generated} tokens generated)"
                )
            # Mostly tokens, often backspaces (masked ones included), rarely <eos>.
            draw = rng.random()
            if draw < 0.3:
                action = vocab.backspace_id
            elif draw < 0.33:
                action = vocab.eos_id
            else:
                action = int(
                    rng.choice([a for a in range(vocab.num_actions) if vocab.special.is_token(a)])
                )
            before = obs.copy()
            obs, _, terminated, truncated, info = env.step(action)
            done = terminated or truncated
            check_disturbance(base, episode, action, info, before, obs)
            # 1. The prompt is never deleted.
            if not np.array_equal(obs[:prompt_length], prompt):
                raise EnvCheckError(f"episode {episode}: the prompt changed after action {action}")
            if action == vocab.backspace_id and generated == 0 and not np.array_equal(obs, before):
                raise EnvCheckError(f"episode {episode}: a masked backspace changed the state")
            # 2. Append then backspace restores the observation (when the append does not end it).
            if vocab.special.is_token(action) and not done:
                obs2, _, terminated, truncated, info2 = env.step(vocab.backspace_id)
                check_disturbance(base, episode, vocab.backspace_id, info2, obs, obs2)
                if not np.array_equal(obs2, before):
                    raise EnvCheckError(
                        f"episode {episode}: append {action} then backspace did not restore the "
                        "previous observation"
                    )
                obs, info, done = obs2, info2, terminated or truncated


def check_sequence_env(env: gym.Env, seed: int = 0, num_episodes: int = 20) -> None:
    """Gymnasium's ``check_env``, SB3's ``check_env`` and :func:`check_invariants`."""
    from gymnasium.utils.env_checker import check_env as gymnasium_check_env
    from stable_baselines3.common.env_checker import check_env as sb3_check_env

    with warnings.catch_warnings():
        warnings.simplefilter("error", category=UserWarning)
        gymnasium_check_env(env.unwrapped)
    sb3_check_env(env.unwrapped, warn=True, skip_render_check=False)
    check_invariants(env, seed=seed, num_episodes=num_episodes)
