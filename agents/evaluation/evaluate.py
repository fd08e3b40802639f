"""Evaluation and generation from a checkpoint (behind `seqmatch eval` and `seqmatch generate`)."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from agents.evaluation.metrics import episode_metrics, final_generated
from agents.generate import generate
from agents.training.checkpoint import CheckpointError
from agents.training.checkpoint import load_policy
from seqenv.tasks import Task, make_task
from seqenv.trajectory import load_demonstrations

if TYPE_CHECKING:
    from agents.cli import EvalConfig, GenerateConfig


def checkpoint_task(
    metadata: dict[str, Any], name: str | None = None, task_args: str = "{}"
) -> Task:
    """The checkpoint's task, or another task whose vocabulary must be the checkpoint's."""
    if name is None:
        task = make_task(metadata["task"]["name"], **metadata["task"]["kwargs"])
    else:
        try:
            kwargs = json.loads(task_args)
        except json.JSONDecodeError as err:
            raise ValueError(f"--task-args is not valid JSON ({err.msg})") from None
        task = make_task(name, **kwargs)
    if task.vocab.to_json() != metadata["vocab"]:
        raise CheckpointError(
            f"the checkpoint's vocabulary does not match task {task.name!r} "
            f"({metadata['vocab'].get('kind')} vocabulary of the checkpoint)"
        )
    return task


def evaluate_checkpoint(config: EvalConfig) -> dict[str, float]:
    """Greedy episodes on held-out prompts of the task, and exact match on ``config.data``."""
    if config.episodes < 1:
        raise ValueError(f"--episodes must be >= 1, got {config.episodes}")
    policy, metadata = load_policy(config.checkpoint, config.device)
    task = checkpoint_task(metadata, config.task, config.task_args)
    max_length, max_steps = int(metadata["max_length"]), int(metadata["max_steps"])
    demos = load_demonstrations(config.data, task.vocab, max_length) if config.data else None
    prompts = [list(e.prompt) for e in task.examples("test", config.episodes, seed=config.seed)]
    out = generate(policy, prompts, max_length=max_length, max_steps=max_steps, greedy=True)
    metrics = {
        f"task/{k}": v for k, v in episode_metrics(task, out.trajectories, out.generated).items()
    }
    if demos is not None:
        out = generate(
            policy,
            [d.prompt.tolist() for d in demos],
            max_length=max_length,
            max_steps=max_steps,
            greedy=True,
        )
        expected = final_generated(demos)
        exact = [
            t.terminated and got == want
            for t, got, want in zip(out.trajectories, out.generated, expected, strict=True)
        ]
        metrics["data/accuracy"] = float(np.mean(exact))
        metrics["data/examples"] = float(len(demos))
        for key, value in episode_metrics(task, out.trajectories, out.generated).items():
            if key != "score":
                metrics[f"data/{key}"] = value
    return metrics


def generate_from_checkpoint(config: GenerateConfig) -> list[tuple[str, str]]:
    """``config.num`` continuations of ``config.prompt``: (final text, action trace) pairs."""
    if config.num < 1:
        raise ValueError(f"--num must be >= 1, got {config.num}")
    policy, metadata = load_policy(config.checkpoint, config.device)
    task = checkpoint_task(metadata)
    vocab = task.vocab
    prompt = vocab.encode(config.prompt)
    device = next(policy.parameters()).device
    generator = torch.Generator(device).manual_seed(config.seed)
    out = generate(
        policy,
        [prompt] * config.num,
        max_length=int(metadata["max_length"]),
        max_steps=int(metadata["max_steps"]),
        greedy=config.greedy,
        temperature=config.temperature,
        top_k=config.top_k,
        top_p=config.top_p,
        generator=generator,
    )
    return [
        (vocab.decode(g), vocab.decode(t.actions))
        for t, g in zip(out.trajectories, out.generated, strict=True)
    ]
