"""`seqmatch compare`: imitation learning against MLE on a task, with seeds and intervals.

The 2x2 ablation {MLE, SequenceMatch} x {with, without backspace}, and the RL peer:

    mle                       teacher forcing on clean data; backspace never used
    bc                        MLE with backspace: BC on noise-augmented data (MLE+<bkspc>)
    sequencematch             SequenceMatch (chi^2-mixture) with backspace and noise augmentation
    sequencematch_no_bkspc    SequenceMatch without backspace (no noise, backspace masked)
    ppo                       stable-baselines3 PPO on the task reward (arithmetic, dyck only)

Every agent is trained with N seeds, then evaluated on held-out prompts with the task's metrics
(:func:`evaluate_task`); results are aggregated as mean and 95% interval over seeds (Student's
t). Outputs under ``--out``: ``results.json``, ``report.md``, PNG plots, TensorBoard runs.

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
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import resources
from importlib.abc import Traversable
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from torch import nn

from agents.collate import collate
from agents.evaluation.metrics import (
    accuracy,
    backspace_stats,
    continuation_texts,
    distinct_n,
    dyck_metrics,
    final_generated,
    mauve_score,
    mean_ci95,
    ngram_entropy,
    perplexity,
    recovery_metrics,
    recovery_starts,
    repetition,
)
from agents.evaluation.occupancy import GrammarTask, exact_divergences, policy_probs_from_model
from agents.generate import generate
from agents.models.interface import PolicyModel, mask_logits
from agents.training.config import TrainConfig, resolve_device
from agents.training.trainer import Trainer
from seqenv.tasks import Task, make_task
from seqenv.trajectory import Trajectory

AGENT_NAMES = ("mle", "bc", "sequencematch", "sequencematch_no_bkspc", "ppo")
AGENT_LABELS = {
    "mle": "MLE",
    "bc": "BC (MLE + backspace, noise)",
    "sequencematch": "SequenceMatch",
    "sequencematch_no_bkspc": "SequenceMatch, no backspace",
    "ppo": "PPO (task reward)",
}
# How each agent maps onto the trainer; `backspace=False` masks it in training and generation.
AGENT_TRAIN: dict[str, dict[str, Any]] = {
    "mle": {"agent": "mle", "backspace": False},
    "bc": {"agent": "bc"},
    "sequencematch": {"agent": "sequencematch"},
    "sequencematch_no_bkspc": {"agent": "sequencematch", "backspace": False},
}
# Metrics of each task, the first being the headline of the report.
TASK_METRICS = {
    "arithmetic": ("accuracy", "recovery", "backspace_rate", "mean_backtrack_length"),
    "dyck": (
        "invalid_rate",
        "true_logprob",
        "length_tv",
        "backspace_rate",
        "exact_chi2_mixture",
        "exact_kl",
        "exact_tv",
    ),
    "text": ("mauve", "perplexity", "distinct_2", "ngram_entropy", "repetition", "backspace_rate"),
}
HIGHER_IS_BETTER = {"accuracy", "recovery", "true_logprob", "mauve", "distinct_2", "ngram_entropy"}

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


class PPOPolicyModel(nn.Module):
    """An SB3 policy seen as a :class:`PolicyModel` (no cache): the logits of its action
    distribution for each state, so that the same generation and metrics code evaluates it."""

    def __init__(self, sb3_policy: Any, special: Any, max_length: int) -> None:
        super().__init__()
        self.sb3_policy = sb3_policy
        self.special = special
        self.max_length = max_length

    @property
    def max_positions(self) -> int | None:
        return None

    def forward(
        self, input_ids: torch.Tensor, position_ids: torch.Tensor, attention: Any = None
    ) -> torch.Tensor:
        B, T = input_ids.shape
        obs = torch.full((B, self.max_length), self.special.pad_id, device=input_ids.device)
        obs[:, :T] = input_ids
        # Rows hold one state each (right padded): SB3 reads the state from the whole row.
        logits = self.sb3_policy.get_distribution(obs.float()).distribution.logits  # (B, A)
        return logits[:, None, :].expand(B, T, logits.shape[-1])


def train_ppo(
    config: dict[str, Any], task: Task, seed: int, out: Path, device: torch.device
) -> tuple[PPOPolicyModel, list[dict[str, float]]]:
    """PPO with the transformer features extractor on the task reward."""
    import gymnasium as gym
    from stable_baselines3 import PPO

    import seqenv
    from agents.models.sb3 import SequenceFeaturesExtractor

    settings = {
        "timesteps": 8000,
        "n_steps": 256,
        "batch_size": 64,
        "width": 64,
        "layers": 1,
        "heads": 2,
        "lr": 3e-4,
        "ent_coef": 0.01,
        **config.get("agents", {}).get("ppo", {}),
    }
    max_length = config["train"].get("max_length") or task.default_max_length
    env = gym.make(seqenv.ENV_ID, task=task, max_length=max_length)
    model = PPO(
        "MlpPolicy",
        env,
        n_steps=settings["n_steps"],
        batch_size=settings["batch_size"],
        learning_rate=settings["lr"],
        ent_coef=settings["ent_coef"],
        seed=seed,
        device=str(device),
        tensorboard_log=str(out / "runs"),
        verbose=0,
        policy_kwargs={
            "features_extractor_class": SequenceFeaturesExtractor,
            "features_extractor_kwargs": {
                "width": settings["width"],
                "layers": settings["layers"],
                "heads": settings["heads"],
            },
        },
    )
    model.learn(settings["timesteps"], tb_log_name=f"ppo-s{seed}")
    model.policy.set_training_mode(False)
    return PPOPolicyModel(model.policy, task.vocab.special, max_length), []


# --------------------------------------------------------------------------------------------
# Evaluation


@torch.no_grad()
def heldout_nll(
    policy: PolicyModel,
    demos: Sequence[Trajectory],
    batch_size: int = 32,
    allow_backspace: bool = True,
) -> tuple[float, int]:
    """Summed negative log-likelihood of held-out demonstrations, and their number of actions."""
    total, count = 0.0, 0
    device = next(iter(policy.parameters())).device
    special = policy.special
    for begin in range(0, len(demos), batch_size):
        batch = collate(demos[begin : begin + batch_size]).to(device)
        logits = policy.forward_batch(batch).float()  # (B, T, A)
        rows = torch.arange(batch.state_rows.shape[0], device=device)[:, None]
        state_logits = logits[rows, batch.state_rows]  # (B, S, A)
        if not allow_backspace:
            allowed = torch.ones(special.num_actions, dtype=torch.bool, device=device)
            allowed[special.backspace_id] = False
            state_logits = mask_logits(state_logits, allowed)
        logp = state_logits.log_softmax(-1).gather(-1, batch.actions[..., None])[..., 0]
        total -= float(logp[batch.step_mask].sum())
        count += int(batch.step_mask.sum())
    return total, count


def evaluate_task(
    task: Task,
    policy: PolicyModel,
    config: dict[str, Any],
    *,
    allow_backspace: bool,
    max_length: int,
    max_steps: int,
    seed: int,
    use_cache: bool = True,
) -> dict[str, float]:
    """The task's metrics of one trained policy on held-out prompts (TASK_METRICS)."""
    evaluation = config.get("eval", {})
    num = int(evaluation.get("episodes", 200))
    device = next(iter(policy.parameters())).device
    generator = torch.Generator(device).manual_seed(10_000 + seed)
    examples = task.examples("test", num, seed=12345)
    prompts = [list(e.prompt) for e in examples]

    def rollouts(greedy: bool, prefixes: list[list[int]] | None = None) -> list[Trajectory]:
        out = generate(
            policy,
            prompts,
            max_length=max_length,
            max_steps=max_steps,
            greedy=greedy,
            generator=generator,
            use_cache=use_cache,
            allow_backspace=allow_backspace,
            prefixes=prefixes,
        )
        return out.trajectories

    metrics: dict[str, float] = {}
    if task.name == "arithmetic":
        episodes = rollouts(greedy=True)
        metrics["accuracy"] = accuracy(task, episodes)
        starts = recovery_starts(task, examples, seed=54321)
        recovered = rollouts(greedy=True, prefixes=[list(s.prefix) for s in starts])
        metrics["recovery"] = recovery_metrics(task, starts, recovered)["recovery_accuracy"]
    elif task.name == "dyck":
        episodes = rollouts(greedy=False)
        data = [list(e.completion) for e in examples]
        dyck = dyck_metrics(task, episodes, data)  # type: ignore[arg-type]
        metrics["invalid_rate"] = 1.0 - dyck["validity"]
        metrics["true_logprob"] = dyck.get("mean_log_prob", float("nan"))
        metrics["length_tv"] = dyck.get("length_tv", float("nan"))
        exact = evaluation.get("exact")
        if exact:
            probs = policy_probs_from_model(policy, task.vocab.special, device)
            if not allow_backspace:
                probs = _without_backspace(probs, task.vocab.special.backspace_id)
            divergences = exact_divergences(
                cast(GrammarTask, task),
                probs,
                float(exact.get("gamma", 0.9)),
                max_length=int(exact.get("max_length", max_length)),
            )
            for key in ("chi2_mixture", "kl", "tv"):
                metrics[f"exact_{key}"] = divergences[key]
    else:
        episodes = rollouts(greedy=False)
        generated = final_generated(episodes)
        metrics["distinct_2"] = distinct_n(generated, 2)
        metrics["ngram_entropy"] = ngram_entropy(generated, 4)
        metrics["repetition"] = repetition(generated, 4)
        demos = [task.demonstration(e, max_length) for e in examples]
        nll, count = heldout_nll(policy, demos, allow_backspace=allow_backspace)
        metrics["perplexity"] = perplexity(nll, count)
        if evaluation.get("mauve", True):
            true = [task.vocab.decode(e.completion) for e in examples]
            metrics["mauve"] = mauve_score(
                continuation_texts(task.vocab, episodes), true, device=str(device)
            )
    stats = backspace_stats(episodes)
    metrics["backspace_rate"] = stats["backspace_rate"]
    metrics["mean_backtrack_length"] = stats["mean_backtrack_length"]
    return metrics


def _without_backspace(
    probs: Callable[[list[list[int]]], np.ndarray], backspace_id: int
) -> Callable[[list[list[int]]], np.ndarray]:
    """The policy as the no-backspace ablation runs it: backspace masked, renormalised."""

    def masked(states: list[list[int]]) -> np.ndarray:
        p = probs(states).copy()
        p[:, backspace_id] = 0.0
        return p / p.sum(axis=1, keepdims=True)

    return masked


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
        max_steps = 2 * max_length
        allow_backspace, use_cache = True, False
    else:
        train = train_config(config, agent, seed, out, device, progress, **overrides)
        trainer = Trainer(train, task=task)
        trainer.train()
        policy, history = trainer.policy, trainer.history
        policy.eval()
        max_length, max_steps = trainer.max_length, trainer.max_steps
        allow_backspace, use_cache = train.backspace, True
    train_seconds = time.perf_counter() - start
    metrics = evaluate_task(
        task,
        policy,
        config,
        allow_backspace=allow_backspace,
        max_length=max_length,
        max_steps=max_steps,
        seed=seed,
        use_cache=use_cache,
    )
    curves = [
        {
            k: v
            for k, v in row.items()
            if k in ("step", "eval/score", "losses/sm/divergence", "losses/loss")
        }
        for row in history
    ]
    return {
        "agent": agent,
        "seed": seed,
        "metrics": metrics,
        "curves": curves,
        "train_seconds": train_seconds,
        "eval_seconds": time.perf_counter() - start - train_seconds,
        **overrides,
    }


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
    from agents.experiments.report import write_outputs

    write_outputs(results, out)
    return results
