"""Replay buffer of model rollouts (docs/method.md §4): FIFO, filled by KV-cache generation.

Every ``refresh_interval`` updates the trainer samples fresh trajectories from the current policy
(prompts drawn from the data) and adds them; the oldest drop out once ``capacity`` is reached.
Stale samples stay valid for the value term of SequenceMatch (docs/method.md §3), which is why a
buffer can be reused across several updates.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Sequence

import numpy as np

from seqenv.trajectory import Trajectory
from seqenv.vocab import SpecialIds


class ReplayBuffer:
    """A FIFO of trajectories with uniform sampling.

    Args:
        capacity: the most trajectories held; adding more drops the oldest.
    """

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"buffer capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self._items: deque[Trajectory] = deque(maxlen=capacity)

    def __len__(self) -> int:
        return len(self._items)

    def add(self, trajectories: Iterable[Trajectory]) -> None:
        """Append trajectories (the newest last)."""
        self._items.extend(trajectories)

    def sample(self, num: int, rng: np.random.Generator) -> list[Trajectory]:
        """``num`` trajectories drawn uniformly with replacement."""
        return self.items(self.sample_indices(num, rng))

    def sample_indices(self, num: int, rng: np.random.Generator) -> list[int]:
        """The positions of ``num`` trajectories drawn uniformly with replacement (oldest 0)."""
        if not self._items:
            raise RuntimeError("the replay buffer is empty: add rollouts before sampling")
        return [int(i) for i in rng.integers(0, len(self._items), size=num)]

    def items(self, indices: Sequence[int]) -> list[Trajectory]:
        """The trajectories at ``indices`` (valid until the next :meth:`add`)."""
        return [self._items[i] for i in indices]

    def to_json(self) -> list[dict]:
        """The contents, oldest first (checkpoints keep them so a resumed run is exact)."""
        return [t.to_json() for t in self._items]

    def load_json(self, items: Sequence[dict], special: SpecialIds) -> None:
        """Replace the contents with those :meth:`to_json` saved."""
        self._items.clear()
        self._items.extend(Trajectory.from_json(item, special) for item in items)
