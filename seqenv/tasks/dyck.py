"""Balanced brackets of up to four types, drawn from a known probabilistic grammar.

A sequence is a Dyck word over ``num_types`` bracket pairs from ``()[]{}<>``, at most
``max_depth`` deep, with ``min_brackets`` to ``max_brackets`` brackets. The grammar is a process
whose next action depends only on the prefix, through its stack of open brackets and its length:

- at depth 0, end (``<eos>``) with probability ``p_end`` and open with ``1 - p_end``;
- deeper, open with probability ``p_open`` and close the innermost bracket with ``1 - p_open``;
- an opening bracket's type is uniform over the ``num_types`` types;
- the limits force a move: no ending before ``min_brackets``, no opening at ``max_depth``, and no
  opening unless the brackets then open can still be closed within ``max_brackets``. Where only
  one kind of move is allowed it has probability 1.

Every reachable prefix has a continuation within the limits (see :meth:`DyckTask.next_token_probs`),
so every sampled sequence satisfies them, and the support of the grammar is exactly the balanced
sequences that do. Because the next-action distribution is known, exact quantities are too: the
probability of a sequence (:meth:`DyckTask.log_prob`), and of every prefix
(:meth:`DyckTask.enumerate_prefixes`), from which the expert's occupancy measure follows.

The prompt is a single start token ``^``, which the grammar never generates (a policy that emits
it has made a mistake). The score is 1 for a terminated valid sequence; ground-truth noise is a
token the grammar forbids at that point, preferably a closing bracket of the wrong type.

Defaults (2 types, depth 4, 2 to 20 brackets, ``p_open = 0.4``, ``p_end = 0.5``) keep the
sequences short enough for a small model while reaching every depth and length: the mean length
is 8.2 brackets, 30% of the sequences are a single pair, 14% have the full 20 brackets and 20%
reach depth 4 (computed exactly). ``p_open = 0.5`` would put 29% at the length limit.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import ClassVar

import numpy as np

from seqenv.tasks.base import Example, Split, Task
from seqenv.vocab import CharVocab

BRACKETS = ("()", "[]", "{}", "<>")
START = "^"
SLACK = 8
"""Room left in the buffer beyond the longest sequence, for wrong tokens written before their
backspaces (noise augmentation, a policy's own mistakes)."""


class DyckTask(Task):
    """Generate a balanced bracket sequence from a known probabilistic grammar.

    Args:
        num_types: bracket types, 1 to 4, taken in the order ``()``, ``[]``, ``{}``, ``<>``.
        max_depth: the most brackets open at once, at least 1.
        min_brackets: the fewest brackets of a sequence; even, at least 0.
        max_brackets: the most brackets of a sequence; even, at least 2 and ``min_brackets``.
        p_open: probability of opening a bracket when both opening and closing are allowed.
        p_end: probability of ending at depth 0 when both ending and opening are allowed.

    Ids: ``^`` is 0, then each type's opening and closing bracket (``(`` 1, ``)`` 2, ...).
    """

    name: ClassVar[str] = "dyck"

    def __init__(
        self,
        *,
        num_types: int = 2,
        max_depth: int = 4,
        min_brackets: int = 2,
        max_brackets: int = 20,
        p_open: float = 0.4,
        p_end: float = 0.5,
    ) -> None:
        for arg, value in (
            ("num_types", num_types),
            ("max_depth", max_depth),
            ("min_brackets", min_brackets),
            ("max_brackets", max_brackets),
        ):
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"{arg} must be an int, got {value!r}")
        if not 1 <= num_types <= len(BRACKETS):
            raise ValueError(f"num_types must be in 1..{len(BRACKETS)}, got {num_types}")
        if max_depth < 1:
            raise ValueError(f"max_depth must be >= 1, got {max_depth}")
        # A balanced sequence has an even length: odd limits would only hide a rounding.
        if min_brackets < 0 or min_brackets % 2:
            raise ValueError(f"min_brackets must be even and >= 0, got {min_brackets}")
        if max_brackets < max(2, min_brackets) or max_brackets % 2:
            raise ValueError(
                f"max_brackets must be even, >= 2 and >= min_brackets={min_brackets}, "
                f"got {max_brackets}"
            )
        for arg, p in (("p_open", p_open), ("p_end", p_end)):
            # Open bounds: then a move has probability zero exactly when the rules forbid it.
            if not 0.0 < p < 1.0:
                raise ValueError(f"{arg} must be in (0, 1), got {p}")
        self.num_types = num_types
        self.max_depth = max_depth
        self.min_brackets = min_brackets
        self.max_brackets = max_brackets
        self.p_open = float(p_open)
        self.p_end = float(p_end)

        pairs = BRACKETS[:num_types]
        self.vocab: CharVocab = CharVocab([START, *"".join(pairs)])
        self.start_id = 0
        self.open_ids: tuple[int, ...] = tuple(1 + 2 * t for t in range(num_types))
        self.close_ids: tuple[int, ...] = tuple(2 + 2 * t for t in range(num_types))
        # Each bracket's type, for the oracle's walk.
        self._open_type = {token: t for t, token in enumerate(self.open_ids)}
        self._close_type = {token: t for t, token in enumerate(self.close_ids)}
        self.eos_id = self.vocab.eos_id
        self.default_max_length = 1 + max_brackets + 1 + SLACK  # ^, brackets, the slot of <eos>

    # ----------------------------------------------------------------------------------------
    # The grammar

    def _probs(self, stack: Sequence[int], length: int) -> np.ndarray:
        """(A,) next-action probabilities after a valid prefix with open ``stack`` of types."""
        probs = np.zeros(self.vocab.num_actions)
        depth = len(stack)
        # Opening needs room to close everything afterwards: length + 1 + (depth + 1) brackets.
        can_open = depth < self.max_depth and length + depth + 2 <= self.max_brackets
        if depth == 0:
            # Reachable states at depth 0 have an even length <= max_brackets, so when ending is
            # forbidden (length < min_brackets <= max_brackets - 2) opening is allowed, and when
            # opening is forbidden (length == max_brackets >= min_brackets) ending is allowed.
            can_end = length >= self.min_brackets
            p_open = (1.0 - self.p_end if can_end else 1.0) if can_open else 0.0
            probs[self.eos_id] = 1.0 - p_open
        else:
            # Closing is always allowed and only shortens what remains to close.
            p_open = self.p_open if can_open else 0.0
            probs[self.close_ids[stack[-1]]] = 1.0 - p_open
        probs[list(self.open_ids)] = p_open / self.num_types
        return probs

    def _walk(self, ids: Sequence[int]) -> tuple[list[int], float] | None:
        """The open stack after ``ids`` and their log-probability; None if it is zero."""
        stack: list[int] = []
        total = 0.0
        for length, token in enumerate(ids):
            token = int(token)
            if not 0 <= token < self.vocab.num_actions:
                raise ValueError(
                    f"id {token} is outside the action space [0, {self.vocab.num_actions})"
                )
            # Only brackets are tokens of a sequence; <eos> or <bkspc> in the middle is invalid.
            if token not in self.open_ids and token not in self.close_ids:
                return None
            p = float(self._probs(stack, length)[token])
            if p == 0.0:
                return None
            total += math.log(p)
            if token in self.open_ids:
                stack.append(self.open_ids.index(token))
            else:
                stack.pop()
        return stack, total

    def next_token_probs(self, prefix_ids: Sequence[int]) -> np.ndarray:
        """The grammar's exact next-action distribution after a prefix.

        Args:
            prefix_ids: the generated brackets so far (without the start token).

        Returns:
            (A,) float64 over the actions, ``<eos>`` included, zero for every forbidden action
            (``^`` and ``<bkspc>`` always). It sums to 1.

        Raises:
            ValueError: if the prefix itself has probability zero.
        """
        walked = self._walk(prefix_ids)
        if walked is None:
            raise ValueError(
                f"prefix {self.vocab.decode(prefix_ids)!r} has probability zero under the grammar"
            )
        return self._probs(walked[0], len(prefix_ids))

    def log_prob(self, generated_ids: Sequence[int], terminated: bool = True) -> float:
        """Exact log-probability of a sequence, with its final ``<eos>`` when ``terminated``.

        Without ``terminated`` it is the probability that a sampled sequence starts with
        ``generated_ids``. ``-inf`` for a sequence the grammar cannot produce.
        """
        walked = self._walk(generated_ids)
        if walked is None:
            return -math.inf
        stack, total = walked
        if not terminated:
            return total
        p_end = float(self._probs(stack, len(generated_ids))[self.eos_id])
        return total + math.log(p_end) if p_end > 0.0 else -math.inf

    def is_valid(self, generated_ids: Sequence[int]) -> bool:
        """Whether a complete sequence has nonzero probability (balanced, within the limits)."""
        return self.log_prob(generated_ids, terminated=True) > -math.inf

    # ----------------------------------------------------------------------------------------
    # The oracle

    def _stack_of(self, ids: Sequence[int]) -> list[int] | None:
        """The open stack after ``ids``, None once a token has probability zero.

        The support of :meth:`_probs` in plain integer tests (no array per token): an opening
        bracket needs ``can_open``, a closing one must match the innermost open bracket, and
        every other id (``^``, ``<eos>``, ``<bkspc>``) leaves the language.
        """
        stack: list[int] = []
        open_type, close_type = self._open_type, self._close_type
        for length, token in enumerate(ids):
            token = int(token)
            if token in open_type:
                depth = len(stack)
                if depth >= self.max_depth or length + depth + 2 > self.max_brackets:
                    return None
                stack.append(open_type[token])
            elif token in close_type and stack and stack[-1] == close_type[token]:
                stack.pop()
            else:
                if not 0 <= token < self.vocab.num_actions:
                    raise ValueError(
                        f"id {token} is outside the action space [0, {self.vocab.num_actions})"
                    )
                return None
        return stack

    def expert_policy(self, prompt: Sequence[int], generated: Sequence[int]) -> np.ndarray:
        """The grammar as an oracle: its next-action distribution, or ``<bkspc>`` off it.

        At a prefix of nonzero probability, :meth:`next_token_probs`; at a prefix that has left
        the language (a bracket the grammar forbids there, ``^``), all mass on ``<bkspc>``.
        Every prefix of nonzero probability can be completed within ``max_brackets``, but the
        oracle ignores the environment's ``max_length`` and step budget: a buffer smaller than
        ``1 + max_brackets + 1`` may not fit the completion it leads to.

        Raises:
            ValueError: for a prompt other than the start token ``^``.
        """
        if len(prompt) != 1 or int(prompt[0]) != self.start_id:
            raise ValueError(
                f"dyck's oracle knows the prompt {START!r} only, got {self.vocab.decode(prompt)!r}"
            )
        stack = self._stack_of(generated)
        if stack is None:
            probs = np.zeros(self.vocab.num_actions)
            probs[self.vocab.backspace_id] = 1.0
            return probs
        return self._probs(stack, len(generated))

    def prompt_length(self, state: Sequence[int]) -> int:
        """1: the prompt is the start token ``^``.

        Raises:
            ValueError: for a state that does not start with ``^``.
        """
        if len(state) == 0 or int(state[0]) != self.start_id:
            raise ValueError(f"a dyck state starts with {START!r}")
        return 1

    def enumerate_prefixes(
        self, max_len: int | None = None
    ) -> Iterator[tuple[tuple[int, ...], float]]:
        """Every prefix of nonzero probability up to ``max_len`` brackets, with its probability.

        Depth first, the empty prefix first. The number of prefixes grows exponentially with the
        length: meant for small settings (exact occupancy measures, tests).
        """
        limit = self.max_brackets if max_len is None else max_len
        todo: list[tuple[tuple[int, ...], list[int], float]] = [((), [], 1.0)]
        while todo:
            ids, stack, prob = todo.pop()
            yield ids, prob
            if len(ids) >= limit:
                continue
            probs = self._probs(stack, len(ids))
            children = []
            for token in (*self.open_ids, *self.close_ids):
                if probs[token] > 0.0:
                    if token in self.open_ids:
                        child = [*stack, self.open_ids.index(token)]
                    else:
                        child = stack[:-1]
                    children.append(((*ids, token), child, prob * float(probs[token])))
            todo.extend(reversed(children))  # so that the smallest id comes out first

    def enumerate_sequences(self) -> Iterator[tuple[tuple[int, ...], float]]:
        """Every complete sequence with its probability (``<eos>`` included). Small settings."""
        for ids, prob in self.enumerate_prefixes():
            p_end = float(self.next_token_probs(ids)[self.eos_id])
            if p_end > 0.0:
                yield ids, prob * p_end

    # ----------------------------------------------------------------------------------------
    # The task

    def sample(self, rng: np.random.Generator, split: Split = "train") -> Example:
        """Draw a sequence from the grammar; both splits share it (their seeds differ)."""
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        stack: list[int] = []
        ids: list[int] = []
        while True:
            probs = self._probs(stack, len(ids))
            # Inverse CDF on one uniform draw (rng.choice with p= costs several times more).
            # Scaled by the total, the draw stays below it: never a zero-probability action.
            cdf = np.cumsum(probs)
            action = int(np.searchsorted(cdf, rng.random() * cdf[-1], side="right"))
            if action == self.eos_id:
                return Example(prompt=(self.start_id,), completion=tuple(ids), terminal=True)
            ids.append(action)
            if action in self.open_ids:
                stack.append(self.open_ids.index(action))
            else:
                stack.pop()

    def score(self, prompt: Sequence[int], generated: Sequence[int], terminated: bool) -> float:
        """1.0 iff the episode terminated, after the start prompt, with a valid sequence."""
        if not terminated or [int(t) for t in prompt] != [self.start_id]:
            return 0.0
        try:
            return float(self.is_valid(generated))
        except ValueError:  # an id outside the action space
            return 0.0

    def ground_truth_noise(
        self,
        rng: np.random.Generator,
        prompt: Sequence[int],
        generated: Sequence[int],
        true_next: int,
    ) -> int:
        """A token the grammar forbids after ``generated``, never ``true_next``.

        A closing bracket that does not match (or any closing bracket at depth 0) if there is
        one, else another forbidden bracket (an opening one at a limit), else ``^``. After a
        prefix that is already invalid every token is a mistake: any token but ``true_next``.
        """
        tokens = (*self.open_ids, *self.close_ids)
        walked = self._walk(generated)
        candidates: list[int] = []
        if walked is not None:
            probs = self._probs(walked[0], len(generated))
            forbidden = [t for t in tokens if probs[t] == 0.0 and t != true_next]
            closing = [t for t in forbidden if t in self.close_ids]
            candidates = closing or forbidden or [self.start_id]
        candidates = [t for t in candidates if t != true_next]
        if not candidates:
            candidates = [t for t in (self.start_id, *tokens) if t != true_next]
        return candidates[int(rng.integers(len(candidates)))]

    def wrong_partial_answer(self, example: Example, rng: np.random.Generator) -> tuple[int, ...]:
        """A partial sequence ending in a mistake, to start a recovery episode from.

        The completion's first ``j`` tokens (``j`` uniform over its positions and the place of
        its ``<eos>``), then a forbidden token (:meth:`ground_truth_noise`). Placed in the
        generated part of the state, it asks the policy to delete that token and finish.
        """
        completion = example.completion
        j = int(rng.integers(len(completion) + 1))
        true_next = completion[j] if j < len(completion) else self.eos_id
        wrong = self.ground_truth_noise(rng, example.prompt, completion[:j], true_next)
        return (*completion[:j], wrong)

    def config(self) -> dict:
        """The keyword arguments that rebuild this task."""
        return {
            "num_types": self.num_types,
            "max_depth": self.max_depth,
            "min_brackets": self.min_brackets,
            "max_brackets": self.max_brackets,
            "p_open": self.p_open,
            "p_end": self.p_end,
        }


__all__ = ["BRACKETS", "START", "DyckTask"]
