"""The one flat, typed configuration of a training run (parsed by ``seqmatch train``)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal

import torch

from agents.objectives import make_objective

Agent = Literal["mle", "bc", "sequencematch"]
AGENTS = ("mle", "bc", "sequencematch")


@dataclass
class TrainConfig:
    """Everything a training run needs; stored in full in its checkpoints and logs."""

    agent: str = "sequencematch"
    """mle (clean data, teacher forcing), bc (noise-augmented data) or sequencematch."""
    task: str = "arithmetic"
    """Task name: arithmetic, dyck or text."""
    task_args: str = "{}"
    """The task's keyword arguments as JSON, e.g. '{"base": 10, "max_digits": 2}'."""
    steps: int = 1000
    """Number of updates."""
    seed: int = 0
    """Seed of the weights, the data order, the noise and the rollouts."""
    logdir: str | None = "runs"
    """TensorBoard runs go to LOGDIR/NAME; none if empty."""
    name: str | None = None
    """Run name; default AGENT-TASK-sSEED."""
    save: str | None = None
    """Checkpoint folder (written at save_interval and at the end); none if unset."""
    resume: bool = False
    """Continue from the checkpoint in --save, exactly where it stopped."""
    json: str | None = None
    """Write the final metrics to this JSON file."""

    # Data
    num_demonstrations: int = 20000
    """Training examples drawn from the task (a fixed dataset, sampled with replacement)."""
    max_length: int | None = None
    """Buffer size of the MDP (prompt included); the task's default if unset."""
    max_steps: int | None = None
    """Step budget of an episode (backspaces count); 2 * max_length if unset."""
    batch_size: int = 32
    """Sequences per update (per process under torchrun)."""
    grad_accum: int = 1
    """Micro-batches per update; batch_size must be a multiple of it."""

    # Noise augmentation (METHOD.md §5); bc and sequencematch only
    noise: float = 0.1
    """Noise level p: chance of k wrong tokens then k backspaces before each expert action."""
    noise_k: int = 1
    """Wrong tokens inserted per noise event (k)."""
    noise_type: str = "random"
    """random (uniform tokens) or ground_truth (the task's plausible mistakes)."""
    noise_targets: bool = True
    """BC also learns to emit the noise tokens (as the paper does); False: only their undoing."""
    backspace: bool = True
    """Allow the backspace action; False gives the no-backspace ablation (and no noise)."""

    # Pretrained model (agents.models.hf)
    model: str | None = None
    """Fine-tune this pretrained causal LM (a local transformers folder or a .gguf file) instead
    of training our own transformer; its tokenizer becomes the task's vocabulary."""
    lora_r: int = 16
    """LoRA rank with --model (adapters on every projection); 0: full fine-tuning."""
    lora_alpha: int = 32
    """LoRA scale numerator: the update is lora_alpha / lora_r * B @ A."""
    lora_dropout: float = 0.05
    """Dropout on the LoRA adapters' input."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass (--model only): less memory, ~30% slower."""
    data: str | None = None
    """Your demonstrations instead of the task's: a JSONL file of {"prompt", "completion"} or
    {"text"} records, a text file (one passage a line), or a `datasets` save_to_disk folder."""

    # Model
    layers: int = 2
    width: int = 128
    heads: int = 4
    dropout: float = 0.0
    positions: str = "learned"
    """learned or rotary position embeddings."""

    # Optimisation
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    """The cosine schedule decays to lr * min_lr_ratio."""
    lr_warmup: int = 50
    """Linear learning-rate warm-up, in updates."""
    lr_schedule_steps: int | None = None
    """Length of the cosine schedule; --steps if unset. Set it to the final length of a run
    that you will extend with --resume, so the schedule does not depend on where it stops."""
    weight_decay: float = 0.01
    grad_clip: float = 1.0

    # SequenceMatch (METHOD.md §3-4)
    divergence: str = "chi2_mixture"
    c: float = 0.25
    """Coefficient of the chi^2 terms."""
    gamma: float = 0.998
    eta: float = 0.1
    """Weight of SequenceMatch in (1 - eta) * BC + eta * SM after the warm start; 0.1 from the
    sweep in benchmarks/README.md (0.5 and 0.9 lost accuracy to runaway backspacing)."""
    value_source: str = "mix"
    """Trajectories of the value term: mix, data or model."""
    sm_warmup: int = 200
    """Updates of plain BC before SequenceMatch starts (the MLE warm start)."""
    k_sample: int = 10
    """Updates between two refreshes of the replay buffer."""
    rollouts: int = 64
    """Trajectories sampled from the policy at each refresh."""
    buffer_size: int = 512
    """Capacity of the FIFO replay buffer (trajectories)."""
    temperature: float = 1.0
    """Sampling temperature of the rollouts."""

    # Evaluation, logging, hardware
    eval_interval: int = 200
    eval_episodes: int = 128
    eval_greedy: bool | None = None
    """Greedy evaluation episodes; default: greedy for arithmetic (accuracy), sampled otherwise
    (validity and likelihood of the distribution the policy generates)."""
    log_interval: int = 20
    save_interval: int = 0
    """Updates between checkpoints (0: only at the end)."""
    device: str = "auto"
    """auto (cuda when available), cpu or cuda."""
    compile: bool = False
    """torch.compile the policy."""
    bf16: bool = True
    """bf16 autocast on a GPU (ignored on the CPU)."""
    progress: bool = True
    """Show a progress bar."""

    def validate(self) -> None:
        """Raise ValueError naming the first bad field."""
        if self.agent not in AGENTS:
            raise ValueError(f"unknown agent {self.agent!r}; known agents: {', '.join(AGENTS)}")
        for name in (
            "steps",
            "batch_size",
            "grad_accum",
            "num_demonstrations",
            "noise_k",
            "k_sample",
            "rollouts",
            "buffer_size",
            "eval_episodes",
            "log_interval",
            "layers",
            "width",
            "heads",
        ):
            if getattr(self, name) < 1:
                raise ValueError(
                    f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}"
                )
        for name in ("eval_interval", "save_interval", "sm_warmup", "lr_warmup"):
            if getattr(self, name) < 0:
                raise ValueError(
                    f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}"
                )
        if self.batch_size % self.grad_accum:
            raise ValueError(
                f"batch_size {self.batch_size} is not a multiple of grad_accum {self.grad_accum}"
            )
        if not 0.0 <= self.noise <= 1.0:
            raise ValueError(f"--noise must be in [0, 1], got {self.noise}")
        if not 0.0 <= self.eta <= 1.0:
            raise ValueError(f"--eta must be in [0, 1], got {self.eta}")
        if not 0.0 < self.gamma <= 1.0:
            raise ValueError(f"--gamma must be in (0, 1], got {self.gamma}")
        if not self.lr > 0.0:
            raise ValueError(f"--lr must be > 0, got {self.lr}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"--min-lr-ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.lr_schedule_steps is not None and self.lr_schedule_steps < 1:
            raise ValueError(f"--lr-schedule-steps must be >= 1, got {self.lr_schedule_steps}")
        if not self.temperature > 0.0:
            raise ValueError(f"--temperature must be > 0, got {self.temperature}")
        # The objective checks its own settings; building it here fails before any file exists.
        make_objective(
            "sequencematch",
            divergence=self.divergence,
            c=self.c,
            gamma=self.gamma,
            value_source=self.value_source,
        )
        resolve_device(self.device)
        if self.noise_type not in ("random", "ground_truth"):
            raise ValueError(
                f"--noise-type must be random or ground_truth, got {self.noise_type!r}"
            )
        if self.model is not None:
            if self.lora_r < 0:
                raise ValueError(f"--lora-r must be >= 0, got {self.lora_r}")
            if not 0.0 <= self.lora_dropout < 1.0:
                raise ValueError(f"--lora-dropout must be in [0, 1), got {self.lora_dropout}")
            if self.task == "dyck":
                raise ValueError(
                    "task 'dyck' cannot use a pretrained model's tokenizer (subword tokens merge "
                    "brackets); use arithmetic or text with --model"
                )
        elif self.gradient_checkpointing:
            raise ValueError("--gradient-checkpointing applies to --model only")
        if self.resume and not self.save:
            raise ValueError("--resume needs --save (the checkpoint folder to resume from)")
        self.task_kwargs()  # parses

    def task_kwargs(self) -> dict[str, Any]:
        try:
            kwargs = json.loads(self.task_args)
        except json.JSONDecodeError as err:
            raise ValueError(f"--task-args is not valid JSON ({err.msg})") from None
        if not isinstance(kwargs, dict):
            raise ValueError("--task-args must be a JSON object")
        return kwargs

    @property
    def run_name(self) -> str:
        return self.name or f"{self.agent}-{self.task}-s{self.seed}"


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda asked for, but no CUDA device is available")
    try:
        return torch.device(name)
    except RuntimeError:  # torch's message for a bad string spans several lines
        raise ValueError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None
