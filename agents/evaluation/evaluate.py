"""The one evaluator: a policy's episodes on held-out prompts, measured under one set of names.

Training (``eval/`` scalars at its intervals), ``seqmatch eval`` and ``seqmatch compare`` all call
:func:`evaluate`, so a number means the same thing in TensorBoard, in JSON and in a report.
:data:`METRICS` names every metric once. ``full=False`` computes the cheap ones (what training
logs at every interval); ``full=True`` adds recovery, the exact occupancy divergences, held-out
perplexity, MAUVE, the n-gram statistics and, on every task with an oracle, the own-error
measures (:data:`OWN_ERROR_METRICS`).

Sampling follows the checkpoint's training setting unless told otherwise: greedy for arithmetic
(accuracy is about the most likely answer), sampled elsewhere (validity, likelihood and diversity
are properties of the distribution the policy generates).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np
import torch

from agents.collate import collate
from agents.evaluation.episodes import (
    backspace_stats,
    dyck_failures,
    dyck_metrics,
    episode_scores,
    own_error_units,
    recovery_metrics,
    recovery_starts,
)
from agents.evaluation.exact import exact_report
from agents.evaluation.occupancy import GrammarTask, enumerate_states, policy_probs_from_model
from agents.evaluation.text import (
    distinct_n,
    mauve_score,
    ngram_entropy,
    perplexity,
    repetition,
)
from agents.generate import generate
from agents.models.interface import PolicyModel
from agents.objectives import ObjectiveBatch, step_values
from seqenv.disturbance import Disturbance, NoiseFn
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
    "failed_wrong_bracket": Metric("failures holding an impossible bracket", None, UNIT),
    "failed_bad_end": Metric("failures ended where they may not, or never ended", None, UNIT),
    "first_error_position": Metric("first impossible bracket / final length, failures", None, UNIT),
    "failed_backspace_rate": Metric("backspaces / steps over the failed episodes", None, UNIT),
    "valid_backspace_rate": Metric("backspaces / steps over the valid episodes", None, UNIT),
    "exact_target_chi2": Metric(
        "exact chi^2-mixture to the target (the marginalised expert, disturbed MDP, gamma 0.9)",
        False,
    ),
    "exact_target_live_chi2": Metric(
        "the same on live pairs only, at gamma 0.998 (end pairs hold ~99% of the measure)", False
    ),
    "exact_clean_chi2": Metric("exact chi^2-mixture to the clean grammar, clean MDP", False),
    "exact_invalid": Metric("exact mass of invalid final texts, clean MDP", False, UNIT),
    "exact_invalid_disturbed": Metric("exact mass of invalid final texts, disturbed", False, UNIT),
    "exact_output_tv": Metric("exact TV of final texts to the grammar's, clean MDP", False, UNIT),
    "exact_output_tv_disturbed": Metric("the same in the disturbed MDP", False, UNIT),
    "exact_backspace_rate": Metric("exact backspaces / steps in the disturbed MDP", None, UNIT),
    # every task with an oracle (seqenv.expert): the agent's own errors, apart from the noise
    "own_error_rate": Metric(
        "episodes where the agent's own token left the oracle's support at a valid state",
        False,
        UNIT,
    ),
    "own_error_repair_rate": Metric("own errors later deleted by the agent", True, UNIT),
    "valid_after_own_error": Metric(
        "episodes with an own error that still end correct", True, UNIT
    ),
    "false_backspace_share": Metric(
        "deleting backspaces that removed a correct own token", False, UNIT
    ),
    "early_eos_rate": Metric(
        "episodes ended by <eos> at a valid state where it is wrong", False, UNIT
    ),
    "noise_unrepaired": Metric(
        "episodes that wrote on (or ended) after a noise token took the text off the language",
        False,
        UNIT,
    ),
    # text
    "mauve": Metric("MAUVE of continuations against the held-out text", True, UNIT),
    "perplexity": Metric("held-out perplexity of demonstrations", False, (1.0, np.inf)),
    "distinct_2": Metric("unique word bigrams / word bigrams, pooled", True, UNIT),
    "ngram_entropy": Metric("entropy (nats) of pooled word-bigram frequencies", True),
    "repetition": Metric("repeated word bigrams within a continuation", False, UNIT),
}

DISTURBED = "disturbed/"
"""The prefix of a metric measured in the disturbed environment (the same metric otherwise)."""


def metric_spec(name: str) -> Metric | None:
    """The :class:`Metric` of a name, ``disturbed/<metric>`` included; None if unknown."""
    return METRICS.get(name.removeprefix(DISTURBED))


TASK_METRICS: dict[str, tuple[str, ...]] = {
    "arithmetic": ("accuracy", "recovery", "backspace_rate", "mean_backtrack_length"),
    "dyck": (
        "invalid_rate",
        "true_logprob",
        "length_tv",
        "backspace_rate",
        "exact_target_chi2",
        "exact_target_live_chi2",
        "exact_clean_chi2",
        "exact_invalid",
        "exact_invalid_disturbed",
        "exact_output_tv",
        "exact_output_tv_disturbed",
        "exact_backspace_rate",
    ),
    "text": ("mauve", "perplexity", "distinct_2", "ngram_entropy", "repetition", "backspace_rate"),
}
"""The metrics reported for each task, the first being its headline."""

OWN_ERROR_METRICS: tuple[str, ...] = (
    "own_error_rate",
    "own_error_repair_rate",
    "valid_after_own_error",
    "false_backspace_share",
    "early_eos_rate",
    "noise_unrepaired",
)
"""The own-error measures (:func:`agents.evaluation.episodes.own_error_units`), computed with
``full=True`` on every task with an oracle; ``noise_unrepaired`` under a disturbance only."""

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
    exact: dict[str, float] = field(default_factory=dict)
    episode_values: dict[str, list[float]] = field(default_factory=dict)
    """The values each mean metric is the mean of (for intervals that resample them as well as
    seeds): one per episode, or for the own-error measures one per item of their denominator
    (an own error, a backspace, an episode with an own error)."""


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


def exact_metrics(
    policy: PolicyModel,
    task: GrammarTask,
    settings: dict[str, Any],
    max_length: int,
    allow_backspace: bool,
) -> tuple[dict[str, float], dict[str, float]]:
    """Exact occupancy metrics of ``policy`` on an enumerable grammar (docs/method.md §5).

    Two :func:`agents.evaluation.exact.exact_report` calls: at ``gamma`` (0.9, the headline)
    and at ``live_gamma`` (0.998, read on live pairs only, since the end pairs hold almost all
    of that measure). The target is the expert marginalised over its knowledge of the
    disturbance ``p``; the ``floor/`` keys of the raw report are what a policy that matches
    the target exactly scores against the clean grammar.

    Returns:
        The headline metrics (names of :data:`METRICS`) and the raw reports, keys prefixed
        ``g<gamma>/``.
    """
    gamma = float(settings.get("gamma", 0.9))
    live_gamma = float(settings.get("live_gamma", 0.998))
    p = float(settings.get("p", 0.0))
    length = int(settings.get("max_length", max_length))
    device = next(iter(policy.parameters())).device
    prompt = task.sample(np.random.default_rng(0)).prompt
    space = enumerate_states(task.vocab.special, prompt, length)
    probs = policy_probs_from_model(
        policy, task.vocab.special, device, allow_backspace=allow_backspace
    )(space.states())
    report = exact_report(task, space, probs, gamma, p)
    live = exact_report(task, space, probs, live_gamma, p)
    headline_metrics = {
        "exact_target_chi2": report["disturbed/chi2_mixture"],
        "exact_target_live_chi2": live["disturbed/live_chi2_mixture"],
        "exact_clean_chi2": report["clean/chi2_mixture"],
        "exact_invalid": report["clean/invalid"],
        "exact_invalid_disturbed": report["disturbed/invalid"],
        "exact_output_tv": report["clean/output_tv"],
        "exact_output_tv_disturbed": report["disturbed/output_tv"],
        "exact_backspace_rate": report["disturbed/backspace_rate"],
    }
    raw = {f"g{gamma}/{k}": v for k, v in report.items()}
    raw.update({f"g{live_gamma}/{k}": v for k, v in live.items()})
    return headline_metrics, raw


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
    disturbance: Disturbance | None = None,
    noise_fn: NoiseFn | None = None,
) -> Evaluation:
    """Run ``episodes`` episodes of ``policy`` on held-out prompts of ``task`` and measure them.

    Args:
        policy: the policy network (put it in eval mode first).
        task: the task; its ``test`` split gives the prompts.
        max_length: the buffer size of the MDP the policy was trained in.
        max_steps: the step budget of the MDP the policy was trained in.
        allow_backspace: False masks ``<bkspc>`` (the no-backspace ablation).
        greedy: most likely actions; None: :func:`default_greedy` of the task.
        temperature: divides the logits when not greedy.
        top_k: when not greedy, sample among the k most likely allowed actions.
        top_p: when not greedy, sample among the smallest set of most likely actions whose
            probability reaches top_p.
        episodes: held-out prompts (one episode each).
        seed: the sampling stream's seed (evaluating never touches training's streams).
        prompt_seed: chooses the held-out prompts; fixed so that every agent meets the same ones.
        full: also the expensive metrics (recovery, exact divergences, perplexity, MAUVE, n-grams).
        exact: settings of the exact occupancy measures (a small dyck): ``gamma`` (0.9),
            ``live_gamma`` (0.998), ``max_length``, and ``p``, the disturbance of the target
            (the training disturbance); None skips them. See :func:`exact_metrics`.
        mauve: compute MAUVE on text (needs the ``text`` extra).
        use_cache: decode with the KV cache (False for policies without one).
        disturbance: evaluate in the disturbed environment (docs/method.md §5): can the policy
            repair errors it did not choose? None: the clean environment.
        noise_fn: the noise of a ``ground_truth`` disturbance.

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
            disturbance=disturbance,
            noise_fn=noise_fn,
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
    per_episode: dict[str, list[float]] = {
        "termination_rate": [float(t.terminated) for t in trajectories],
        "length": [float(len(g)) for g in generated],
    }
    if full and task.has_oracle:
        noise = disturbance is not None and disturbance.active
        for name, units in own_error_units(task, trajectories, noise).items():
            metrics[name] = float(np.mean(units)) if units else float("nan")
            per_episode[name] = units
    if task.name == "arithmetic":
        per_episode["accuracy"] = episode_scores(task, trajectories, generated)
        metrics["accuracy"] = float(np.mean(per_episode["accuracy"]))
        if full:
            starts = recovery_starts(task, examples, seed=54321)
            recovered, _ = rollouts(prefixes=[list(s.prefix) for s in starts])
            metrics["recovery"] = recovery_metrics(task, starts, recovered)["recovery_accuracy"]
    elif task.name == "dyck":
        data = [list(e.completion) for e in examples]
        dyck = dyck_metrics(cast(Any, task), trajectories, data)
        metrics["invalid_rate"] = 1.0 - dyck["validity"]
        per_episode["invalid_rate"] = [
            1.0 - float(t.terminated and cast(Any, task).is_valid(g))
            for t, g in zip(trajectories, generated, strict=True)
        ]
        metrics["true_logprob"] = dyck.get("mean_log_prob", float("nan"))
        metrics["length_tv"] = dyck.get("length_tv", float("nan"))
        if full:  # where the failures go wrong (benchmarks/README.md, the regime comparison)
            metrics.update(dyck_failures(cast(Any, task), trajectories))
        if full and exact:
            headline_metrics, raw = exact_metrics(
                policy, cast(GrammarTask, task), exact, max_length, allow_backspace
            )
            metrics.update(headline_metrics)
            return Evaluation(metrics, prompts, trajectories, generated, raw, per_episode)
    elif task.name == "text" and full:
        texts = [task.vocab.decode(ids) for ids in generated]  # final texts, after backspaces
        metrics["distinct_2"] = distinct_n(texts, TEXT_NGRAM)
        metrics["ngram_entropy"] = ngram_entropy(texts, TEXT_NGRAM)
        metrics["repetition"] = repetition(texts, TEXT_NGRAM)
        demos = [task.demonstration(e, max_length) for e in examples]
        nll, count = heldout_nll(policy, demos, allow_backspace)
        metrics["perplexity"] = perplexity(nll, count)
        if mauve:
            true = [task.vocab.decode(e.completion) for e in examples]
            metrics["mauve"] = mauve_score(texts, true, device=str(device))
    else:
        metrics["score"] = float(np.mean(episode_scores(task, trajectories, generated)))
    return Evaluation(metrics, prompts, trajectories, generated, episode_values=per_episode)


@torch.no_grad()
def divergence_estimate(
    policy: Any, objective: Any, demos: Sequence[Trajectory], episodes: Sequence[Trajectory]
) -> float:
    """The occupancy-divergence estimate d_hat = J + alpha H of a policy (docs/method.md §3).

    ``objective`` is a :class:`agents.objectives.SequenceMatch`; ``demos`` are held-out
    demonstrations, ``episodes`` the policy's own evaluation episodes, both in the policy's
    environment. Every agent is measured this way, so the curves overlay.
    """
    device = next(iter(policy.parameters())).device
    batch = ObjectiveBatch(
        data=collate(list(demos)).to(device), model=collate(list(episodes)).to(device)
    )
    return float(objective(policy, batch).metrics["divergence"])


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
