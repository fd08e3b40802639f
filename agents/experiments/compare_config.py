"""The config of `seqmatch compare`: its options, the embedded default, a named config, loading.

A comparison is driven by a config: the embedded default (one-digit arithmetic, MLE, BC and
SequenceMatch, about 10 minutes on 2 cores) or a JSON file, named (``configs/NAME.json`` shipped in
this package) or given by path. Keys: ``task``, ``task_args``, ``seeds``, ``train`` (fields of
:class:`agents.config.TrainConfig` common to all agents), ``agents`` (per-agent overrides; ``ppo``
takes ``timesteps``, ``n_steps``, ``width``...: ``PPO.loop_settings``), ``eval`` (``episodes``,
``exact``: the exact-divergence settings for a small dyck, ``mauve``), ``sweep`` (optional:
``param``, ``values``, ``agents``), ``quick`` (overrides applied with ``--quick``), ``needs_model``
(the pretrained LM a config is written for, which ``--model`` must give), ``default_agents`` (the
agents run without ``--agents``), ``description`` (what the config is for) and ``targets`` (claims
answered in the report by :func:`agents.experiments.summary.check_targets`); the last three are not
part of what a resumed run must match.
"""

from __future__ import annotations

import copy
import json
from dataclasses import asdict, dataclass
from importlib import resources
from importlib.abc import Traversable
from pathlib import Path
from typing import Any, cast

from agents.algorithms import ALGORITHMS, resolve_algorithm
from agents.config import TrainConfig
from agents.deprecated import renamed_config
from agents.experiments.storage import run_key
from agents.outputs import safe_name
from seqenv.disturbance import Disturbance
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
    # Only where this budget differs from TrainConfig's defaults (the rest are TrainConfig's, and
    # every run's config records them: library_defaults).
    "train": {
        "steps": 1600,
        "batch_size": 64,
        "width": 64,
        "heads": 2,
        "lr": 3e-3,
        "lr_warmup": 20,
        "num_demonstrations": 5000,
        "eval_episodes": 100,
        "sm_warmup": 600,
        "dagger_warmup": 600,
        "buffer_size": 256,
    },
    "agents": {"ppo": {"timesteps": 2000}},  # and PPO's own defaults (PPO.loop_settings)
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


def merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``base`` with ``overrides`` applied, nested dicts merged key by key."""
    out = copy.deepcopy(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
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
    config = renamed_config(config, f"config {config.get('name', 'default')!r}")
    if options.task is not None and options.task != config["task"]:
        raise ValueError(
            f"config {config.get('name')!r} is for task {config['task']!r}, not {options.task!r}"
        )
    if options.quick:
        config = merge(config, config.get("quick", DEFAULT_CONFIG["quick"]))
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


def comparison_task(config: dict[str, Any]) -> Task:
    """The comparison's task; on a pretrained model's tokenizer when ``train.model`` is set."""
    model = config.get("train", {}).get("model")
    vocab = None
    if model:
        from agents.models.hf import load_hf_vocab

        vocab = load_hf_vocab(model)  # the task speaks the model's tokenizer
    return make_task(config["task"], vocab=vocab, **config.get("task_args", {}))


def comparison_disturbance(config: dict[str, Any]) -> Disturbance | None:
    """The training disturbance of a comparison (its ``train`` block), or None."""
    train = config.get("train", {})
    p = float(train.get("disturbance", TrainConfig.disturbance))
    kind = train.get("disturbance_type", TrainConfig.disturbance_type)
    return Disturbance(p, kind) if p > 0 else None
