"""The `seqmatch` command: one typed config per subcommand, parsed by tyro.

Errors from bad input print one line on stderr and exit non-zero (2 for a command line that does
not parse, 1 for a value or file that is rejected); ``--debug`` (anywhere on the command line)
shows the traceback, or tyro's full message, instead.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, SupportsFloat

import numpy as np
import tyro

from agents.experiments.compare import CompareConfig
from agents.training.config import TrainConfig

# Exceptions that mean "the input was bad", as opposed to a bug: reported in one line.
USER_ERRORS: tuple[type[BaseException], ...] = (
    ValueError,
    FileNotFoundError,
    PermissionError,
    IsADirectoryError,
    NotADirectoryError,
    KeyError,
    TypeError,
)


@dataclass
class ShowConfig:
    """Play one expert demonstration of a task, with noise and backspaces, via SequenceGen-v0."""

    task: str = "arithmetic"
    """Task name: arithmetic, dyck or text."""
    seed: int = 0
    """Seed of the prompt and of the noise."""
    noise: float = 0.3
    """Noise level p: probability of a mistake (then a backspace) before each expert action."""
    corpus: str | None = None
    """Text file or folder, for the text task."""


def show(config: ShowConfig) -> None:
    """Print each state of an augmented demonstration as the environment steps through it."""
    import gymnasium as gym

    import seqenv
    from seqenv.env import SequenceGenEnv
    from seqenv.trajectory import augment, random_noise

    kwargs: dict[str, Any] = {"corpus": config.corpus} if config.corpus else {}
    env = gym.make(seqenv.ENV_ID, task=config.task, **kwargs)
    base = env.unwrapped
    assert isinstance(base, SequenceGenEnv)
    rng = np.random.default_rng(config.seed)
    example = base.task.sample(rng)
    demo = augment(
        base.task.demonstration(example, base.max_length),
        random_noise(base.vocab.special),
        p=config.noise,
        rng=rng,
        max_length=base.max_length,
        max_steps=base.max_steps,
    )
    _, info = env.reset(seed=config.seed, options={"prompt": list(demo.prompt)})
    print(f"prompt: {info['text']!r}")
    reward: SupportsFloat = 0.0
    for action in demo.actions.tolist():
        _, reward, terminated, truncated, info = env.step(action)
        name = {base.vocab.eos_id: "<eos>", base.vocab.backspace_id: "<bkspc>"}.get(
            action, repr(base.vocab.decode([action]))
        )
        print(f"  {name:>9} -> {info['generated']!r}")
    end = "terminated" if terminated else "truncated" if truncated else "running"
    print(f"{end} after {demo.num_steps} steps ({demo.num_backspaces} backspaces), reward {reward}")


def _write_json(path: str | None, document: dict[str, Any]) -> None:
    """Write ``document`` atomically (a temporary file, then a rename): never a partial file."""
    if path is None:
        return
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp")
    tmp.write_text(json.dumps(document, indent=2) + "\n")
    os.replace(tmp, target)


def train(config: TrainConfig) -> None:
    """Train an agent; print and optionally write the final evaluation."""
    from agents.training.trainer import Trainer

    trainer = Trainer(config)
    metrics = trainer.train()
    if trainer.is_main:
        for key, value in metrics.items():
            print(f"{key}: {value:.4f}")
        _write_json(
            config.json,
            {"step": trainer.step, "metrics": metrics, "config": dataclasses.asdict(config)},
        )


@dataclass
class EvalConfig:
    """Evaluate a checkpoint: the task's score on held-out prompts, or exact match on your data."""

    checkpoint: str
    """Checkpoint folder written by `seqmatch train --save`."""
    data: str | None = None
    """JSONL file (or `datasets` folder) of {"prompt"} or {"prompt", "completion"} records: one
    generation per record, exact-match accuracy on those with a completion."""
    output: str | None = None
    """Write the generations of --data to this JSONL file (one line per record)."""
    task: str | None = None
    """Evaluate on this task instead of the checkpoint's (its vocabulary must match)."""
    task_args: str = "{}"
    """The task's keyword arguments as JSON (with --task)."""
    episodes: int = 256
    """Held-out prompts of the task to evaluate on."""
    seed: int = 0
    greedy: bool | None = None
    """Greedy decoding; default: as the checkpoint's run evaluated (greedy for arithmetic)."""
    temperature: float | None = None
    """Sampling temperature; default: the checkpoint's."""
    top_k: int | None = None
    top_p: float | None = None
    json: str | None = None
    """Write the metrics to this JSON file."""
    device: str = "auto"


def evaluate(config: EvalConfig) -> None:
    from agents.evaluation.evaluate import evaluate_checkpoint

    metrics = evaluate_checkpoint(config)
    for key, value in metrics.items():
        print(f"{key}: {value:.4f}")
    _write_json(config.json, {"checkpoint": config.checkpoint, "metrics": metrics})


@dataclass
class GenerateConfig:
    """Continue a prompt with a trained policy (backspaces applied; --trace shows them)."""

    checkpoint: str
    """Checkpoint folder written by `seqmatch train --save`."""
    prompt: str
    """The text to continue."""
    num: int = 1
    """Number of samples."""
    greedy: bool | None = None
    """Greedy decoding; default: as the checkpoint's run evaluated (greedy for arithmetic)."""
    temperature: float | None = None
    """Sampling temperature; default: the checkpoint's."""
    top_k: int | None = None
    top_p: float | None = None
    seed: int = 0
    trace: bool = False
    """Also print each action, backspaces included."""
    device: str = "auto"


def generate_text(config: GenerateConfig) -> None:
    from agents.evaluation.evaluate import generate_from_checkpoint

    for text, trace in generate_from_checkpoint(config):
        print(text)
        if config.trace:
            print(f"  actions: {trace}")


@dataclass
class ExportConfig:
    """Merge a pretrained-LM checkpoint's adapters into a plain transformers folder."""

    checkpoint: str
    """Checkpoint folder written by `seqmatch train --model ... --save`."""
    out: str
    """Folder to write (AutoModelForCausalLM.from_pretrained reads it; <bkspc> is its last row)."""


def export(config: ExportConfig) -> None:
    from agents.evaluation.evaluate import export_checkpoint

    print(f"wrote {export_checkpoint(config.checkpoint, config.out)}")


def compare(config: CompareConfig) -> None:
    """Run the comparison, print the table and say where the outputs are."""
    from agents.experiments.compare import run_compare
    from agents.experiments.report import table, verdicts

    results = run_compare(config)
    print(table(results))
    print("\n".join(verdicts(results)))
    print(
        f"\nwrote {Path(config.out) / 'results.json'}, report.md and plots "
        f"({results['wall_seconds'] / 60:.1f} min)"
    )


def _one_line(box: str) -> str:
    """The first paragraph of one of tyro's error boxes, on one line (borders, colours dropped)."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", box)
    lines = [line.strip().strip("│").strip() for line in text.splitlines()]
    title = ""
    paragraph: list[str] = []
    for line in lines:
        if line.startswith("╭"):
            title = line.strip("╭╮─ ")
        elif not line.strip("─╰╯ "):  # a rule: the end of the first paragraph
            if paragraph:
                break
        else:
            paragraph.append(line)
    return " ".join(" ".join(paragraph).split()) or title or "invalid arguments"


def _parse(config_type: type, args: list[str], prog: str, debug: bool) -> Any:
    """``tyro.cli``, with its multi-line error box turned into one line (unless ``debug``).

    Exits 2 on a parse error, as argparse does; ``--help`` is printed as tyro renders it.
    """
    captured = io.StringIO()
    try:
        with contextlib.redirect_stderr(captured):
            return tyro.cli(config_type, args=args, prog=prog)
    except SystemExit as exit_:
        if exit_.code in (0, None) or debug:
            sys.stderr.write(captured.getvalue())
            raise
        print(
            f"{prog}: error: {_one_line(captured.getvalue())} (see {prog} --help)", file=sys.stderr
        )
        raise SystemExit(2) from None


@dataclass
class BenchConfig:
    """Throughput ratios of the env, the policy and the agents (agents.experiments.throughput)."""

    json: str | None = None
    """Write the figures to this JSON file."""
    quick: bool = False
    """Short measurements (a smoke run)."""
    only: str = "env,policy,agents"
    """Comma-separated groups."""


def bench(config: BenchConfig) -> None:
    """Measure the throughput ratios (:mod:`agents.experiments.throughput`)."""
    from agents.experiments.throughput import main as throughput_main

    argv = ["--only", config.only] + (["--quick"] if config.quick else [])
    argv += ["--json", config.json] if config.json else []
    code = throughput_main(argv)
    if code:
        raise SystemExit(code)


# name -> (config, run, one line for `seqmatch --help`)
COMMANDS: dict[str, tuple[type, Callable[[Any], Any], str]] = {
    "compare": (CompareConfig, compare, "IL against MLE on a task: train, evaluate, report"),
    "train": (TrainConfig, train, "train an agent (mle, bc, sequencematch) on a task"),
    "eval": (EvalConfig, evaluate, "evaluate a checkpoint on the task or on your data"),
    "generate": (GenerateConfig, generate_text, "continue a prompt with a checkpoint"),
    "export": (ExportConfig, export, "merge a --model checkpoint into a transformers folder"),
    "show": (ShowConfig, show, "play an augmented demonstration through the environment"),
    "bench": (BenchConfig, bench, "throughput ratios of the env, the policy and the agents"),
}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `seqmatch` command."""
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args
    args = [a for a in args if a != "--debug"]
    if not args or args[0] not in COMMANDS:
        names = ", ".join(COMMANDS)
        if args and args[0] in ("-h", "--help"):
            print(f"usage: seqmatch {{{names}}} [--help] [--debug] ...")
            print(__doc__)
            for name, (_, _, summary) in COMMANDS.items():
                print(f"  {name:<10} {summary}")
            return 0
        given = f"unknown command {args[0]!r}" if args else "no command given"
        print(f"seqmatch: error: {given}; commands: {names}", file=sys.stderr)
        return 2
    name, rest = args[0], args[1:]
    config_type, run, _ = COMMANDS[name]
    try:
        config = _parse(config_type, rest, f"seqmatch {name}", debug)
    except SystemExit as exit_:  # --help (0) or a command line that does not parse (2)
        return exit_.code if isinstance(exit_.code, int) else 2
    try:
        if isinstance(config, TrainConfig):
            config.validate()
        run(config)
    except USER_ERRORS as err:
        if debug:
            raise
        message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        print(f"seqmatch {name}: error: {message}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
