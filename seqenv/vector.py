"""SequenceGen-v0 for ``num_envs`` sequences at once, on torch tensors, and an SB3 adapter.

One :class:`~seqenv.mdp.SequenceMDP` of batch size ``num_envs`` steps every sequence in one
tensor operation; only resets (drawing prompts) and end-of-episode scores loop in Python, once
per episode. Each row keeps its own ``np.random.Generator``, seeded as gymnasium's
``SyncVectorEnv`` seeds its sub-environments (``seed + i``), so the trajectories equal those of
``num_envs`` single :class:`~seqenv.env.SequenceGenEnv` with the same seeds and actions. With a
disturbance, each row draws its key from that generator at reset, as the single env does, and the
MDP disturbs every row at once from a counter-based hash of (key, step).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from gymnasium import spaces
from gymnasium.utils import seeding
from gymnasium.vector import AutoresetMode, VectorEnv
from gymnasium.vector.utils import batch_space
from stable_baselines3.common.vec_env.base_vec_env import (
    VecEnv,
    VecEnvIndices,
    VecEnvObs,
    VecEnvStepReturn,
)

from seqenv.devices import check_device, memory_shortfall
from seqenv.disturbance import KEY_BOUND, Disturbance, resolve_disturbance
from seqenv.env import (
    RewardFn,
    check_options,
    episode_reward,
    noise_of,
    resolve_max_length,
    resolve_reward,
    resolve_task,
    rgb_rows,
)
from seqenv.expert import expert_probs
from seqenv.mdp import InvalidActionError, SequenceMDP, check_int, is_integer_dtype
from seqenv.render import text_image
from seqenv.tasks import Task


class SequenceGenVectorEnv(VectorEnv):
    """``num_envs`` copies of SequenceGen-v0 batched on torch tensors on ``device``.

    Observations, rewards, ``terminated`` and ``truncated`` are torch tensors on ``device``
    (shapes (N, max_length) int64, (N,) float32, (N,) bool, (N,) bool), and
    ``info["action_mask"]`` is an (N, num_actions) bool tensor; after a step,
    ``info["intended_action"]`` and ``info["executed_action"]`` are (N,) int64 tensors (they differ
    where the disturbance replaced a token; -1 in rows that this step reset instead of stepping).
    Text is not decoded on every step (it would dominate the cost): ``render()`` with
    ``render_mode="ansi"`` or :meth:`texts` give it; ``"rgb_array"`` gives a tuple of images.
    :meth:`expert_action_probs` gives the task's oracle at every row, (N, num_actions).

    Autoreset: ``NEXT_STEP`` (gymnasium's default; the step after an episode ends resets that row
    and ignores its action) or ``DISABLED`` (reset rows with ``reset(options={"reset_mask": m})``).
    Arguments are those of SequenceGenEnv (``disturbance`` and ``disturbance_type`` included) plus
    ``num_envs``, ``device``, ``autoreset_mode`` and ``copy`` (as gymnasium's: False returns the
    env's own observation tensor, which the next step overwrites, and saves a copy per step).
    """

    def __init__(
        self,
        num_envs: int = 1,
        task: str | Task = "arithmetic",
        max_length: int | None = None,
        max_steps: int | None = None,
        reward: str | RewardFn = "task",
        disturbance: float | Disturbance = 0.0,
        disturbance_type: str | None = None,
        device: torch.device | str = "cpu",
        render_mode: str | None = None,
        autoreset_mode: AutoresetMode | str = AutoresetMode.NEXT_STEP,
        copy: bool = True,
        **task_kwargs: Any,
    ) -> None:
        num_envs = check_int(num_envs, "num_envs", 1)
        autoreset_mode = AutoresetMode(autoreset_mode)
        if autoreset_mode == AutoresetMode.SAME_STEP:
            raise ValueError("autoreset_mode SAME_STEP is not supported; use NEXT_STEP or DISABLED")
        if render_mode not in (None, "ansi", "rgb_array"):
            raise ValueError("render_mode must be None, 'ansi' or 'rgb_array'")
        self.metadata = {"render_modes": ["ansi", "rgb_array"], "autoreset_mode": autoreset_mode}
        self.render_mode = render_mode
        self.copy = copy
        self.num_envs = num_envs
        self.device = check_device(device)
        self.task = resolve_task(task, task_kwargs)
        self.vocab = self.task.vocab
        self.reward_fn = resolve_reward(reward)
        self.max_length = resolve_max_length(max_length, self.task)
        self._check_memory()
        self.disturbance = resolve_disturbance(disturbance, disturbance_type)
        self.mdp = SequenceMDP(
            self.vocab.special,
            self.max_length,
            max_steps,
            batch_size=num_envs,
            device=self.device,
            disturbance=self.disturbance,
            noise_fn=noise_of(self.disturbance, self.task),
        )
        self.max_steps = self.mdp.max_steps
        num_actions = self.vocab.num_actions
        self.single_action_space = spaces.Discrete(num_actions)
        self.single_observation_space = spaces.Box(0, num_actions, (self.max_length,), np.int64)
        self.action_space = batch_space(self.single_action_space, num_envs)
        self.observation_space = batch_space(self.single_observation_space, num_envs)
        self._rngs: list[np.random.Generator | None] = [None] * num_envs
        self._autoreset = torch.zeros(num_envs, dtype=torch.bool, device=self.device)
        self._started = False

    def _check_memory(self) -> None:
        """ValueError (one line) before allocating, where ``num_envs`` rows cannot fit.

        Per row, a rough lower estimate: the token buffer and an observation copy (int64), the
        action mask, and a numpy Generator (about 1 KB, measured) on the CPU.
        """
        tensors = self.num_envs * (16 * self.max_length + self.vocab.num_actions + 64)
        python = self.num_envs * 1000
        checks = [(tensors, self.device), (python, torch.device("cpu"))]
        if self.device.type == "cpu":
            checks = [(tensors + python, self.device)]
        for num_bytes, device in checks:
            message = memory_shortfall(
                num_bytes, device, f"{self.num_envs} environments", "use fewer num_envs"
            )
            if message is not None:
                raise ValueError(message)

    # -- resets ------------------------------------------------------------------------------
    def _seed_rows(self, seed: int | Sequence[int | None] | None) -> None:
        seeds: Sequence[int | None]
        if seed is None or isinstance(seed, int):
            seeds = [None if seed is None else seed + i for i in range(self.num_envs)]
        else:
            seeds = list(seed)
            if len(seeds) != self.num_envs:
                raise ValueError(f"expected {self.num_envs} seeds, got {len(seeds)}")
        for i, s in enumerate(seeds):
            # As gymnasium.Env.reset: a seed reseeds; no seed keeps the row's stream going.
            if s is not None or self._rngs[i] is None:
                self._rngs[i], _ = seeding.np_random(s)

    def _reset_rows(self, rows: list[int]) -> None:
        prompts, keys = [], []
        for i in rows:
            rng = self._rngs[i]
            assert rng is not None
            prompts.append(list(self.task.sample(rng).prompt))
            # As SequenceGenEnv.reset: the key after the prompt, only when there is a disturbance.
            keys.append(int(rng.integers(KEY_BOUND)) if self.disturbance.active else 0)
        self.mdp.reset_rows(rows, prompts, keys=keys)

    def reset(
        self,
        *,
        seed: int | Sequence[int | None] | None = None,
        options: dict[str, Any] | None = None,
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        """Reset every row, or only the rows of ``options["reset_mask"]``, to a fresh prompt.

        Args:
            seed: one int (row ``i`` gets ``seed + i``), one per row, or None to keep each
                row's random stream going.
            options: only ``"reset_mask"``, an (N,) bool mask of the rows to reset.

        Returns:
            The (N, max_length) int64 observations and ``{"action_mask": (N, num_actions) bool}``.
        """
        options = check_options(options, ("reset_mask",))
        self._seed_rows(seed)
        if "reset_mask" in options:
            mask = torch.as_tensor(options["reset_mask"], dtype=torch.bool).reshape(-1)
            rows = torch.nonzero(mask).reshape(-1).tolist()
        else:
            rows = list(range(self.num_envs))
        self._reset_rows(rows)
        self._autoreset[rows] = False
        self._started = True
        return self._observation(), {"action_mask": self.mdp.action_mask()}

    def _observation(self) -> torch.Tensor:
        if not self.copy:
            return self.mdp.tokens
        if self.device.type == "cpu":
            # torch splits a copy of more than 32k elements across threads; for the small,
            # frequent copies of an environment the hand-off costs more than the copy itself.
            return torch.from_numpy(self.mdp.tokens.numpy().copy())
        return self.mdp.tokens.clone()

    # -- steps -------------------------------------------------------------------------------
    def step(
        self, actions: Any
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, dict[str, Any]]:
        """Apply one (N,) integer action per row; rows due for autoreset are reset instead.

        Returns:
            Observations, rewards, ``terminated``, ``truncated`` and ``info``, as in the class
            docstring.

        Raises:
            RuntimeError: before :meth:`reset`, or with ``DISABLED`` autoreset once a row ended.
            InvalidActionError: the actions are not integers (or not valid ids).
        """
        if not self._started:
            raise RuntimeError("call reset() before step()")
        actions = torch.as_tensor(np.asarray(actions) if not torch.is_tensor(actions) else actions)
        if not is_integer_dtype(actions.dtype):
            raise InvalidActionError(f"actions must be integer ids, got dtype {actions.dtype}")
        if actions.shape not in ((self.num_envs,), (self.num_envs, 1)):
            raise InvalidActionError(
                f"actions must have shape ({self.num_envs},), one per environment; got "
                f"{tuple(actions.shape)}"
            )
        actions = actions.to(self.device, torch.int64).reshape(-1)
        if self.metadata["autoreset_mode"] == AutoresetMode.DISABLED and bool(self.mdp.done.any()):
            raise RuntimeError(
                "some rows have ended: reset them with reset(options={'reset_mask': ...})"
            )
        resetting = self._autoreset
        # Rows being reset are done, so the MDP ignores their actions; a placeholder keeps the
        # range check from tripping over whatever the caller sent for them.
        actions = torch.where(resetting, torch.zeros_like(actions), actions)
        result = self.mdp.step(actions)
        ended = result.terminated | result.truncated
        rewards = torch.zeros(self.num_envs, dtype=torch.float32, device=self.device)
        if self.reward_fn != "none" and bool(ended.any()):
            rows = torch.nonzero(ended).reshape(-1)
            # One transfer for every ended row, then plain lists.
            tokens = self.mdp.tokens[rows].tolist()
            starts = self.mdp.prompt_length[rows].tolist()
            ends = self.mdp.length[rows].tolist()
            terminated = result.terminated[rows].tolist()
            scores = [
                episode_reward(
                    self.reward_fn, self.task, self.vocab, row[:start], row[start:end], done
                )
                for row, start, end, done in zip(tokens, starts, ends, terminated, strict=True)
            ]
            rewards[rows] = torch.tensor(scores, dtype=torch.float32, device=self.device)
        if bool(resetting.any()):
            self._reset_rows(torch.nonzero(resetting).reshape(-1).tolist())
        if self.metadata["autoreset_mode"] == AutoresetMode.NEXT_STEP:
            self._autoreset = ended
        info = {
            "action_mask": self.mdp.action_mask(),
            "intended_action": result.intended.masked_fill(resetting, -1),
            "executed_action": result.executed.masked_fill(resetting, -1),
        }
        return self._observation(), rewards, result.terminated, result.truncated, info

    def expert_action_probs(self) -> torch.Tensor:
        """The task's expert at every row's current state: (N, A) float32 on ``device``.

        The batched form of ``SequenceGenEnv.expert_action_probs`` (:mod:`seqenv.expert`): each
        row the expert's next-action distribution, or all mass on ``<bkspc>`` where the row's
        text has left the task's language. A row whose episode just ended gives the oracle at
        its final state (it is reset by the next step).

        Raises:
            NoOracleError: the task has no oracle.
            RuntimeError: before :meth:`reset`.
        """
        if not self._started:
            raise RuntimeError("call reset() before expert_action_probs()")
        # One transfer of the live states, then plain lists.
        tokens = self.mdp.tokens.tolist()
        starts = self.mdp.prompt_length.tolist()
        ends = self.mdp.length.tolist()
        prompts = [row[:start] for row, start in zip(tokens, starts, strict=True)]
        generated = [row[start:end] for row, start, end in zip(tokens, starts, ends, strict=True)]
        probs = expert_probs(self.task, prompts, generated)
        return torch.from_numpy(probs).to(self.device, torch.float32)

    def texts(self) -> list[str]:
        """The current text of every row."""
        return [self.vocab.decode(self.mdp.state(i)) for i in range(self.num_envs)]

    def render(self) -> list[str] | tuple[np.ndarray, ...] | None:  # type: ignore[override]
        """``"ansi"``: every row's text; ``"rgb_array"``: each drawn as an (H, W, 3) image."""
        if self.render_mode == "ansi":
            return self.texts()
        if self.render_mode == "rgb_array":
            rows = rgb_rows(self.max_length)
            prompt_chars = [
                len(self.vocab.decode(self.mdp.state(i)[: int(self.mdp.prompt_length[i])]))
                for i in range(self.num_envs)
            ]
            return tuple(
                text_image(text, prompt_chars=chars, rows=rows)
                for text, chars in zip(self.texts(), prompt_chars, strict=True)
            )
        return None


class SB3VecEnv(VecEnv):
    """Stable-Baselines3's ``VecEnv`` API over :class:`SequenceGenVectorEnv`.

    SB3 resets a row in the step that ends it and keeps the last observation in
    ``info["terminal_observation"]``; ``info["TimeLimit.truncated"]`` marks truncation, and
    ``info["intended_action"]`` and ``info["executed_action"]`` are as in the single env.
    ``action_masks()`` gives the (N, num_actions) bool masks for maskable algorithms.
    """

    def __init__(self, num_envs: int = 1, **env_kwargs: Any) -> None:
        env_kwargs["autoreset_mode"] = AutoresetMode.DISABLED
        self.env = SequenceGenVectorEnv(num_envs=num_envs, **env_kwargs)
        super().__init__(num_envs, self.env.single_observation_space, self.env.single_action_space)
        self._actions: np.ndarray | None = None

    def reset(self) -> VecEnvObs:
        """Reset every row, with the seeds given to ``seed()`` if any; (N, max_length) int64."""
        seeds = self._seeds if any(s is not None for s in self._seeds) else None
        obs, _ = self.env.reset(seed=seeds)
        self._reset_seeds()
        return obs.cpu().numpy()

    def step_async(self, actions: np.ndarray) -> None:
        """Store the (N,) actions for :meth:`step_wait`."""
        self._actions = np.asarray(actions)

    def step_wait(self) -> VecEnvStepReturn:
        """Step every row, resetting the rows that end; infos as in the class docstring."""
        obs, rewards, terminated, truncated, step_info = self.env.step(self._actions)
        dones = terminated | truncated
        obs_np = obs.cpu().numpy()
        intended = step_info["intended_action"].tolist()
        executed = step_info["executed_action"].tolist()
        infos: list[dict[str, Any]] = [
            {
                "TimeLimit.truncated": bool(truncated[i] and not terminated[i]),
                "intended_action": intended[i],
                "executed_action": executed[i],
            }
            for i in range(self.num_envs)
        ]
        if bool(dones.any()):
            for i in torch.nonzero(dones).reshape(-1).tolist():
                infos[i]["terminal_observation"] = obs_np[i].copy()
            obs, _ = self.env.reset(options={"reset_mask": dones})
            obs_np = obs.cpu().numpy()
        return obs_np, rewards.cpu().numpy(), dones.cpu().numpy(), infos

    def action_masks(self) -> np.ndarray:
        """The (N, num_actions) bool masks of valid actions."""
        return self.env.mdp.action_mask().cpu().numpy()

    def expert_action_probs(self) -> np.ndarray:
        """(N, num_actions) float32: the task's expert at every row (the vector env's oracle)."""
        return self.env.expert_action_probs().cpu().numpy()

    def close(self) -> None:
        """Close the underlying vector env."""
        self.env.close()

    def get_attr(self, attr_name: str, indices: VecEnvIndices = None) -> list[Any]:
        """The vector env's attribute, once per requested row (the rows share it)."""
        return [getattr(self.env, attr_name) for _ in self._get_indices(indices)]

    def set_attr(self, attr_name: str, value: Any, indices: VecEnvIndices = None) -> None:
        """Set an attribute of the vector env (for every row; ``indices`` is ignored)."""
        setattr(self.env, attr_name, value)

    def env_method(
        self,
        method_name: str,
        *method_args: Any,
        indices: VecEnvIndices = None,
        **method_kwargs: Any,
    ) -> list[Any]:
        """Call a method of the vector env once per requested row; ``action_masks`` per row."""
        if method_name == "action_masks":
            masks = self.action_masks()
            return [masks[i] for i in self._get_indices(indices)]
        method = getattr(self.env, method_name)
        return [method(*method_args, **method_kwargs) for _ in self._get_indices(indices)]

    def env_is_wrapped(self, wrapper_class: type, indices: VecEnvIndices = None) -> list[bool]:
        """False for every row: the rows are not gymnasium envs and have no wrappers."""
        return [False for _ in self._get_indices(indices)]
