"""Addition and subtraction in bases 2 to 16, as in DeepMind's mathematics dataset.

The questions of the dataset's module ``arithmetic__add_or_sub_in_base``, generated in process
from a seed, in exactly its format::

    In base 7, what is 532644052 - 12?      ->  532644040
    In base 13, what is -40c + -4?          ->  -413
    In base 9, what is 5 - -85?             ->  101

The prompt is the question and the expert's completion is the answer, one character per token.
Digits are ``0-9a-f`` in lower case; a negative number has a leading ``-`` (so a negative second
operand reads ``+ -4`` or ``- -85``) and zero is ``0``. The score is 1 for exactly the right
answer, recomputed from the prompt; ground-truth noise is a wrong digit of the base in use.

Operand sizes (the difficulty):

- By default as the dataset's train split: a difficulty ``e`` uniform in ``entropy`` = (3, 10),
  split between the operands as ``e1 = max(1, U(0, e))`` and ``e2 = max(1, e - e1)``; operand i
  uniform in ``[-ceil(10**ei / 2), ceil(10**ei / 2)]`` (``[0, ceil(10**ei)]`` when unsigned). So
  operands reach 5e9 in magnitude (33 binary digits) and one of the two is often small, as in the
  examples above.
- With ``max_digits`` set (an easy setting for a small model, e.g. base 10 and 1-2 digits): the
  number of digits of each operand, in the base of the question, is uniform in
  ``[min_digits, max_digits]``, the operand uniform among the numbers with that many digits, and
  negative with probability 1/2 when signed.

Train and test questions are disjoint: a question belongs to the test split when a hash of its
text falls in the first ``test_fraction`` of the hash range, so that accuracy on the test split
measures held-out questions even in an easy setting where the same question comes up often.
"""

from __future__ import annotations

import math
import re
import zlib
from collections import OrderedDict
from collections.abc import Sequence
from typing import ClassVar

import numpy as np

from seqenv.tasks.base import Example, Split, Task, answer_policy
from seqenv.vocab import CharVocab, Vocab

DIGITS = "0123456789abcdef"
MIN_BASE, MAX_BASE = 2, 16
TEMPLATE = "In base {base}, what is {p} {op} {q}?"

# Every character a question or an answer can hold, sorted, and the same for every setting: a
# checkpoint trained on one difficulty can be evaluated on another.
CHARS: tuple[str, ...] = tuple(sorted(set("In base , what is ? + -") | set(DIGITS)))

SLACK = 8
"""Room left in the buffer beyond the longest question and answer, for wrong tokens written
before their backspaces (noise augmentation, a policy's own mistakes)."""

_ANSWERS_KEPT = 65_536  # answers of recently sampled questions, kept for scoring
_MAX_DRAWS = 10_000  # draws before a split is declared empty (a setting with very few questions)
_MAX_ENTROPY = 18.0  # 10**18 / 2 still fits the int64 that numpy draws
_QUESTION = re.compile(r"In base (\d+), what is (-?[0-9a-f]+) ([+-]) (-?[0-9a-f]+)\?")
_BASE = re.compile(r"In base (\d+),")


def to_base(value: int, base: int) -> str:
    """``value`` written in ``base``: digits ``0-9a-f``, a leading ``-`` when negative, ``0``."""
    if not MIN_BASE <= base <= MAX_BASE:
        raise ValueError(f"base must be in {MIN_BASE}..{MAX_BASE}, got {base}")
    if value < 0:
        return "-" + to_base(-value, base)
    digits = []
    while True:
        value, digit = divmod(value, base)
        digits.append(DIGITS[digit])
        if value == 0:
            return "".join(reversed(digits))


def _from_base(text: str, base: int) -> int:
    digits = text.removeprefix("-")
    bad = [c for c in digits if DIGITS.index(c) >= base]
    if bad:
        raise ValueError(f"digit {bad[0]!r} of {text!r} is not a digit of base {base}")
    return int(text, base)


def parse_question(question: str) -> tuple[int, int, str, int]:
    """Read ``In base B, what is P op Q?`` as ``(B, P, op, Q)``.

    Raises:
        ValueError: for text not in that format, a base outside 2..16 or a digit not of the base.
    """
    match = _QUESTION.fullmatch(question)
    if match is None:
        raise ValueError(f"not an add-or-sub-in-base question: {question!r}")
    base = int(match[1])
    if not MIN_BASE <= base <= MAX_BASE:
        raise ValueError(f"base {base} of {question!r} is outside {MIN_BASE}..{MAX_BASE}")
    return base, _from_base(match[2], base), match[3], _from_base(match[4], base)


def format_question(base: int, p: int, op: str, q: int) -> str:
    """The dataset's question for ``p op q`` in ``base`` (``op`` is ``+`` or ``-``)."""
    if op not in ("+", "-"):
        raise ValueError(f"op must be '+' or '-', got {op!r}")
    return TEMPLATE.format(base=base, p=to_base(p, base), op=op, q=to_base(q, base))


def answer(question: str) -> str:
    """The exact answer to a question, written in its base.

    Raises:
        ValueError: if the question does not parse (see :func:`parse_question`).
    """
    base, p, op, q = parse_question(question)
    return to_base(p + q if op == "+" else p - q, base)


class ArithmeticTask(Task):
    """Add or subtract two signed integers written in a base from 2 to 16.

    Args:
        base: the base of every question, or None for uniform in 2..16 (the dataset).
        min_digits: the fewest digits of an operand; only with ``max_digits``.
        max_digits: the most digits of an operand, in the base of the question; None for the
            dataset's sizes, drawn from ``entropy``.
        entropy: the range of the dataset's difficulty ``e`` (decimal digits shared by the two
            operands); (3, 10) is the dataset's train split. Only without ``max_digits``.
        signed: operands can be negative (the dataset); False draws them non-negative.
        test_fraction: the share of all questions kept for the test split; 0 draws both splits
            from every question (then they overlap).
        vocab: the vocabulary to write questions and answers in (e.g. a pretrained model's
            tokenizer, :class:`seqenv.vocab.PretrainedVocab`); one character per token if unset.
            Each digit must be one token of it. Not part of :meth:`config`.
    """

    name: ClassVar[str] = "arithmetic"

    def __init__(
        self,
        *,
        base: int | None = None,
        min_digits: int = 1,
        max_digits: int | None = None,
        entropy: Sequence[float] = (3.0, 10.0),
        signed: bool = True,
        test_fraction: float = 0.1,
        vocab: Vocab | None = None,
    ) -> None:
        if base is not None and (
            isinstance(base, bool) or not isinstance(base, int) or not MIN_BASE <= base <= MAX_BASE
        ):
            raise ValueError(f"base must be None or an int in {MIN_BASE}..{MAX_BASE}, got {base!r}")
        if max_digits is None:
            if min_digits != 1:
                raise ValueError("min_digits needs max_digits (without it, entropy sets the sizes)")
        elif not (isinstance(min_digits, int) and isinstance(max_digits, int)):
            raise ValueError(
                f"min_digits and max_digits must be ints, got {min_digits!r}, {max_digits!r}"
            )
        elif not 1 <= min_digits <= max_digits:
            raise ValueError(
                f"min_digits and max_digits must satisfy 1 <= min_digits <= max_digits, got "
                f"min_digits={min_digits}, max_digits={max_digits}"
            )
        try:
            entropy = tuple(float(e) for e in entropy)
        except (TypeError, ValueError):
            raise ValueError(f"entropy must be a pair of numbers, got {entropy!r}") from None
        if len(entropy) != 2 or not 0.0 < entropy[0] <= entropy[1] <= _MAX_ENTROPY:
            raise ValueError(
                f"entropy must be (low, high) with 0 < low <= high <= {_MAX_ENTROPY:g}, "
                f"got {entropy}"
            )
        if max_digits is not None and entropy != (3.0, 10.0):
            raise ValueError("entropy applies only without max_digits; give one or the other")
        if not 0.0 <= test_fraction < 1.0:
            raise ValueError(f"test_fraction must be in [0, 1), got {test_fraction}")
        self.base = base
        self.min_digits = min_digits
        self.max_digits = max_digits
        self.entropy: tuple[float, float] = (entropy[0], entropy[1])
        self.signed = bool(signed)
        self.test_fraction = float(test_fraction)
        self.bases: tuple[int, ...] = (
            tuple(range(MIN_BASE, MAX_BASE + 1)) if base is None else (base,)
        )
        self.vocab: Vocab = CharVocab(CHARS) if vocab is None else vocab
        self._answers: OrderedDict[tuple[int, ...], tuple[int, ...]] = OrderedDict()
        digit_ids = [self.vocab.encode(d) for d in DIGITS]
        if any(len(ids) != 1 for ids in digit_ids):
            raise ValueError("the arithmetic task needs a vocabulary with one token per digit")
        self._digit_ids = tuple(ids[0] for ids in digit_ids)
        self.default_max_length = self._longest_episode() + 1 + SLACK  # + 1: the slot of <eos>

    # ----------------------------------------------------------------------------------------
    # Sampling

    def _operand(self, rng: np.random.Generator, base: int, entropy: float) -> int:
        if self.max_digits is None:
            # The dataset's number.integer(entropy, signed): uniform up to about 10**entropy.
            bound = 10.0 ** max(1.0, entropy)
            if self.signed:
                high = math.ceil(bound / 2)
                return int(rng.integers(-high, high, endpoint=True))
            return int(rng.integers(0, math.ceil(bound), endpoint=True))
        num_digits = int(rng.integers(self.min_digits, self.max_digits, endpoint=True))
        # Digit by digit, so that any size works without overflow; the leading digit is nonzero
        # except for the one-digit numbers, which include 0.
        value = int(rng.integers(1 if num_digits > 1 else 0, base))
        for _ in range(num_digits - 1):
            value = value * base + int(rng.integers(0, base))
        if self.signed and rng.random() < 0.5:
            value = -value
        return value

    def draw_question(self, rng: np.random.Generator) -> str:
        """One question from the whole distribution, ignoring the train/test split."""
        return format_question(*self._draw(rng))

    def _draw(self, rng: np.random.Generator) -> tuple[int, int, str, int]:
        """(base, p, op, q) of one question from the whole distribution."""
        e_p = e_q = 0.0  # the digit counts set the sizes when max_digits is given
        if self.max_digits is None:
            # The dataset's split of the difficulty between the two operands.
            e = float(rng.uniform(*self.entropy))
            e_p = max(1.0, float(rng.uniform(0.0, e)))
            e_q = max(1.0, e - e_p)
        base = self.bases[int(rng.integers(len(self.bases)))]
        p = self._operand(rng, base, e_p)
        q = self._operand(rng, base, e_q)
        op = "+" if rng.random() < 0.5 else "-"
        return base, p, op, q

    def in_test_split(self, question: str) -> bool:
        """Whether a question belongs to the test split (a fixed hash of its text)."""
        return zlib.crc32(question.encode("ascii")) < self.test_fraction * 2**32

    def sample(self, rng: np.random.Generator, split: Split = "train") -> Example:
        """Draw a question of ``split``; its completion is the answer."""
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        want_test = split == "test"
        for _ in range(_MAX_DRAWS):
            base, p, op, q = self._draw(rng)
            question = format_question(base, p, op, q)
            if self.test_fraction == 0.0 or self.in_test_split(question) == want_test:
                result = to_base(p + q if op == "+" else p - q, base)
                example = Example(
                    prompt=tuple(self.vocab.encode(question)),
                    completion=tuple(self.vocab.encode(result)),
                    terminal=True,
                )
                self._remember(example.prompt, example.completion)
                return example
        raise ValueError(
            f"no {split} question in {_MAX_DRAWS} draws: this setting has too few distinct "
            f"questions to split them; use test_fraction=0 or more digits"
        )

    def _max_operand(self, base: int) -> int:
        if self.max_digits is None:
            bound = 10.0 ** max(1.0, self.entropy[1])
            return math.ceil(bound / 2) if self.signed else math.ceil(bound)
        return base**self.max_digits - 1

    def _longest_episode(self) -> int:
        """The most characters a question and its answer can take together."""
        longest = 0
        for base in self.bases:
            largest = self._max_operand(base)
            operand = len(to_base(-largest, base))  # "-" counted even when unsigned: a bound
            question = len(format_question(base, 0, "+", 0)) - 2 + 2 * operand
            result = len(to_base(-2 * largest, base))
            longest = max(longest, question + result)
        return longest

    # ----------------------------------------------------------------------------------------
    # Scoring and noise

    def score(self, prompt: Sequence[int], generated: Sequence[int], terminated: bool) -> float:
        """1.0 iff the episode terminated with exactly the answer to the prompt's question."""
        if not terminated:
            return 0.0
        expected = self._expected(tuple(prompt))
        if expected is None:
            return 0.0
        if tuple(generated) == expected:
            return 1.0
        # A subword vocabulary spells the same answer in more than one way: compare the text.
        if isinstance(self.vocab, CharVocab):
            return 0.0
        return float(self.vocab.decode(generated) == self.vocab.decode(expected))

    def _expected(self, prompt: tuple[int, ...]) -> tuple[int, ...] | None:
        """The answer's ids for a prompt, None if the prompt is not a question.

        Environments score every episode they start from :meth:`sample`, which remembers the
        answers it drew, so scoring seldom parses a question again.
        """
        known = self._answers.get(prompt)
        if known is not None:
            return known
        try:
            return tuple(self.vocab.encode(answer(self.vocab.decode(prompt))))
        except ValueError:  # VocabularyError included
            return None

    def _remember(self, prompt: tuple[int, ...], completion: tuple[int, ...]) -> None:
        self._answers[prompt] = completion
        if len(self._answers) > _ANSWERS_KEPT:
            self._answers.popitem(last=False)

    def base_of(self, prompt: Sequence[int]) -> int:
        """The base named at the start of a prompt.

        Raises:
            ValueError: if the prompt does not start with ``In base B,`` for B in 2..16.
        """
        text = self.vocab.decode(prompt)
        match = _BASE.match(text)
        if match is None or not MIN_BASE <= int(match[1]) <= MAX_BASE:
            raise ValueError(f"prompt {text!r} does not start with 'In base B,' for B in 2..16")
        return int(match[1])

    def ground_truth_noise(
        self,
        rng: np.random.Generator,
        prompt: Sequence[int],
        generated: Sequence[int],
        true_next: int,
    ) -> int:
        """A digit of the prompt's base other than ``true_next`` (any digit if that is not one)."""
        candidates = [d for d in self._digit_ids[: self.base_of(prompt)] if d != true_next]
        return candidates[int(rng.integers(len(candidates)))]

    # ----------------------------------------------------------------------------------------
    # The oracle

    @property
    def has_oracle(self) -> bool:
        """True on the character vocabulary: there an answer has exactly one encoding."""
        return isinstance(self.vocab, CharVocab)

    def expert_policy(self, prompt: Sequence[int], generated: Sequence[int]) -> np.ndarray | None:
        """The answer as an oracle (:func:`~seqenv.tasks.base.answer_policy`).

        While the generated text is a prefix of the answer, its next character (``<eos>`` after
        the whole answer); otherwise ``<bkspc>``. Defined on the character vocabulary only:
        with a pretrained model's tokenizer one answer has several encodings, and the oracle
        would call a correct spelling an error, so there it is None (no oracle).

        Raises:
            ValueError: for a prompt that is not a question.
        """
        if not self.has_oracle:
            return None
        expected = self._expected(tuple(int(t) for t in prompt))
        if expected is None:
            raise ValueError(
                f"arithmetic's oracle needs a question, got {self.vocab.decode(prompt)!r}"
            )
        return answer_policy(self.vocab.special, expected, generated)

    def prompt_length(self, state: Sequence[int]) -> int:
        """The question's length: up to and including its only ``?``.

        Raises:
            ValueError: for a state without ``?`` (not a question), or on a vocabulary other
                than the character one.
        """
        if not self.has_oracle:
            raise ValueError("arithmetic's prompts are read from states on its own characters only")
        mark = self.vocab.encode("?")[0]
        ids = [int(t) for t in state]
        if mark not in ids:
            raise ValueError(f"state {self.vocab.decode(ids)!r} holds no question")
        return ids.index(mark) + 1

    def config(self) -> dict:
        """The keyword arguments that rebuild this task."""
        return {
            "base": self.base,
            "min_digits": self.min_digits,
            "max_digits": self.max_digits,
            "entropy": list(self.entropy),
            "signed": self.signed,
            "test_fraction": self.test_fraction,
        }


__all__ = [
    "CHARS",
    "DIGITS",
    "ArithmeticTask",
    "answer",
    "format_question",
    "parse_question",
    "to_base",
]
