"""What training and generation need of a policy network, and the one place logits are masked.

Both :class:`agents.policy.TransformerPolicy` and the wrapper of a transformers causal LM
(``agents/hf.py``) implement :class:`PolicyModel`. Shapes: B rows, T input positions, N new
input positions of a decoding call, A = num_actions.

The KV cache of :meth:`PolicyModel.decode` is addressed by position: the keys and values of the
token at position p of row b live in slot p of row b, and a query at position p sees slots
0..p of its row. Since a state is a prefix of positions, that one rule is the whole rollback:
after a backspace, feeding the token returned to at its old position overwrites its slot, and
slots beyond it (the deleted token) are out of sight until a later token overwrites them. Each
row thus has its own length (its query position + 1), and slots past it are masked out.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Protocol, runtime_checkable

import torch

from agents.collate import RefeedMask, TrajectoryBatch
from seqenv.vocab import SpecialIds


@runtime_checkable
class PolicyModel(Protocol):
    """A network whose logits over the extended vocabulary are the soft Q-function.

    As in docs/method.md §2.

    Attributes:
        special: the special ids of the vocabulary the network reads and predicts.
        max_positions: the largest position id it accepts + 1; ``None`` for no limit.
    """

    special: SpecialIds

    @property
    def max_positions(self) -> int | None:
        """The largest position id the network accepts + 1; ``None`` for no limit."""
        ...

    def parameters(self, recurse: bool = True) -> Iterator[torch.nn.Parameter]:
        """The trainable parameters, as ``nn.Module.parameters``."""
        ...

    def __call__(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        attention: RefeedMask | None = None,
    ) -> torch.Tensor:
        """Logits (B, T, A) of a whole input; ``attention=None`` means plain causal attention.

        (An ``nn.Module`` implements this through its ``forward``.)
        """
        ...

    def forward_batch(self, batch: TrajectoryBatch) -> torch.Tensor:
        """Logits (B, T, A) of a re-feed batch, one pass (causal fast path without backspaces)."""
        ...

    def init_cache(self, batch_size: int, capacity: int) -> Any:
        """An empty KV cache of ``capacity`` positions for ``batch_size`` rows.

        The cache may offer ``keep_rows(index)``, which keeps only the rows ``index`` (a 1-D
        int64 tensor) in that order; generation then stops decoding the rows that are done.
        """
        ...

    def decode(
        self, input_ids: torch.Tensor, position_ids: torch.Tensor, cache: Any
    ) -> torch.Tensor:
        """Feed (B, N) tokens at their positions, writing their keys and values into ``cache``.

        Returns logits (B, N, A); position i of row b attends to cache slots 0..position_ids[b, i].
        """
        ...


def cache_visibility(position_ids: torch.Tensor) -> tuple[int, torch.Tensor]:
    """The cache slots a decoding call reads, and which of them each query sees.

    Args:
        position_ids: (B, N) positions of the tokens fed.

    Returns:
        num_slots: S, the slots to read (the largest position + 1; one sync per call).
        visible: (B, N, S) bool, slot s is visible to query i of row b iff s <= position_ids[b, i].
    """
    num_slots = int(position_ids.max()) + 1
    slot = torch.arange(num_slots, device=position_ids.device)
    return num_slots, slot[None, None, :] <= position_ids[:, :, None]


def mask_logits(logits: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """Logits with ``-inf`` where ``allowed`` is false: the only place a mask becomes ``-inf``.

    Args:
        logits: (..., A) float.
        allowed: bool, broadcastable to ``logits``.
    """
    return logits.masked_fill(~allowed, float("-inf"))
