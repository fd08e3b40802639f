"""Metrics of finished episodes, on plain inputs: trajectories and token id lists.

Nothing here runs a model, so every metric is testable on hand-made cases. Sections:

- **General**: backspace usage and episode statistics (:func:`backspace_stats`).
- **Arithmetic**: exact-match accuracy (:func:`accuracy`) and recovery from a wrong partial
  answer (:func:`recovery_starts`, :func:`recovery_metrics`).
- **Dyck**: validity, log-probability under the true grammar, length distributions
  (:func:`dyck_metrics`); the exact occupancy measures are in :mod:`agents.evaluation.occupancy`.
- **Own errors** (every task with an oracle, :mod:`seqenv.expert`): the agent's own mistakes,
  told apart from the environment's noise, and whether it repairs them (:func:`own_error_units`).

A "sample" below is either a :class:`~seqenv.trajectory.Trajectory` (its final generated ids
after every backspace, and whether it terminated) or a plain list of generated ids (taken as a
terminated episode).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from seqenv.expert import require_oracle
from seqenv.tasks.base import Example, Task
from seqenv.trajectory import Trajectory, replay
from seqenv.vocab import SpecialIds

Sample = Trajectory | Sequence[int]


# --------------------------------------------------------------------------------------------
# General: backspace usage and episodes


def final_generated(trajectories: Sequence[Trajectory]) -> list[list[int]]:
    """The generated ids each episode leaves, after every backspace (one batched replay)."""
    if not trajectories:
        return []
    return replay(trajectories)


def _finals(samples: Sequence[Sample]) -> list[tuple[list[int], bool]]:
    """(final generated ids, terminated) of each sample; plain id lists count as terminated."""
    trajectories = [s for s in samples if isinstance(s, Trajectory)]
    replayed = iter(final_generated(trajectories))
    out = []
    for s in samples:
        if isinstance(s, Trajectory):
            out.append((next(replayed), s.terminated))
        else:
            out.append(([int(t) for t in s], True))
    return out


def backtrack_lengths(actions: Sequence[int] | np.ndarray, backspace_id: int) -> list[int]:
    """Lengths of the maximal runs of consecutive backspaces in an action sequence."""
    runs = []
    count = 0
    for action in actions:
        if int(action) == backspace_id:
            count += 1
        elif count:
            runs.append(count)
            count = 0
    if count:
        runs.append(count)
    return runs


def backspace_stats(trajectories: Sequence[Trajectory]) -> dict[str, float]:
    """How episodes use the backspace, and how they end.

    Returns:
        ``backspace_rate``: backspaces / steps, pooled over all episodes (every action is a
        step, ``<eos>`` included); ``mean_backtrack_length``: mean length of the maximal runs
        of consecutive backspaces, pooled over all runs (0 when there is no backspace);
        ``num_backtracks``: the number of such runs; ``backspace_episode_fraction``: episodes
        with at least one backspace; ``mean_episode_length``: steps per episode;
        ``mean_generated_length``: tokens left at the end; ``termination_rate``: episodes
        that ended with ``<eos>`` (the others were truncated); ``num_episodes``.
    """
    if not trajectories:
        raise ValueError("backspace_stats needs at least one trajectory")
    backspace_id = trajectories[0].special.backspace_id
    steps = sum(t.num_steps for t in trajectories)
    backspaces = sum(t.num_backspaces for t in trajectories)
    runs = [r for t in trajectories for r in backtrack_lengths(t.actions, backspace_id)]
    generated = final_generated(trajectories)
    n = len(trajectories)
    return {
        "backspace_rate": backspaces / steps,
        "mean_backtrack_length": float(np.mean(runs)) if runs else 0.0,
        "num_backtracks": float(len(runs)),
        "backspace_episode_fraction": sum(t.num_backspaces > 0 for t in trajectories) / n,
        "mean_episode_length": steps / n,
        "mean_generated_length": sum(len(g) for g in generated) / n,
        "termination_rate": sum(t.terminated for t in trajectories) / n,
        "num_episodes": float(n),
    }


# --------------------------------------------------------------------------------------------
# Arithmetic: accuracy and recovery


def accuracy(task: Task, trajectories: Sequence[Trajectory]) -> float:
    """Mean of ``task.score`` over the episodes' final texts.

    For arithmetic, the fraction that terminated with exactly the right answer.
    """
    if not trajectories:
        raise ValueError("accuracy needs at least one trajectory")
    return float(np.mean(episode_scores(task, trajectories)))


def episode_scores(
    task: Task, trajectories: Sequence[Trajectory], finals: Sequence[Sequence[int]] | None = None
) -> list[float]:
    """``task.score`` of each episode's final text (``finals``, if the caller has them)."""
    finals = final_generated(trajectories) if finals is None else finals
    return [
        float(task.score(t.prompt.tolist(), g, t.terminated))
        for t, g in zip(trajectories, finals, strict=True)
    ]


@dataclass(frozen=True)
class RecoveryStart:
    """The start of a recovery episode: a prompt, then a wrong partial answer.

    The policy may delete the partial answer (it sits in the generated part of the state, not in
    the prompt).

    Attributes:
        prompt: the question's ids.
        prefix: the wrong partial answer: correct tokens, then one mistake as the last token.
        completion: the correct answer's ids.
    """

    prompt: tuple[int, ...]
    prefix: tuple[int, ...]
    completion: tuple[int, ...]

    def trajectory(
        self, actions: Sequence[int], terminated: bool, special: SpecialIds
    ) -> Trajectory:
        """The episode as :func:`recovery_metrics` expects it.

        The prefix, written as the first actions, then the policy's own ``actions`` from the
        starting state.
        """
        return Trajectory(
            prompt=np.asarray(self.prompt, dtype=np.int64),
            actions=np.asarray([*self.prefix, *actions], dtype=np.int64),
            terminated=terminated,
            truncated=not terminated,
            special=special,
        )


def wrong_partial_answer(task: Task, example: Example, rng: np.random.Generator) -> tuple[int, ...]:
    """A partial answer ending in a mistake: :meth:`Task.wrong_partial_answer` of the task."""
    return tuple(int(t) for t in task.wrong_partial_answer(example, rng))


def recovery_starts(task: Task, examples: Sequence[Example], seed: int = 0) -> list[RecoveryStart]:
    """One recovery start per example (see :func:`wrong_partial_answer`), the same for a seed.

    Start each episode with ``prompt`` as the prompt and ``prefix`` as tokens already generated
    (``SequenceMDP.reset_rows(..., generated=...)``).
    """
    rng = np.random.default_rng(seed)
    return [
        RecoveryStart(
            prompt=tuple(int(t) for t in e.prompt),
            prefix=wrong_partial_answer(task, e, rng),
            completion=tuple(int(t) for t in e.completion),
        )
        for e in examples
    ]


def recovery_metrics(
    task: Task, starts: Sequence[RecoveryStart], trajectories: Sequence[Trajectory]
) -> dict[str, float]:
    """How often a policy recovers from a wrong partial answer.

    Episode ``i`` starts from ``starts[i]``. Its trajectory holds the prompt as its prompt and
    the wrong prefix as its first actions, followed by the policy's own actions
    (:meth:`RecoveryStart.trajectory` builds one). A trajectory that starts from the state
    itself cannot be a :class:`Trajectory`: its first backspace would go below its own start.

    The episode is scored by ``task.score`` on its final generated text, after every
    backspace. For arithmetic that text must equal the correct answer: the policy must
    backspace out of the wrong digit (and anything written after it) and finish the answer; a
    right answer appended after the mistake still scores 0. (For dyck the score is validity.)

    Returns:
        ``recovery_accuracy``: the mean score of the final texts;
        ``recovery_deleted_fraction``: the fraction whose policy deleted the wrong token at some
        point (the generated length fell below the prefix's); ``recovery_backspace_fraction``:
        the fraction whose policy used a backspace at all; ``recovery_first_backspace_fraction``:
        the fraction whose first own action is a backspace.

    Raises:
        ValueError: if the counts differ, or a trajectory's prompt or first actions do not
            match its start.
    """
    if len(starts) != len(trajectories):
        raise ValueError(f"{len(starts)} starts but {len(trajectories)} trajectories")
    if not starts:
        raise ValueError("recovery_metrics needs at least one episode")
    deleted = used = first = 0
    for i, (start, t) in enumerate(zip(starts, trajectories, strict=True)):
        k = len(start.prefix)
        if (
            tuple(t.prompt.tolist()) != start.prompt
            or tuple(t.actions[:k].tolist()) != start.prefix
        ):
            raise ValueError(
                f"trajectory {i} does not begin with its start: its prompt must be the start's "
                "prompt and its first actions the wrong prefix (see RecoveryStart.trajectory)"
            )
        own = t.actions[k:]
        backspace = t.special.backspace_id
        used += bool((own == backspace).any())
        first += bool(len(own) and own[0] == backspace)
        length = k
        for action in own.tolist():
            if action == backspace:
                length -= 1
            elif action != t.special.eos_id:
                length += 1
            if length < k:
                deleted += 1
                break
    n = len(starts)
    return {
        "recovery_accuracy": accuracy(task, trajectories),
        "recovery_deleted_fraction": deleted / n,
        "recovery_backspace_fraction": used / n,
        "recovery_first_backspace_fraction": first / n,
    }


# --------------------------------------------------------------------------------------------
# Dyck: validity, log-probability under the grammar, lengths


class Grammar(Protocol):
    """What the dyck metrics need of a task (:class:`seqenv.tasks.dyck.DyckTask`)."""

    def log_prob(self, generated_ids: Sequence[int], terminated: bool = True) -> float:
        """Exact log-probability of a sequence, with its final ``<eos>`` when ``terminated``."""
        ...

    def is_valid(self, generated_ids: Sequence[int]) -> bool:
        """Whether a complete sequence has nonzero probability."""
        ...


def validity_rate(task: Grammar, samples: Sequence[Sample]) -> float:
    """Fraction of samples that are valid complete sequences (``task.is_valid``).

    A truncated episode is never valid.
    """
    finals = _finals(samples)
    if not finals:
        raise ValueError("validity_rate needs at least one sample")
    return sum(terminated and task.is_valid(ids) for ids, terminated in finals) / len(finals)


def log_prob_stats(task: Grammar, samples: Sequence[Sample]) -> dict[str, float]:
    """Log-probability of the samples under the true grammar, ``<eos>`` included.

    Invalid samples have log-probability ``-inf``, so the mean is over the valid ones and the
    invalid share is reported beside it.

    Returns:
        ``mean_log_prob``: mean natural-log probability of the valid samples (nan if none);
        ``invalid_rate``: the fraction with probability zero (truncated ones included);
        ``num_valid``.
    """
    finals = _finals(samples)
    if not finals:
        raise ValueError("log_prob_stats needs at least one sample")
    values = [task.log_prob(ids, terminated=True) if term else -math.inf for ids, term in finals]
    valid = [v for v in values if v > -math.inf]
    return {
        "mean_log_prob": float(np.mean(valid)) if valid else math.nan,
        "invalid_rate": 1.0 - len(valid) / len(values),
        "num_valid": float(len(valid)),
    }


def sequence_lengths(samples: Sequence[Sample]) -> list[int]:
    """The final generated length of each sample."""
    return [len(ids) for ids, _ in _finals(samples)]


def length_distances(model_lengths: Sequence[int], data_lengths: Sequence[int]) -> dict[str, float]:
    """Distances between two empirical length distributions.

    Returns:
        ``length_tv``: total variation ½ Σ_l |p(l) - q(l)| of the two length histograms;
        ``length_wasserstein``: the Wasserstein-1 distance ∫ |F_p(x) - F_q(x)| dx of the two
        empirical distributions (the mean shift in length needed to turn one into the other).
        Both 0 for identical distributions.
    """
    if not model_lengths or not data_lengths:
        raise ValueError("length_distances needs lengths on both sides")
    p, q = Counter(int(x) for x in model_lengths), Counter(int(x) for x in data_lengths)
    n_p, n_q = len(model_lengths), len(data_lengths)
    support = sorted(set(p) | set(q))
    tv = 0.5 * sum(abs(p[k] / n_p - q[k] / n_q) for k in support)
    # Between consecutive support points the two CDFs are constant.
    cdf_p = np.cumsum([p[k] / n_p for k in support])
    cdf_q = np.cumsum([q[k] / n_q for k in support])
    wasserstein = float(np.sum(np.abs(cdf_p - cdf_q)[:-1] * np.diff(support)))
    return {"length_tv": float(tv), "length_wasserstein": wasserstein}


def dyck_failures(task: Grammar, trajectories: Sequence[Trajectory]) -> dict[str, float]:
    """Where the invalid samples go wrong, and whether they backspaced.

    For each failed episode (not a valid complete sequence), its final text is classified:

    - ``failed_wrong_bracket``: some bracket is impossible under the grammar (a mismatched or
      unopened close, an open beyond the limits); ``first_error_position`` is the mean relative
      position of the first one, index / final length, in [0, 1);
    - ``failed_bad_end``: every bracket is possible but the sequence ended where it may not
      (brackets left open, too short), or never ended (truncated).

    ``failed_backspace_rate`` and ``valid_backspace_rate`` pool backspaces / steps over the
    failed and the valid episodes: a learner that repairs would backspace more where it failed.
    Rates over no episodes are NaN.
    """
    failed_steps = failed_bksp = valid_steps = valid_bksp = 0
    wrong, positions, bad_end = 0, [], 0
    for t in trajectories:
        ids = t.generated()
        bksp = t.num_backspaces
        if t.terminated and task.is_valid(ids):
            valid_steps, valid_bksp = valid_steps + t.num_steps, valid_bksp + bksp
            continue
        failed_steps, failed_bksp = failed_steps + t.num_steps, failed_bksp + bksp
        prefixes = (task.log_prob(ids[: i + 1], terminated=False) for i in range(len(ids)))
        first = next((i for i, lp in enumerate(prefixes) if lp == -math.inf), None)
        if first is None:
            bad_end += 1
        else:
            wrong += 1
            positions.append(first / len(ids))
    failed = wrong + bad_end
    nan = float("nan")
    return {
        "failed_wrong_bracket": wrong / failed if failed else nan,
        "failed_bad_end": bad_end / failed if failed else nan,
        "first_error_position": float(np.mean(positions)) if positions else nan,
        "failed_backspace_rate": failed_bksp / failed_steps if failed_steps else nan,
        "valid_backspace_rate": valid_bksp / valid_steps if valid_steps else nan,
    }


def dyck_metrics(
    task: Grammar, samples: Sequence[Sample], data: Sequence[Sample]
) -> dict[str, float]:
    """Validity, log-probability and length distances of model samples against data samples."""
    return {
        "validity": validity_rate(task, samples),
        **log_prob_stats(task, samples),
        **length_distances(sequence_lengths(samples), sequence_lengths(data)),
    }


# --------------------------------------------------------------------------------------------
# Own errors: the agent's mistakes against the task's oracle, apart from the noise

OWN_ERROR_DENOMINATORS: dict[str, str] = {
    "own_error_rate": "episode",
    "own_error_repair_rate": "own error",
    "valid_after_own_error": "episode with an own error",
    "false_backspace_share": "backspace that deleted a token",
    "early_eos_rate": "episode",
    "noise_unrepaired": "episode (disturbed evaluation only)",
}
"""The unit of each own-error measure: it is the mean of one 0/1 value (a task score for
``valid_after_own_error``) per such unit, pooled over the episodes of one evaluation."""

# Where each generated token came from.
_CORRECT, _ERROR, _NOISE, _AFTER = "correct", "error", "noise", "after"


def own_error_units(
    task: Task, trajectories: Sequence[Trajectory], noise: bool = False
) -> dict[str, list[float]]:
    """The units of the own-error measures; each measure is the mean of its units.

    Each episode is walked with its intended and executed actions
    (:attr:`~seqenv.trajectory.Trajectory.intended`), asking the task's oracle
    (:meth:`~seqenv.tasks.Task.expert_policy`) at every valid state. A state is *valid* while
    every token it holds was in the oracle's support where it was appended; the first token
    that was not takes the state off the language, and it stays off until that token is
    deleted. A generated token is one of:

    - *correct*: the agent's own token (executed as intended) at a valid state, in the
      oracle's support;
    - *own error*: the agent's own token at a valid state, outside the oracle's support;
    - *noise*: the disturbance replaced the agent's token (valid or not: the oracle judges it);
    - *after*: the agent's own token at a state already off the language.

    Units (their denominators are :data:`OWN_ERROR_DENOMINATORS`):

    - ``own_error_rate``: one per episode, 1 if it has an own error.
    - ``own_error_repair_rate``: one per own error, 1 if a later backspace deleted it.
    - ``valid_after_own_error``: one per episode with an own error, its task score (1 for a
      correct final text, after every backspace; dyck: valid, arithmetic: the answer).
    - ``false_backspace_share``: one per backspace that deleted a token, 1 if that token was
      a correct one of the agent's (text it should have kept); deleting noise is never false.
    - ``early_eos_rate``: one per episode, 1 if the agent ended with ``<eos>`` at a valid
      state whose oracle gives ``<eos>`` no mass (it cannot be repaired, so it is not counted
      as an own error).
    - ``noise_unrepaired`` (only with ``noise``): one per episode, 1 if the agent wrote on or
      ended (any action but ``<bkspc>``) at a state that a noise token had taken off the
      language. Such tokens are *after* tokens, not own errors.

    Args:
        task: a task with an oracle.
        trajectories: finished episodes (the disturbed ones keep ``intended``).
        noise: the episodes ran in the disturbed environment: also ``noise_unrepaired``.

    Raises:
        NoOracleError: the task has no oracle.
    """
    require_oracle(task)
    units: dict[str, list[float]] = {
        name: [] for name in OWN_ERROR_DENOMINATORS if noise or name != "noise_unrepaired"
    }
    for t in trajectories:
        special = t.special
        prompt = t.prompt.tolist()
        generated: list[int] = []
        origins: list[str] = []  # of each generated token
        error_index: list[int] = []  # its index in the own-error units, -1 if not an error
        valid = [True]  # of the state with k generated tokens, k = 0..len(generated)
        culprit: list[str | None] = [None]  # the origin of the token that took it off
        first_error = len(units["own_error_repair_rate"])
        early_eos = left_noise = False
        for chosen, ran in zip(t.intended_actions.tolist(), t.actions.tolist(), strict=True):
            if ran == special.backspace_id:
                if generated:
                    generated.pop()
                    valid.pop()
                    culprit.pop()
                    origin, index = origins.pop(), error_index.pop()
                    units["false_backspace_share"].append(float(origin == _CORRECT))
                    if index >= 0:
                        units["own_error_repair_rate"][index] = 1.0
                continue
            if culprit[-1] == _NOISE:
                left_noise = True
            # The oracle at valid states only: a state off the language stays off.
            probs = task.expert_policy(prompt, generated) if valid[-1] else None
            if ran == special.eos_id:
                early_eos = probs is not None and probs[special.eos_id] == 0.0
                continue
            supported = probs is not None and probs[ran] > 0.0
            if chosen != ran:
                origin = _NOISE
            elif probs is None:
                origin = _AFTER
            else:
                origin = _CORRECT if supported else _ERROR
            index = -1
            if origin == _ERROR:
                index = len(units["own_error_repair_rate"])
                units["own_error_repair_rate"].append(0.0)
            generated.append(ran)
            origins.append(origin)
            error_index.append(index)
            valid.append(supported)
            culprit.append(culprit[-1] if probs is None else None if supported else origin)
        own_errors = len(units["own_error_repair_rate"]) > first_error
        units["own_error_rate"].append(float(own_errors))
        if own_errors:
            units["valid_after_own_error"].append(
                float(task.score(prompt, generated, t.terminated))
            )
        units["early_eos_rate"].append(float(early_eos))
        if noise:
            units["noise_unrepaired"].append(float(left_noise))
    return units
