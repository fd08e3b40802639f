"""The rules of the backspace MDP that every module shares, each defined once.

- **Allowed actions** (:func:`allowed_actions`): every ordinary token and ``<eos>``; ``<bkspc>``
  only in a state with something generated (a backspace never deletes the prompt), and nowhere
  in the no-backspace ablation. The environment's action mask, generation, the objectives and the
  exact occupancy code all call it, so they cannot disagree.
- **Step budget** (:func:`step_budget`): ``2 * max_length`` actions unless given; backspaces
  count, so no policy loops forever.
- **Last live token** (:func:`last_live_index`): the buffer index of the last token of a state,
  whose logits are those of the state.

Shapes: ``...`` any batch shape, A actions.
"""

from __future__ import annotations

from typing import Any

import torch

from seqenv.vocab import SpecialIds


def allowed_actions(
    has_generated: torch.Tensor, special: SpecialIds, allow_backspace: bool = True
) -> torch.Tensor:
    """(..., A) bool: the actions a policy may take in each state.

    Args:
        has_generated: (...) bool, the state holds at least one generated token.
        special: the vocabulary's special ids.
        allow_backspace: False masks ``<bkspc>`` everywhere (the no-backspace ablation).
    """
    num_actions = special.num_actions
    is_backspace = torch.arange(num_actions, device=has_generated.device) == special.backspace_id
    backspace_ok = has_generated if allow_backspace else torch.zeros_like(has_generated)
    return backspace_ok[..., None] | ~is_backspace  # (..., A)


def step_budget(max_length: int, max_steps: int | None = None) -> int:
    """The step budget of an episode: ``max_steps``, or ``2 * max_length`` when unset."""
    return 2 * max_length if max_steps is None else max_steps


def out_of_room(num_steps: Any, length: Any, max_steps: int, max_length: int) -> Any:
    """Whether an episode that has not ended is cut here: budget spent or buffer full.

    Ints or tensors (elementwise); the MDP and the disturbed demonstrations share it.
    """
    return (num_steps >= max_steps) | (length >= max_length)


def deletable_append(length: Any, max_length: int) -> Any:
    """Whether an append to a state of ``length`` tokens leaves room to delete it again.

    Only such appends may be disturbed. Ints or tensors (elementwise).
    """
    return length + 1 < max_length


def last_live_index(length: torch.Tensor) -> torch.Tensor:
    """(...) int64: the buffer index of the last token of states of ``length`` tokens."""
    return length - 1
