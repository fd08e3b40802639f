"""Evaluation, generation and export from a checkpoint (`seqmatch eval`, `generate`, `export`).

Plain arguments in, plain results out: the command line builds them, and so can a user. Each
reads only the checkpoint: its vocabulary (the tokenizer, for a pretrained LM), its weights and,
for the text task, the held-out prompts stored at training time, so a corpus is never read again
unless ``task`` asks for one. The backspace rule and the sampling settings default to what the
checkpoint was trained and evaluated with.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from agents import outputs
from agents.config import parse_task_args
from agents.data import load_prompt_records
from agents.evaluation.episodes import backspace_stats
from agents.evaluation.evaluate import default_greedy, evaluate
from agents.generate import generate
from agents.training.checkpoint import TMP_PREFIX, CheckpointError, load_policy, read_metadata
from seqenv.tasks import Example, Split, Task, make_task
from seqenv.vocab import PretrainedVocab, Vocab, VocabularyError, vocab_from_json

MAX_SEQUENCES = 1_000_000
"""More episodes or samples than any evaluation or generation needs: a larger count is a typo."""


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
        """One of the stored prompts (no continuation is stored)."""
        return Example(self.prompts[int(rng.integers(len(self.prompts)))], (), False)

    def examples(self, split: Split, num: int, seed: int = 0) -> list[Example]:
        """The first ``num`` stored prompts (as many as there are)."""
        return [Example(p, (), False) for p in self.prompts[:num]]

    def score(self, prompt: Sequence[int], generated: Sequence[int], terminated: bool) -> float:
        """0: text has no built-in score."""
        return 0.0

    def ground_truth_noise(
        self,
        rng: np.random.Generator,
        prompt: Sequence[int],
        generated: Sequence[int],
        true_next: int,
    ) -> int:
        """Not available: a stored text task has no noise model."""
        raise ValueError("a text checkpoint without its corpus has no ground-truth noise")


def checkpoint_task(
    metadata: dict[str, Any], name: str | None = None, task_args: str = "{}"
) -> Task:
    """The checkpoint's task, or another task whose vocabulary must be the checkpoint's.

    A text checkpoint that stored its test prompts gives :class:`StoredPrompts` (no corpus read).
    """
    try:
        vocab = vocab_from_json(metadata["vocab"])
    except (VocabularyError, KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"checkpoint.json is incomplete or corrupt ({err})") from None
    # A pretrained model's tokenizer is not a task's own vocabulary: build the task on it.
    model_vocab = vocab if isinstance(vocab, PretrainedVocab) else None
    if name is None:
        task_name = metadata["task"]["name"]
        if task_name == "text" and metadata.get("test_prompts"):
            return StoredPrompts(vocab, metadata["test_prompts"], int(metadata["max_length"]))
        task = make_task(task_name, vocab=model_vocab, **metadata["task"]["kwargs"])
    else:
        task = make_task(name, vocab=model_vocab, **parse_task_args(task_args))
    if task.vocab.to_json() != metadata["vocab"]:
        raise CheckpointError(
            f"the checkpoint's vocabulary does not match task {task.name!r} "
            f"({metadata['vocab'].get('kind')} vocabulary of the checkpoint)"
        )
    return task


def trained_settings(metadata: dict[str, Any]) -> dict[str, Any]:
    """What evaluation takes over from training: the MDP and the backspace rule."""
    config = metadata.get("config", {})
    return {
        "max_length": int(metadata["max_length"]),
        "max_steps": int(metadata["max_steps"]),
        "allow_backspace": bool(config.get("backspace", True)),
    }


def sampling_settings(
    metadata: dict[str, Any], greedy: bool | None, temperature: float | None
) -> tuple[bool, float]:
    """(greedy, temperature): the given ones, else what the checkpoint's run evaluated with."""
    config = metadata.get("config", {})
    if greedy is None:
        greedy = config.get("eval_greedy")
        if greedy is None:
            greedy = default_greedy(metadata["task"]["name"])
    if temperature is None:
        temperature = float(config.get("temperature", 1.0))
    if not (np.isfinite(temperature) and temperature > 0):
        raise ValueError(f"--temperature must be finite and > 0, got {temperature}")
    return bool(greedy), temperature


def _write_jsonl(path: str, rows: list[dict[str, Any]]) -> None:
    """Write ``rows`` by the output rule (:mod:`agents.outputs`): atomically, never a link."""
    outputs.write_file(path, "".join(json.dumps(row) + "\n" for row in rows), "--output")


def evaluate_checkpoint(
    checkpoint: str,
    *,
    task: str | None = None,
    task_args: str = "{}",
    data: str | None = None,
    output: str | None = None,
    episodes: int = 256,
    seed: int = 0,
    greedy: bool | None = None,
    temperature: float | None = None,
    top_k: int | None = None,
    top_p: float | None = None,
    device: str = "auto",
) -> dict[str, float]:
    """The task's metrics on held-out prompts, and one generation per record of ``data``.

    Returns:
        ``task/<metric>`` for the metrics of :func:`agents.evaluation.evaluate.evaluate`; with
        ``data``, ``data/accuracy`` (exact match on the records that hold a completion),
        ``data/examples`` and the records' backspace statistics. ``output`` receives the
        generations of ``data`` as JSONL.
    """
    if not 1 <= episodes <= MAX_SEQUENCES:
        raise ValueError(f"--episodes must be in [1, {MAX_SEQUENCES}], got {episodes}")
    metadata = read_metadata(checkpoint)
    the_task = checkpoint_task(metadata, task, task_args)
    settings = trained_settings(metadata)
    max_length, max_steps = settings["max_length"], settings["max_steps"]
    # Read every record before loading the model: a bad file fails fast and writes nothing.
    records = load_prompt_records(data, the_task.vocab, max_length) if data else None
    greedy, temperature = sampling_settings(metadata, greedy, temperature)
    sampling: dict[str, Any] = {
        "greedy": greedy,
        "temperature": temperature,
        "top_k": top_k,
        "top_p": top_p,
    }
    policy, metadata = load_policy(checkpoint, device)
    stored = isinstance(the_task, StoredPrompts)  # no continuations: the cheap metrics only
    result = evaluate(
        policy, the_task, **settings, **sampling, episodes=episodes, seed=seed,
        full=not stored, mauve=False,
    )  # fmt: skip
    metrics = {f"task/{k}": v for k, v in result.metrics.items()}
    if records is None:
        return metrics
    torch_device = next(policy.parameters()).device
    out = generate(
        policy,
        [list(r.prompt_ids) for r in records],
        max_length=max_length,
        max_steps=max_steps,
        allow_backspace=settings["allow_backspace"],
        generator=torch.Generator(torch_device).manual_seed(seed),
        **sampling,
    )
    vocab = the_task.vocab
    texts = [vocab.decode(g) for g in out.generated]
    scored = [
        t.terminated and text == r.completion
        for r, t, text in zip(records, out.trajectories, texts, strict=True)
        if r.completion is not None
    ]
    if scored:
        metrics["data/accuracy"] = float(np.mean(scored))
    metrics["data/examples"] = float(len(records))
    stats = backspace_stats(out.trajectories)
    for key in ("backspace_rate", "termination_rate"):
        metrics[f"data/{key}"] = stats[key]
    metrics["data/length"] = stats["mean_generated_length"]
    if output:
        _write_jsonl(
            output,
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


def generate_from_checkpoint(
    checkpoint: str,
    prompt: str,
    *,
    num: int = 1,
    greedy: bool | None = None,
    temperature: float | None = None,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int = 0,
    device: str = "auto",
) -> list[tuple[str, str]]:
    """``num`` continuations of ``prompt``: (final text, action trace) pairs."""
    if not 1 <= num <= MAX_SEQUENCES:
        raise ValueError(f"--num must be in [1, {MAX_SEQUENCES}], got {num}")
    metadata = read_metadata(checkpoint)
    greedy, temperature = sampling_settings(metadata, greedy, temperature)
    policy, metadata = load_policy(checkpoint, device)
    vocab = vocab_from_json(metadata["vocab"])  # all that generation needs of the task
    ids = vocab.encode(prompt)
    if not ids:
        raise ValueError("--prompt is empty")
    settings = trained_settings(metadata)
    torch_device = next(policy.parameters()).device
    out = generate(
        policy,
        [ids] * num,
        max_length=settings["max_length"],
        max_steps=settings["max_steps"],
        allow_backspace=settings["allow_backspace"],
        greedy=greedy,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        generator=torch.Generator(torch_device).manual_seed(seed),
    )
    return [
        (vocab.decode(g), vocab.decode(t.actions))
        for t, g in zip(out.trajectories, out.generated, strict=True)
    ]


def check_export_target(
    out: str | Path, checkpoint: str | Path, overwrite: bool = False, probe: bool = True
) -> None:
    """Refuse, before loading anything, an ``export --out`` folder that must not be written.

    It must be new, empty, or an export folder seqmatch wrote (replaced with ``overwrite``);
    never the checkpoint or a user's folder (one line each; ``probe``: also refuse a folder
    another process holds).
    """
    out = Path(out)
    outputs.check_folder(out, "--out", "export", [("--checkpoint", str(checkpoint))], probe=probe)
    if out.is_dir() and outputs.has_content(out):
        if outputs.owner(out) != "export":
            raise FileExistsError(
                f"--out {out}: the folder holds files and is not a seqmatch export (refusing to "
                "write into it); choose a new or empty folder"
            )
        if not overwrite:
            raise FileExistsError(
                f"--out {out}: an export is there; pass --overwrite to replace it"
            )
    model = read_metadata(checkpoint).get("model")
    if not (isinstance(model, dict) and model.get("kind") == "hf"):
        raise ValueError(f"{checkpoint}: not a pretrained-LM checkpoint (train with --model)")


def export_checkpoint(checkpoint: str | Path, out: str | Path, overwrite: bool = False) -> Path:
    """Write a pretrained-LM checkpoint as a plain transformers folder (adapters merged).

    The folder is seqmatch's (marker, manifest, lock: :mod:`agents.outputs`): the export is
    written beside it first, then moved in file by file, each listed before it moves; the files
    of an earlier export that this one does not write are removed, nothing else.
    """
    from agents.models.hf import HFPolicy, export_pretrained

    out = Path(out)
    check_export_target(out, checkpoint, overwrite)
    with outputs.claimed(out, "--out"):
        check_export_target(out, checkpoint, overwrite, probe=False)  # again, under the lock
        policy, _ = load_policy(checkpoint, "cpu")
        if not isinstance(policy, HFPolicy):
            raise ValueError(f"{checkpoint}: not a pretrained-LM checkpoint (train with --model)")
        outputs.mark(out, "export")
        tmp = out / f"{TMP_PREFIX}export-{os.getpid()}"
        outputs.record(out, tmp.name)
        try:
            export_pretrained(policy, tmp)
            names = sorted(p.name for p in tmp.iterdir())
            earlier = outputs.listed(out)
            outputs.record(out, *names)
            for name in names:
                if (out / name).exists() and name not in earlier:  # not seqmatch's: kept
                    raise FileExistsError(f"--out {out}: {name} is not seqmatch's; not replaced")
                if (out / name).is_dir() and not (out / name).is_symlink():
                    shutil.rmtree(out / name)
                os.replace(tmp / name, out / name)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        outputs.remove_listed(out, keep=names)
    return out
