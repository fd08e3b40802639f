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
(:func:`agents.evaluation.evaluate.evaluate`); results are aggregated as mean and 95% interval
over seeds (a percentile bootstrap over seeds, and over each seed's evaluation episodes where a
run gives them: :mod:`agents.experiments.summary`). Outputs under ``--out``: ``results.json``,
``report.md``, PNG plots, TensorBoard runs, and one file per finished run,
``runs/<agent>-s<seed>.json`` (``sweep/runs/...`` for the sweep), written when the run ends:
``{"format": 1, "config": ..., "row": ...}`` where ``config`` is what decides the run's result
(the config without :data:`NOT_RUN_KEYS`, with the library's training defaults under
``library_defaults``) and ``row`` the run's row of results.json. A stopped comparison resumes
from these files (a run with ``train.save_interval`` also from its last
checkpoint, ``checkpoints/<run>``); results.json and report.md are rebuilt after every run.
The folder is seqmatch's (:mod:`agents.outputs`): a marker, ``seqmatch-comparison``, a manifest of
what the comparison wrote there (all that ``--overwrite`` removes), and a lock held while a
comparison runs, so that a second one fails at once.

A comparison is driven by a config: the embedded default (one-digit arithmetic, MLE, BC and
SequenceMatch, about 10 minutes on 2 cores) or a JSON file, named (``configs/NAME.json`` shipped in
this package) or given by path. Keys: ``task``, ``task_args``, ``seeds``, ``train`` (fields of
:class:`agents.training.config.TrainConfig` common to all agents), ``agents`` (per-agent overrides;
``ppo`` takes ``timesteps``, ``n_steps``, ``width``...), ``eval`` (``episodes``, ``exact``: the
exact-divergence settings for a small dyck, ``mauve``), ``sweep`` (optional: ``param``,
``values``, ``agents``), ``quick`` (overrides applied with ``--quick``), ``needs_model`` (the
pretrained LM a config is written for, which ``--model`` must give), ``default_agents`` (the
agents run without ``--agents``), ``description`` (what the config is for) and ``targets``
(claims answered in the report by :func:`agents.experiments.summary.check_targets`); the last
three are not part of what a resumed run must match.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import multiprocessing
import os
import platform
import shlex
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from importlib import resources
from importlib.abc import Traversable
from pathlib import Path
from typing import Any, cast

import torch

from agents.algorithms import ALGORITHMS, resolve_algorithm
from agents.evaluation.evaluate import (
    evaluate,
    exact_metrics,
    human_text_metrics,
)
from agents.evaluation.occupancy import GrammarTask
from agents.experiments.report import _clean, output_names, write_outputs
from agents.experiments.summary import aggregate, check_targets, convergence, differences
from agents.outputs import (
    LOCK,
    check_folder,
    claimed,
    has_content,
    listed,
    mark,
    owner,
    record,
    remove_listed,
    safe_name,
    write_json,
)
from agents.training.checkpoint import POINTER
from agents.training.config import ADDED_SETTINGS, TrainConfig, resolve_device
from agents.training.memory import check_memory
from agents.training.trainer import Trainer
from seqenv.disturbance import Disturbance
from seqenv.rules import step_budget
from seqenv.tasks import Task, make_task

DEFAULT_CONFIG: dict[str, Any] = {
    "name": "default",
    "task": "arithmetic",
    "task_args": {"base": 10, "min_digits": 1, "max_digits": 1},
    "seeds": 3,
    # PPO (which learns nothing at this budget) and the ablations gain little here: their time
    # went into updates, so that the curves flatten. `--agents all` brings them back. BC has
    # SequenceMatch's level penalty, so SequenceMatch - BC is the term's own effect and the
    # eta-0 ablation is no longer needed to tell them apart.
    "default_agents": ["mle", "bc", "sequencematch", "dagger"],
    "train": {
        "steps": 1600,
        "batch_size": 64,
        "layers": 2,
        "width": 64,
        "heads": 2,
        "lr": 3e-3,
        "lr_warmup": 20,
        "num_demonstrations": 5000,
        "eval_interval": 200,
        "eval_episodes": 100,
        "log_interval": 20,
        "noise": 0.1,
        "sm_warmup": 600,
        "dagger_warmup": 600,
        "k_sample": 10,
        "rollouts": 64,
        "buffer_size": 256,
        "eta": 0.3,
    },
    "agents": {"ppo": {"timesteps": 2000, "n_steps": 256, "width": 64, "layers": 1}},
    "eval": {"episodes": 200},
    "quick": {
        "seeds": 2,
        "train": {
            "steps": 20,
            "sm_warmup": 10,
            "dagger_warmup": 10,
            "eval_interval": 10,
            "num_demonstrations": 200,
            "eval_episodes": 8,
        },
        "agents": {"ppo": {"timesteps": 256, "n_steps": 64}},
        "eval": {"episodes": 16},
    },
}


MAX_SEEDS = 10_000
"""More seeds than any comparison needs: a larger count is a typo (each is a run per agent)."""
WORKER_BYTES = 300 * 2**20
"""A worker process's memory once it has imported torch and the library (240 MB measured), before
its run: what --jobs multiplies."""


@dataclass
class CompareConfig:
    """Train MLE, BC, SequenceMatch (with and without backspace) and PPO; compare them."""

    task: str | None = None
    """arithmetic, dyck or text; the config's task if unset (arithmetic by default)."""
    seeds: int | None = None
    """Seeds per agent (at least 2 for an interval); the config's if unset."""
    quick: bool = False
    """A tiny budget: a smoke run of the whole pipeline."""
    config: str | None = None
    """A named config (shipped in agents/experiments/configs/NAME.json) or a path to one; the
    embedded default if unset."""
    out: str = "out/compare"
    """Output folder: results.json, report.md, plots, TensorBoard runs. A new or empty folder,
    or a comparison seqmatch wrote (its marker, manifest and lock); a folder of anything else
    is refused, and one comparison at a time holds it."""
    agents: str | None = None
    """Comma-separated subset of the agents, or `all`; default: the config's `default_agents`,
    else all that apply to the task."""
    device: str = "auto"
    """auto (cuda when available), cpu, cuda or cuda:N; every run uses it."""
    threads: int | None = 1
    """torch CPU threads. 1 by default: the small models of these configs gain little from a
    second thread and lose several times over when the machine is busy; 0 keeps torch's."""
    progress: bool = True
    """Show progress bars (with --jobs 1 only)."""
    jobs: int = 1
    """(agent, seed) runs trained at once, each in its own worker process with --threads
    threads; a run's result does not depend on the number of jobs."""
    resume: bool = False
    """Continue the comparison in --out, keeping its finished runs (a folder holding runs of
    the same config, and of the same library defaults, is resumed without it; this flag fails
    where there is nothing to resume)."""
    overwrite: bool = False
    """Replace a comparison of another config or other library defaults (or a finished one
    without per-run results) in --out instead of refusing: what it wrote (its manifest) is
    removed, nothing else. Runs of the same config and defaults are kept, not rerun: remove
    --out to train them again."""
    model: str | None = None
    """Fine-tune this pretrained LM (folder or .gguf) instead of training our transformer; sets
    the config's train.model (LoRA settings come from train.lora_r etc.)."""
    data: str | None = None
    """Your demonstrations (JSONL, text file or `datasets` folder); sets train.data."""


def _merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def configs_dir() -> Traversable:
    """The named configs, shipped as package data of :mod:`agents.experiments`."""
    return resources.files("agents.experiments") / "configs"


def named_configs() -> list[str]:
    """The names of the shipped configs."""
    return sorted(
        p.name.removesuffix(".json") for p in configs_dir().iterdir() if p.name.endswith(".json")
    )


def load_config(options: CompareConfig) -> dict[str, Any]:
    """The comparison's full config: the named or embedded one, with the options applied."""
    if options.config is None:
        config = copy.deepcopy(DEFAULT_CONFIG)
        if options.task not in (None, "arithmetic"):
            named = configs_dir() / f"{options.task}_cpu.json"
            if not named.is_file():
                raise ValueError(f"no default config for task {options.task!r}: pass --config")
            config = json.loads(named.read_text())
    else:
        path: Path | Traversable = Path(options.config)
        if not Path(options.config).suffix:
            path = configs_dir() / f"{options.config}.json"
        if not path.is_file():
            known = ", ".join(named_configs())
            raise ValueError(f"no config {options.config!r} (known: {known})")
        try:
            config = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: not valid JSON ({err.msg})") from None
        config.setdefault("name", path.name.removesuffix(".json"))
    if options.task is not None and options.task != config["task"]:
        raise ValueError(
            f"config {config.get('name')!r} is for task {config['task']!r}, not {options.task!r}"
        )
    if options.quick:
        config = _merge(config, config.get("quick", DEFAULT_CONFIG["quick"]))
    for key in ("model", "data"):
        if getattr(options, key) is not None:
            config.setdefault("train", {})[key] = getattr(options, key)
    if config.get("needs_model") and not config.get("train", {}).get("model"):
        raise ValueError(
            f"config {config.get('name')!r} fine-tunes a pretrained LM: pass --model PATH "
            f"({config['needs_model']})"
        )
    if config.get("train", {}).get("model"):
        if config["task"] == "dyck":
            raise ValueError(
                "task 'dyck' cannot use a pretrained model's tokenizer (subword tokens merge "
                "brackets); use arithmetic or text with --model"
            )
        if config.get("eval", {}).get("exact"):
            raise ValueError(
                "the exact divergences enumerate a small character vocabulary; a pretrained "
                "model's is too large: remove eval.exact from the config"
            )
    if options.seeds is not None:
        config["seeds"] = options.seeds
    if not 1 <= int(config["seeds"]) <= MAX_SEEDS:
        raise ValueError(f"--seeds must be in [1, {MAX_SEEDS}], got {config['seeds']}")
    config["agent_list"] = agent_list(config, options.agents)
    config["library_defaults"] = library_defaults()
    return config


def agent_list(config: dict[str, Any], agents: str | None) -> list[str]:
    """The agents a comparison runs, registered ones in registry order, then the others.

    ``agents`` (comma-separated names, ``module:Class`` entries, or ``all``), else the config's
    ``default_agents`` (those that can run on its task), else every registered agent that can.

    Raises:
        ValueError: for an unknown name, or an agent that cannot run on this task.
    """
    pretrained = bool(config.get("train", {}).get("model"))
    wanted = config.get("default_agents")
    if agents and agents.strip() != "all":
        wanted = [a.strip() for a in agents.split(",") if a.strip()]
    elif agents:
        wanted = None
    if not wanted:
        return [
            name
            for name, spec in ALGORITHMS.items()
            if spec.cls.unavailable(config["task"], pretrained) is None
        ]
    asked = bool(agents)  # named on the command line: one that cannot run here is an error
    for name in list(wanted):
        reason = resolve_algorithm(name).cls.unavailable(config["task"], pretrained)
        if reason is not None and asked:
            raise ValueError(f"agent {name!r} {reason}")
        if reason is not None:  # a config's default that does not apply to this task
            wanted = [w for w in wanted if w != name]
    if len({safe_name(name) for name in wanted}) < len(set(wanted)):
        raise ValueError(f"--agents {','.join(wanted)}: two names give the same run files")
    registered = [name for name in ALGORITHMS if name in wanted]
    return registered + [name for name in dict.fromkeys(wanted) if name not in ALGORITHMS]


def library_defaults() -> dict[str, Any]:
    """The defaults of :class:`TrainConfig` in this version of the library, as JSON reads them.

    Part of every comparison's config and so of every stored run: a comparison is not resumed
    over runs that a default changed since (in the code, not in the config file) would train
    differently.
    """
    return cast(dict[str, Any], json.loads(json.dumps(asdict(TrainConfig()))))


# --------------------------------------------------------------------------------------------
# Training


def train_config(
    config: dict[str, Any],
    agent: str,
    seed: int,
    out: Path,
    device: str,
    progress: bool,
    **overrides: Any,
) -> TrainConfig:
    """The trainer's config of one run: the config's train block, the agent's, the overrides.

    The run's TensorBoard name is its run key, so the sweep's values get folders of their own.
    """
    fields: dict[str, Any] = {
        **config.get("train", {}),
        **config.get("agents", {}).get(agent, {}),
        **resolve_algorithm(agent).overrides,  # a preset's settings (mle: no backspace)
        **overrides,
    }
    return TrainConfig(
        agent=agent,
        task=config["task"],
        task_args=json.dumps(config.get("task_args", {})),
        seed=seed,
        logdir=str(out / "runs"),
        name=run_key(agent, seed, overrides),
        device=device,
        progress=progress,
        **fields,
    )


# --------------------------------------------------------------------------------------------
# The comparison


def run_one(
    config: dict[str, Any],
    task: Task,
    agent: str,
    seed: int,
    out: Path,
    device: str,
    progress: bool,
    **overrides: Any,
) -> dict[str, Any]:
    """Train and evaluate one agent with one seed; a row of results.json."""
    start = time.perf_counter()
    policy: Any  # a TransformerPolicy, or PPO's policy seen as one
    evaluation = config.get("eval", {})
    disturbance = _disturbance(config)
    exact = evaluation.get("exact")
    if exact is not None:
        exact = {"p": disturbance.p if disturbance else 0.0, **exact}
    warm_start: dict[str, Any] = {}
    labelled_states = 0  # states an expert labelled that the updates read (none for PPO)
    algorithm = resolve_algorithm(agent).cls
    if algorithm.own_loop:
        torch_device = resolve_device(device)
        policy, history = algorithm.train_own_loop(  # type: ignore[attr-defined]
            config, task, seed, out, torch_device
        )
        max_length = policy.max_length
        max_steps = step_budget(max_length)
        allow_backspace, use_cache = True, False
    else:
        train = train_config(config, agent, seed, out, device, progress, **overrides)
        full_steps = train.steps
        warm_steps = algorithm.warm_start_steps(train)
        two_phase = exact is not None and warm_steps > 0
        if two_phase:  # the schedule must not depend on where training pauses
            train.lr_schedule_steps = train.lr_schedule_steps or full_steps
        if not two_phase:
            _save_and_resume(train, out)
        trainer = Trainer(train, task=task)
        if not algorithm.trains:  # evaluated as built: a pretrained model's adapter is a no-op
            trainer.config.steps = 0
        if two_phase:
            assert exact is not None
            # The warm start's own exact metrics, so the SequenceMatch phase is seen to keep or
            # improve them. Training pauses at the warm start's end and continues; evaluating
            # never touches training's random streams.
            trainer.config.steps = min(warm_steps, full_steps)
            trainer.train()
            trainer.policy.eval()
            warm_start = exact_metrics(
                trainer.policy, cast(GrammarTask, task), exact, trainer.max_length,
                train.backspace,
            )[0]  # fmt: skip
            trainer.policy.train()
            trainer.config.steps = full_steps
        trainer.train()
        policy, history = trainer.policy, trainer.history
        labelled_states = trainer.num_labelled_states
        policy.eval()
        max_length, max_steps = trainer.max_length, trainer.max_steps
        allow_backspace, use_cache = train.backspace, True
    train_seconds = time.perf_counter() - start
    settings: dict[str, Any] = {
        "max_length": max_length,
        "max_steps": max_steps,
        "allow_backspace": allow_backspace,
        "episodes": int(evaluation.get("episodes", 200)),
        "seed": 10_000 + seed,
        "full": True,
        "mauve": bool(evaluation.get("mauve", True)),
        "use_cache": use_cache,
    }
    clean = evaluate(policy, task, **settings, exact=exact)
    metrics = dict(clean.metrics)
    episode_values = dict(clean.episode_values)
    if disturbance is not None:
        noise_fn = task.ground_truth_noise if disturbance.kind == "ground_truth" else None
        disturbed = evaluate(policy, task, **settings, disturbance=disturbance, noise_fn=noise_fn)
        metrics.update({f"disturbed/{k}": v for k, v in disturbed.metrics.items()})
        episode_values.update({f"disturbed/{k}": v for k, v in disturbed.episode_values.items()})
    curves = [
        {
            k: v
            for k, v in row.items()
            if k == "step"
            or k.startswith(("eval/", "train/grad_share_"))
            or k in ("losses/sm/divergence", "losses/loss")
        }
        for row in history
    ]
    return {
        "agent": agent,
        "seed": seed,
        "metrics": metrics,
        "exact": clean.exact,
        "episode_values": episode_values,
        "warm_start": warm_start,
        "curves": curves,
        "train_seconds": train_seconds,
        "eval_seconds": time.perf_counter() - start - train_seconds,
        "labelled_states": labelled_states,
        **overrides,
    }


def _save_and_resume(train: TrainConfig, out: Path) -> None:
    """With ``train.save_interval`` set, a run saves to ``out/checkpoints/<run>`` and resumes there.

    A long run (a pretrained model's: an hour on a CPU) stopped mid-way then continues from its
    last save when the comparison is resumed, instead of starting over; the finished run's
    checkpoint stays for `seqmatch eval` and `generate`.
    """
    if not train.save_interval:
        return
    save = out / "checkpoints" / train.run_name
    train.save = str(save)
    if (save / POINTER).is_file():
        train.resume = True
        print(f"[compare] {train.run_name}: resuming from {save}", file=sys.stderr, flush=True)
    elif save.exists():  # claimed by a run stopped before its first save
        train.overwrite = True


def comparison_task(config: dict[str, Any]) -> Task:
    """The comparison's task; on a pretrained model's tokenizer when ``train.model`` is set."""
    model = config.get("train", {}).get("model")
    vocab = None
    if model:
        from agents.models.hf import load_hf_vocab

        vocab = load_hf_vocab(model)  # the task speaks the model's tokenizer
    return make_task(config["task"], vocab=vocab, **config.get("task_args", {}))


def _disturbance(config: dict[str, Any]) -> Disturbance | None:
    """The training disturbance of a comparison (its ``train`` block), or None."""
    train = config.get("train", {})
    p = float(train.get("noise", TrainConfig.noise))
    kind = train.get("noise_type", TrainConfig.noise_type)
    return Disturbance(p, kind) if p > 0 else None


# --------------------------------------------------------------------------------------------
# Finished runs on disk: one JSON file each, the resume point of a stopped comparison

RUN_FORMAT = 1
PLOT_INTERVAL = 60.0
"""Seconds between redraws of the plots while runs finish (results.json and report.md are
rewritten after every run; the plots at most this often, and at the end)."""


NOT_RUN_KEYS = frozenset(
    ("name", "description", "targets", "seeds", "quick", "sweep", "agent_list", "default_agents")
)
"""Config keys that do not change any run's result (a resumed comparison may differ in them)."""


def runs_config(config: dict[str, Any]) -> dict[str, Any]:
    """The part of a comparison's config that decides each run's result.

    As JSON reads it back: what a resumed comparison must share with the runs it keeps.
    """
    kept = {k: v for k, v in config.items() if k not in NOT_RUN_KEYS}
    if "library_defaults" in kept:  # a setting added since, at the value it had before: no change
        kept["library_defaults"] = {
            k: v
            for k, v in kept["library_defaults"].items()
            if not (k in ADDED_SETTINGS and v == ADDED_SETTINGS[k])
        }
    return json.loads(json.dumps(kept))


def stored_or_run(
    path: Path,
    config: dict[str, Any],
    train: Callable[[], dict[str, Any]],
    label: str,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The row of the finished run stored at ``path``, or ``train()``'s row, then stored there.

    For the scan and the sweep, whose runs are one file each as a comparison's are. ``label``
    is printed before training; ``extra`` is added to a new row (and so stored with it).

    Raises:
        ValueError: if the stored run belongs to another config (compared as
            :func:`runs_config` does).
    """
    if path.is_file():
        stored = read_run(path)
        if runs_config(stored["config"]) != runs_config(config):
            raise ValueError(f"{path} was run with another config: pass another --out")
        return stored["row"]
    print(label, file=sys.stderr, flush=True)
    row = _clean({**train(), **(extra or {})})
    write_json_atomic(path, {"format": RUN_FORMAT, "config": config, "row": row})
    return row


def run_key(agent: str, seed: int, overrides: dict[str, Any] | None = None) -> str:
    """The file name (without .json) of one run: ``<agent>-s<seed>[-<param>=<value>]``.

    A value with a path separator or ``..`` in it is sanitised: the name stays in its folder.
    """
    extra = "".join(f"-{k}={v}" for k, v in sorted((overrides or {}).items()))
    return safe_name(f"{agent}-s{seed}{extra}")


def write_json_atomic(path: Path, content: Any) -> None:
    """Write ``content`` as JSON to ``path`` by the output rule (:mod:`agents.outputs`).

    Through a temporary file and a rename: a reader (or a resumed comparison) never sees a
    half-written file.
    """
    write_json(path, content)


def run_files(out: Path) -> list[Path]:
    """The finished-run files of the comparison in ``out`` (main runs and sweep runs)."""
    return sorted([*(out / "runs").glob("*.json"), *(out / "sweep" / "runs").glob("*.json")])


def read_run(path: Path) -> dict[str, Any]:
    """One finished-run file: ``{"format", "config", "row"}``.

    Raises:
        ValueError: for a file that is not such a record.
    """
    try:
        record = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not a finished-run file ({err.msg})") from None
    if not isinstance(record, dict) or record.get("format") != RUN_FORMAT or "row" not in record:
        raise ValueError(f"{path}: not a finished-run file of format {RUN_FORMAT}")
    return record


def prepare_out(out: Path, config: dict[str, Any], resume: bool, overwrite: bool) -> int:
    """Check that ``out`` can take this comparison; return how many finished runs it keeps.

    Run once the folder's lock is held. A folder holding runs of the same config is resumed.
    One holding another config's runs, or a finished comparison without per-run files, is
    refused unless ``overwrite`` (then what the comparison wrote there is removed: what its
    manifest lists). A folder that is not a comparison is refused (:func:`check_out`). The
    folder is marked as a comparison; one from before the marker is marked now, its files listed.

    Raises:
        FileExistsError: for a folder that holds another comparison (and not ``overwrite``), or
            that is no comparison.
        ValueError: for ``resume`` where there is nothing to resume.
    """
    adopted = check_out(out, probe=False)
    wanted = runs_config(config)
    files = run_files(out)
    foreign = [p for p in files if runs_config(read_run(p)["config"]) != wanted]
    legacy = not files and (out / "results.json").exists()
    if (foreign or legacy) and not overwrite:
        what = (
            f"runs of a different config ({foreign[0].relative_to(out)})"
            if foreign
            else "a finished comparison without per-run files"
        )
        raise FileExistsError(
            f"--out {out} holds {what}; pass --overwrite to replace it, or choose another --out"
        )
    if adopted:  # a comparison from before the marker: listed first, then marked
        record(out, *adopted)
    mark(out, "comparison")
    if foreign or legacy:
        remove_listed(out)
        files = []
    if resume and not files:
        raise ValueError(f"--resume: no finished runs in {out}")
    return len(files)


def check_out(
    out: Path, inputs: Sequence[tuple[str, str | None]] = (), probe: bool = True
) -> list[str]:
    """Refuse an ``--out`` that is not a comparison folder; what a pre-marker one wrote.

    New, empty, or marked as a comparison: fine. A folder from before the marker is recognised
    by its content (:func:`_pre_marker_entries`): a comparison's results.json (with its config),
    finished-run files, or only the TensorBoard runs and checkpoints of a first run stopped
    early. Anything else that holds files is a user's folder, refused.

    ``probe``: refuse a folder whose lock another process holds (off under the lock itself).

    Returns:
        The entries (relative paths) the pre-marker comparison wrote; empty otherwise.
    """
    check_folder(out, "--out", "comparison", inputs, probe=probe)
    if not out.is_dir() or owner(out) == "comparison" or not has_content(out):
        return []
    entries = _pre_marker_entries(out)
    if entries is None:
        raise FileExistsError(
            f"--out {out}: the folder holds files and is not a seqmatch comparison (refusing to "
            "write into it); choose a new or empty folder"
        )
    return entries


def _event_files_only(folder: Path) -> bool:
    entries = list(folder.iterdir())
    return bool(entries) and all(p.name.startswith("events.out.tfevents") for p in entries)


def _pre_marker_entries(out: Path) -> list[str] | None:
    """What a comparison written before the marker existed wrote in ``out``; None if none did.

    Recognised by content, never by names alone: results.json with a comparison's config (and
    report.md and the plots it names), finished-run files, TensorBoard run folders that hold
    only event files, and seqmatch checkpoints under ``checkpoints/``.
    """
    entries: list[str] = []
    try:
        results = json.loads((out / "results.json").read_text())
    except (OSError, ValueError):
        results = None
    is_results = isinstance(results, dict) and isinstance(results.get("config"), dict)
    if is_results:
        assert isinstance(results, dict)
        try:
            names = output_names(results)
        except (KeyError, TypeError, AttributeError):
            names = ["results.json", "report.md"]
        entries += [n for n in names if (out / n).is_file()]
    runs = []
    for path in run_files(out):
        try:
            read_run(path)
        except ValueError:
            continue
        runs.append(str(path.relative_to(out)))
    entries += runs
    work = []
    for base in ("runs", "sweep/runs"):
        if (out / base).is_dir():
            work += [
                str(p.relative_to(out))
                for p in (out / base).iterdir()
                if p.is_dir() and _event_files_only(p)
            ]
    for base in ("checkpoints", "sweep/checkpoints"):
        if (out / base).is_dir():
            work += [str(p.relative_to(out)) for p in (out / base).iterdir() if owner(p)]
    entries += work
    if is_results or runs:
        return entries
    # A first run stopped before it finished: only its TensorBoard run and checkpoint.
    known = {"runs", "sweep", "checkpoints", LOCK}
    if work and all(p.name in known for p in out.iterdir()):
        found = {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()} - {LOCK}
        if all(any(f.startswith(w + "/") for w in work) for f in found):
            return entries
    return None


def _clear_unfinished(out: Path, logdir: Path) -> None:
    """Remove the TensorBoard folder an interrupted run left behind (event files only).

    The rerun's curves are then not mixed with it. Only a folder the comparison's manifest
    lists (one it wrote) is removed, and only while it holds event files alone.
    """
    ours = str(logdir.relative_to(out)) in listed(out)
    if ours and logdir.is_dir() and _event_files_only(logdir):
        shutil.rmtree(logdir)


def _spec_entries(out: Path, spec: RunSpec) -> list[str]:
    """What one run writes under ``out``: its run file, TensorBoard run and checkpoint."""
    key = run_key(spec.agent, spec.seed, dict(spec.overrides))
    paths = [spec.path, spec.out / "runs" / key, spec.out / "checkpoints" / key]
    return [str(p.relative_to(out)) for p in paths]


# --------------------------------------------------------------------------------------------
# Running: in this process, or in worker processes with --jobs


@dataclass(frozen=True)
class RunSpec:
    """One (agent, seed) run of the comparison (of the sweep where ``overrides`` is set)."""

    agent: str
    seed: int
    out: Path
    """The folder whose ``runs/`` takes its TensorBoard run and its finished-run file."""
    overrides: tuple[tuple[str, Any], ...] = ()

    @property
    def path(self) -> Path:
        """The run's result file under ``out/runs``."""
        return self.out / "runs" / f"{run_key(self.agent, self.seed, dict(self.overrides))}.json"

    def describe(self) -> str:
        """The run in words: agent, seed and any overrides."""
        extra = "".join(f" {k}={v}" for k, v in self.overrides)
        return f"{self.agent} seed {self.seed}{extra}"


def _run_spec(
    config: dict[str, Any], task: Task | None, spec: RunSpec, device: str, progress: bool
) -> dict[str, Any]:
    """Train and evaluate one run.

    Returns its row (with the sweep value where there is one) and the CPU seconds it took
    (``cpu_seconds``: the measure of cost on a busy machine).
    """
    if task is None:
        task = comparison_task(config)
    overrides = dict(spec.overrides)
    cpu_start = time.process_time()
    row = run_one(config, task, spec.agent, spec.seed, spec.out, device, progress, **overrides)
    row["cpu_seconds"] = time.process_time() - cpu_start  # this process's CPU time, all threads
    if overrides:
        row["value"] = next(iter(overrides.values()))
    return row


def _worker_task(
    task: tuple[dict[str, Any], RunSpec, str, int | None],
) -> tuple[RunSpec, dict[str, Any]]:
    """One run in a worker process (spawned: a fresh interpreter, torch threads set first).

    Raises:
        RuntimeError: for a run stopped by Ctrl-C (a KeyboardInterrupt would kill the worker
            and leave the pool waiting for its result).
    """
    config, spec, device, threads = task
    if threads:
        torch.set_num_threads(threads)
    try:
        return spec, _run_spec(config, None, spec, device, False)
    except KeyboardInterrupt as err:
        raise RuntimeError(f"{spec.describe()}: {err or 'interrupted'}") from None


def _exit_with_parent(parent: int) -> None:
    """In a worker: exit once ``parent`` is gone, rather than train on for nobody.

    The pool terminates its workers on any exception in the parent, but a SIGKILL (or a
    SIGTERM to the parent alone) leaves no chance to; the worker is then re-parented.
    """

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(2.0)
        os._exit(1)

    # On Linux the kernel signals the worker the moment its parent dies, so that an orphan
    # stops before it writes into a folder whose lock its parent no longer holds; the watch is
    # the fallback elsewhere. The kernel also signals when the parent's thread that started the
    # worker ends (the pool's own thread starts the replacement workers): then the parent is
    # still there, and the worker goes on.
    def orphaned(signum: int, frame: Any) -> None:
        if os.getppid() != parent:
            os._exit(1)

    with contextlib.suppress(OSError, AttributeError, ValueError):
        import ctypes

        signal.signal(signal.SIGUSR1, orphaned)
        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGUSR1))  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the parent died before the lines above
        os._exit(1)
    threading.Thread(target=watch, daemon=True, name="exit-with-parent").start()


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
        _clear_unfinished(out, out / _spec_entries(out, spec)[1])
    record(out, *(entry for spec in todo for entry in _spec_entries(out, spec)))
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
        write_json_atomic(spec.path, _clean(record))  # strict JSON: NaN becomes null
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
    # (Only the main thread may install a handler.)
    on_main = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGTERM)
    if on_main:
        signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    try:
        if options.jobs == 1:
            for spec in todo:
                print(f"[compare] {spec.describe()}", file=sys.stderr, flush=True)
                finish(spec, _run_spec(config, task, spec, options.device, progress))
        elif todo:
            _run_parallel(config, todo, options, finish)
    except BaseException:
        if done:  # a stopped comparison keeps a partial report of what finished
            build_results(config, options, out, specs, elapsed(), reference)
        raise
    finally:
        if on_main and previous is not None:
            signal.signal(signal.SIGTERM, previous)
    return build_results(config, options, out, specs, elapsed(), reference)


def _raise_keyboard_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"stopped by signal {signum}")


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
    """Run ``todo`` in ``options.jobs`` spawned worker processes; ``finish`` each as it ends.

    On any exception here (Ctrl-C included) the workers are terminated: the runs in progress
    are lost (they rerun on resume), the finished ones are already on disk.
    """
    context = multiprocessing.get_context("spawn")
    # Runs with rollouts (SequenceMatch's) are the longest: started first, none is left alone
    # at the end while the other cores idle.
    todo = sorted(todo, key=lambda spec: not resolve_algorithm(spec.agent).cls.needs_rollouts)
    tasks = [(config, spec, options.device, options.threads) for spec in todo]
    jobs = min(options.jobs, len(todo))  # never more processes than runs
    check_memory(jobs * WORKER_BYTES, torch.device("cpu"), f"--jobs {jobs} worker processes",
                 "use fewer --jobs")  # fmt: skip
    # A fresh process per run, which exits by itself once this process is gone (killed).
    pool = context.Pool(
        jobs, initializer=_exit_with_parent, initargs=(os.getpid(),), maxtasksperchild=1
    )
    try:
        for spec, row in pool.imap_unordered(_worker_task, tasks):
            finish(spec, row)
        pool.close()
    except BaseException:
        pool.terminate()
        raise
    finally:
        pool.join()


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
    results: dict[str, Any] = {
        "task": config["task"],
        "config": {k: v for k, v in config.items() if k != "quick"},
        "command": "seqmatch compare "
        + shlex.join(sys.argv[2:] if sys.argv[1:2] == ["compare"] else sys.argv[1:]),
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
