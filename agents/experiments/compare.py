"""`seqmatch compare`: imitation learning against MLE on a task, with seeds and intervals.

The 2x2 ablation {MLE, SequenceMatch} x {with, without backspace}, the two BC labellings of the
disturbed demonstrations (docs/method.md §5), and the RL peer:

    mle                       teacher forcing on clean data; backspace never used
    bc                        BC on the disturbed demonstrations, intended actions (MLE+<bkspc>)
    bc_executed               the same demonstrations, executed actions as labels: noise tokens
                              are targets (the paper's scheme)
    sequencematch             SequenceMatch (chi^2-mixture) in the disturbed environment
    sequencematch_eta0        the same run with the SequenceMatch term's weight at 0: its warm
                              start's objective (BC with the level penalty) throughout, the
                              ablation that shows what the SequenceMatch term itself adds
    sequencematch_no_bkspc    SequenceMatch without backspace (clean data, backspace masked)
    ppo                       stable-baselines3 PPO on the task reward (arithmetic, dyck only)
    untuned                   the pretrained LM as loaded, no update (with --model only; its
                              <bkspc> row is masked, as for MLE): the baseline a fine-tune must beat

Every metric is measured twice: in the clean environment, and under the training disturbance
(``disturbed/<metric>``: can the agent repair errors it did not choose?).

Every agent is trained with N seeds, then evaluated on held-out prompts with the task's metrics
(:func:`agents.evaluation.evaluate.evaluate`); results are aggregated as mean and 95% interval over
seeds (a percentile bootstrap over seeds, and over each seed's evaluation episodes where a run gives
them: :mod:`agents.experiments.summary`). Outputs under ``--out``: ``results.json``, ``report.md``,
PNG plots, TensorBoard runs, and one file per finished run, ``runs/<agent>-s<seed>.json``
(``sweep/runs/...`` for the sweep), written when the run ends: ``{"format": 1, "config": ..., "row":
...}`` where ``config`` is what decides the run's result
(:func:`agents.experiments.storage.runs_config`: the config without the keys that change no run,
with the library's training defaults under ``library_defaults``) and ``row`` the run's row of
results.json. A stopped comparison resumes from these files (a run with ``train.save_interval`` also
from its last checkpoint, ``checkpoints/<run>``); results.json and report.md are rebuilt after every
run. The folder is seqmatch's (:mod:`agents.outputs`): a marker, ``seqmatch-comparison``, a manifest
of what the comparison wrote there (all that ``--overwrite`` removes), and a lock held while a
comparison runs, so that a second one fails at once.

The comparison's config is :mod:`agents.experiments.compare_config`'s; one run is
:mod:`agents.experiments.single_run`'s, the run files and resume
:mod:`agents.experiments.storage`'s, the worker processes :mod:`agents.experiments.pool`'s.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from agents.algorithms import resolve_algorithm
from agents.config import resolve_device
from agents.evaluation.evaluate import human_text_metrics
from agents.experiments.compare_config import CompareConfig, comparison_task, load_config
from agents.experiments.pool import run_parallel, sigterm_as_interrupt
from agents.experiments.report import strict_json, write_outputs
from agents.experiments.single_run import run_in_worker, run_spec
from agents.experiments.storage import (
    RUN_FORMAT,
    RunSpec,
    check_out,
    clear_unfinished,
    prepare_out,
    read_run,
    runs_config,
    spec_entries,
    write_json_atomic,
)
from agents.experiments.summary import aggregate, check_targets, convergence, differences
from agents.outputs import claimed, record

PLOT_INTERVAL = 60.0
"""Seconds between redraws of the plots while runs finish (results.json and report.md are
rewritten after every run; the plots at most this often, and at the end)."""


def _specs(config: dict[str, Any], out: Path) -> list[RunSpec]:
    """Every run of the comparison, main runs first, then the sweep's."""
    seeds = range(int(config["seeds"]))
    specs = [RunSpec(agent, seed, out) for agent in config["agent_list"] for seed in seeds]
    sweep = config.get("sweep")
    if sweep:
        for agent in sweep.get("agents", ["bc", "sequencematch"]):
            for value in sweep["values"]:
                overrides = ((str(sweep["param"]), value),)
                specs += [RunSpec(agent, seed, out / "sweep", overrides) for seed in seeds]
    return specs


def run_compare(options: CompareConfig) -> dict[str, Any]:
    """Run the comparison (the runs not finished yet) and write its outputs.

    Each run's row is written to its file as the run ends, and results.json, report.md and the
    plots are rebuilt from the finished runs after each one, so a stopped comparison keeps a
    partial report and resumes where it stopped. The ``--out`` folder's lock is held
    throughout: a second comparison there fails at once (:mod:`agents.outputs`).

    Returns:
        results.json's content.
    """
    check_out(Path(options.out))  # a user's folder is refused before its lock file is made
    with claimed(options.out, "--out"):
        return _run_compare(options)


def _run_compare(options: CompareConfig) -> dict[str, Any]:
    config = load_config(options)
    if options.jobs < 1:
        raise ValueError(f"--jobs must be >= 1, got {options.jobs}")
    out = Path(options.out)
    task = comparison_task(config)
    out.mkdir(parents=True, exist_ok=True)
    kept = prepare_out(out, config, options.resume, options.overwrite)
    if options.threads:
        torch.set_num_threads(options.threads)  # 0 or None: torch's own default
    progress = options.progress and sys.stderr.isatty() and options.jobs == 1
    started = time.perf_counter()
    specs = _specs(config, out)
    todo = [s for s in specs if not s.path.exists()]
    if kept:
        print(
            f"[compare] resuming in {out}: {len(specs) - len(todo)} of {len(specs)} runs done",
            file=sys.stderr,
            flush=True,
        )
    for spec in todo:  # a stopped run's TensorBoard folder, then what each run will write
        clear_unfinished(out, out / spec_entries(out, spec)[1])
    record(out, *(entry for spec in todo for entry in spec_entries(out, spec)))
    wanted = runs_config(config)
    done = len(specs) - len(todo)
    reference = {}
    if task.name == "text":  # where a text statistic saturates, the human value shows it
        episodes = int(config.get("eval", {}).get("episodes", 200))
        reference["human_text"] = human_text_metrics(task, episodes)

    # A resumed comparison's wall time includes the sessions before it (its last results.json).
    earlier = _earlier_wall_seconds(out) if kept else 0.0

    def elapsed() -> float:
        return earlier + time.perf_counter() - started

    def finish(spec: RunSpec, row: dict[str, Any]) -> None:
        nonlocal done
        record = {"format": RUN_FORMAT, "config": wanted, "row": row}
        write_json_atomic(spec.path, strict_json(record))  # strict JSON: NaN becomes null
        done += 1
        seconds = row.get("train_seconds", 0.0) + row.get("eval_seconds", 0.0)
        print(
            f"[compare] {done}/{len(specs)} done: {spec.describe()} ({seconds:.0f} s)",
            file=sys.stderr,
            flush=True,
        )
        redraw = time.perf_counter() - plotted[0] > PLOT_INTERVAL
        if redraw:
            plotted[0] = time.perf_counter()
        build_results(config, options, out, specs, elapsed(), reference, with_plots=redraw)

    plotted = [time.perf_counter()]
    # `kill` stops the comparison as Ctrl-C does: workers terminated, partial report kept.
    with sigterm_as_interrupt():
        try:
            if options.jobs == 1:
                for spec in todo:
                    print(f"[compare] {spec.describe()}", file=sys.stderr, flush=True)
                    finish(spec, run_spec(config, task, spec, options.device, progress))
            elif todo:
                _run_parallel(config, todo, options, finish)
        except BaseException:
            if done:  # a stopped comparison keeps a partial report of what finished
                build_results(config, options, out, specs, elapsed(), reference)
            raise
    return build_results(config, options, out, specs, elapsed(), reference)


def _earlier_wall_seconds(out: Path) -> float:
    """The wall time recorded by the comparison in ``out`` before this session (0 if none)."""
    try:
        value = json.loads((out / "results.json").read_text()).get("wall_seconds", 0.0)
    except (OSError, ValueError, AttributeError):
        return 0.0
    return float(value) if isinstance(value, int | float) and math.isfinite(value) else 0.0


def _run_parallel(
    config: dict[str, Any],
    todo: Sequence[RunSpec],
    options: CompareConfig,
    finish: Callable[[RunSpec, dict[str, Any]], None],
) -> None:
    """Run ``todo`` in ``options.jobs`` worker processes (:mod:`agents.experiments.pool`).

    ``finish`` takes each run as it ends; on any exception (Ctrl-C included) the runs in progress
    are lost (they rerun on resume), the finished ones are already on disk.
    """
    # Runs with rollouts (SequenceMatch's) are the longest: started first, none is left alone
    # at the end while the other cores idle.
    todo = sorted(todo, key=lambda spec: not resolve_algorithm(spec.agent).cls.needs_rollouts)
    tasks = [(config, spec, options.device, options.threads) for spec in todo]
    run_parallel(run_in_worker, tasks, options.jobs, lambda done: finish(*done))


def named_model(config: dict[str, Any], command: str) -> tuple[dict[str, Any], str]:
    """``config`` and ``command`` with a pretrained model named by its file and sha256.

    The path a model had on one machine says nothing on another; its file name and content
    hash say which model it was. Without ``train.model`` both come back unchanged.
    """
    path = config.get("train", {}).get("model")
    if not path:
        return config, command
    identity = model_identity(path)
    train = {**config["train"], "model": identity}
    return {**config, "train": train}, command.replace(str(path), identity["file"])


_IDENTITIES: dict[tuple[str, int, int], dict[str, str]] = {}


def model_identity(path: str) -> dict[str, str]:
    """``{"file", "sha256"}`` of a model file, or of a model folder's files (in name order)."""
    root = Path(path)
    files = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else [root]
    stats = [f.stat() for f in files]
    key = (str(root.resolve()), sum(s.st_size for s in stats), max(s.st_mtime_ns for s in stats))
    if key not in _IDENTITIES:  # a report is rebuilt after every run: hash each model once
        digest = hashlib.sha256()
        for f in files:
            if root.is_dir():
                digest.update(str(f.relative_to(root)).encode() + b"\0")
            with f.open("rb") as handle:
                for block in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(block)
        _IDENTITIES[key] = {"file": root.name, "sha256": digest.hexdigest()}
    return _IDENTITIES[key]


def build_results(
    config: dict[str, Any],
    options: CompareConfig,
    out: Path,
    specs: Sequence[RunSpec],
    wall_seconds: float,
    reference: dict[str, Any],
    with_plots: bool = True,
) -> dict[str, Any]:
    """results.json's content from the finished runs of ``specs``.

    Written with the report and plots. A comparison with runs still missing is marked
    ``"complete": false``.

    Args:
        config: the comparison's resolved config (task, seeds, train settings, sweep).
        options: the command line's options (device, jobs and threads are recorded).
        out: the comparison's output folder.
        specs: every run of the comparison, finished or not.
        wall_seconds: wall-clock time of the comparison so far.
        reference: measured rows that are not agents (the human text's statistics).
        with_plots: redraw the plots too (seconds; results.json and report.md take little).
    """
    finished = {s: read_run(s.path)["row"] for s in specs if s.path.exists()}
    runs = [row for s, row in finished.items() if not s.overrides]
    sweep_runs = [row for s, row in finished.items() if s.overrides]
    shown, command = named_model(
        {k: v for k, v in config.items() if k != "quick"},
        "seqmatch compare "
        + shlex.join(sys.argv[2:] if sys.argv[1:2] == ["compare"] else sys.argv[1:]),
    )
    results: dict[str, Any] = {
        "task": config["task"],
        "config": shown,
        "command": command,
        "machine": {
            "platform": platform.platform(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "cpus": os.cpu_count(),
            "device": str(resolve_device(options.device)),
            "jobs": options.jobs,
            "threads": options.threads,
        },
        "wall_seconds": wall_seconds,
        "run_seconds": sum(
            r.get("train_seconds", 0.0) + r.get("eval_seconds", 0.0) for r in finished.values()
        ),
        "cpu_seconds": sum(r.get("cpu_seconds", 0.0) for r in finished.values()),
        "complete": len(finished) == len(specs),
        "runs_done": len(finished),
        "runs_total": len(specs),
        "runs": runs,
        "agents": aggregate(runs),
        "differences": differences(runs),
        "targets": check_targets(runs, config.get("targets", [])),
        "convergence": convergence(runs, config),
        "reference": reference,
    }
    sweep = config.get("sweep")
    if sweep_runs and sweep:
        results["sweep"] = {
            "param": sweep["param"],
            "runs": sweep_runs,
            "by_value": {
                agent: aggregate([r for r in sweep_runs if r["agent"] == agent], key="value")
                for agent in sorted({r["agent"] for r in sweep_runs})
            },
        }
    write_outputs(results, out, with_plots)
    return results
