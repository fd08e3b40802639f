"""What a task provides: a vocabulary, prompts with expert completions, a scorer and its noise."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar, Literal

import numpy as np

from seqenv.trajectory import Trajectory, from_completion, from_text
from seqenv.vocab import Vocab

Split = Literal["train", "test"]


@dataclass(frozen=True)
class Example:
    """A prompt and the expert's continuation, as token ids.

    Attributes:
        prompt: ordinary token ids, at least one.
        completion: the expert's tokens after the prompt (no ``<eos>``).
        terminal: the expert ends with ``<eos>`` after ``completion``; False for a passage cut
            at ``max_length`` (a truncated episode).
    """

    prompt: tuple[int, ...]
    completion: tuple[int, ...]
    terminal: bool = True


class Task(ABC):
    """A source of prompts and demonstrations with a score. One subclass per file in this folder.

    Subclasses set ``name`` and ``vocab`` and give ``default_max_length``, the buffer size an
    environment uses when the caller names none.
    """

    name: ClassVar[str]
    vocab: Vocab
    default_max_length: int

    @abstractmethod
    def sample(self, rng: np.random.Generator, split: Split = "train") -> Example:
        """Draw one example (a fresh prompt for an environment reset)."""

    def examples(self, split: Split, num: int, seed: int = 0) -> list[Example]:
        """``num`` examples of a split, the same for the same seed."""
        rng = np.random.default_rng([seed, 0 if split == "train" else 1])
        return [self.sample(rng, split) for _ in range(num)]

    def demonstration(self, example: Example, max_length: int) -> Trajectory:
        """The expert's episode for ``example`` in an MDP of buffer size ``max_length``."""
        if example.terminal:
            return from_completion(
                example.prompt, example.completion, self.vocab.special, max_length
            )
        ids = [*example.prompt, *example.completion]
        return from_text(ids, self.vocab.special, len(example.prompt), max_length)

    def demonstrations(
        self, split: Split, num: int, max_length: int, seed: int = 0
    ) -> list[Trajectory]:
        """The expert's episodes for ``num`` examples of ``split`` drawn with ``seed``."""
        return [self.demonstration(e, max_length) for e in self.examples(split, num, seed)]

    @abstractmethod
    def score(self, prompt: Sequence[int], generated: Sequence[int], terminated: bool) -> float:
        """The task's own score of a finished episode (the default reward, paid at its end)."""

    @abstractmethod
    def ground_truth_noise(
        self,
        rng: np.random.Generator,
        prompt: Sequence[int],
        generated: Sequence[int],
        true_next: int,
    ) -> int:
        """A plausible mistake at this point: an ordinary token id other than ``true_next``."""

    def wrong_partial_answer(self, example: Example, rng: np.random.Generator) -> tuple[int, ...]:
        """A partial answer ending in a mistake, to start a recovery episode from.

        The answer's first ``j`` tokens (``j`` uniform over its positions), then
        :meth:`ground_truth_noise` in place of token ``j`` (for arithmetic, a wrong digit of the
        base). Placed in the generated part of the state, it asks the policy to delete the
        mistake and finish the answer.
        """
        completion = example.completion
        if not completion:
            raise ValueError("an example with an empty completion has no partial answer")
        j = int(rng.integers(len(completion)))
        wrong = self.ground_truth_noise(rng, example.prompt, completion[:j], completion[j])
        return (*completion[:j], int(wrong))

    def config(self) -> dict:
        """The keyword arguments that rebuild this task (stored in checkpoints)."""
        return {}
