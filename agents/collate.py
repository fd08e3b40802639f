"""Trajectories to a batch: the re-feed scheme of docs/method.md §6, one masked pass per trajectory.

Each trajectory becomes one row of inputs. Its prompt tokens come first; then every action but
``<eos>`` adds one input row holding the last token of the state after that action, at position
(length of that state - 1):

- a token appends a row holding itself;
- a backspace *re-feeds* the token returned to, at its old position. The deleted token's row and
  the re-fed token's earlier row both die at that point: later rows attend to the new copy only.

Row ``k`` is visible from row ``k`` itself until it dies, so the whole attention structure is one
integer per row, ``alive_until``: query row ``q`` attends to key row ``k`` iff
``k <= q < alive_until[k]``. Rows that never die (and padding) have ``alive_until = T``. From it
come a dense boolean mask and a FlexAttention ``mask_mod`` (:class:`RefeedMask`); a batch with no
backspace is plain causal attention, which the policy runs on its fast path.

Shapes: B trajectories, T input rows (padded on the right), S steps (actions, padded).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields

import numpy as np
import torch
from torch.nn.attention.flex_attention import BlockMask, create_block_mask

from seqenv.trajectory import LabelKind, Trajectory

MaskMod = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
"""FlexAttention's ``mask_mod(b, h, q_idx, kv_idx) -> bool``."""


@dataclass(frozen=True)
class RefeedMask:
    """Who attends to whom in a re-feed batch: query row q sees key row k iff k <= q < until[k].

    Attributes:
        alive_until: (B, T) int64, the first row that no longer sees row k (T if none).
    """

    alive_until: torch.Tensor
    _block_masks: dict[int, BlockMask] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        if self.alive_until.ndim != 2 or self.alive_until.dtype != torch.int64:
            raise ValueError(
                f"alive_until must be (B, T) int64, got {tuple(self.alive_until.shape)} "
                f"{self.alive_until.dtype}"
            )

    def dense(self) -> torch.Tensor:
        """(B, T, T) bool, [b, q, k] true where query row q attends to key row k."""
        T = self.alive_until.shape[1]
        index = torch.arange(T, device=self.alive_until.device)
        causal = index[None, :] <= index[:, None]  # (T, T), [q, k]
        alive = index[None, :, None] < self.alive_until[:, None, :]  # (B, T, T), [b, q, k]
        return causal[None] & alive

    def mask_mod(self) -> MaskMod:
        """The same mask as a FlexAttention ``mask_mod`` (build a ``BlockMask`` from it)."""
        alive_until = self.alive_until

        def refeed_mask(
            b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor
        ) -> torch.Tensor:
            return (kv_idx <= q_idx) & (q_idx < alive_until[b, kv_idx])

        return refeed_mask

    def block_mask(self, block_size: int = 128) -> BlockMask:
        """The FlexAttention ``BlockMask`` of this mask, built once and then reused.

        Every pass over the same batch (the forward, a second pass of an objective, the hidden
        states) takes the same BlockMask. On CUDA it is built by a compiled kernel
        (``_compile=True``); inside a compiled model it is built in the graph and not cached.
        """
        if torch.compiler.is_compiling():
            return self._build_block_mask(block_size, compiled=False)
        if block_size not in self._block_masks:
            compiled = self.alive_until.device.type == "cuda"
            self._block_masks[block_size] = self._build_block_mask(block_size, compiled)
        return self._block_masks[block_size]

    def _build_block_mask(self, block_size: int, compiled: bool) -> BlockMask:
        B, T = self.alive_until.shape
        return create_block_mask(
            self.mask_mod(),
            B,
            None,
            T,
            T,
            device=self.alive_until.device,
            BLOCK_SIZE=block_size,
            _compile=compiled,
        )

    def to(self, device: torch.device | str) -> RefeedMask:
        """The same mask on ``device`` (its cached BlockMasks are not carried over)."""
        return RefeedMask(self.alive_until.to(device))


@dataclass(frozen=True)
class TrajectoryBatch:
    """Trajectories as one padded batch of re-feed inputs, with per-step indices into its rows.

    Read the logits ``(B, T, A)`` of one forward pass with: Q(s_t, a_t) =
    ``logits[b, state_rows[b, t], labels[b, t]]``; V(s_t) = logsumexp of ``logits[b,
    state_rows[b, t]]``; V(s_{t+1}) the same at ``next_rows``, and 0 where ``terminal``.

    Attributes:
        input_ids: (B, T) int64, the re-feed input rows; ``pad_id`` after the last row.
        position_ids: (B, T) int64, position of each row (length of its state - 1); 0 in padding.
        alive_until: (B, T) int64, see :class:`RefeedMask`; T for padding.
        row_mask: (B, T) bool, true on real rows.
        state_rows: (B, S) int64, the row whose logits are those of s_t; 0 in padding.
        actions: (B, S) int64, a_t as executed (what the MDP ran; it decides the rows); 0 in
            padding (a valid index, masked by ``step_mask``).
        labels: (B, S) int64, the action a learner is trained on at s_t: the intended action
            (the default, docs/method.md §5) or the executed one (the paper's noise scheme).
            They differ only where a disturbance replaced a token; 0 in padding.
        next_rows: (B, S) int64, the row of s_{t+1}; equals ``state_rows`` where ``terminal``
            (there is no next state) and in padding.
        terminal: (B, S) bool, a_t is ``<eos>``: V(s_{t+1}) = 0.
        truncated: (B, S) bool, the last step of a truncated trajectory: V(s_{t+1}) is read from
            the logits at ``next_rows`` (bootstrapped).
        discount_exponent: (B, S) int64, t, so that step weights are gamma ** t.
        step_mask: (B, S) bool, true on real steps.
        undone: (B, S) bool, a_t appends a token that a later backspace deletes (a noise token).
        has_backspace: whether any trajectory deletes a token (else attention is plain causal).
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    alive_until: torch.Tensor
    row_mask: torch.Tensor
    state_rows: torch.Tensor
    actions: torch.Tensor
    labels: torch.Tensor
    next_rows: torch.Tensor
    terminal: torch.Tensor
    truncated: torch.Tensor
    discount_exponent: torch.Tensor
    step_mask: torch.Tensor
    undone: torch.Tensor
    has_backspace: bool
    # One mask object per batch, so the BlockMask it caches is built once for every pass.
    _attention: RefeedMask = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        rows = ("input_ids", "position_ids", "alive_until", "row_mask")
        steps = (
            "state_rows",
            "actions",
            "labels",
            "next_rows",
            "terminal",
            "truncated",
            "discount_exponent",
            "step_mask",
            "undone",
        )
        for names in (rows, steps):
            shapes = {name: tuple(getattr(self, name).shape) for name in names}
            first = shapes[names[0]]
            if len(first) != 2 or any(shape != first for shape in shapes.values()):
                raise ValueError(f"fields must share one (B, _) shape, got {shapes}")
        if self.input_ids.shape[0] != self.state_rows.shape[0]:
            raise ValueError("row and step fields disagree on the batch size")
        for name in ("row_mask", "terminal", "truncated", "step_mask", "undone"):
            if getattr(self, name).dtype != torch.bool:
                raise ValueError(f"{name} must be bool, got {getattr(self, name).dtype}")
        object.__setattr__(self, "_attention", RefeedMask(self.alive_until))

    @property
    def attention(self) -> RefeedMask:
        """The attention structure of the batch (the same object on every call)."""
        return self._attention

    @property
    def forward_attention(self) -> RefeedMask | None:
        """What a policy's forward pass takes: the re-feed mask, or None.

        None (plain causal attention, the fast path) for a batch in which no backspace deletes
        anything.
        """
        return self.attention if self.has_backspace else None

    @property
    def num_tokens(self) -> int:
        """Input rows that are not padding (the tokens a forward pass really processes)."""
        return int(self.row_mask.sum())

    def to(self, device: torch.device | str) -> TrajectoryBatch:
        """The same batch with every tensor on ``device``."""
        moved = {
            f.name: getattr(self, f.name).to(device, non_blocking=True)
            if isinstance(getattr(self, f.name), torch.Tensor)
            else getattr(self, f.name)
            for f in fields(self)
            if f.init
        }
        return TrajectoryBatch(**moved)


@dataclass
class _Layout:
    """The re-feed layout of one trajectory (plain Python lists, filled step by step)."""

    input_ids: list[int]
    position_ids: list[int]
    alive_until: list[int]
    state_rows: list[int]
    next_rows: list[int]
    undone: list[bool]
    has_backspace: bool


def refeed_layout(trajectory: Trajectory) -> _Layout:
    """Input rows, positions, death rows and per-step rows of one trajectory (docs/method.md §6)."""
    special = trajectory.special
    prompt = trajectory.prompt.tolist()
    never = -1  # filled with T by collate: a row nothing deletes stays visible to the end
    input_ids = list(prompt)
    position_ids = list(range(len(prompt)))
    alive_until = [never] * len(prompt)
    state = list(range(len(prompt)))  # the row holding each position of the live state
    state_rows: list[int] = []
    next_rows: list[int] = []
    undone: list[bool] = []
    appended_by: dict[int, int] = {}  # row -> the step that appended its token (re-feeds inherit)
    has_backspace = False
    for step, action in enumerate(trajectory.actions.tolist()):
        state_rows.append(state[-1])
        undone.append(False)
        if action == special.eos_id:
            next_rows.append(state[-1])
            continue
        row = len(input_ids)
        if action == special.backspace_id:
            if len(state) == len(prompt):
                # A no-op backspace (nothing generated): the state and its row stay as they are.
                next_rows.append(state[-1])
                continue
            has_backspace = True
            deleted = state.pop()
            undone[appended_by[deleted]] = True
            alive_until[deleted] = row
            alive_until[state[-1]] = row  # replaced by the re-fed copy below
            input_ids.append(input_ids[state[-1]])
            if state[-1] in appended_by:
                appended_by[row] = appended_by[state[-1]]
            state[-1] = row
        else:
            input_ids.append(action)
            appended_by[row] = step
            state.append(row)
        position_ids.append(len(state) - 1)
        alive_until.append(never)
        next_rows.append(row)
    return _Layout(
        input_ids, position_ids, alive_until, state_rows, next_rows, undone, has_backspace
    )


def collate(
    trajectories: Sequence[Trajectory], pad_to_multiple: int = 1, labels: LabelKind = "intended"
) -> TrajectoryBatch:
    """Build the re-feed batch of ``trajectories`` (on the CPU; move it with ``.to(device)``).

    Args:
        trajectories: episodes of one vocabulary.
        labels: ``intended`` (learn the actions the agent chose; the default) or ``executed``
            (learn what ran, noise tokens included: the paper's scheme, an ablation).
        pad_to_multiple: pad T up to a multiple of this (e.g. 128, FlexAttention's block size,
            or a fixed length to keep compiled shapes static).
    """
    if not trajectories:
        raise ValueError("collate needs at least one trajectory")
    special = trajectories[0].special
    if any(t.special != special for t in trajectories):
        raise ValueError("trajectories from different vocabularies cannot share a batch")
    if pad_to_multiple < 1:
        raise ValueError(f"pad_to_multiple must be >= 1, got {pad_to_multiple}")
    if labels not in ("intended", "executed"):
        raise ValueError(f"labels must be 'intended' or 'executed', got {labels!r}")
    layouts = [refeed_layout(t) for t in trajectories]
    B = len(trajectories)
    longest = max(len(layout.input_ids) for layout in layouts)
    T = -(-longest // pad_to_multiple) * pad_to_multiple
    S = max(t.num_steps for t in trajectories)

    input_ids = np.full((B, T), special.pad_id, dtype=np.int64)
    position_ids = np.zeros((B, T), dtype=np.int64)
    alive_until = np.full((B, T), T, dtype=np.int64)
    row_mask = np.zeros((B, T), dtype=bool)
    state_rows = np.zeros((B, S), dtype=np.int64)
    actions = np.zeros((B, S), dtype=np.int64)
    label_ids = np.zeros((B, S), dtype=np.int64)
    next_rows = np.zeros((B, S), dtype=np.int64)
    terminal = np.zeros((B, S), dtype=bool)
    truncated = np.zeros((B, S), dtype=bool)
    discount_exponent = np.zeros((B, S), dtype=np.int64)
    step_mask = np.zeros((B, S), dtype=bool)
    undone = np.zeros((B, S), dtype=bool)

    for b, (trajectory, layout) in enumerate(zip(trajectories, layouts, strict=True)):
        n, N = len(layout.input_ids), trajectory.num_steps
        input_ids[b, :n] = layout.input_ids
        position_ids[b, :n] = layout.position_ids
        until = np.array(layout.alive_until, dtype=np.int64)
        alive_until[b, :n] = np.where(until < 0, T, until)
        row_mask[b, :n] = True
        state_rows[b, :N] = layout.state_rows
        actions[b, :N] = trajectory.actions
        label_ids[b, :N] = trajectory.labels(labels)
        next_rows[b, :N] = layout.next_rows
        terminal[b, :N] = trajectory.actions == special.eos_id
        truncated[b, N - 1] = trajectory.truncated
        discount_exponent[b, :N] = np.arange(N)
        step_mask[b, :N] = True
        undone[b, :N] = layout.undone

    return TrajectoryBatch(
        input_ids=torch.from_numpy(input_ids),
        position_ids=torch.from_numpy(position_ids),
        alive_until=torch.from_numpy(alive_until),
        row_mask=torch.from_numpy(row_mask),
        state_rows=torch.from_numpy(state_rows),
        actions=torch.from_numpy(actions),
        labels=torch.from_numpy(label_ids),
        next_rows=torch.from_numpy(next_rows),
        terminal=torch.from_numpy(terminal),
        truncated=torch.from_numpy(truncated),
        discount_exponent=torch.from_numpy(discount_exponent),
        step_mask=torch.from_numpy(step_mask),
        undone=torch.from_numpy(undone),
        has_backspace=any(layout.has_backspace for layout in layouts),
    )
