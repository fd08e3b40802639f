"""The Dyck task: its grammar's exact probabilities, sampling, score, noise, demonstrations."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from seqenv.tasks.dyck import DyckTask
from seqenv.trajectory import augment, replay


def ids(task: DyckTask, text: str) -> list[int]:
    return task.vocab.encode(text)


def balanced(text: str, pairs: str) -> tuple[bool, int]:
    """Whether ``text`` is a Dyck word over ``pairs`` ("()[]"), and its greatest depth."""
    closer = {pairs[i]: pairs[i + 1] for i in range(0, len(pairs), 2)}
    stack: list[str] = []
    deepest = 0
    for c in text:
        if c in closer:
            stack.append(closer[c])
            deepest = max(deepest, len(stack))
        elif not stack or stack.pop() != c:
            return False, deepest
    return not stack, deepest


def within_limits(task: DyckTask, text: str) -> bool:
    ok, deepest = balanced(text, "".join(task.vocab.chars[1:]))
    return ok and deepest <= task.max_depth and task.min_brackets <= len(text) <= task.max_brackets


# ---------------------------------------------------------------------------------------------
# Vocabulary


def test_vocabulary() -> None:
    assert "".join(DyckTask().vocab.chars) == "^()[]"
    assert "".join(DyckTask(num_types=1).vocab.chars) == "^()"
    task = DyckTask(num_types=4)
    assert "".join(task.vocab.chars) == "^()[]{}<>"
    assert task.open_ids == (1, 3, 5, 7) and task.close_ids == (2, 4, 6, 8)
    assert task.default_max_length == 1 + 20 + 1 + 8


# ---------------------------------------------------------------------------------------------
# Probabilities computed by hand


def test_probabilities_by_hand_depth_one() -> None:
    # "(" is forced (too short to end), ")" is forced (depth 1 is the limit); then end with
    # p_end, or open again and be forced through ")" and <eos> by the length limit 4.
    task = DyckTask(num_types=1, max_depth=1, min_brackets=2, max_brackets=4, p_end=0.3)
    assert math.exp(task.log_prob(ids(task, "()"))) == pytest.approx(0.3)
    assert math.exp(task.log_prob(ids(task, "()()"))) == pytest.approx(0.7)
    assert dict(task.enumerate_sequences()) == pytest.approx(
        {tuple(ids(task, "()")): 0.3, tuple(ids(task, "()()")): 0.7}
    )
    eos = task.vocab.eos_id
    assert task.next_token_probs([]).tolist() == [0.0, 1.0, 0.0, 0.0, 0.0]
    assert task.next_token_probs(ids(task, "(")).tolist() == [0.0, 0.0, 1.0, 0.0, 0.0]
    assert task.next_token_probs(ids(task, "()")) == pytest.approx([0, 0.7, 0, 0.3, 0])
    assert task.next_token_probs(ids(task, "()()"))[eos] == 1.0


def test_probabilities_by_hand_depth_two() -> None:
    task = DyckTask(
        num_types=1, max_depth=2, min_brackets=2, max_brackets=6, p_open=0.4, p_end=0.25
    )
    expected = {
        "()": 0.6 * 0.25,
        # "(" forced, "(" 0.4, ")" forced at depth 2, ")" 0.6, then end 0.25 (could open again).
        "(())": 0.4 * 0.6 * 0.25,
        # After "(()(" ... the length limit forces both closes and the end.
        "(()())": 0.4 * 0.4,
        "()()": 0.6 * 0.75 * 0.6 * 0.25,
        # At length 5 there is no room to open again: ")" and the end are forced.
        "()()()": 0.6 * 0.75 * 0.6 * 0.75,
        "()(())": 0.6 * 0.75 * 0.4,
        "(())()": 0.4 * 0.6 * 0.75,
    }
    got = {
        task.vocab.decode(s): math.exp(lp)
        for s, lp in ((s, task.log_prob(s)) for s, _ in task.enumerate_sequences())
    }
    assert got == pytest.approx(expected)
    assert sum(expected.values()) == pytest.approx(1.0)


def test_types_are_uniform() -> None:
    task = DyckTask(num_types=2, max_depth=1, min_brackets=2, max_brackets=2)
    # One pair, its type uniform; nothing else fits.
    assert math.exp(task.log_prob(ids(task, "()"))) == pytest.approx(0.5)
    assert math.exp(task.log_prob(ids(task, "[]"))) == pytest.approx(0.5)
    assert task.next_token_probs([]) == pytest.approx([0, 0.5, 0, 0.5, 0, 0, 0])


def test_prefix_probability() -> None:
    task = DyckTask(
        num_types=1, max_depth=2, min_brackets=2, max_brackets=6, p_open=0.4, p_end=0.25
    )
    assert task.log_prob([], terminated=False) == 0.0
    assert math.exp(task.log_prob(ids(task, "(("), terminated=False)) == pytest.approx(0.4)
    assert task.log_prob(ids(task, "(("), terminated=True) == -math.inf


# ---------------------------------------------------------------------------------------------
# The grammar's support is exactly the balanced sequences within the limits


SMALL = [
    {"num_types": 1, "max_depth": 1, "min_brackets": 2, "max_brackets": 4},
    {"num_types": 1, "max_depth": 3, "min_brackets": 0, "max_brackets": 8, "p_open": 0.7},
    {"num_types": 2, "max_depth": 2, "min_brackets": 4, "max_brackets": 8, "p_end": 0.1},
    {"num_types": 2, "max_depth": 4, "min_brackets": 6, "max_brackets": 6},
    {"num_types": 3, "max_depth": 2, "min_brackets": 2, "max_brackets": 6, "p_open": 0.2},
]


@pytest.mark.parametrize("kwargs", SMALL)
def test_complete_sequences_sum_to_one(kwargs: dict) -> None:
    task = DyckTask(**kwargs)
    sequences = dict(task.enumerate_sequences())
    assert sum(sequences.values()) == pytest.approx(1.0)
    for sequence, prob in sequences.items():
        assert task.log_prob(sequence) == pytest.approx(math.log(prob))


@pytest.mark.parametrize("kwargs", SMALL)
def test_support_is_every_balanced_sequence_within_the_limits(kwargs: dict) -> None:
    task = DyckTask(**kwargs)
    brackets = "".join(task.vocab.chars[1:])
    expected = {
        text
        for n in range(task.max_brackets + 1)
        for text in map("".join, itertools.product(brackets, repeat=n))
        if within_limits(task, text)
    }
    got = {task.vocab.decode(s) for s, _ in task.enumerate_sequences()}
    assert got == expected
    assert all(task.is_valid(ids(task, text)) for text in expected)
    # Every short string of the whole alphabet, the start token included (never valid).
    alphabet = "".join(task.vocab.chars)
    for n in range(5):
        for text in map("".join, itertools.product(alphabet, repeat=n)):
            assert task.is_valid(ids(task, text)) == (text in expected), text


@pytest.mark.parametrize("kwargs", SMALL)
def test_prefix_probabilities_are_consistent(kwargs: dict) -> None:
    task = DyckTask(**kwargs)
    prefixes = dict(task.enumerate_prefixes())
    for prefix, prob in prefixes.items():
        assert task.log_prob(prefix, terminated=False) == pytest.approx(math.log(prob))
        probs = task.next_token_probs(prefix)
        assert probs.sum() == pytest.approx(1.0)
        # Every reachable prefix can go on: no dead end.
        assert probs.max() > 0.0
        assert probs[task.start_id] == 0.0 and probs[task.vocab.backspace_id] == 0.0
    # The prefixes of one length, with the sequences that ended before it, make up everything.
    ended = dict(task.enumerate_sequences())
    for n in range(task.max_brackets + 1):
        alive = sum(p for s, p in prefixes.items() if len(s) == n)
        gone = sum(p for s, p in ended.items() if len(s) < n)
        assert alive + gone == pytest.approx(1.0)


# ---------------------------------------------------------------------------------------------
# Sampling


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"num_types": 4, "max_depth": 1},
        {"max_depth": 10, "min_brackets": 12, "max_brackets": 12, "p_open": 0.9},
        {"min_brackets": 20, "max_brackets": 20, "p_open": 0.05},
        {"min_brackets": 0, "max_brackets": 2},
        {"p_open": 0.99, "p_end": 0.01},
    ],
)
def test_samples_are_valid_and_within_limits(kwargs: dict) -> None:
    task = DyckTask(**kwargs)
    for example in task.examples("train", 200):
        assert example.prompt == (task.start_id,) and example.terminal
        text = task.vocab.decode(example.completion)
        assert within_limits(task, text), text
        assert task.is_valid(example.completion)
        assert len(example.prompt) + len(example.completion) < task.default_max_length


def test_sample_frequencies_match_the_probabilities() -> None:
    task = DyckTask(num_types=1, max_depth=1, min_brackets=2, max_brackets=4, p_end=0.3)
    examples = task.examples("train", 4000)
    share = sum(len(e.completion) == 2 for e in examples) / len(examples)
    assert share == pytest.approx(0.3, abs=0.03)  # about 4 standard deviations


def test_default_samples_reach_every_depth_and_the_length_limit() -> None:
    task = DyckTask()
    texts = [task.vocab.decode(e.completion) for e in task.examples("train", 500)]
    assert {balanced(t, "()[]")[1] for t in texts} == {1, 2, 3, 4}
    assert {len(t) for t in texts} == set(range(2, 21, 2))
    assert {"[", "("} <= set("".join(texts))


def test_seeded_determinism() -> None:
    task = DyckTask()
    assert task.examples("train", 50, seed=3) == task.examples("train", 50, seed=3)
    assert task.examples("train", 50, seed=3) != task.examples("train", 50, seed=4)
    assert task.examples("train", 50, seed=3) != task.examples("test", 50, seed=3)


# ---------------------------------------------------------------------------------------------
# Invalid sequences


@pytest.mark.parametrize(
    "text",
    [
        "",  # shorter than min_brackets
        "(]",  # wrong closing bracket
        ")(",  # closing at depth 0
        "((",  # unfinished
        "^()",  # the start token
        "()" * 11,  # longer than max_brackets
        "((((()))))",  # deeper than max_depth
    ],
)
def test_invalid_sequences(text: str) -> None:
    task = DyckTask()
    assert task.log_prob(ids(task, text)) == -math.inf
    assert not task.is_valid(ids(task, text))
    assert task.score([task.start_id], ids(task, text), terminated=True) == 0.0


def test_specials_inside_a_sequence_are_invalid() -> None:
    task = DyckTask()
    eos, backspace = task.vocab.eos_id, task.vocab.backspace_id
    assert task.log_prob([*ids(task, "()"), eos, *ids(task, "()")]) == -math.inf
    assert task.log_prob([*ids(task, "(("), backspace, *ids(task, ")")]) == -math.inf
    with pytest.raises(ValueError, match="outside"):
        task.log_prob([task.vocab.num_actions])


def test_next_token_probs_of_an_invalid_prefix_raises() -> None:
    task = DyckTask()
    with pytest.raises(ValueError, match="probability zero"):
        task.next_token_probs(ids(task, "(]"))


# ---------------------------------------------------------------------------------------------
# Score, noise, demonstrations


def test_score() -> None:
    task = DyckTask()
    start = [task.start_id]
    assert task.score(start, ids(task, "([])"), terminated=True) == 1.0
    assert task.score(start, ids(task, "([])"), terminated=False) == 0.0
    assert task.score(start, ids(task, "([)]"), terminated=True) == 0.0
    assert task.score(ids(task, "("), ids(task, "([])"), terminated=True) == 0.0
    assert task.score(start, [99], terminated=True) == 0.0


def test_noise_prefers_a_wrong_closing_bracket() -> None:
    task = DyckTask()
    rng = np.random.default_rng(0)
    close_round, close_square = ids(task, ")]")
    after = ids(task, "([")
    assert {task.ground_truth_noise(rng, [0], after, close_square) for _ in range(20)} == {
        close_round
    }
    # At depth 0 every closing bracket is forbidden.
    drawn = {
        task.ground_truth_noise(rng, [0], ids(task, "()"), ids(task, "(")[0]) for _ in range(50)
    }
    assert drawn == {close_round, close_square}


def test_noise_falls_back_to_the_start_token() -> None:
    # One type, depth 2: no closing bracket is ever of the wrong type.
    task = DyckTask(num_types=1, max_depth=2, max_brackets=8)
    rng = np.random.default_rng(0)
    # After "(" both "(" and ")" are allowed: the only forbidden token is "^".
    assert task.ground_truth_noise(rng, [0], ids(task, "("), ids(task, ")")[0]) == task.start_id
    # At depth 2 opening is forbidden (no closing bracket is wrong with one type).
    assert (
        task.ground_truth_noise(rng, [0], ids(task, "(("), ids(task, ")")[0]) == ids(task, "(")[0]
    )


@pytest.mark.parametrize("kwargs", [{}, {"num_types": 1}, {"num_types": 4, "max_depth": 2}])
def test_noise_is_forbidden_and_never_the_true_token(kwargs: dict) -> None:
    task = DyckTask(**kwargs)
    rng = np.random.default_rng(1)
    for example in task.examples("train", 100):
        actions = [*example.completion, task.vocab.eos_id]
        for j, true_next in enumerate(actions):
            prefix = example.completion[:j]
            noise = task.ground_truth_noise(rng, example.prompt, prefix, true_next)
            assert noise != true_next
            assert task.vocab.special.is_token(noise)
            assert task.next_token_probs(prefix)[noise] == 0.0
            # After an earlier mistake: still an ordinary token, still not the true one.
            later = task.ground_truth_noise(rng, example.prompt, [*prefix, noise], true_next)
            assert later != true_next and task.vocab.special.is_token(later)


def test_demonstrations_replay_to_the_sequence() -> None:
    task = DyckTask()
    examples = task.examples("train", 40, seed=5)
    trajectories = [task.demonstration(e, task.default_max_length) for e in examples]
    assert replay(trajectories) == [list(e.completion) for e in examples]
    rng = np.random.default_rng(0)
    noisy = [
        augment(t, task.ground_truth_noise, p=0.5, k=2, rng=rng, max_length=task.default_max_length)
        for t in trajectories
    ]
    assert sum(t.num_backspaces for t in noisy) > 0
    assert replay(noisy) == [list(e.completion) for e in examples]


def test_wrong_partial_answer() -> None:
    task = DyckTask()
    rng = np.random.default_rng(0)
    for example in task.examples("train", 200, seed=2):
        partial = task.wrong_partial_answer(example, rng)
        j = len(partial) - 1
        assert partial[:j] == example.completion[:j]
        assert task.log_prob(partial[:j], terminated=False) > -math.inf
        assert task.log_prob(partial, terminated=False) == -math.inf


# ---------------------------------------------------------------------------------------------
# Arguments


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        ({"num_types": 0}, "num_types"),
        ({"num_types": 5}, "num_types"),
        ({"num_types": 2.0}, "num_types"),
        ({"max_depth": 0}, "max_depth"),
        ({"min_brackets": -2}, "min_brackets"),
        ({"min_brackets": 3}, "min_brackets"),
        ({"max_brackets": 21}, "max_brackets"),
        ({"max_brackets": 0, "min_brackets": 0}, "max_brackets"),
        ({"min_brackets": 8, "max_brackets": 6}, "max_brackets"),
        ({"p_open": 0.0}, "p_open"),
        ({"p_open": 1.0}, "p_open"),
        ({"p_end": 0.0}, "p_end"),
        ({"p_end": 1.5}, "p_end"),
    ],
)
def test_bad_arguments_are_named(kwargs: dict, named: str) -> None:
    with pytest.raises(ValueError, match=named):
        DyckTask(**kwargs)


def test_arguments_are_keyword_only() -> None:
    with pytest.raises(TypeError):
        DyckTask(2)  # type: ignore[call-arg]


def test_config_rebuilds_the_task() -> None:
    for task in (DyckTask(), DyckTask(num_types=3, max_depth=2, min_brackets=4, p_open=0.3)):
        rebuilt = DyckTask(**task.config())
        assert rebuilt.config() == task.config()
        assert rebuilt.examples("train", 5) == task.examples("train", 5)
