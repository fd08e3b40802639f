"""What a task provides: a vocabulary, prompts with expert completions, a scorer and its noise."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar, Literal

import numpy as np

from seqenv.trajectory import Trajectory, from_completion, from_text
from seqenv.vocab import SpecialIds, Vocab

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

    # ----------------------------------------------------------------------------------------
    # The expert as an oracle (docs/method.md §8, own errors)

    def expert_policy(self, prompt: Sequence[int], generated: Sequence[int]) -> np.ndarray | None:
        """The expert's action distribution at any state, valid or not; None: no oracle.

        A task that knows its expert everywhere opts in by overriding this (arithmetic knows
        the answer, dyck its grammar; text has no oracle). The convention: at a state whose
        generated text can still be continued correctly, the expert's next-action distribution;
        at a state that has left the task's language, all mass on ``<bkspc>``. It sees only
        the text: it is not the demonstrator of the disturbed environment, which also knows
        which tokens were noise.

        Args:
            prompt: the prompt's ids.
            generated: the ids generated after it (after every backspace).

        Returns:
            (A,) float64 over the actions, summing to 1, or None where the task has no oracle.
        """
        return None

    @property
    def has_oracle(self) -> bool:
        """Whether :meth:`expert_policy` is defined (a subclass overrides it)."""
        return type(self).expert_policy is not Task.expert_policy

    def expert_policies(
        self, prompts: Sequence[Sequence[int]], generated: Sequence[Sequence[int]]
    ) -> np.ndarray | None:
        """(B, A) float64: :meth:`expert_policy` of B states at once; None: no oracle.

        One row per (prompt, generated) pair. A task may override it with a faster batch.
        """
        if len(prompts) != len(generated):
            raise ValueError(f"{len(prompts)} prompts but {len(generated)} generated parts")
        if not self.has_oracle:
            return None
        out = np.zeros((len(prompts), self.vocab.num_actions))
        for row, (prompt, ids) in enumerate(zip(prompts, generated, strict=True)):
            probs = self.expert_policy(prompt, ids)
            if probs is None:
                return None
            out[row] = probs
        return out

    def prompt_length(self, state: Sequence[int]) -> int:
        """How many of a state's leading ids are its prompt.

        What a policy that sees only the observation (:class:`seqenv.expert.ExpertPolicy`)
        needs to split it into prompt and generated text. A task whose prompts can be told
        from the text implements it (dyck: the start token; arithmetic: up to the ``?``).

        Raises:
            NotImplementedError: the task does not say where its prompts end.
            ValueError: ``state`` does not start with a prompt of the task.
        """
        raise NotImplementedError(
            f"task {self.name!r} does not say where its prompts end: implement "
            "Task.prompt_length to read its states from observations"
        )

    def config(self) -> dict:
        """The keyword arguments that rebuild this task (stored in checkpoints)."""
        return {}


def answer_policy(
    special: SpecialIds, answer: Sequence[int], generated: Sequence[int]
) -> np.ndarray:
    """The oracle of a task with one right answer: (A,) float64 one-hot.

    The answer's next token while ``generated`` is a prefix of ``answer``, ``<eos>`` once it is
    all of it, ``<bkspc>`` otherwise (the text has left the answer).
    """
    probs = np.zeros(special.num_actions)
    n = len(generated)
    if n <= len(answer) and [int(g) for g in generated] == [int(a) for a in answer[:n]]:
        probs[int(answer[n]) if n < len(answer) else special.eos_id] = 1.0
    else:
        probs[special.backspace_id] = 1.0
    return probs
