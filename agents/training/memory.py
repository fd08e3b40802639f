"""Rough memory estimates, checked before allocating: one clear line instead of a crash."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

import torch

from agents.training.config import RunError, TrainConfig


def _parameters(width: int, layers: int, num_embeddings: int, context: int) -> int:
    """Parameters of a :class:`TransformerPolicy` (attention 4 w^2 + MLP 8 w^2 per layer)."""
    return 12 * layers * width * width + (num_embeddings + context) * width


def training_bytes(config: TrainConfig, num_actions: int, max_length: int, max_steps: int) -> int:
    """A rough lower estimate of a run's memory, in bytes.

    Weights, gradients and AdamW moments (fp32), the activations of one micro-batch, and the KV
    caches of a rollout or evaluation batch.
    """
    width, layers = config.width, config.layers
    params = _parameters(width, layers, num_actions + 4, max_length)
    from agents.algorithms import resolve_algorithm  # the registry's PPO adapter imports config

    model_rows = resolve_algorithm(config.agent).cls.model_rows(config)
    rows = (config.batch_size + model_rows) // config.grad_accum
    T = max_length + max_steps
    activations = rows * T * (layers * (16 * width + config.heads * T) + 3 * num_actions)
    rollouts = max(config.rollouts, config.eval_episodes) * T * (2 * layers * width + num_actions)
    return 4 * (4 * params + max(activations, rollouts))


def policy_bytes(model: dict[str, Any], num_actions: int, num_sequences: int, T: int) -> int:
    """A rough lower estimate of generating ``num_sequences`` with a policy of config ``model``."""
    width, layers = int(model["width"]), int(model["num_layers"])
    params = _parameters(width, layers, num_actions + 4, int(model["context_length"]))
    return 4 * (params + num_sequences * T * (2 * layers * width + num_actions))


def available_memory(device: torch.device) -> int | None:
    """Bytes free for tensors on ``device``, or None when unknown."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    if device.type == "cpu":
        try:
            for line in Path("/proc/meminfo").read_text().splitlines():
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
        except OSError:
            pass
        with contextlib.suppress(ValueError, OSError, AttributeError):
            return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return None


def check_memory(num_bytes: int, device: torch.device, what: str) -> None:
    """RunError (one line) when ``num_bytes`` exceed what ``device`` has free."""
    free = available_memory(device)
    if free is not None and num_bytes > free:
        raise RunError(
            f"{what} need about {num_bytes / 2**30:.3g} GiB, {device.type} has "
            f"{free / 2**30:.3g} GiB free: make the model, batch or sample count smaller"
        )
