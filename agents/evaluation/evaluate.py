"""Evaluation and generation from a checkpoint (behind `seqmatch eval` and `seqmatch generate`).

Both read only the checkpoint: its vocabulary (the tokenizer, for a pretrained LM), its weights
and, for the text task, the held-out prompts stored at training time, so a corpus is never read
again unless ``--task`` asks for one.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch

from agents.data import load_prompt_records
from agents.evaluation.metrics import episode_metrics
from agents.generate import generate
from agents.training.checkpoint import CheckpointError, load_policy, read_metadata
from seqenv.tasks import Example, Split, Task, make_task
from seqenv.vocab import PretrainedVocab, Vocab, vocab_from_json

if TYPE_CHECKING:
    from agents.cli import EvalConfig, GenerateConfig


class StoredPrompts(Task):
    """A text checkpoint's task without its corpus: the vocabulary and the stored test prompts.

    Text has no built-in score, so :meth:`score` is 0, as :class:`seqenv.tasks.text.TextTask`'s.
    """

    name: ClassVar[str] = "text"

    def __init__(self, vocab: Vocab, prompts: Sequence[Sequence[int]], max_length: int) -> None:
        self.vocab = vocab
        self.prompts = [tuple(int(i) for i in p) for p in prompts]
        self.default_max_length = max_length

    def sample(self, rng: np.random.Generator, split: Split = "train") -> Example:
        return Example(self.prompts[int(rng.integers(len(self.prompts)))], (), False)

    def score(self, prompt: Sequence[int], generated: Sequence[int], terminated: bool) -> float:
        return 0.0

    def ground_truth_noise(
        self,
        rng: np.random.Generator,
        prompt: Sequence[int],
        generated: Sequence[int],
        true_next: int,
    ) -> int:
        raise NotImplementedError("a stored text task has no noise model")


def checkpoint_task(
    metadata: dict[str, Any], name: str | None = None, task_args: str = "{}"
) -> Task:
    """The checkpoint's task, or another task whose vocabulary must be the checkpoint's.

    A text checkpoint that stored its test prompts gives :class:`StoredPrompts` (no corpus read).
    """
    vocab = vocab_from_json(metadata["vocab"])
    # A pretrained model's tokenizer is not a task's own vocabulary: build the task on it.
    own_vocab = vocab if isinstance(vocab, PretrainedVocab) else None
    if name is None:
        task_name = metadata["task"]["name"]
        if task_name == "text" and metadata.get("test_prompts"):
            return StoredPrompts(vocab, metadata["test_prompts"], int(metadata["max_length"]))
        task = make_task(task_name, vocab=own_vocab, **metadata["task"]["kwargs"])
    else:
        try:
            kwargs = json.loads(task_args)
        except json.JSONDecodeError as err:
            raise ValueError(f"--task-args is not valid JSON ({err.msg})") from None
        task = make_task(name, vocab=own_vocab, **kwargs)
    if task.vocab.to_json() != metadata["vocab"]:
        raise CheckpointError(
            f"the checkpoint's vocabulary does not match task {task.name!r} "
            f"({metadata['vocab'].get('kind')} vocabulary of the checkpoint)"
        )
    return task


def sampling_settings(
    metadata: dict[str, Any], greedy: bool | None, temperature: float | None
) -> tuple[bool, float]:
    """(greedy, temperature): the given ones, else what the checkpoint's run evaluated with."""
    config = metadata.get("config", {})
    if greedy is None:
        greedy = config.get("eval_greedy")
        if greedy is None:
            greedy = metadata["task"]["name"] == "arithmetic"
    if temperature is None:
        temperature = float(config.get("temperature", 1.0))
    if not temperature > 0:
        raise ValueError(f"--temperature must be > 0, got {temperature}")
    return bool(greedy), temperature


def _write_jsonl(path: str, rows: list[dict[str, Any]]) -> None:
    """Write ``rows`` atomically: a temporary file renamed into place."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp")
    tmp.write_text("".join(json.dumps(row) + "\n" for row in rows))
    os.replace(tmp, target)


def evaluate_checkpoint(config: EvalConfig) -> dict[str, float]:
    """Episodes on held-out prompts of the task; with ``config.data``, one generation per record
    (exact match against the records that hold a completion, written to ``config.output``)."""
    if config.episodes < 1:
        raise ValueError(f"--episodes must be >= 1, got {config.episodes}")
    metadata = read_metadata(config.checkpoint)
    task = checkpoint_task(metadata, config.task, config.task_args)
    max_length, max_steps = int(metadata["max_length"]), int(metadata["max_steps"])
    # Read every record before loading the model: a bad file fails fast and writes nothing.
    records = load_prompt_records(config.data, task.vocab, max_length) if config.data else None
    policy, metadata = load_policy(config.checkpoint, config.device)
    greedy, temperature = sampling_settings(metadata, config.greedy, config.temperature)
    device = next(policy.parameters()).device
    sampling: dict[str, Any] = {
        "greedy": greedy,
        "temperature": temperature,
        "top_k": config.top_k,
        "top_p": config.top_p,
        "generator": torch.Generator(device).manual_seed(config.seed),
    }
    if isinstance(task, StoredPrompts):
        prompts = [list(p) for p in task.prompts[: config.episodes]]
    else:
        prompts = [list(e.prompt) for e in task.examples("test", config.episodes, seed=config.seed)]
    out = generate(policy, prompts, max_length=max_length, max_steps=max_steps, **sampling)
    metrics = {
        f"task/{k}": v for k, v in episode_metrics(task, out.trajectories, out.generated).items()
    }
    if records is not None:
        out = generate(
            policy,
            [list(r.prompt_ids) for r in records],
            max_length=max_length,
            max_steps=max_steps,
            **sampling,
        )
        vocab = task.vocab
        texts = [vocab.decode(g) for g in out.generated]
        scored = [
            t.terminated and text == r.completion
            for r, t, text in zip(records, out.trajectories, texts, strict=True)
            if r.completion is not None
        ]
        if scored:
            metrics["data/accuracy"] = float(np.mean(scored))
        metrics["data/examples"] = float(len(records))
        for key, value in episode_metrics(task, out.trajectories, out.generated).items():
            if key != "score":
                metrics[f"data/{key}"] = value
        if config.output:
            _write_jsonl(
                config.output,
                [
                    {
                        "prompt": r.prompt,
                        "generation": text,
                        "terminated": bool(t.terminated),
                        "actions": vocab.decode(t.actions),
                        **({} if r.completion is None else {"completion": r.completion}),
                    }
                    for r, t, text in zip(records, out.trajectories, texts, strict=True)
                ],
            )
    return metrics


def generate_from_checkpoint(config: GenerateConfig) -> list[tuple[str, str]]:
    """``config.num`` continuations of ``config.prompt``: (final text, action trace) pairs."""
    if config.num < 1:
        raise ValueError(f"--num must be >= 1, got {config.num}")
    policy, metadata = load_policy(config.checkpoint, config.device)
    vocab = vocab_from_json(metadata["vocab"])  # all that generation needs of the task
    prompt = vocab.encode(config.prompt)
    if not prompt:
        raise ValueError("--prompt is empty")
    greedy, temperature = sampling_settings(metadata, config.greedy, config.temperature)
    device = next(policy.parameters()).device
    generator = torch.Generator(device).manual_seed(config.seed)
    out = generate(
        policy,
        [prompt] * config.num,
        max_length=int(metadata["max_length"]),
        max_steps=int(metadata["max_steps"]),
        greedy=greedy,
        temperature=temperature,
        top_k=config.top_k,
        top_p=config.top_p,
        generator=generator,
    )
    return [
        (vocab.decode(g), vocab.decode(t.actions))
        for t, g in zip(out.trajectories, out.generated, strict=True)
    ]


def export_checkpoint(checkpoint: str | Path, out: str | Path) -> Path:
    """Write a pretrained-LM checkpoint as a plain transformers folder (adapters merged)."""
    from agents.models.hf import HFPolicy, export_pretrained

    policy, _ = load_policy(checkpoint, "cpu")
    if not isinstance(policy, HFPolicy):
        raise ValueError(f"{checkpoint}: not a pretrained-LM checkpoint (train with --model)")
    return export_pretrained(policy, out)
