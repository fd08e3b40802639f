"""Evaluation and generation from a saved checkpoint (behind `seqmatch eval` and `generate`).

Plain arguments in, plain results out: the command line builds them, and so can a user. The
sampling settings and ``allow_backspace`` default to what the checkpoint was trained with.
"""

from __future__ import annotations

from typing import Any

import torch

from agents.evaluation.evaluate import data_accuracy, evaluate, parse_task_args
from agents.generate import generate
from agents.training.checkpoint import CheckpointError
from agents.training.trainer import load_policy
from seqenv.tasks import Task, make_task
from seqenv.trajectory import load_demonstrations

MAX_EPISODES = 1_000_000
"""More held-out episodes than any evaluation needs; a larger count is a typo, not a request."""


def checkpoint_task(
    metadata: dict[str, Any], name: str | None = None, task_args: str = "{}"
) -> Task:
    """The checkpoint's task, or another task whose vocabulary must be the checkpoint's."""
    if name is None:
        task = make_task(metadata["task"]["name"], **metadata["task"]["kwargs"])
    else:
        task = make_task(name, **parse_task_args(task_args))
    if task.vocab.to_json() != metadata["vocab"]:
        raise CheckpointError(
            f"the checkpoint's vocabulary does not match task {task.name!r} "
            f"({metadata['vocab'].get('kind')} vocabulary of the checkpoint)"
        )
    return task


def trained_settings(metadata: dict[str, Any]) -> dict[str, Any]:
    """What evaluation takes over from training: the MDP, the backspace rule, the sampling."""
    config = metadata.get("config", {})
    return {
        "max_length": int(metadata["max_length"]),
        "max_steps": int(metadata["max_steps"]),
        "allow_backspace": bool(config.get("backspace", True)),
        "greedy": config.get("eval_greedy"),
        "temperature": float(config.get("temperature", 1.0)),
    }


def evaluate_checkpoint(
    checkpoint: str,
    *,
    task: str | None = None,
    task_args: str = "{}",
    data: str | None = None,
    episodes: int = 256,
    seed: int = 0,
    device: str = "auto",
    full: bool = True,
) -> dict[str, float]:
    """The task's metrics on held-out prompts, and exact match on ``data`` when given.

    Returns:
        ``task/<metric>`` for the metrics of :func:`agents.evaluation.evaluate.evaluate`, and
        ``data/<metric>`` for :func:`agents.evaluation.evaluate.data_accuracy` on ``data``.
    """
    if not 1 <= episodes <= MAX_EPISODES:
        raise ValueError(f"--episodes must be in [1, {MAX_EPISODES}], got {episodes}")
    policy, metadata = load_policy(checkpoint, device)
    the_task = checkpoint_task(metadata, task, task_args)
    settings = trained_settings(metadata)
    demos = load_demonstrations(data, the_task.vocab, settings["max_length"]) if data else None
    result = evaluate(
        policy, the_task, **settings, episodes=episodes, seed=seed, full=full, mauve=False
    )
    metrics = {f"task/{k}": v for k, v in result.metrics.items()}
    if demos is not None:
        found = data_accuracy(
            policy, demos, max_length=settings["max_length"], max_steps=settings["max_steps"]
        )
        metrics.update({f"data/{k}": v for k, v in found.items()})
    return metrics


def generate_from_checkpoint(
    checkpoint: str,
    prompt: str,
    *,
    num: int = 1,
    greedy: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int = 0,
    device: str = "auto",
) -> list[tuple[str, str]]:
    """``num`` continuations of ``prompt``: (final text, action trace) pairs."""
    if num < 1:
        raise ValueError(f"--num must be >= 1, got {num}")
    policy, metadata = load_policy(checkpoint, device)
    task = checkpoint_task(metadata)
    vocab = task.vocab
    settings = trained_settings(metadata)
    torch_device = next(policy.parameters()).device
    generator = torch.Generator(torch_device).manual_seed(seed)
    out = generate(
        policy,
        [vocab.encode(prompt)] * num,
        max_length=settings["max_length"],
        max_steps=settings["max_steps"],
        allow_backspace=settings["allow_backspace"],
        greedy=greedy,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        generator=generator,
    )
    return [
        (vocab.decode(g), vocab.decode(t.actions))
        for t, g in zip(out.trajectories, out.generated, strict=True)
    ]
