"""`seqmatch compare`: imitation learning against MLE on a task, with seeds and intervals.

The 2x2 ablation {MLE, SequenceMatch} x {with, without backspace}, the two BC labellings of the
disturbed demonstrations (docs/method.md §5), and the RL peer:

    mle                       teacher forcing on clean data; backspace never used
    bc                        BC on the disturbed demonstrations, intended actions (MLE+<bkspc>)
    bc_executed               the same demonstrations, executed actions as labels: noise tokens
                              are targets (the paper's scheme)
    sequencematch             SequenceMatch (chi^2-mixture) in the disturbed environment
    sequencematch_no_bkspc    SequenceMatch without backspace (clean data, backspace masked)
    ppo                       stable-baselines3 PPO on the task reward (arithmetic, dyck only)

Every metric is measured twice: in the clean environment, and under the training disturbance
(``disturbed/<metric>``: can the agent repair errors it did not choose?).

Every agent is trained with N seeds, then evaluated on held-out prompts with the task's metrics
(:func:`agents.evaluation.evaluate.evaluate`); results are aggregated as mean and 95% interval
over seeds (Student's t). Outputs under ``--out``: ``results.json``, ``report.md``, PNG plots,
TensorBoard runs.

A comparison is driven by a config: the embedded default (the arithmetic task at an easy
setting, a few minutes on a CPU) or a JSON file, named (``configs/NAME.json`` shipped in
this package) or given by path. Keys: ``task``, ``task_args``, ``seeds``, ``train`` (fields of
:class:`agents.training.config.TrainConfig` common to all agents), ``agents`` (per-agent overrides;
``ppo`` takes ``timesteps``, ``n_steps``, ``width``...), ``eval`` (``episodes``, ``exact``: the
exact-divergence settings for a small dyck, ``mauve``), ``sweep`` (optional: ``param``,
``values``, ``agents``), ``quick`` (overrides applied with ``--quick``) and ``needs_model`` (the
pretrained LM a config is written for, which ``--model`` must give).
"""

from __future__ import annotations

import copy
import json
import os
import platform
import shlex
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from importlib.abc import Traversable
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch

from agents.evaluation.evaluate import evaluate, exact_metrics, headline, human_text_metrics
from agents.evaluation.occupancy import GrammarTask
from agents.evaluation.stats import mean_ci95
from agents.experiments.ppo import train_ppo
from agents.experiments.report import write_outputs
from agents.training.config import TrainConfig, resolve_device
from agents.training.trainer import Trainer
from seqenv.disturbance import Disturbance
from seqenv.rules import step_budget
from seqenv.tasks import Task, make_task

AGENT_NAMES = ("mle", "bc", "bc_executed", "sequencematch", "sequencematch_no_bkspc", "ppo")
# How each agent maps onto the trainer; `backspace=False` masks it in training and generation.
AGENT_TRAIN: dict[str, dict[str, Any]] = {
    "mle": {"agent": "mle", "backspace": False},
    "bc": {"agent": "bc"},
    "bc_executed": {"agent": "bc", "labels": "executed"},
    "sequencematch": {"agent": "sequencematch"},
    "sequencematch_no_bkspc": {"agent": "sequencematch", "backspace": False},
}
DEFAULT_CONFIG: dict[str, Any] = {
    "name": "default",
    "task": "arithmetic",
    "task_args": {"base": 10, "min_digits": 1, "max_digits": 1},
    "seeds": 2,
    "train": {
        "steps": 800,
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
        "sm_warmup": 400,
        "k_sample": 10,
        "rollouts": 64,
        "buffer_size": 256,
        "eta": 0.1,
    },
    "agents": {"ppo": {"timesteps": 8000, "n_steps": 256, "width": 64, "layers": 1}},
    "eval": {"episodes": 200},
    "quick": {
        "seeds": 2,
        "train": {
            "steps": 20,
            "sm_warmup": 10,
            "eval_interval": 10,
            "num_demonstrations": 200,
            "eval_episodes": 8,
        },
        "agents": {"ppo": {"timesteps": 256, "n_steps": 64}},
        "eval": {"episodes": 16},
    },
}


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
    """Output folder: results.json, report.md, plots, TensorBoard runs."""
    agents: str | None = None
    """Comma-separated subset of the agents (default: all that apply to the task)."""
    device: str = "auto"
    threads: int | None = 1
    """torch CPU threads. 1 by default: the small models of these configs gain little from a
    second thread and lose several times over when the machine is busy; 0 keeps torch's."""
    progress: bool = True
    """Show progress bars."""
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
    if int(config["seeds"]) < 1:
        raise ValueError(f"--seeds must be >= 1, got {config['seeds']}")
    # PPO trains its own small network on the task's reward: no text task, no pretrained model.
    agents = [
        a
        for a in AGENT_NAMES
        if not (a == "ppo" and (config["task"] == "text" or config.get("train", {}).get("model")))
    ]
    if options.agents:
        wanted = [a.strip() for a in options.agents.split(",") if a.strip()]
        unknown = sorted(set(wanted) - set(AGENT_NAMES))
        if unknown:
            raise ValueError(f"unknown agents {unknown}; known: {', '.join(AGENT_NAMES)}")
        agents = [a for a in agents if a in wanted]
    config["agent_list"] = agents
    return config


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
    fields: dict[str, Any] = {
        **config.get("train", {}),
        **config.get("agents", {}).get(agent, {}),
        **AGENT_TRAIN[agent],
        **overrides,
    }
    return TrainConfig(
        task=config["task"],
        task_args=json.dumps(config.get("task_args", {})),
        seed=seed,
        logdir=str(out / "runs"),
        name=f"{agent}-s{seed}",
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
    if agent == "ppo":
        torch_device = resolve_device(device)
        policy, history = train_ppo(config, task, seed, out, torch_device)
        max_length = policy.max_length
        max_steps = step_budget(max_length)
        allow_backspace, use_cache = True, False
    evaluation = config.get("eval", {})
    disturbance = _disturbance(config)
    exact = evaluation.get("exact")
    if exact is not None:
        exact = {"p": disturbance.p if disturbance else 0.0, **exact}
    warm_start: dict[str, Any] = {}
    if agent == "ppo":
        torch_device = resolve_device(device)
        policy, history = train_ppo(config, task, seed, out, torch_device)
        max_length = policy.max_length
        max_steps = step_budget(max_length)
        allow_backspace, use_cache = True, False
    else:
        train = train_config(config, agent, seed, out, device, progress, **overrides)
        full_steps = train.steps
        two_phase = exact is not None and train.agent == "sequencematch" and train.sm_warmup > 0
        if two_phase:  # the schedule must not depend on where training pauses
            train.lr_schedule_steps = train.lr_schedule_steps or full_steps
        trainer = Trainer(train, task=task)
        if two_phase:
            assert exact is not None
            # The warm start's own exact metrics, so the SequenceMatch phase is seen to keep or
            # improve them. Training pauses at the warm start's end and continues; evaluating
            # never touches training's random streams.
            trainer.config.steps = min(train.sm_warmup, full_steps)
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
    if disturbance is not None:
        noise_fn = task.ground_truth_noise if disturbance.kind == "ground_truth" else None
        disturbed = evaluate(
            policy, task, **settings, disturbance=disturbance, noise_fn=noise_fn
        ).metrics
        metrics.update({f"disturbed/{k}": v for k, v in disturbed.items()})
    curves = [
        {
            k: v
            for k, v in row.items()
            if k in ("step", f"eval/{headline(task.name)}", "losses/sm/divergence", "losses/loss")
        }
        for row in history
    ]
    return {
        "agent": agent,
        "seed": seed,
        "metrics": metrics,
        "exact": clean.exact,
        "warm_start": warm_start,
        "curves": curves,
        "train_seconds": train_seconds,
        "eval_seconds": time.perf_counter() - start - train_seconds,
        **overrides,
    }


def _disturbance(config: dict[str, Any]) -> Disturbance | None:
    """The training disturbance of a comparison (its ``train`` block), or None."""
    train = config.get("train", {})
    p = float(train.get("noise", TrainConfig.noise))
    kind = train.get("noise_type", TrainConfig.noise_type)
    return Disturbance(p, kind) if p > 0 else None


def aggregate(runs: Sequence[dict[str, Any]], key: str = "agent") -> dict[str, Any]:
    """{group: {metric: {"mean", "ci95": [lo, hi], "n"}}} over the seeds of each group."""
    groups: dict[str, list[dict[str, float]]] = {}
    for run in runs:
        groups.setdefault(str(run[key]), []).append(run["metrics"])
    out: dict[str, Any] = {}
    for group, rows in groups.items():
        out[group] = {}
        for metric in rows[0]:
            values = [r[metric] for r in rows if np.isfinite(r.get(metric, np.nan))]
            if not values:
                continue
            mean, lo, hi = mean_ci95(values)
            out[group][metric] = {"mean": mean, "ci95": [lo, hi], "n": len(values)}
    return out


def run_compare(options: CompareConfig) -> dict[str, Any]:
    """Run the whole comparison and write its outputs; return results.json's content."""
    config = load_config(options)
    out = Path(options.out)
    model = config.get("train", {}).get("model")
    vocab = None
    if model:
        from agents.models.hf import load_hf_vocab

        vocab = load_hf_vocab(model)  # the task speaks the model's tokenizer
    task = make_task(config["task"], vocab=vocab, **config.get("task_args", {}))
    out.mkdir(parents=True, exist_ok=True)
    if options.threads:
        torch.set_num_threads(options.threads)  # 0 or None: torch's own default
    progress = options.progress and sys.stderr.isatty()  # bars only for a person watching
    started = time.perf_counter()
    runs = []
    for agent in config["agent_list"]:
        for seed in range(int(config["seeds"])):
            print(f"[compare] {agent} seed {seed}", file=sys.stderr, flush=True)
            runs.append(run_one(config, task, agent, seed, out, options.device, progress))
    sweep_runs = []
    sweep = config.get("sweep")
    if sweep:
        for agent in sweep.get("agents", ["bc", "sequencematch"]):
            for value in sweep["values"]:
                for seed in range(int(config["seeds"])):
                    print(
                        f"[compare] sweep {sweep['param']}={value} {agent} seed {seed}",
                        file=sys.stderr,
                        flush=True,
                    )
                    row = run_one(
                        config,
                        task,
                        agent,
                        seed,
                        out / "sweep",
                        options.device,
                        progress,
                        **{sweep["param"]: value},
                    )
                    row["value"] = value
                    sweep_runs.append(row)
    reference = {}
    if task.name == "text":  # where a text statistic saturates, the human value shows it
        episodes = int(config.get("eval", {}).get("episodes", 200))
        reference["human_text"] = human_text_metrics(task, episodes)
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
        },
        "wall_seconds": time.perf_counter() - started,
        "runs": runs,
        "agents": aggregate(runs),
        "reference": reference,
    }
    if sweep_runs:
        assert sweep is not None
        results["sweep"] = {
            "param": sweep["param"],
            "runs": sweep_runs,
            "by_value": {
                agent: aggregate([r for r in sweep_runs if r["agent"] == agent], key="value")
                for agent in {r["agent"] for r in sweep_runs}
            },
        }
    write_outputs(results, out)
    return results
