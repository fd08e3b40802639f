"""An algorithm of a user's own, outside ``agents/``: BC with label smoothing.

Loaded by name as ``tests.agents.label_smoothing:LabelSmoothingBC`` (``--agent`` of ``seqmatch
train``, an entry of ``seqmatch compare --agents``), with ``--agent-args '{"smoothing": 0.2}'``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from agents.algorithms import Algorithm
from agents.objectives import BatchPolicy, BCLoss, LossOutput, Objective, ObjectiveBatch


@dataclass
class Smoothing:
    smoothing: float = 0.1
    """Share of each target's mass spread evenly over every action."""


class LabelSmoothingBC(Algorithm):
    """(1 - eps) BC + eps x the cross entropy to the uniform distribution over the actions."""

    label = "BC with label smoothing"
    short_label = "BC+LS"
    Settings = Smoothing

    def loss(self, step: int) -> Objective:
        L = self.trainer.max_steps  # BC's normaliser: every term per sequence of L steps
        bc, eps = BCLoss(normaliser_length=L), self.extra.smoothing

        def smoothed(policy: BatchPolicy, batch: ObjectiveBatch) -> LossOutput:
            out = bc(policy, batch)
            data = batch.data
            log_pi = policy.forward_batch(data).log_softmax(dim=-1)  # (B, T, A)
            rows = torch.arange(data.input_ids.shape[0])[:, None]
            uniform = -log_pi[rows, data.state_rows].mean(dim=-1)  # (B, S)
            spread = torch.where(data.step_mask, uniform, 0.0).sum() / (len(uniform) * L)
            loss = (1 - eps) * out.loss + eps * spread
            return LossOutput(loss, {**out.metrics, "loss": loss.detach()})

        return smoothed
