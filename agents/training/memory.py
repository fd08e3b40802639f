"""Rough memory estimates, checked before allocating: one clear line instead of a crash."""

from __future__ import annotations

from typing import Any

import torch

from agents.algorithms import resolve_algorithm
from agents.config import RunError, TrainConfig
from seqenv.devices import memory_shortfall


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


def demonstration_bytes(config: TrainConfig, max_length: int) -> int:
    """A rough lower estimate of the memory of a task's demonstrations, in bytes.

    The training set and the held-out ones, each a Python object with two small arrays: about
    530 bytes for a dyck demonstration (buffer 30) and 1.1 KB for arithmetic (135), measured.
    """
    return (config.num_demonstrations + config.eval_episodes) * (400 + 4 * max_length)


def check_host_memory(config: TrainConfig, max_length: int, world_size: int = 1) -> None:
    """RunError (one line) where what a run keeps in host memory cannot fit, before any of it.

    The task's demonstrations (unless --data gives them), and SequenceMatch's pool of
    length-bucketed model batches: ``model_batch_buckets`` global model batches of positions
    drawn at once, about 200 bytes each with their lengths.
    """
    cpu = torch.device("cpu")
    if config.data is None:
        what = f"{config.num_demonstrations} demonstrations"
        check_memory(demonstration_bytes(config, max_length), cpu, what,
                     "use fewer --num-demonstrations")  # fmt: skip
    if resolve_algorithm(config.agent).cls.model_rows(config):  # a pool of model batches
        rows = config.model_batch_buckets * config.resolved_model_batch_size * world_size
        what = f"--model-batch-buckets {config.model_batch_buckets} model batches"
        check_memory(200 * rows, cpu, what, "use fewer --model-batch-buckets")


def check_memory(
    num_bytes: int,
    device: torch.device,
    what: str,
    fix: str = "make the model, batch or sample count smaller",
) -> None:
    """RunError (one line) when ``num_bytes`` exceed what ``device`` has free.

    ``fix`` says what to change.
    """
    message = memory_shortfall(num_bytes, device, what, fix)
    if message is not None:
        raise RunError(message)
