"""One narrow logger shared by every agent: ``record(key, value)``, ``dump(step)``.

Keys are namespaced so that the curves of MLE, BC and SequenceMatch runs overlay in TensorBoard:
``losses/`` (objective terms), ``train/`` (optimisation: learning rate, gradient norm, speed),
``eval/`` (task score and samples), ``rollout/`` (statistics of the model's own generations).
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import torch


class Logger:
    """Averages what is recorded between two dumps and writes it as TensorBoard scalars.

    Args:
        logdir: the run's folder (event files go there); ``None`` logs nowhere but still averages.
    """

    def __init__(self, logdir: str | Path | None) -> None:
        self.logdir = Path(logdir) if logdir is not None else None
        self._writer = None
        if self.logdir is not None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(str(self.logdir))
        self._sums: dict[str, list[torch.Tensor | float]] = defaultdict(list)

    def record(self, key: str, value: torch.Tensor | float) -> None:
        """Keep a value (a tensor stays on its device: no GPU sync until :meth:`dump`)."""
        if "/" not in key:
            raise ValueError(f"logger keys are namespaced, e.g. 'losses/{key}'")
        self._sums[key].append(value.detach() if isinstance(value, torch.Tensor) else value)

    def dump(self, step: int) -> dict[str, float]:
        """Write the mean of each key since the last dump; return those means."""
        # The one place recorded tensors are synced to the host (once per log interval).
        means = {
            key: float(torch.tensor([float(v) for v in values]).mean())
            for key, values in self._sums.items()
        }
        self._sums.clear()
        if self._writer is not None:
            for key, value in means.items():
                self._writer.add_scalar(key, value, step)
            self._writer.flush()
        return means

    def text(self, key: str, text: str, step: int) -> None:
        """Write a text (e.g. samples) at ``step`` right away; not averaged."""
        if self._writer is not None:
            self._writer.add_text(key, text, step)
            self._writer.flush()

    def close(self) -> None:
        """Close the event file."""
        if self._writer is not None:
            self._writer.close()
