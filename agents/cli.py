"""The `seqmatch` command: one typed config per subcommand, parsed by tyro.

Errors from bad input print one line on stderr and exit non-zero (2 for a command line that does
not parse, 1 for a value or file that is rejected, 130 for Ctrl-C); ``--debug`` (anywhere on the
command line) shows the traceback, or tyro's full message, instead. Anything else is a bug and
shows its traceback.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import math
import os
import re
import signal
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, SupportsFloat, TypeVar


@contextlib.contextmanager
def _ctrl_c_exits() -> Iterator[None]:
    """Ctrl-C while the modules below load (a second or two): one line and exit 130, as later.

    Python's own handler would print a traceback from inside torch's import. Only where that
    handler is in place (a library that set its own, or an ignored SIGINT, is left alone).
    Whatever the interrupted import turns the exit into (numpy's C start-up reports it as an
    ImportError), the interrupt decides the outcome.
    """
    interrupted = False

    def stop(signum: int, frame: Any) -> None:
        nonlocal interrupted
        interrupted = True
        raise SystemExit(130)

    on_main = threading.current_thread() is threading.main_thread()
    if not on_main or signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        yield
        return
    signal.signal(signal.SIGINT, stop)
    try:
        yield
    except BaseException:
        if not interrupted:
            raise
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if interrupted:
        print("seqmatch: interrupted", file=sys.stderr)
        raise SystemExit(130)


with _ctrl_c_exits():
    import numpy as np
    import tyro

    from agents.algorithms import describe_algorithms, resolve_algorithm
    from agents.commands import MAX_SEQUENCES
    from agents.config import RunError, TrainConfig
    from agents.deprecated import renamed_flags
    from agents.experiments.compare_config import CompareConfig
    from agents.outputs import OutputError, check_file, write_json, writes_to_stdout
    from seqenv.disturbance import Disturbance, DisturbanceKind

# Exceptions that mean "the input was bad" or "the run cannot go on for a reason the user can
# act on", as opposed to a bug (KeyError, TypeError, ...: those show their traceback).
USER_ERRORS: tuple[type[BaseException], ...] = (
    ValueError,
    RunError,
    OutputError,
    FileNotFoundError,
    FileExistsError,
    PermissionError,
    IsADirectoryError,
    NotADirectoryError,
)

T = TypeVar("T")


@dataclass
class ShowConfig:
    """Play the expert of a task in the disturbed environment (SequenceGen-v0), step by step."""

    task: str = "arithmetic"
    """Task: arithmetic, dyck, text, a registered name or module:Class."""
    seed: int = 0
    """Seed of the prompt and of the disturbance."""
    disturbance: float = 0.3
    """Disturbance p: the environment replaces a token action by a noise token with this
    chance; the expert then backspaces it and tries again."""
    disturbance_type: DisturbanceKind = "random"
    """random (uniform tokens) or ground_truth (the task's plausible mistakes)."""


def show(config: ShowConfig) -> None:
    """Print each step of the expert acting in the disturbed environment."""
    import gymnasium as gym

    import seqenv
    from seqenv.env import SequenceGenEnv

    disturbance = Disturbance(config.disturbance, config.disturbance_type)  # checks both
    env = gym.make(seqenv.ENV_ID, task=config.task, disturbance=disturbance)
    base = env.unwrapped
    assert isinstance(base, SequenceGenEnv)
    vocab = base.vocab
    example = base.task.sample(np.random.default_rng(config.seed))
    plan = [*example.completion, *([vocab.eos_id] if example.terminal else [])]
    _, info = env.reset(seed=config.seed, options={"prompt": list(example.prompt)})
    print(f"prompt: {info['text']!r}")

    def name(action: int) -> str:
        special = {vocab.eos_id: "<eos>", vocab.backspace_id: "<bkspc>"}
        return special.get(action, repr(vocab.decode([action])))

    reward: SupportsFloat = 0.0
    terminated = truncated = False
    steps = backspaces = 0
    while plan and not (terminated or truncated):
        action = int(plan[0])
        _, reward, terminated, truncated, info = env.step(action)
        steps += 1
        executed = int(info["executed_action"])
        note = f"  (disturbed: {name(executed)} ran)" if executed != action else ""
        print(f"  {name(action):>9} -> {info['generated']!r}{note}")
        if executed != action and not (terminated or truncated):
            _, reward, terminated, truncated, info = env.step(vocab.backspace_id)
            steps += 1
            backspaces += 1
            print(f"  {'<bkspc>':>9} -> {info['generated']!r}")
            continue  # the expert tries the same token again
        plan.pop(0)
    end = "terminated" if terminated else "truncated" if truncated else "running"
    print(f"{end} after {steps} steps ({backspaces} backspaces), reward {reward}")


OUTPUT_RULE = """\
Output paths (agents/outputs.py), checked before any work: a regular file is replaced atomically
(a temporary file and a rename) and keeps its mode; a symlink is followed (the file it names is
written, the link stays); a device or a named pipe (/dev/stdout, /dev/null) is written in place,
never replaced. Refused: a pipe nobody reads, a run's own input, seqmatch's own files (a
checkpoint's pointer and step folders, a folder's marker, manifest and lock) and a folder of
anything else. train --save, compare and export hold their folder's lock: one writer at a time."""


def _quiet_libraries() -> None:
    """--no-progress: no progress bars from transformers and huggingface_hub either."""
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"  # read when transformers is imported
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()


def _report(metrics: dict[str, float], json_path: str | None) -> None:
    """Print the metrics, one a line: on stderr where --json goes to stdout (``| jq``)."""
    stream = sys.stderr if writes_to_stdout(json_path) else sys.stdout
    for key, value in metrics.items():
        print(f"{key}: {value:.4f}", file=stream)


def train(config: TrainConfig) -> None:
    """Train an agent; print and optionally write the final evaluation."""
    from agents.training.trainer import Trainer

    if not config.progress:
        _quiet_libraries()
    if config.json is not None:
        check_file(config.json, "--json", [("--data", config.data), ("--model", config.model)])
    spec = resolve_algorithm(config.agent)
    if not spec.cls.trains:
        raise ValueError(
            f"agent {config.agent!r} is a baseline never trained: use seqmatch compare"
        )
    config = spec.configure(config)  # the settings a preset fixes
    trainer = Trainer(config)
    metrics = trainer.train()
    if trainer.is_main:
        _report(metrics, config.json)
        if config.json is not None:
            config_json = dataclasses.asdict(config)
            document = {"step": trainer.step, "metrics": metrics, "config": config_json}
            write_json(config.json, document, "--json", indent=2)


@dataclass
class EvalConfig:
    """Evaluate a checkpoint: the task's score on held-out prompts, or exact match on your data."""

    checkpoint: str
    """Checkpoint folder written by `seqmatch train --save`."""
    data: str | None = None
    """JSONL file (or `datasets` folder) of {"prompt"} or {"prompt", "completion"} records: one
    generation per record, exact-match accuracy on those with a completion."""
    output: str | None = None
    """Write the generations of --data to this JSONL file (one line per record); as --json, it
    may not be an input (--data, --checkpoint)."""
    task: str | None = None
    """Evaluate on this task instead of the checkpoint's (its vocabulary must match)."""
    task_args: str = "{}"
    """The task's keyword arguments as JSON (with --task)."""
    episodes: int = 256
    """Held-out prompts of the task to evaluate on."""
    seed: int = 0
    """Seed of the held-out prompts and of sampling."""
    greedy: bool | None = None
    """Greedy decoding; default: as the checkpoint's run evaluated (greedy for arithmetic)."""
    temperature: float | None = None
    """Sampling temperature; default: the checkpoint's."""
    top_k: int | None = None
    """Sample from the k most likely actions only, >= 1; no cut if unset."""
    top_p: float | None = None
    """Nucleus sampling: the smallest set of actions whose probability reaches p, in (0, 1]."""
    json: str | None = None
    """Write the metrics to this JSON file (/dev/stdout: the JSON alone on stdout, the lines
    printed go to stderr)."""
    device: str = "auto"
    """auto (cuda when available), cpu, cuda or cuda:N."""


def evaluate(config: EvalConfig) -> None:
    """Evaluate a checkpoint: print its metrics, optionally write them as JSON."""
    from agents.commands import evaluate_checkpoint
    from agents.outputs import resolved

    if config.episodes > MAX_SEQUENCES:
        raise ValueError(f"--episodes must be <= {MAX_SEQUENCES}, got {config.episodes}")
    _check_sampling(config.temperature, config.top_k, config.top_p)
    inputs = [("--checkpoint", config.checkpoint), ("--data", config.data)]
    for flag, path in (("--json", config.json), ("--output", config.output)):
        if path is not None:
            check_file(path, flag, inputs)
    if config.json and config.output and resolved(config.json) == resolved(config.output):
        raise ValueError(f"--json and --output name the same file ({config.output})")
    _check_generation_memory(config.checkpoint, config.episodes, config.device)
    metrics = _generation(
        lambda: evaluate_checkpoint(
            config.checkpoint,
            task=config.task,
            task_args=config.task_args,
            data=config.data,
            output=config.output,
            episodes=config.episodes,
            seed=config.seed,
            greedy=config.greedy,
            temperature=config.temperature,
            top_k=config.top_k,
            top_p=config.top_p,
            device=config.device,
        )
    )
    _report(metrics, config.json)
    if config.json is not None:
        document = {"checkpoint": config.checkpoint, "metrics": metrics}
        write_json(config.json, document, "--json", indent=2)


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
    """Sample from the k most likely actions only, >= 1; no cut if unset."""
    top_p: float | None = None
    """Nucleus sampling: the smallest set of actions whose probability reaches p, in (0, 1]."""
    seed: int = 0
    """Seed of sampling."""
    trace: bool = False
    """Also print each action, backspaces included."""
    device: str = "auto"
    """auto (cuda when available), cpu, cuda or cuda:N."""


def generate_text(config: GenerateConfig) -> None:
    """Continue a prompt with a checkpoint's policy and print each sample."""
    from agents.commands import generate_from_checkpoint

    if config.num > MAX_SEQUENCES:
        raise ValueError(f"--num must be <= {MAX_SEQUENCES}, got {config.num}")
    _check_sampling(config.temperature, config.top_k, config.top_p)
    _check_generation_memory(config.checkpoint, config.num, config.device)
    pairs = _generation(
        lambda: generate_from_checkpoint(
            config.checkpoint,
            config.prompt,
            num=config.num,
            greedy=config.greedy,
            temperature=config.temperature,
            top_k=config.top_k,
            top_p=config.top_p,
            seed=config.seed,
            device=config.device,
        )
    )
    for text, trace in pairs:
        print(text)
        if config.trace:
            print(f"  actions: {trace}")


def _check_sampling(temperature: float | None, top_k: int | None, top_p: float | None) -> None:
    """Refuse sampling settings out of range (one line), before loading anything."""
    if temperature is not None and not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"--temperature must be finite and > 0, got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"--top-k must be >= 1, got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"--top-p must be in (0, 1], got {top_p}")


def _check_generation_memory(checkpoint: str, num_sequences: int, device: str) -> None:
    """Refuse, before loading, a generation batch that cannot fit (a rough estimate).

    A checkpoint whose sizes cannot be read passes here: loading it reports what is wrong.
    """
    from agents.config import resolve_device
    from agents.training.checkpoint import CheckpointError, read_metadata
    from agents.training.memory import check_memory, policy_bytes
    from seqenv.vocab import vocab_from_json

    try:
        metadata = read_metadata(checkpoint)
        num_actions = vocab_from_json(metadata["vocab"]).special.num_actions
        T = int(metadata["max_length"]) + int(metadata["max_steps"])
        need = policy_bytes(metadata["model"], num_actions, num_sequences, T)
    except (CheckpointError, KeyError, TypeError, ValueError, AttributeError):
        return
    check_memory(need, resolve_device(device), f"{num_sequences} sequences with this model")


def _generation(run: Callable[[], T]) -> T:
    """``run()``, with an allocation that fails anyway as a one-line RunError."""
    import torch

    try:
        return run()
    except (MemoryError, torch.OutOfMemoryError) as err:
        raise RunError(f"out of memory while generating ({type(err).__name__}); ask for fewer "
                       "samples") from None  # fmt: skip
    except RuntimeError as err:  # torch's CPU allocator: "DefaultCPUAllocator: can't allocate"
        if "can't allocate memory" not in str(err):
            raise
        raise RunError("out of memory while generating; ask for fewer samples") from None


@dataclass
class ExportConfig:
    """Merge a pretrained-LM checkpoint's adapters into a plain transformers folder."""

    checkpoint: str
    """Checkpoint folder written by `seqmatch train --model ... --save`."""
    out: str
    """Folder to write (AutoModelForCausalLM.from_pretrained reads it; <bkspc> is its last row):
    a new or empty folder, which becomes seqmatch's (a marker, a manifest of its files, a lock
    while it is written); a folder of anything else is refused."""
    overwrite: bool = False
    """Replace an export seqmatch wrote in --out (only the files its manifest lists go)."""


def export(config: ExportConfig) -> None:
    """Export a pretrained-LM checkpoint as a plain transformers folder."""
    from agents.commands import check_export_target, export_checkpoint

    check_export_target(config.out, config.checkpoint, config.overwrite)  # before any loading
    _quiet_libraries()  # the merged model's "Writing model shards" bar
    print(f"wrote {export_checkpoint(config.checkpoint, config.out, config.overwrite)}")


def compare(config: CompareConfig) -> None:
    """Run the comparison, print the table and say where the outputs are."""
    from agents.experiments.compare import run_compare
    from agents.experiments.report import table, verdicts
    from agents.experiments.storage import check_out

    if config.threads is not None and config.threads < 0:
        raise ValueError(f"--threads must be >= 0 (0: torch's default), got {config.threads}")
    inputs = [("--config", config.config), ("--model", config.model), ("--data", config.data)]
    check_out(Path(config.out), inputs)
    if not config.progress:
        _quiet_libraries()
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


def _description(config_type: type) -> str | None:
    """The ``--help`` text above the flags: train's lists the registered agents."""
    if config_type is not TrainConfig:
        return None  # tyro's: the config's docstring
    return (
        "Train an agent on a task. Agents (--agent NAME), from agents.algorithms:\n\n"
        + describe_algorithms()
        + "\n\nor --agent module:Class, an Algorithm subclass of yours (--agent-args JSON gives "
        "its own settings)."
    )


def _parse(config_type: type, args: list[str], prog: str, debug: bool) -> Any:
    """``tyro.cli``, with its multi-line error box turned into one line (unless ``debug``).

    Exits 2 on a parse error, as argparse does; ``--help`` is printed as tyro renders it.
    """
    captured = io.StringIO()
    try:
        with contextlib.redirect_stderr(captured):
            return tyro.cli(
                config_type, args=args, prog=prog, description=_description(config_type)
            )
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

    if config.json is not None:
        check_file(config.json, "--json")
    argv = ["--only", config.only] + (["--quick"] if config.quick else [])
    argv += ["--json", config.json] if config.json else []
    code = throughput_main(argv)
    if code:
        raise SystemExit(code)


# name -> (config, run, one line for `seqmatch --help`)
COMMANDS: dict[str, tuple[type, Callable[[Any], Any], str]] = {
    "compare": (CompareConfig, compare, "IL against MLE on a task: train, evaluate, report"),
    "train": (
        TrainConfig,
        train,
        "train an agent (--agent: mle, bc, sequencematch, ...) on a task",
    ),
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
            print(f"\n{OUTPUT_RULE}")
            return 0
        given = f"unknown command {args[0]!r}" if args else "no command given"
        print(f"seqmatch: error: {given}; commands: {names}", file=sys.stderr)
        return 2
    name, rest = args[0], renamed_flags(args[1:], args[0])
    config_type, run, _ = COMMANDS[name]
    try:
        config = _parse(config_type, rest, f"seqmatch {name}", debug)
    except SystemExit as exit_:  # --help (0) or a command line that does not parse (2)
        return exit_.code if isinstance(exit_.code, int) else 2
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"seqmatch {name}: interrupted", file=sys.stderr)
        return 130
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
    except KeyboardInterrupt as err:  # Ctrl-C: the trainer saved a checkpoint if it could
        if debug:
            raise
        message = str(err).strip() or "interrupted"
        print(f"seqmatch {name}: {message}", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
