"""The add-or-sub-in-base task: format, answers, sampling, score, noise, demonstrations."""

from __future__ import annotations

import re
from collections import Counter

import numpy as np
import pytest

from seqenv.tasks.arithmetic import (
    CHARS,
    DIGITS,
    ArithmeticTask,
    answer,
    format_question,
    parse_question,
    to_base,
)
from seqenv.trajectory import augment, replay
from seqenv.vocab import VocabularyError

# The dataset's format, canonical numbers only (no leading zeros, no "-0").
NUMBER = r"-?(?:0|[1-9a-f][0-9a-f]*)"
QUESTION = re.compile(rf"In base (\d+), what is ({NUMBER}) ([+-]) ({NUMBER})\?")
ANSWER = re.compile(NUMBER)


@pytest.fixture(scope="module")
def task() -> ArithmeticTask:
    return ArithmeticTask()


@pytest.fixture(scope="module")
def easy() -> ArithmeticTask:
    return ArithmeticTask(base=10, max_digits=2)


def text(task: ArithmeticTask, ids) -> str:
    return task.vocab.decode(ids)


# ---------------------------------------------------------------------------------------------
# Format and answers


@pytest.mark.parametrize(
    ("question", "expected"),
    [
        ("In base 7, what is 532644052 - 12?", "532644040"),
        ("In base 13, what is -40c + -4?", "-413"),
        ("In base 9, what is 5 - -85?", "101"),
    ],
)
def test_dataset_examples(question: str, expected: str) -> None:
    assert QUESTION.fullmatch(question)
    assert answer(question) == expected


def test_parse_question_by_hand() -> None:
    # 40c in base 13 is 4*169 + 12 = 688.
    assert parse_question("In base 13, what is -40c + -4?") == (13, -688, "+", -4)
    assert parse_question("In base 9, what is 5 - -85?") == (9, 5, "-", -77)


def test_to_base_by_hand() -> None:
    assert to_base(0, 2) == "0"
    assert to_base(5, 2) == "101"
    assert to_base(-255, 16) == "-ff"
    assert to_base(-692, 13) == "-413"
    assert to_base(10, 10) == "10"


def test_to_base_round_trips() -> None:
    rng = np.random.default_rng(0)
    for value in rng.integers(-(10**12), 10**12, size=200).tolist():
        for base in range(2, 17):
            assert int(to_base(value, base), base) == value


def test_answer_is_zero_as_0() -> None:
    assert answer("In base 5, what is 3 - 3?") == "0"
    assert answer("In base 2, what is -1 + 1?") == "0"


@pytest.mark.parametrize(
    "question",
    [
        "In base 7, what is 1 * 2?",
        "In base 17, what is 1 + 2?",
        "In base 1, what is 0 + 0?",
        "In base 7, what is 8 + 1?",  # 8 is not a digit of base 7
        "In base 10, what is 1 + 2",
        "what is 1 + 2?",
        "",
    ],
)
def test_bad_questions_raise(question: str) -> None:
    with pytest.raises(ValueError):
        answer(question)


def test_format_question_matches_the_examples() -> None:
    assert format_question(13, -688, "+", -4) == "In base 13, what is -40c + -4?"
    assert format_question(9, 5, "-", -77) == "In base 9, what is 5 - -85?"
    with pytest.raises(ValueError, match="op"):
        format_question(9, 5, "*", 1)


# ---------------------------------------------------------------------------------------------
# Vocabulary


def test_vocabulary_is_sorted_and_covers_the_format() -> None:
    assert list(CHARS) == sorted(CHARS)
    assert set(CHARS) == set("In base , what is ? + -") | set(DIGITS)
    assert ArithmeticTask().vocab == ArithmeticTask(base=2, max_digits=1).vocab


def test_character_outside_vocabulary_is_named(task: ArithmeticTask) -> None:
    with pytest.raises(VocabularyError, match=r"'\*'"):
        task.vocab.encode("In base 7, what is 1 * 2?")
    with pytest.raises(VocabularyError, match="'g'"):
        task.vocab.encode("g")


# ---------------------------------------------------------------------------------------------
# Sampling


def test_samples_have_the_format_and_correct_answers(task: ArithmeticTask) -> None:
    for example in task.examples("train", 300, seed=1) + task.examples("test", 100, seed=1):
        question, result = text(task, example.prompt), text(task, example.completion)
        match = QUESTION.fullmatch(question)
        assert match, question
        assert ANSWER.fullmatch(result), result
        base = int(match[1])
        p, q = int(match[2], base), int(match[4], base)
        assert int(result, base) == (p + q if match[3] == "+" else p - q)
        assert example.terminal


def test_default_sizes_follow_the_dataset(task: ArithmeticTask) -> None:
    questions = [parse_question(text(task, e.prompt)) for e in task.examples("train", 2000)]
    bases = Counter(base for base, _, _, _ in questions)
    assert set(bases) == set(range(2, 17))
    assert Counter(op for _, _, op, _ in questions).keys() == {"+", "-"}
    operands = [abs(v) for _, p, _, q in questions for v in (p, q)]
    assert max(operands) <= 5 * 10**9
    assert max(operands) > 10**8  # the large end of the spread is reached
    assert sum(v < 100 for v in operands) > 0.1 * len(operands)  # and so is the small end
    assert any(p < 0 for _, p, _, _ in questions) and any(q < 0 for _, _, _, q in questions)


def test_digits_setting(easy: ArithmeticTask) -> None:
    questions = [parse_question(text(easy, e.prompt)) for e in easy.examples("train", 500)]
    assert {base for base, _, _, _ in questions} == {10}
    operands = [v for _, p, _, q in questions for v in (p, q)]
    assert max(abs(v) for v in operands) <= 99
    assert any(abs(v) >= 10 for v in operands) and any(abs(v) < 10 for v in operands)
    assert any(v < 0 for v in operands)


def test_unsigned_operands_are_non_negative() -> None:
    task = ArithmeticTask(base=16, min_digits=2, max_digits=3, signed=False)
    for example in task.examples("train", 200):
        _, p, _, q = parse_question(task.vocab.decode(example.prompt))
        assert 16 <= p < 16**3 and 16 <= q < 16**3


def test_seeded_determinism(task: ArithmeticTask) -> None:
    assert task.examples("train", 50, seed=3) == task.examples("train", 50, seed=3)
    assert task.examples("train", 50, seed=3) != task.examples("train", 50, seed=4)
    assert task.examples("train", 50, seed=3) != task.examples("test", 50, seed=3)


def test_splits_are_disjoint() -> None:
    # Base 10, one digit: 19 * 19 * 2 = 722 questions, each drawn many times.
    task = ArithmeticTask(base=10, max_digits=1)
    train = {e.prompt for e in task.examples("train", 3000)}
    test = {e.prompt for e in task.examples("test", 1000)}
    assert not train & test
    assert 0.05 < len(test) / (len(train) + len(test)) < 0.15


def test_a_split_without_questions_is_a_clear_error() -> None:
    task = ArithmeticTask(base=2, max_digits=1, signed=False, test_fraction=0.999)
    with pytest.raises(ValueError, match="test_fraction"):
        task.sample(np.random.default_rng(0), "train")
    everything = ArithmeticTask(base=2, max_digits=1, signed=False, test_fraction=0.0)
    assert len(everything.examples("test", 10)) == 10


def test_default_max_length_by_hand(easy: ArithmeticTask) -> None:
    # Longest: "In base 10, what is -99 - -99?" (30) and "-198" (4), then <eos> and the slack 8.
    assert easy.default_max_length == 30 + 4 + 1 + 8


def test_default_max_length_holds_every_sample(task: ArithmeticTask) -> None:
    for example in task.examples("train", 500):
        assert len(example.prompt) + len(example.completion) + 8 < task.default_max_length


# ---------------------------------------------------------------------------------------------
# Score, noise, demonstrations


def test_score(task: ArithmeticTask) -> None:
    prompt = task.vocab.encode("In base 13, what is -40c + -4?")
    assert task.score(prompt, task.vocab.encode("-413"), terminated=True) == 1.0
    assert task.score(prompt, task.vocab.encode("-413"), terminated=False) == 0.0
    assert task.score(prompt, task.vocab.encode("-412"), terminated=True) == 0.0
    assert task.score(prompt, task.vocab.encode("-4130"), terminated=True) == 0.0
    assert task.score(prompt, task.vocab.encode("-41"), terminated=True) == 0.0
    assert task.score(prompt, [], terminated=True) == 0.0
    assert task.score(prompt, [*task.vocab.encode("-413"), task.vocab.backspace_id], True) == 0.0
    not_a_question = task.vocab.encode("In base 13, what is it?")
    assert task.score(not_a_question, task.vocab.encode("-413"), terminated=True) == 0.0


def test_score_of_demonstrations_is_one(task: ArithmeticTask) -> None:
    for example in task.examples("test", 50):
        assert task.score(example.prompt, example.completion, terminated=True) == 1.0


@pytest.mark.parametrize("base", range(2, 17))
def test_noise_is_a_wrong_digit_of_the_base(task: ArithmeticTask, base: int) -> None:
    rng = np.random.default_rng(base)
    prompt = task.vocab.encode(f"In base {base}, what is 1 + 1?")
    digit_ids = task.vocab.encode(DIGITS[:base])
    specials = [task.vocab.encode("-")[0], task.vocab.eos_id]
    for true_next in [*digit_ids, *specials]:
        drawn = {task.ground_truth_noise(rng, prompt, [], true_next) for _ in range(40)}
        assert true_next not in drawn
        assert drawn <= set(digit_ids)
    # Every other digit can come up (base 2 has exactly one).
    drawn = {task.ground_truth_noise(rng, prompt, [], digit_ids[0]) for _ in range(400)}
    assert drawn == set(digit_ids[1:])


def test_noise_needs_a_question(task: ArithmeticTask) -> None:
    with pytest.raises(ValueError, match="In base"):
        task.ground_truth_noise(np.random.default_rng(0), task.vocab.encode("what"), [], 0)


def test_demonstrations_replay_to_the_answer(task: ArithmeticTask) -> None:
    examples = task.examples("train", 40, seed=5)
    trajectories = [task.demonstration(e, task.default_max_length) for e in examples]
    assert replay(trajectories) == [list(e.completion) for e in examples]
    rng = np.random.default_rng(0)
    noisy = [
        augment(t, task.ground_truth_noise, p=0.5, rng=rng, max_length=task.default_max_length)
        for t in trajectories
    ]
    assert sum(t.num_backspaces for t in noisy) > 0
    assert replay(noisy) == [list(e.completion) for e in examples]


def test_wrong_partial_answer(task: ArithmeticTask) -> None:
    rng = np.random.default_rng(0)
    for example in task.examples("train", 200, seed=2):
        partial = task.wrong_partial_answer(example, rng)
        j = len(partial) - 1
        assert partial[:j] == example.completion[:j]
        assert partial[j] != example.completion[j]
        base = parse_question(task.vocab.decode(example.prompt))[0]
        assert task.vocab.decode(partial[j:]) in DIGITS[:base]


# ---------------------------------------------------------------------------------------------
# Arguments


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        ({"base": 1}, "base"),
        ({"base": 17}, "base"),
        ({"base": True}, "base"),
        ({"base": 10.0}, "base"),
        ({"min_digits": 2}, "min_digits"),
        ({"min_digits": 0, "max_digits": 2}, "min_digits"),
        ({"min_digits": 3, "max_digits": 2}, "max_digits"),
        ({"max_digits": 2, "entropy": (1.0, 2.0)}, "entropy"),
        ({"entropy": (5.0, 3.0)}, "entropy"),
        ({"entropy": (0.0, 3.0)}, "entropy"),
        ({"entropy": (3.0, 30.0)}, "entropy"),
        ({"entropy": (3.0,)}, "entropy"),
        ({"entropy": 3.0}, "entropy"),
        ({"entropy": ("a", "b")}, "entropy"),
        ({"test_fraction": 1.0}, "test_fraction"),
        ({"test_fraction": -0.1}, "test_fraction"),
    ],
)
def test_bad_arguments_are_named(kwargs: dict, named: str) -> None:
    with pytest.raises(ValueError, match=named):
        ArithmeticTask(**kwargs)


def test_arguments_are_keyword_only() -> None:
    with pytest.raises(TypeError):
        ArithmeticTask(10)  # type: ignore[call-arg]


def test_config_rebuilds_the_task(easy: ArithmeticTask) -> None:
    for task in (ArithmeticTask(), easy, ArithmeticTask(entropy=(2, 4), signed=False)):
        rebuilt = ArithmeticTask(**task.config())
        assert rebuilt.config() == task.config()
        assert rebuilt.examples("train", 5) == task.examples("train", 5)
