"""The backspace MDP, batched on torch tensors: the one transition every other module uses.

A state is the prompt followed by the tokens generated so far. Actions are the ordinary tokens
(append), ``<eos>`` (terminate) and ``<bkspc>`` (delete the last generated token). A backspace never
deletes the prompt: with nothing generated it is a no-op that still costs a step
(docs/method.md §1).
Every action costs one step of the budget ``max_steps``; an episode is truncated when the budget is
spent or when the buffer reaches ``max_length`` tokens, and terminated by ``<eos>``.

With a :class:`~seqenv.disturbance.Disturbance`, a token action may be replaced by a noise token
before it runs (docs/method.md §5); :class:`StepResult` keeps the intended and the executed action.

Shapes: B rows (sequences), L = max_length, A = num_actions.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from seqenv.disturbance import (
    KEY_BOUND,
    Disturbance,
    NoiseFn,
    counter_hash,
    draw_below,
    ground_truth_token,
)
from seqenv.rules import (
    allowed_actions,
    deletable_append,
    last_live_index,
    out_of_room,
    step_budget,
)
from seqenv.vocab import SpecialIds


class InvalidActionError(ValueError):
    """An action that is not an integer id of the action space."""


class PromptTooLongError(ValueError):
    """A prompt that leaves no room to generate within ``max_length``."""


def check_int(value: Any, name: str, minimum: int) -> int:
    """``value`` as an int >= ``minimum``; bools, strings and non-integral floats are rejected."""
    integral = isinstance(value, int | np.integer) and not isinstance(value, bool)
    integral_float = isinstance(value, float | np.floating) and float(value).is_integer()
    if not (integral or integral_float):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    number = int(value)
    if number < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
    return number


def is_integer_dtype(dtype: np.dtype | torch.dtype) -> bool:
    """True for a numpy or torch integer dtype (bool is not one)."""
    if isinstance(dtype, torch.dtype):
        return not dtype.is_floating_point and not dtype.is_complex and dtype != torch.bool
    return np.dtype(dtype).kind in "iu"


def as_action_id(action: Any) -> int:
    """One action as a Python int: an int, a numpy or torch integer scalar, or a 0-d array.

    Raises:
        InvalidActionError: for floats, bools, strings and arrays of more than one element.
    """
    if isinstance(action, int | np.integer) and not isinstance(action, bool):
        return int(action)
    # A one-element array of shape () or (1,), as policies' predict() methods return.
    if (
        isinstance(action, np.ndarray | torch.Tensor)
        and is_integer_dtype(action.dtype)
        and tuple(action.shape) in ((), (1,))
    ):
        return int(action.reshape(()).item())
    raise InvalidActionError(
        f"an action must be an integer id, got {type(action).__name__} {action!r}"
    )


@dataclass
class StepResult:
    """What one batched step did, per row (all shape (B,)).

    Attributes:
        appended: bool, an ordinary token was appended.
        deleted: bool, a backspace removed a generated token.
        noop_backspace: bool, a backspace with nothing generated (the no-op of docs/method.md §1).
        terminated: bool, the row ended with ``<eos>`` at this step.
        truncated: bool, the row ran out of steps or of length at this step.
        intended: int64, the action the caller chose.
        executed: int64, the action the MDP ran: ``intended``, or a noise token that differs
            from it where the disturbance replaced a token action.
    """

    appended: torch.Tensor
    deleted: torch.Tensor
    noop_backspace: torch.Tensor
    terminated: torch.Tensor
    truncated: torch.Tensor
    intended: torch.Tensor
    executed: torch.Tensor

    @property
    def disturbed(self) -> torch.Tensor:
        """(B,) bool: the disturbance replaced the intended token."""
        return self.intended != self.executed


class SequenceMDP:
    """Batched backspace MDP. Holds the state of B sequences and steps them in place.

    Args:
        special: the vocabulary's special ids.
        max_length: capacity of the token buffer, prompt included.
        max_steps: step budget of an episode (backspaces count); ``None`` means ``2 * max_length``.
        batch_size: number of rows B.
        device: where the state tensors live.
        disturbance: replaces token actions by noise tokens with probability ``p``
            (:class:`~seqenv.disturbance.Disturbance`); ``None`` never does.
        noise_fn: the noise of ``kind="ground_truth"``, e.g. ``task.ground_truth_noise``.
        seed: seeds the row keys that :meth:`reset_rows` draws when it is given none.

    State tensors (all on ``device``):
        tokens: (B, L) int64, the live state, padded with ``pad_id``.
        length: (B,) int64, tokens in the live state, prompt included.
        prompt_length: (B,) int64.
        num_steps: (B,) int64, actions taken in the episode.
        terminated, truncated: (B,) bool. A row that is done ignores further actions.
        keys: (B,) int64, each row's key of the disturbance's counter-based random stream.
    """

    def __init__(
        self,
        special: SpecialIds,
        max_length: int,
        max_steps: int | None = None,
        batch_size: int = 1,
        device: torch.device | str = "cpu",
        disturbance: Disturbance | None = None,
        noise_fn: NoiseFn | None = None,
        seed: int | None = None,
    ) -> None:
        max_length = check_int(max_length, "max_length", 2)  # a prompt and one token
        self.special = special
        self.max_length = max_length
        checked_steps = None if max_steps is None else check_int(max_steps, "max_steps", 1)
        self.max_steps = step_budget(max_length, checked_steps)
        self.batch_size = check_int(batch_size, "batch_size", 1)
        self.device = torch.device(device)
        B, L = self.batch_size, max_length
        self.tokens = torch.full((B, L), special.pad_id, dtype=torch.int64, device=self.device)
        self.length = torch.zeros(B, dtype=torch.int64, device=self.device)
        self.prompt_length = torch.zeros(B, dtype=torch.int64, device=self.device)
        self.num_steps = torch.zeros(B, dtype=torch.int64, device=self.device)
        self.terminated = torch.zeros(B, dtype=torch.bool, device=self.device)
        self.truncated = torch.zeros(B, dtype=torch.bool, device=self.device)
        self._rows = torch.arange(B, device=self.device)

        if disturbance is not None and not isinstance(disturbance, Disturbance):
            raise TypeError(f"disturbance must be a Disturbance or None, got {disturbance!r}")
        self.disturbance = Disturbance(0.0) if disturbance is None else disturbance
        self.noise_fn = noise_fn
        self.keys = torch.zeros(B, dtype=torch.int64, device=self.device)
        self._key_rng = np.random.default_rng(seed)
        # Ordinary tokens: their ids (T,), and each action's index among them (A,), -1 if special.
        token_ids = [a for a in range(special.num_actions) if special.is_token(a)]
        self._token_ids = torch.tensor(token_ids, dtype=torch.int64, device=self.device)
        index = torch.full((special.num_actions,), -1, dtype=torch.int64)
        index[token_ids] = torch.arange(len(token_ids))
        self._token_index = index.to(self.device)
        if self.disturbance.active:
            if len(token_ids) < 2:
                raise ValueError("a disturbance needs at least two ordinary tokens to draw noise")
            if self.disturbance.disturbance_type == "ground_truth" and noise_fn is None:
                raise ValueError("a ground_truth disturbance needs noise_fn (the task's noise)")

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
        keys: Sequence[int] | np.ndarray | torch.Tensor | None = None,
    ) -> None:
        """Start new episodes in ``rows`` from ``prompts`` (one prompt per row).

        Args:
            rows: the rows to reset.
            prompts: one prompt per row.
            generated: tokens already in the deletable part of each starting state (used to start
                from a wrong partial answer and see whether the policy backspaces out).
            keys: one key in [0, 2**63) per row for the disturbance's random stream (an env draws
                it from the row's seeded generator); ``None`` draws them from ``seed``.
        """
        rows_list = [int(r) for r in rows]
        if len(rows_list) != len(prompts):
            raise ValueError(f"{len(rows_list)} rows but {len(prompts)} prompts")
        prefixes = [()] * len(prompts) if generated is None else generated
        if len(prefixes) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(prefixes)} generated prefixes")
        if keys is None:
            keys_np = (
                self._key_rng.integers(KEY_BOUND, size=len(rows_list), dtype=np.int64)
                if self.disturbance.active
                else np.zeros(len(rows_list), dtype=np.int64)
            )
        else:
            keys_np = np.asarray(keys.cpu() if torch.is_tensor(keys) else keys).reshape(-1)
            if len(keys_np) != len(rows_list) or not is_integer_dtype(keys_np.dtype):
                raise ValueError(f"expected {len(rows_list)} integer keys, got {keys!r}")
            if ((keys_np < 0) | (keys_np >= KEY_BOUND)).any():
                raise ValueError("keys must lie in [0, 2**63)")
        if not rows_list:
            return
        # Built on the host in one block and moved with one copy: resets happen every step of
        # a vector env, a few rows at a time.
        block = np.full((len(rows_list), self.max_length + 3), self.special.pad_id, np.int64)
        for i, (prompt, prefix) in enumerate(zip(prompts, prefixes, strict=True)):
            self._check_state(prompt, prefix)
            block[i, : len(prompt)] = prompt
            block[i, len(prompt) : len(prompt) + len(prefix)] = prefix
            block[i, -3:-1] = len(prompt) + len(prefix), len(prompt)
        block[:, -1] = keys_np
        index = torch.tensor(rows_list, dtype=torch.int64, device=self.device)
        values = torch.from_numpy(block).to(self.device)
        self.tokens[index] = values[:, : self.max_length]
        self.length[index] = values[:, -3]
        self.prompt_length[index] = values[:, -2]
        self.keys[index] = values[:, -1]
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
        actions = torch.as_tensor(actions, device=self.device)
        if not is_integer_dtype(actions.dtype):
            raise InvalidActionError(f"actions must be integer ids, got dtype {actions.dtype}")
        actions = actions.to(torch.int64).reshape(-1)
        if actions.shape[0] != self.batch_size:
            raise ValueError(f"expected {self.batch_size} actions, got {actions.shape[0]}")
        bad = (actions < 0) | (actions >= self.special.num_actions)
        if bool(bad.any()):
            value = int(actions[bad][0])
            raise InvalidActionError(
                f"action {value} is outside the action space [0, {self.special.num_actions})"
            )
        live = ~self.done
        intended = actions
        if self.disturbance.active:
            actions = self._disturb(intended, live)
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
        out_of_budget = out_of_room(self.num_steps, self.length, self.max_steps, self.max_length)
        truncated = live & ~terminated & out_of_budget
        self.terminated |= terminated
        self.truncated |= truncated
        return StepResult(
            appended, deleted, noop_backspace, terminated, truncated, intended, actions
        )

    def _disturb(self, intended: torch.Tensor, live: torch.Tensor) -> torch.Tensor:
        """(B,) int64: the actions to execute, with the disturbed token actions replaced."""
        s = self.special
        # Eligible: a live row's ordinary token whose append leaves room to delete it.
        eligible = (
            live
            & (intended != s.eos_id)
            & (intended != s.backspace_id)
            & deletable_append(self.length, self.max_length)
        )
        bits = counter_hash(self.keys, self.num_steps)  # (B,) 64 random bits
        disturbed = eligible & ((bits >> 32) & 0xFFFFFFFF < self.disturbance.threshold)
        # Uniform over the T - 1 ordinary tokens other than the intended one (low 32 bits).
        draw = draw_below(bits, len(self._token_ids) - 1)  # (B,) in [0, T - 1)
        draw += (draw >= self._token_index[intended]).long()
        noise = self._token_ids[draw]
        if self.disturbance.disturbance_type == "ground_truth":
            noise = self._ground_truth_noise(intended, disturbed, noise)
        return torch.where(disturbed, noise, intended)

    def _ground_truth_noise(
        self, intended: torch.Tensor, disturbed: torch.Tensor, fallback: torch.Tensor
    ) -> torch.Tensor:
        """The task's noise in the disturbed rows (a Python loop over those rows only).

        A draw equal to the intended token is redrawn a few times, then replaced by ``fallback``
        (random noise), so that the noise always differs from the intended token.
        """
        assert self.noise_fn is not None
        rows = torch.nonzero(disturbed).reshape(-1).tolist()
        if not rows:
            return fallback
        noise = fallback.clone()
        keys, steps = self.keys[rows].tolist(), self.num_steps[rows].tolist()
        targets, starts = intended[rows].tolist(), self.prompt_length[rows].tolist()
        fallbacks = fallback[rows].tolist()
        for row, key, step, target, start, spare in zip(
            rows, keys, steps, targets, starts, fallbacks, strict=True
        ):
            state = self.state(row)
            noise[row] = ground_truth_token(
                self.noise_fn, key, step, state[:start], state[start:], target, spare,
                self.special.is_token,
            )  # fmt: skip
        return noise

    def generated(self, row: int) -> list[int]:
        """The generated part of the live state of one row."""
        start, end = int(self.prompt_length[row]), int(self.length[row])
        return self.tokens[row, start:end].tolist()

    def state(self, row: int) -> list[int]:
        """The whole live state (prompt and generated tokens) of one row."""
        return self.tokens[row, : int(self.length[row])].tolist()
