"""How a run's policy is built and seen: our transformer or a pretrained LM, and its batch pass.

:func:`build_policy` makes the network a :class:`~agents.config.TrainConfig` asks for;
:class:`PolicyView` is what the objectives see of it, its whole masked pass routed through the
(possibly DDP-wrapped, possibly compiled) :class:`BatchForward` module.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, TypeAlias

from torch import nn

from agents.collate import TrajectoryBatch
from agents.config import TrainConfig
from agents.models.policy import TransformerConfig, TransformerPolicy
from seqenv.vocab import SpecialIds, Vocab

if TYPE_CHECKING:
    import torch

    from agents.models.hf import HFPolicy

Policy: TypeAlias = "TransformerPolicy | HFPolicy"
"""The policies a run trains: our transformer, or a pretrained LM (``--model``)."""


class BatchForward(nn.Module):
    """``forward(batch)`` of a policy, so that DDP and torch.compile see the whole masked pass."""

    def __init__(self, policy: Policy) -> None:
        super().__init__()
        self.policy = policy

    def forward(self, batch: TrajectoryBatch) -> torch.Tensor:
        """Logits (B, T, A) of the batch's one masked pass."""
        return self.policy.forward_batch(batch)


class PolicyView:
    """What the objectives see: the policy's ids, and ``forward_batch``.

    ``forward_batch`` is routed through the (possibly DDP-wrapped, possibly compiled) batch
    module so gradients are synchronised.
    """

    def __init__(self, policy: Policy, batch_forward: nn.Module) -> None:
        self.policy = policy
        self.special = policy.special
        self._batch_forward = batch_forward

    def forward_batch(self, batch: TrajectoryBatch) -> torch.Tensor:
        """Logits (B, T, A), through the batch module (DDP synchronises the gradients)."""
        return self._batch_forward(batch)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.policy, name)


def model_vocabulary(config: TrainConfig) -> Vocab | None:
    """The tokenizer vocabulary of ``config.model``; None without a pretrained model."""
    if config.model is None:
        return None
    from agents.models.hf import load_hf_vocab

    return load_hf_vocab(config.model)


def build_policy(config: TrainConfig, special: SpecialIds, max_length: int) -> Policy:
    """The policy a run trains: our transformer, or the pretrained LM of ``config.model``.

    LoRA adapters when ``config.lora_r > 0``, all weights otherwise.
    """
    if config.model is None:
        return TransformerPolicy(
            special,
            TransformerConfig(
                num_layers=config.layers,
                width=config.width,
                num_heads=config.heads,
                context_length=max_length,
                dropout=config.dropout,
                positions=config.positions,
            ),
        )
    from agents.models.hf import LoraSettings, load_hf

    policy, _ = load_hf(config.model)
    if policy.special != special:
        raise ValueError(f"{config.model}: the model's special ids differ from the task's")
    if policy.max_positions is not None and max_length > policy.max_positions:
        raise ValueError(
            f"--max-length {max_length} exceeds the model's {policy.max_positions} positions"
        )
    if config.lora_r > 0:
        policy.enable_lora(LoraSettings(config.lora_r, config.lora_alpha, config.lora_dropout))
    if config.gradient_checkpointing:
        # Non-reentrant: works with a frozen embedding (no input needs a gradient).
        policy.model.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": False}
        )
    return policy
