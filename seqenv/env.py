"""SequenceGen-v0: text generation with a backspace, one sequence per environment."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from gymnasium import spaces

from seqenv.disturbance import KEY_BOUND, Disturbance, NoiseFn, resolve_disturbance
from seqenv.expert import expert_probs
from seqenv.mdp import SequenceMDP, as_action_id, check_int
from seqenv.render import text_image
from seqenv.tasks import Task, make_task
from seqenv.vocab import Vocab

RewardFn = Callable[[str, str, bool], float]
"""(prompt text, generated text, terminated) -> reward, paid once when the episode ends."""


def resolve_task(task: str | Task, task_kwargs: dict[str, Any]) -> Task:
    """A task object from a name and its keyword arguments, or the object itself."""
    if isinstance(task, Task):
        if task_kwargs:
            raise TypeError(
                f"task keyword arguments {sorted(task_kwargs)} given with a Task object"
            )
        return task
    return make_task(task, **task_kwargs)


def resolve_reward(reward: str | RewardFn) -> str | RewardFn:
    """Check ``reward``: ``"task"``, ``"none"`` or a callable; raises ValueError otherwise."""
    if callable(reward) or reward in ("task", "none"):
        return reward
    raise ValueError(f"reward must be 'task', 'none' or a callable, got {reward!r}")


def resolve_max_length(max_length: int | None, task: Task) -> int:
    """The buffer size: the task's default, or the caller's (an integer >= 2)."""
    if max_length is None:
        return task.default_max_length
    return check_int(max_length, "max_length", 2)


def noise_of(disturbance: Disturbance, task: Task) -> NoiseFn | None:
    """The noise function a disturbance of this kind needs: the task's, for ground_truth."""
    return task.ground_truth_noise if disturbance.disturbance_type == "ground_truth" else None


def check_options(options: Any, known: tuple[str, ...]) -> dict[str, Any]:
    """``reset``'s options as a dict; anything but a dict with known keys is a ValueError."""
    if options is None:
        return {}
    if not isinstance(options, dict):
        raise ValueError(f"reset options must be a dict, got {type(options).__name__} {options!r}")
    unknown = sorted(str(key) for key in options if key not in known)
    if unknown:
        raise ValueError(f"unknown reset options {unknown}; known: {', '.join(known)}")
    return options


def rgb_rows(max_length: int) -> int:
    """Lines of the rgb_array canvas: room for about four characters a token, 64 a line."""
    return min(32, max(2, -(-4 * max_length // 64)))


def episode_reward(
    reward: str | RewardFn,
    task: Task,
    vocab: Vocab,
    prompt: list[int],
    generated: list[int],
    terminated: bool,
) -> float:
    """The reward paid at the end of an episode (every other step pays 0)."""
    if reward == "none":
        return 0.0
    if reward == "task":
        return float(task.score(prompt, generated, terminated))
    assert callable(reward)
    return float(reward(vocab.decode(prompt), vocab.decode(generated), terminated))


class SequenceGenEnv(gym.Env[np.ndarray, np.int64]):
    """Generate a sequence token by token, with a backspace to undo the last token.

    ## Description
    The agent continues a prompt drawn from a task (an arithmetic question, the start symbol of
    a bracket language, the opening of a passage of prose). Each action appends one token, deletes
    the last generated token, or ends the sequence. The expert demonstrations of the task never
    backspace; an imitation learner that strays off the data can (docs/method.md §1).

    ## Observation Space
    ``Box(0, num_actions, (max_length,), int64)``: the token ids of the current state (prompt, then
    generated tokens), padded on the right with ``vocab.pad_id`` (= ``num_actions``).
    ``info["action_mask"]`` (int8, ``(num_actions,)``) marks the allowed actions,
    ``info["text"]`` is the current text and ``info["generated"]`` the generated part of it.
    After a step, ``info["intended_action"]`` is the action taken and ``info["executed_action"]``
    the one that ran (they differ where the disturbance replaced a token).

    ## Action Space
    ``Discrete(num_actions)``: ids below ``num_actions`` other than the two special ones append
    that token; ``vocab.eos_id`` ends the episode; ``vocab.backspace_id`` deletes the last generated
    token. The prompt is never deleted: a backspace with nothing generated is masked out in
    ``info["action_mask"]`` and, if taken anyway, is a no-op that still costs a step. An action is
    an integer id (an int, a numpy or torch integer scalar or a 0-d integer array); anything else
    raises ``InvalidActionError``.

    With ``disturbance=p`` (docs/method.md §5, like ALE's sticky actions), an ordinary token action
    is, with probability p, replaced before it runs by a noise token that differs from it: uniform
    over the other ordinary tokens (``disturbance_type="random"``) or the task's plausible mistake
    (``"ground_truth"``). ``<eos>`` and ``<bkspc>`` are never replaced, nor is an append that
    fills the buffer (nothing could delete it). The draws come from ``self.np_random``.

    ## Rewards
    0 on every step but the last. At the end of the episode: with ``reward="task"`` (the default)
    the task's score (arithmetic: 1 for the correct answer ended by ``<eos>``; dyck: 1 for a valid
    complete sequence; text: 0); with ``"none"``, 0; with a callable
    ``f(prompt_text, generated_text, terminated)``, its value.

    ## Starting State
    A prompt drawn from the task with ``self.np_random``. ``reset(options={"prompt": ...})`` sets
    the prompt (text or ids), ``options={"generated": ...}`` places tokens in the deletable part
    of the starting state (e.g. a wrong partial answer) and ``options={"split": "test"}`` draws
    the prompt from the test split. Other options raise ``ValueError``.

    ## Episode End
    Termination: the action ``<eos>``. Truncation: the state reaches ``max_length`` tokens, or
    ``max_steps`` actions were taken (backspaces count). A truncated state still has a value.

    ## Arguments
    ``gym.make("SequenceGen-v0", task="arithmetic", max_length=None, max_steps=None,
    reward="task", disturbance=0.0, disturbance_type=None, render_mode=None, **task_kwargs)``.
    ``task`` is a name (``"arithmetic"``, ``"dyck"``, ``"text"``) or a ``Task`` object;
    ``max_length`` defaults to the task's ``default_max_length`` and ``max_steps`` to
    ``2 * max_length`` (both integers); ``disturbance`` is p in [0, 1] or a
    :class:`~seqenv.disturbance.Disturbance`, ``disturbance_type`` ``"random"`` (the default) or
    ``"ground_truth"``; ``render_mode`` is ``"ansi"`` (the text) or ``"rgb_array"`` (the text
    drawn as an (H, W, 3) uint8 image); other keyword arguments go to the task (for example
    ``corpus=`` for ``"text"``).

    ## Version History
    * v0: initial version. Added since, leaving the default dynamics unchanged: the disturbance
      (p = 0 by default), ``info["intended_action"]`` and ``info["executed_action"]``,
      ``render_mode="rgb_array"``, and :meth:`expert_action_probs` (the task's oracle).
    """

    metadata: dict[str, Any] = {"render_modes": ["ansi", "rgb_array"], "render_fps": 4}  # noqa: RUF012

    def __init__(
        self,
        task: str | Task = "arithmetic",
        max_length: int | None = None,
        max_steps: int | None = None,
        reward: str | RewardFn = "task",
        disturbance: float | Disturbance = 0.0,
        disturbance_type: str | None = None,
        render_mode: str | None = None,
        **task_kwargs: Any,
    ) -> None:
        if render_mode is not None and render_mode not in self.metadata["render_modes"]:
            raise ValueError(f"render_mode must be one of {self.metadata['render_modes']}")
        self.render_mode = render_mode
        self.task = resolve_task(task, task_kwargs)
        self.vocab: Vocab = self.task.vocab
        self.reward_fn = resolve_reward(reward)
        self.max_length = resolve_max_length(max_length, self.task)
        self.disturbance = resolve_disturbance(disturbance, disturbance_type)
        self.mdp = SequenceMDP(
            self.vocab.special,
            self.max_length,
            max_steps,
            batch_size=1,
            disturbance=self.disturbance,
            noise_fn=noise_of(self.disturbance, self.task),
        )
        self.max_steps = self.mdp.max_steps
        num_actions = self.vocab.num_actions
        self.action_space = spaces.Discrete(num_actions)
        self.observation_space = spaces.Box(0, num_actions, (self.max_length,), np.int64)
        self._needs_reset = True

    def _ids(self, value: Any, name: str) -> list[int]:
        if isinstance(value, str):
            return self.vocab.encode(value)
        try:
            return [int(v) for v in value]
        except TypeError:
            raise TypeError(f"options[{name!r}] must be text or a sequence of ids") from None

    def _obs(self) -> np.ndarray:
        return self.mdp.tokens[0].numpy().copy()

    def _info(self) -> dict[str, Any]:
        return {
            "action_mask": self.mdp.action_mask()[0].numpy().astype(np.int8),
            "text": self.vocab.decode(self.mdp.state(0)),
            "generated": self.vocab.decode(self.mdp.generated(0)),
        }

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[np.ndarray, dict[str, Any]]:
        """Start an episode; ``options`` may set ``"prompt"``, ``"generated"`` and ``"split"``.

        See the class docstring for the options. Returns the observation and the info dict.
        """
        super().reset(seed=seed)
        options = check_options(options, ("prompt", "generated", "split"))
        split = options.get("split", "train")
        if split not in ("train", "test"):
            raise ValueError(f"options['split'] must be 'train' or 'test', got {split!r}")
        if "prompt" in options:
            prompt = self._ids(options["prompt"], "prompt")
        else:
            prompt = list(self.task.sample(self.np_random, split).prompt)
        generated = self._ids(options.get("generated", ()), "generated")
        # The disturbance's key, drawn only when there is one: p = 0 leaves the stream unchanged.
        key = int(self.np_random.integers(KEY_BOUND)) if self.disturbance.active else 0
        self.mdp.reset_rows([0], [prompt], [generated], keys=[key])
        self._needs_reset = False
        return self._obs(), self._info()

    def step(self, action: Any) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        """Apply one action; the reward is paid at the end of the episode.

        Raises:
            RuntimeError: before :meth:`reset`, or after the episode ended.
        """
        if self._needs_reset:
            raise RuntimeError("call reset() before step() (and after an episode ends)")
        result = self.mdp.step(torch.tensor([as_action_id(action)]))
        terminated, truncated = bool(result.terminated[0]), bool(result.truncated[0])
        reward = 0.0
        if terminated or truncated:
            self._needs_reset = True
            reward = episode_reward(
                self.reward_fn,
                self.task,
                self.vocab,
                self.mdp.state(0)[: int(self.mdp.prompt_length[0])],
                self.mdp.generated(0),
                terminated,
            )
        info = self._info()
        info["intended_action"] = int(result.intended[0])
        info["executed_action"] = int(result.executed[0])
        return self._obs(), reward, terminated, truncated, info

    def action_masks(self) -> np.ndarray:
        """The current action mask as bools (the name sb3-contrib's maskable algorithms call)."""
        return self.mdp.action_mask()[0].numpy()

    def expert_action_probs(self) -> np.ndarray:
        """The task's expert at the current state, valid or not: (A,) float64 summing to 1.

        The oracle of :mod:`seqenv.expert`: at a state that can still be completed correctly,
        the expert's next-action distribution; at one that has left the task's language, all
        mass on ``<bkspc>``. It sees only the text, so after a disturbance that left valid text
        it continues where the disturbed env's demonstrator would delete. After an episode
        ends, it is the oracle at the final state.

        Raises:
            NoOracleError: the task has no oracle (text; a task without ``expert_policy``).
            RuntimeError: before :meth:`reset`.
        """
        start = int(self.mdp.prompt_length[0])
        if start == 0:  # every prompt holds a token: nothing was reset yet
            raise RuntimeError("call reset() before expert_action_probs()")
        state = self.mdp.state(0)
        return expert_probs(self.task, [state[:start]], [state[start:]])[0]

    def render(self) -> str | np.ndarray | None:
        """``"ansi"``: the current text; ``"rgb_array"``: it drawn as an (H, W, 3) uint8 image."""
        if self.render_mode == "ansi":
            return self.vocab.decode(self.mdp.state(0))
        if self.render_mode == "rgb_array":
            prompt = self.mdp.state(0)[: int(self.mdp.prompt_length[0])]
            return text_image(
                self.vocab.decode(self.mdp.state(0)),
                prompt_chars=len(self.vocab.decode(prompt)),
                rows=rgb_rows(self.max_length),
            )
        return None
