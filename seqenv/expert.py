"""The task's expert as an oracle at every state, for users, agents and evaluation.

A task that knows its expert everywhere (:meth:`seqenv.tasks.Task.expert_policy`: arithmetic
through the answer, dyck through its grammar) gives the expert's action distribution at any
state, including states no demonstration visits: the model's own wrong ones. At a state that
has left the task's language the oracle puts all its mass on ``<bkspc>``.

The oracle sees only the text. It is **not** the demonstrator of the disturbed environment
(:func:`seqenv.trajectory.disturbed_demonstrations`), which also knows which tokens were noise
and deletes noise that happens to be valid (random noise ``[`` in place of ``(``), where the
oracle continues (agents/evaluation/exact.py explains why that expert is Markov only in an
augmented state). The two agree for arithmetic, and for dyck with ground-truth noise, which is
always invalid.

Entry points:

- :func:`expert_probs`: (B, A) for a batch of (prompt, generated) states, the form an agent's
  trainer labels states with; :func:`trajectory_expert_probs`: (N, A) at the N states an
  episode visits.
- ``env.unwrapped.expert_action_probs()`` on the single env (A,) and
  ``SequenceGenVectorEnv.expert_action_probs()`` (N, A) on the vector env.
- :class:`ExpertPolicy`: Stable-Baselines3's ``predict`` signature on observations, for
  ``evaluate_policy``, the imitation library's DAgger or a user's loop.

A task without an oracle raises :class:`NoOracleError`, one line naming the tasks that have one.

Shapes: B states, N steps, L = max_length, A = num_actions.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from seqenv.tasks import Task, oracle_task_names
from seqenv.trajectory import Trajectory


class NoOracleError(ValueError):
    """The task does not know its expert at every state."""


def require_oracle(task: Task) -> None:
    """Raise :class:`NoOracleError` unless ``task`` has an oracle.

    Raises:
        NoOracleError: one line naming the tasks that have one.
    """
    if task.has_oracle:
        return
    raise NoOracleError(
        f"task {task.name!r} has no expert oracle; tasks with one: "
        f"{', '.join(oracle_task_names())} (arithmetic on its own character vocabulary, not a "
        "pretrained model's tokenizer), or a task that implements Task.expert_policy"
    )


def expert_probs(
    task: Task, prompts: Sequence[Sequence[int]], generated: Sequence[Sequence[int]]
) -> np.ndarray:
    """The oracle at B states: (B, A) float64, each row summing to 1.

    Args:
        task: a task with an oracle.
        prompts: B prompts (ids).
        generated: the ids generated after each prompt.

    Raises:
        NoOracleError: the task has no oracle.
    """
    require_oracle(task)
    probs = task.expert_policies(prompts, generated)
    if probs is None:
        raise NoOracleError(f"task {task.name!r} returned no expert distribution")
    return probs


def trajectory_expert_probs(task: Task, trajectory: Trajectory) -> np.ndarray:
    """The oracle at each state an episode visits before its N actions: (N, A) float64.

    Row t is the state before action t (the prompt and what the executed actions 0..t-1 left).

    Raises:
        NoOracleError: the task has no oracle.
    """
    special = trajectory.special
    generated: list[int] = []
    states: list[list[int]] = []
    for action in trajectory.actions.tolist():
        states.append(list(generated))
        if action == special.backspace_id:
            if generated:
                generated.pop()
        elif action != special.eos_id:
            generated.append(action)
    prompt = trajectory.prompt.tolist()
    return expert_probs(task, [prompt] * len(states), states)


def task_of(env: Any) -> Task:
    """The task behind an environment.

    A :class:`~seqenv.tasks.Task` itself, a (wrapped) ``SequenceGen-v0``, the vector env, or a
    Stable-Baselines3 ``VecEnv`` of them.

    Raises:
        TypeError: for anything else.
    """
    if isinstance(env, Task):
        return env
    for holder in (env, getattr(env, "unwrapped", None), getattr(env, "env", None)):
        task = getattr(holder, "task", None)
        if isinstance(task, Task):
            return task
    if hasattr(env, "get_attr"):  # a Stable-Baselines3 VecEnv
        task = env.get_attr("task", indices=[0])[0]
        if isinstance(task, Task):
            return task
    raise TypeError(f"no SequenceGen-v0 task behind {type(env).__name__}")


class ExpertPolicy:
    """The task's oracle as a policy with Stable-Baselines3's ``predict`` signature.

    It reads each observation (token ids padded with ``pad_id``), splits it into prompt and
    generated text with :meth:`~seqenv.tasks.Task.prompt_length`, and acts from
    :meth:`~seqenv.tasks.Task.expert_policy`: the most likely action when ``deterministic``
    (ties go to the lowest id), a draw from the distribution otherwise. So it works wherever an
    SB3 policy does: ``evaluate_policy(ExpertPolicy(env), env)``, the imitation library's DAgger
    (as its expert policy, or as a callable: ``policy(obs, state, episode_start)`` samples), or
    a user's loop.

    Args:
        env: a ``SequenceGen-v0`` env (wrapped or not), the vector env, an SB3 VecEnv of
            them, or a :class:`~seqenv.tasks.Task`.
        seed: seeds the draws of ``deterministic=False``.

    Raises:
        NoOracleError: the env's task has no oracle.
    """

    def __init__(self, env: Any, seed: int | None = None) -> None:
        self.task = task_of(env)
        require_oracle(self.task)
        self.special = self.task.vocab.special
        self.rng = np.random.default_rng(seed)

    def _states(self, observation: Any) -> tuple[list[list[int]], list[list[int]]]:
        obs = np.asarray(
            observation.cpu() if hasattr(observation, "cpu") else observation, dtype=np.int64
        )
        if obs.ndim not in (1, 2):
            raise ValueError(f"observations must be (L,) or (B, L) token ids, got {obs.shape}")
        prompts, generated = [], []
        for row in np.atleast_2d(obs).tolist():
            ids = [t for t in row if t != self.special.pad_id]
            start = self.task.prompt_length(ids)
            prompts.append(ids[:start])
            generated.append(ids[start:])
        return prompts, generated

    def action_probs(self, observation: Any) -> np.ndarray:
        """(B, A) float64: the oracle at each observation (an (L,) one gives (1, A))."""
        return expert_probs(self.task, *self._states(observation))

    def predict(
        self,
        observation: Any,
        state: tuple[np.ndarray, ...] | None = None,
        episode_start: np.ndarray | None = None,
        deterministic: bool = False,
    ) -> tuple[np.ndarray, tuple[np.ndarray, ...] | None]:
        """The expert's action for each observation, as SB3's ``BasePolicy.predict``.

        Args:
            observation: (L,) or (B, L) token ids, numpy or torch.
            state: passed through (the oracle has no memory).
            episode_start: ignored.
            deterministic: the most likely action instead of a draw.

        Returns:
            The actions, int64 of shape () for one (L,) observation and (B,) otherwise, and
            ``state``.
        """
        probs = self.action_probs(observation)  # (B, A)
        if deterministic:
            actions = probs.argmax(axis=1)
        else:
            cdf = np.cumsum(probs, axis=1)
            draws = self.rng.random(len(probs)) * cdf[:, -1]
            actions = (cdf <= draws[:, None]).sum(axis=1)  # inverse CDF: never a zero-mass action
        actions = actions.astype(np.int64)
        single = np.ndim(observation) == 1
        return (actions.reshape(()) if single else actions), state

    def __call__(
        self,
        observation: Any,
        state: tuple[np.ndarray, ...] | None = None,
        episode_start: np.ndarray | None = None,
    ) -> tuple[np.ndarray, tuple[np.ndarray, ...] | None]:
        """``predict`` with draws: the imitation library's policy-callable signature."""
        return self.predict(observation, state, episode_start, deterministic=False)


__all__ = [
    "ExpertPolicy",
    "NoOracleError",
    "expert_probs",
    "require_oracle",
    "task_of",
    "trajectory_expert_probs",
]
