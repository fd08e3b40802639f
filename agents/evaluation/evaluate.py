"""The one evaluator: a policy's episodes on held-out prompts, measured under one set of names.

Training (``eval/`` scalars at its intervals), ``seqmatch eval`` and ``seqmatch compare`` all call
:func:`evaluate`, so a number means the same thing in TensorBoard, in JSON and in a report.
:data:`METRICS` names every metric once. ``full=False`` computes the cheap ones (what training
logs at every interval); ``full=True`` adds recovery, the exact occupancy divergences, held-out
perplexity, MAUVE and the n-gram statistics.

Sampling follows the checkpoint's training setting unless told otherwise: greedy for arithmetic
(accuracy is about the most likely answer), sampled elsewhere (validity, likelihood and diversity
are properties of the distribution the policy generates).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
import torch

from agents.collate import collate
from agents.evaluation.episodes import (
    accuracy,
    backspace_stats,
    dyck_metrics,
    episode_scores,
    final_generated,
    recovery_metrics,
    recovery_starts,
)
from agents.evaluation.occupancy import GrammarTask, exact_divergences, policy_probs_from_model
from agents.evaluation.text import (
    continuation_texts,
    distinct_n,
    mauve_score,
    ngram_entropy,
    perplexity,
    repetition,
)
from agents.generate import generate
from agents.models.interface import PolicyModel
from agents.objectives import step_values
from seqenv.tasks import Task
from seqenv.trajectory import Trajectory


@dataclass(frozen=True)
class Metric:
    """One metric of :func:`evaluate`.

    Attributes:
        description: what it measures, in one line (reports print it).
        higher_is_better: its direction; None where neither is better (a rate to match).
        bounds: the range the metric lives in; intervals are kept inside it.
    """

    description: str
    higher_is_better: bool | None
    bounds: tuple[float, float] = (-np.inf, np.inf)


UNIT = (0.0, 1.0)
METRICS: dict[str, Metric] = {
    # every task
    "backspace_rate": Metric("backspaces / steps, pooled over episodes", None, UNIT),
    "mean_backtrack_length": Metric("mean run of consecutive backspaces", None, (0.0, np.inf)),
    "termination_rate": Metric("episodes ended by <eos> (the rest truncated)", None, UNIT),
    "length": Metric("mean generated length after backspaces", None, (0.0, np.inf)),
    "score": Metric("mean task score (a task without metrics of its own)", True),
    # arithmetic
    "accuracy": Metric("exact-match answers on held-out questions", True, UNIT),
    "recovery": Metric("correct answers started from a wrong partial answer", True, UNIT),
    # dyck
    "invalid_rate": Metric("samples that are not valid complete sequences", False, UNIT),
    "true_logprob": Metric("mean log-probability of valid samples under the grammar", True),
    "length_tv": Metric("TV between sample and data length distributions", False, UNIT),
    "exact_chi2_mixture": Metric("exact chi^2-mixture of occupancies to the data", False),
    "exact_kl": Metric("exact KL of occupancies, data to policy", False, (0.0, np.inf)),
    "exact_tv": Metric("exact TV of occupancies to the data", False, UNIT),
    # text
    "mauve": Metric("MAUVE of continuations against the held-out text", True, UNIT),
    "perplexity": Metric("held-out perplexity of demonstrations", False, (1.0, np.inf)),
    "distinct_2": Metric("unique word bigrams / word bigrams, pooled", True, UNIT),
    "ngram_entropy": Metric("entropy (nats) of pooled word-bigram frequencies", True),
    "repetition": Metric("repeated word bigrams within a continuation", False, UNIT),
}

TASK_METRICS: dict[str, tuple[str, ...]] = {
    "arithmetic": ("accuracy", "recovery", "backspace_rate", "mean_backtrack_length"),
    "dyck": (
        "invalid_rate",
        "true_logprob",
        "length_tv",
        "backspace_rate",
        "exact_chi2_mixture",
        "exact_kl",
        "exact_tv",
    ),
    "text": ("mauve", "perplexity", "distinct_2", "ngram_entropy", "repetition", "backspace_rate"),
}
"""The metrics reported for each task, the first being its headline."""

TEXT_NGRAM = 2
"""n of the text n-gram statistics, over words. 4-grams of a few hundred short continuations
are all distinct (the entropy then only counts them); word bigrams repeat in real prose."""


def headline(task_name: str) -> str:
    """The metric a task is judged by (the first of :data:`TASK_METRICS`; ``accuracy`` else)."""
    return TASK_METRICS.get(task_name, ("accuracy",))[0]


def default_greedy(task_name: str) -> bool:
    """Greedy episodes for arithmetic (accuracy), sampled for every other task."""
    return task_name == "arithmetic"


@dataclass(frozen=True)
class Evaluation:
    """What :func:`evaluate` returns.

    Attributes:
        metrics: name (a key of :data:`METRICS`) -> value.
        prompts: the held-out prompts of the episodes.
        episodes: one trajectory per prompt, backspaces included.
        generated: the final generated ids of each episode, after its backspaces.
    """

    metrics: dict[str, float]
    prompts: list[list[int]]
    episodes: list[Trajectory]
    generated: list[list[int]]


@torch.no_grad()
def heldout_nll(
    policy: PolicyModel, demos: Sequence[Trajectory], allow_backspace: bool, batch_size: int = 32
) -> tuple[float, int]:
    """Summed negative log-likelihood of held-out demonstrations, and their number of actions.

    Log pi comes from :func:`agents.objectives.step_values`, the same allowed actions and the
    same masking as the training loss, so perplexity and the training NLL agree.
    """
    total, count = 0.0, 0
    device = next(iter(policy.parameters())).device
    for begin in range(0, len(demos), batch_size):
        batch = collate(demos[begin : begin + batch_size]).to(device)
        values = step_values(cast(Any, policy), batch, allow_backspace)
        total -= float(values.log_prob[values.valid].sum())
        count += int(values.valid.sum())
    return total, count


def _without_backspace(
    probs: Callable[[list[list[int]]], np.ndarray], backspace_id: int
) -> Callable[[list[list[int]]], np.ndarray]:
    """The policy as the no-backspace ablation runs it: backspace masked, renormalised."""

    def masked(states: list[list[int]]) -> np.ndarray:
        p = probs(states).copy()
        p[:, backspace_id] = 0.0
        return p / p.sum(axis=1, keepdims=True)

    return masked


def _words(vocab: Any, generated: Sequence[Sequence[int]]) -> list[str]:
    return [vocab.decode(ids) for ids in generated]


@torch.no_grad()
def evaluate(
    policy: PolicyModel,
    task: Task,
    *,
    max_length: int,
    max_steps: int,
    allow_backspace: bool = True,
    greedy: bool | None = None,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    episodes: int = 200,
    seed: int = 0,
    prompt_seed: int = 12345,
    full: bool = False,
    exact: dict[str, Any] | None = None,
    mauve: bool = True,
    use_cache: bool = True,
) -> Evaluation:
    """Run ``episodes`` episodes of ``policy`` on held-out prompts of ``task`` and measure them.

    Args:
        policy: the policy network (put it in eval mode first).
        task: the task; its ``test`` split gives the prompts.
        max_length, max_steps: the MDP the policy was trained in.
        allow_backspace: False masks ``<bkspc>`` (the no-backspace ablation).
        greedy: most likely actions; None: :func:`default_greedy` of the task.
        temperature, top_k, top_p: sampling settings when not greedy.
        episodes: held-out prompts (one episode each).
        seed: the sampling stream's seed (evaluating never touches training's streams).
        prompt_seed: chooses the held-out prompts; fixed so that every agent meets the same ones.
        full: also the expensive metrics (recovery, exact divergences, perplexity, MAUVE, n-grams).
        exact: settings of the exact occupancy divergences (dyck): ``gamma``, ``max_length``;
            None skips them.
        mauve: compute MAUVE on text (needs the ``text`` extra).
        use_cache: decode with the KV cache (False for policies without one).

    Returns:
        The episodes and their metrics, named as in :data:`METRICS`.
    """
    if episodes < 1:
        raise ValueError(f"episodes must be >= 1, got {episodes}")
    greedy = default_greedy(task.name) if greedy is None else greedy
    device = next(iter(policy.parameters())).device
    generator = torch.Generator(device).manual_seed(seed)
    examples = task.examples("test", episodes, seed=prompt_seed)
    prompts = [list(e.prompt) for e in examples]

    def rollouts(prefixes: list[list[int]] | None = None) -> tuple[list[Trajectory], list]:
        out = generate(
            policy,
            prompts,
            max_length=max_length,
            max_steps=max_steps,
            greedy=greedy,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            generator=generator,
            use_cache=use_cache,
            allow_backspace=allow_backspace,
            prefixes=prefixes,
        )
        return out.trajectories, out.generated

    trajectories, generated = rollouts()
    stats = backspace_stats(trajectories)
    metrics: dict[str, float] = {
        "backspace_rate": stats["backspace_rate"],
        "mean_backtrack_length": stats["mean_backtrack_length"],
        "termination_rate": stats["termination_rate"],
        "length": stats["mean_generated_length"],
    }
    if task.name == "arithmetic":
        metrics["accuracy"] = accuracy(task, trajectories)
        if full:
            starts = recovery_starts(task, examples, seed=54321)
            recovered, _ = rollouts(prefixes=[list(s.prefix) for s in starts])
            metrics["recovery"] = recovery_metrics(task, starts, recovered)["recovery_accuracy"]
    elif task.name == "dyck":
        data = [list(e.completion) for e in examples]
        dyck = dyck_metrics(cast(Any, task), trajectories, data)
        metrics["invalid_rate"] = 1.0 - dyck["validity"]
        metrics["true_logprob"] = dyck.get("mean_log_prob", float("nan"))
        metrics["length_tv"] = dyck.get("length_tv", float("nan"))
        if full and exact:
            probs = policy_probs_from_model(policy, task.vocab.special, device)
            if not allow_backspace:
                probs = _without_backspace(probs, task.vocab.special.backspace_id)
            divergences = exact_divergences(
                cast(GrammarTask, task),
                probs,
                float(exact.get("gamma", 0.9)),
                max_length=int(exact.get("max_length", max_length)),
            )
            for key in ("chi2_mixture", "kl", "tv"):
                metrics[f"exact_{key}"] = divergences[key]
    elif task.name == "text" and full:
        texts = _words(task.vocab, generated)
        metrics["distinct_2"] = distinct_n(texts, TEXT_NGRAM)
        metrics["ngram_entropy"] = ngram_entropy(texts, TEXT_NGRAM)
        metrics["repetition"] = repetition(texts, TEXT_NGRAM)
        demos = [task.demonstration(e, max_length) for e in examples]
        nll, count = heldout_nll(policy, demos, allow_backspace)
        metrics["perplexity"] = perplexity(nll, count)
        if mauve:
            true = [task.vocab.decode(e.completion) for e in examples]
            metrics["mauve"] = mauve_score(
                continuation_texts(task.vocab, trajectories), true, device=str(device)
            )
    else:
        metrics["score"] = float(np.mean(episode_scores(task, trajectories, generated)))
    return Evaluation(metrics, prompts, trajectories, generated)


def human_text_metrics(task: Task, episodes: int, prompt_seed: int = 12345) -> dict[str, float]:
    """The text n-gram statistics of the held-out human continuations themselves.

    The same prompts and sample size as :func:`evaluate`, so a model's value can be read beside
    the value of real text (and a statistic that saturates shows it).
    """
    examples = task.examples("test", episodes, seed=prompt_seed)
    texts = [task.vocab.decode(e.completion) for e in examples]
    return {
        "distinct_2": distinct_n(texts, TEXT_NGRAM),
        "ngram_entropy": ngram_entropy(texts, TEXT_NGRAM),
        "repetition": repetition(texts, TEXT_NGRAM),
    }


def sample_lines(vocab: Any, evaluation: Evaluation, num: int = 8) -> str:
    """A few episodes as text: prompt -> action trace => final text (for TensorBoard)."""
    rows = zip(evaluation.prompts, evaluation.episodes, evaluation.generated, strict=True)
    return "\n\n".join(
        f"    {vocab.decode(p)!r} -> {vocab.decode(t.actions)!r} => {vocab.decode(g)!r}"
        for p, t, g in list(rows)[:num]
    )


def data_accuracy(
    policy: PolicyModel, demos: Sequence[Trajectory], *, max_length: int, max_steps: int
) -> dict[str, float]:
    """Greedy exact match against a user's demonstrations (prompt -> the demonstrated text)."""
    out = generate(
        policy,
        [d.prompt.tolist() for d in demos],
        max_length=max_length,
        max_steps=max_steps,
        greedy=True,
    )
    expected = final_generated(demos)
    exact = [
        t.terminated and got == want
        for t, got, want in zip(out.trajectories, out.generated, expected, strict=True)
    ]
    stats = backspace_stats(out.trajectories)
    return {
        "accuracy": float(np.mean(exact)),
        "examples": float(len(demos)),
        "backspace_rate": stats["backspace_rate"],
        "termination_rate": stats["termination_rate"],
        "length": stats["mean_generated_length"],
    }


def parse_task_args(task_args: str) -> dict[str, Any]:
    """``--task-args`` JSON as a dict, or a one-line ValueError."""
    try:
        kwargs = json.loads(task_args)
    except json.JSONDecodeError as err:
        raise ValueError(f"--task-args is not valid JSON ({err.msg})") from None
    if not isinstance(kwargs, dict):
        raise ValueError("--task-args must be a JSON object")
    return kwargs
