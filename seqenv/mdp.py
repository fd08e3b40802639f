"""The backspace MDP, batched on torch tensors: the one transition every other module uses.

A state is the prompt followed by the tokens generated so far. Actions are the ordinary tokens
(append), ``<eos>`` (terminate) and ``<bkspc>`` (delete the last generated token). A backspace never
deletes the prompt: with nothing generated it is a no-op that still costs a step (METHOD.md §1).
Every action costs one step of the budget ``max_steps``; an episode is truncated when the budget is
spent or when the buffer reaches ``max_length`` tokens, and terminated by ``<eos>``.

Shapes: B rows (sequences), L = max_length, A = num_actions.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from seqenv.rules import allowed_actions, last_live_index, step_budget
from seqenv.vocab import SpecialIds


class InvalidActionError(ValueError):
    """An action id outside the action space."""


class PromptTooLongError(ValueError):
    """A prompt that leaves no room to generate within ``max_length``."""


@dataclass
class StepResult:
    """What one batched step did, per row (all shape (B,)).

    Attributes:
        appended: bool, an ordinary token was appended.
        deleted: bool, a backspace removed a generated token.
        noop_backspace: bool, a backspace with nothing generated (the no-op of METHOD.md §1).
        terminated: bool, the row ended with ``<eos>`` at this step.
        truncated: bool, the row ran out of steps or of length at this step.
    """

    appended: torch.Tensor
    deleted: torch.Tensor
    noop_backspace: torch.Tensor
    terminated: torch.Tensor
    truncated: torch.Tensor


class SequenceMDP:
    """Batched backspace MDP. Holds the state of B sequences and steps them in place.

    Args:
        special: the vocabulary's special ids.
        max_length: capacity of the token buffer, prompt included.
        max_steps: step budget of an episode (backspaces count); ``None`` means ``2 * max_length``.
        batch_size: number of rows B.
        device: where the state tensors live.

    State tensors (all on ``device``):
        tokens: (B, L) int64, the live state, padded with ``pad_id``.
        length: (B,) int64, tokens in the live state, prompt included.
        prompt_length: (B,) int64.
        num_steps: (B,) int64, actions taken in the episode.
        terminated, truncated: (B,) bool. A row that is done ignores further actions.
    """

    def __init__(
        self,
        special: SpecialIds,
        max_length: int,
        max_steps: int | None = None,
        batch_size: int = 1,
        device: torch.device | str = "cpu",
    ) -> None:
        if max_length < 2:
            raise ValueError(f"max_length must be >= 2 (a prompt and one token), got {max_length}")
        self.special = special
        self.max_length = max_length
        self.max_steps = step_budget(max_length, max_steps)
        if self.max_steps < 1:
            raise ValueError(f"max_steps must be >= 1, got {self.max_steps}")
        self.batch_size = batch_size
        self.device = torch.device(device)
        B, L = batch_size, max_length
        self.tokens = torch.full((B, L), special.pad_id, dtype=torch.int64, device=self.device)
        self.length = torch.zeros(B, dtype=torch.int64, device=self.device)
        self.prompt_length = torch.zeros(B, dtype=torch.int64, device=self.device)
        self.num_steps = torch.zeros(B, dtype=torch.int64, device=self.device)
        self.terminated = torch.zeros(B, dtype=torch.bool, device=self.device)
        self.truncated = torch.zeros(B, dtype=torch.bool, device=self.device)
        self._rows = torch.arange(B, device=self.device)

    @property
    def done(self) -> torch.Tensor:
        """(B,) bool: terminated or truncated."""
        return self.terminated | self.truncated

    def _check_state(self, prompt: Sequence[int], prefix: Sequence[int]) -> None:
        """Raise a clear error for a starting state the MDP cannot hold."""
        if len(prompt) == 0:
            raise PromptTooLongError("a prompt must hold at least one token")
        if len(prompt) + len(prefix) >= self.max_length:
            what = "prompt" if not prefix else "prompt and starting tokens"
            raise PromptTooLongError(
                f"{what} of {len(prompt) + len(prefix)} tokens leave no room to generate: "
                f"max_length is {self.max_length}"
            )
        ids = np.asarray([*prompt, *prefix], dtype=np.int64)
        s = self.special
        bad = (ids < 0) | (ids >= s.num_actions) | (ids == s.eos_id) | (ids == s.backspace_id)
        if bad.any():
            raise InvalidActionError(
                f"starting state holds id {int(ids[bad][0])}, which is not an ordinary token"
            )

    def reset_rows(
        self,
        rows: Sequence[int] | torch.Tensor,
        prompts: Sequence[Sequence[int]],
        generated: Sequence[Sequence[int]] | None = None,
    ) -> None:
        """Start new episodes in ``rows`` from ``prompts`` (one prompt per row).

        ``generated``, if given, are tokens already in the deletable part of each starting state
        (used to start from a wrong partial answer and see whether the policy backspaces out).
        """
        rows_list = [int(r) for r in rows]
        if len(rows_list) != len(prompts):
            raise ValueError(f"{len(rows_list)} rows but {len(prompts)} prompts")
        prefixes = [()] * len(prompts) if generated is None else generated
        if len(prefixes) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(prefixes)} generated prefixes")
        if not rows_list:
            return
        # Built on the host in one block and moved with one copy: resets happen every step of
        # a vector env, a few rows at a time.
        block = np.full((len(rows_list), self.max_length + 2), self.special.pad_id, np.int64)
        for i, (prompt, prefix) in enumerate(zip(prompts, prefixes, strict=True)):
            self._check_state(prompt, prefix)
            block[i, : len(prompt)] = prompt
            block[i, len(prompt) : len(prompt) + len(prefix)] = prefix
            block[i, -2:] = len(prompt) + len(prefix), len(prompt)
        index = torch.tensor(rows_list, dtype=torch.int64, device=self.device)
        values = torch.from_numpy(block).to(self.device)
        self.tokens[index] = values[:, : self.max_length]
        self.length[index] = values[:, -2]
        self.prompt_length[index] = values[:, -1]
        self.num_steps[index] = 0
        self.terminated[index] = False
        self.truncated[index] = False

    def reset(self, prompts: Sequence[Sequence[int]]) -> None:
        """Start new episodes in every row."""
        if len(prompts) != self.batch_size:
            raise ValueError(f"expected {self.batch_size} prompts, got {len(prompts)}")
        self.reset_rows(range(self.batch_size), prompts)

    def action_mask(self) -> torch.Tensor:
        """(B, A) bool: the actions the policy may take. Backspace needs a generated token."""
        return allowed_actions(self.length > self.prompt_length, self.special)

    def step(self, actions: torch.Tensor) -> StepResult:
        """Apply one action per row, in place. Rows already done are left as they are."""
        actions = torch.as_tensor(actions, dtype=torch.int64, device=self.device).reshape(-1)
        if actions.shape[0] != self.batch_size:
            raise ValueError(f"expected {self.batch_size} actions, got {actions.shape[0]}")
        bad = (actions < 0) | (actions >= self.special.num_actions)
        if bool(bad.any()):
            value = int(actions[bad][0])
            raise InvalidActionError(
                f"action {value} is outside the action space [0, {self.special.num_actions})"
            )
        live = ~self.done
        is_eos = actions == self.special.eos_id
        is_backspace = actions == self.special.backspace_id
        has_generated = self.length > self.prompt_length

        deleted = live & is_backspace & has_generated
        noop_backspace = live & is_backspace & ~has_generated
        appended = live & ~is_eos & ~is_backspace

        # Backspace: pad the last live slot out. Append: write at `length`. Rows are distinct,
        # so both writes are plain scatters. (length < max_length holds for every live row.)
        last = last_live_index(self.length).clamp(min=0)
        self.tokens[self._rows[deleted], last[deleted]] = self.special.pad_id
        self.tokens[self._rows[appended], self.length[appended]] = actions[appended]
        self.length += appended.long() - deleted.long()
        self.num_steps += live.long()

        terminated = live & is_eos
        out_of_budget = (self.num_steps >= self.max_steps) | (self.length >= self.max_length)
        truncated = live & ~terminated & out_of_budget
        self.terminated |= terminated
        self.truncated |= truncated
        return StepResult(appended, deleted, noop_backspace, terminated, truncated)

    def generated(self, row: int) -> list[int]:
        """The generated part of the live state of one row."""
        start, end = int(self.prompt_length[row]), int(self.length[row])
        return self.tokens[row, start:end].tolist()

    def state(self, row: int) -> list[int]:
        """The whole live state (prompt and generated tokens) of one row."""
        return self.tokens[row, : int(self.length[row])].tolist()
