"""The one flat, typed configuration of a training run (parsed by ``seqmatch train``)."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from typing import Any

import torch

from agents.deprecated import renamed_settings
from agents.models.policy import Positions
from agents.objectives import Divergence, SequenceMatchLoss, ValueSource
from agents.outputs import check_name, safe_name
from seqenv.devices import check_device
from seqenv.disturbance import DisturbanceKind, check_disturbance
from seqenv.trajectory import LabelKind


class RunError(RuntimeError):
    """A run refused or stopped for a reason the user can act on; reported in one line.

    Memory, device, a diverged loss, a full disk, an interrupt: reported like bad input.
    """


DEFAULT_MODEL_BATCH = 8
"""Rollouts per model batch when model_batch_size is unset (benchmarks/README.md: the cost of a
SequenceMatch run against BC, and the quality check that chose it)."""


@dataclass
class TrainConfig:
    """Everything a training run needs; stored in full in its checkpoints and logs."""

    agent: str = "sequencematch"
    """A registered algorithm (agents.algorithms: mle, bc, sequencematch and presets such as
    bc_executed; `seqmatch train --help` lists them) or module:Class, an Algorithm subclass of
    yours."""
    agent_args: str = "{}"
    """Settings of an algorithm of your own (its Settings dataclass) as JSON, e.g.
    '{"smoothing": 0.1}'; the built-in algorithms read TrainConfig's fields instead."""
    task: str = "arithmetic"
    """Task: arithmetic, dyck, text, a name given to seqenv.register_task, or module:Class."""
    task_args: str = "{}"
    """The task's keyword arguments as JSON, e.g. '{"base": 10, "max_digits": 2}'."""
    steps: int = 1000
    """Number of updates."""
    seed: int = 0
    """Seed of the weights, the data order, the noise and the rollouts."""
    logdir: str | None = "runs"
    """TensorBoard runs go to LOGDIR/NAME; none if empty."""
    name: str | None = None
    """Run name, a plain name (no path separator, no '..'); default AGENT-TASK-sSEED."""
    save: str | None = None
    """Checkpoint folder (written at save_interval and at the end); none if unset. A new or
    empty folder, or a checkpoint; a run holds its lock, so a second run there fails at once."""
    resume: bool = False
    """Continue from the checkpoint in --save, exactly where it stopped."""
    overwrite: bool = False
    """Replace the checkpoint in --save with this run's (its current step stays until the first
    new save is complete; only what seqmatch wrote there is removed, as its manifest lists).
    Without it or --resume, --save must name a new or empty folder."""
    json: str | None = None
    """Write the final metrics to this JSON file: replaced atomically; a symlink is followed;
    a device or pipe (/dev/stdout) is written in place (the printed lines then go to stderr)."""

    # --- Data ---

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

    # --- Disturbance (docs/method.md §5); bc and sequencematch only ---

    disturbance: float = 0.1
    """Disturbance p: the environment replaces a token action by a noise token with this
    chance, in the demonstrations (the expert then backspaces it), the rollouts and the
    disturbed evaluation."""
    disturbance_type: DisturbanceKind = "random"
    """random (uniform tokens) or ground_truth (the task's plausible mistakes)."""
    labels: LabelKind = "intended"
    """Actions learned from: intended (what the agent chose; noise is never a target) or
    executed (what ran, noise tokens included: the paper's scheme, an ablation)."""
    noise_targets: bool = True
    """With executed labels, the noise tokens are BC targets (the paper); False: only their
    undoing."""
    backspace: bool = True
    """Allow the backspace action; False gives the no-backspace ablation (and no noise)."""

    # --- Pretrained model (agents.models.hf) ---

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

    # --- Model (our transformer; ignored with --model) ---

    layers: int = 2
    """Transformer blocks, >= 1."""
    width: int = 128
    """Model width (embedding size), >= 1; a multiple of --heads."""
    heads: int = 4
    """Attention heads per block, >= 1."""
    dropout: float = 0.0
    """Dropout probability in the transformer, in [0, 1)."""
    positions: Positions = "learned"
    """learned or rotary position embeddings."""

    # --- Optimisation ---

    lr: float = 1e-3
    """Peak learning rate of AdamW, > 0."""
    min_lr_ratio: float = 0.1
    """The cosine schedule decays to lr * min_lr_ratio."""
    lr_warmup: int = 50
    """Linear learning-rate warm-up, in updates."""
    lr_schedule_steps: int | None = None
    """Length of the cosine schedule; --steps if unset. Set it to the final length of a run
    that you will extend with --resume, so the schedule does not depend on where it stops."""
    weight_decay: float = 0.01
    """AdamW weight decay, >= 0."""
    grad_clip: float = 1.0
    """Maximum global gradient norm, > 0."""

    # --- SequenceMatch (docs/method.md §3-4) ---

    divergence: Divergence = "chi2_mixture"
    """The divergence SequenceMatch minimises; chi2_mixture is the paper's, linear is for tests."""
    c: float = 0.25
    """Coefficient of the chi^2 terms (chi2_mixture; chi2 has a fixed 1/4). For chi2_mixture,
    chi2 and linear only kappa = c * alpha moves the fixed point: 0.25 is biased toward never
    ending and runaway backspacing, 0.025 leaves a small bias, <= 0.0025 lands on the target."""
    alpha: float = 0.01
    """Soft-Q temperature of SequenceMatch: Q = alpha * logits, V = alpha * logsumexp (0.01,
    our reading of the paper's alpha). Not the sampling --temperature of the rollouts."""
    gamma: float = 0.998
    """Discount of SequenceMatch (0.998 in the paper)."""
    eta: float = 0.3
    """Weight of SequenceMatch in (1 - eta) * BC + eta * SM / alpha after the warm start. The
    share of the gradient norm that comes from SM is about eta (0.10 at 0.1, 0.31 at 0.3 on
    dyck_small); 0.3 gives it a quarter or more while keeping the exact bounds on dyck_small,
    and eta from 0.01 to 1 made no measured difference on dyck_hard (benchmarks/README.md)."""
    level_penalty: float = 0.01
    """Weight of the log-partition penalty (a z-loss: V(s)^2 per target step) in BC (the bc
    agent, DAgger's warm start) and in SequenceMatch's warm start and BC part. The policy
    ignores the logits' common level; SequenceMatch's chi^2 terms read it (docs/method.md §3,
    "The logits' level"). BC has it too, at the same weight, so that SequenceMatch - BC is the
    SequenceMatch term's own effect, and because it measurably helps BC's recovery: +0.25
    [+0.03, +0.46] on one-digit arithmetic (6 seeds), at a small cost in small dyck's exact fit
    (chi^2 0.0016 against 0.0006, both far inside their bound; benchmarks/README.md). MLE trains
    without it. 0 turns it off."""
    value_source: ValueSource = "mix"
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
    """Sampling temperature of the rollouts (not the soft-Q temperature --alpha)."""

    # --- DAgger (agents/algorithms/dagger.py): the task's oracle labels the learner's states ---

    dagger_warmup: int = 200
    """Updates of plain BC before the on-policy rounds (as SequenceMatch's sm_warmup): the first
    rollouts then come from a policy that has learnt the shape of the data."""
    dagger_beta: float = 0.5
    """beta_0: the chance that a rollout step takes the oracle's action instead of the
    learner's, in the first round (DAgger's mixture policy keeps early rollouts near the
    expert's states while the learner is still BC)."""
    dagger_beta_decay: float = 0.99
    """beta_i = beta_0 * decay^i at the i-th update after the warm start (0.99: halved every 69
    updates, so the late rounds are the learner's own states)."""
    dagger_rollouts: int = 16
    """Rollouts of the current policy per update (on average), on the training prompts, into
    the buffer."""
    dagger_round: int = 4
    """Updates per DAgger round: each round starts with dagger_rollouts x dagger_round rollouts
    of the current policy, generated in one batch (a batched generation of 64 episodes costs
    about what one of 16 does: the steps, not the rows, take the time)."""
    dagger_buffer_size: int = 2048
    """Capacity of the FIFO buffer of labelled rollouts (trajectories): the aggregated dataset,
    bounded; the oldest rounds leave first."""
    dagger_demo_share: float = 0.25
    """Share of each batch that is demonstrations relabelled by the oracle (the rest: rollouts
    from the buffer). Keeps the expert's own states in every update; 1 trains on relabelled
    demonstrations only (the control with the same expert information, no rollouts)."""

    # --- Run cost: defaults chosen by the quality check in benchmarks/README.md ---

    model_batch_size: int | None = None
    """Rollouts per model batch of a SequenceMatch update (per process); unset: the smaller of
    8 and batch_size, rounded up to a multiple of grad_accum. Each term is normalised by its own
    number of sequences, but the pooled value term (mix) then weighs data and model samples in
    proportion to the two sizes. Set it to batch_size for a model batch as large as the data
    batch (the first version's setting)."""
    model_batch_buckets: int = 4
    """Draw model batches by length: every this many updates, draw that many model batches'
    worth of rollouts from the buffer at once (uniformly, with replacement, as usual), sort
    them by length and serve them as that many batches of similar lengths, in random order,
    so that a batch pads to less. Each rollout is still drawn uniformly; what changes is which
    rollouts share an update. 1: one uniform draw per update."""
    rollout_length_factor: float | None = 2.0
    """Cap the rollouts' step budget at ceil(factor * the rollout_length_quantile of the
    demonstrations' step counts), never above max_steps; longer rollouts are truncated (their
    last state bootstrapped, docs/method.md §3). None: the full step budget."""
    rollout_length_quantile: float = 0.99
    """The quantile of the demonstrations' step counts that rollout_length_factor scales."""

    # --- Evaluation, logging, hardware ---

    eval_interval: int = 200
    """Updates between evaluations, >= 0 (0: only at the end)."""
    eval_episodes: int = 128
    """Held-out prompts per evaluation, >= 1."""
    eval_greedy: bool | None = None
    """Greedy evaluation episodes; default: greedy for arithmetic (accuracy), sampled otherwise
    (validity and likelihood of the distribution the policy generates)."""
    log_interval: int = 20
    """Updates between two logged rows of training metrics, >= 1."""
    grad_share_interval: int = 100
    """SequenceMatch updates between two measurements of the gradient shares
    (``train/grad_share_sm``, ``train/grad_share_kappa``), each three extra backward passes;
    logged with the next row. 0: never (a diagnostic only: training is the same either way)."""
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

    @property
    def resolved_model_batch_size(self) -> int:
        """The model batch of a SequenceMatch update: model_batch_size, or its default."""
        if self.model_batch_size is not None:
            return self.model_batch_size
        smallest = min(DEFAULT_MODEL_BATCH, self.batch_size)
        return -(-smallest // self.grad_accum) * self.grad_accum

    def validate(self) -> None:
        """Raise ValueError naming the first bad field."""
        for field in dataclasses.fields(self):  # nan and inf are never a setting
            value = getattr(self, field.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"--{field.name.replace('_', '-')} must be finite, got {value}")
        for name in (
            "steps",
            "batch_size",
            "grad_accum",
            "num_demonstrations",
            "k_sample",
            "rollouts",
            "buffer_size",
            "eval_episodes",
            "log_interval",
            "layers",
            "width",
            "heads",
            "dagger_rollouts",
            "dagger_round",
            "dagger_buffer_size",
        ):
            if getattr(self, name) < 1:
                raise ValueError(
                    f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}"
                )
        for name in ("max_length", "max_steps"):  # unset (None) means the default; 0 is an error
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(
                    f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}"
                )
        non_negative = ("eval_interval", "save_interval", "sm_warmup", "lr_warmup", "dagger_warmup")
        for name in (*non_negative, "grad_share_interval"):
            if getattr(self, name) < 0:
                raise ValueError(
                    f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}"
                )
        if self.model_batch_size is not None and (
            self.model_batch_size < 1 or self.model_batch_size % self.grad_accum
        ):
            raise ValueError(
                f"--model-batch-size must be >= 1 and a multiple of grad_accum {self.grad_accum}, "
                f"got {self.model_batch_size}"
            )
        if self.model_batch_buckets < 1:
            raise ValueError(f"--model-batch-buckets must be >= 1, got {self.model_batch_buckets}")
        if self.rollout_length_factor is not None and not self.rollout_length_factor > 0:
            raise ValueError(
                f"--rollout-length-factor must be > 0, got {self.rollout_length_factor}"
            )
        if not 0.0 < self.rollout_length_quantile <= 1.0:
            raise ValueError(
                f"--rollout-length-quantile must be in (0, 1], got {self.rollout_length_quantile}"
            )
        if self.batch_size % self.grad_accum:
            raise ValueError(
                f"batch_size {self.batch_size} is not a multiple of grad_accum {self.grad_accum}"
            )
        for name in ("dagger_beta", "dagger_demo_share"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(
                    f"--{name.replace('_', '-')} must be in [0, 1], got {getattr(self, name)}"
                )
        if not 0.0 < self.dagger_beta_decay <= 1.0:
            raise ValueError(f"--dagger-beta-decay must be in (0, 1], got {self.dagger_beta_decay}")
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
        if not (math.isfinite(self.alpha) and self.alpha > 0.0):
            raise ValueError(f"--alpha must be finite and > 0, got {self.alpha}")
        if not (math.isfinite(self.level_penalty) and self.level_penalty >= 0.0):
            raise ValueError(f"--level-penalty must be finite and >= 0, got {self.level_penalty}")
        if not self.grad_clip > 0.0:
            raise ValueError(f"--grad-clip must be > 0, got {self.grad_clip}")
        if not self.weight_decay >= 0.0:
            raise ValueError(f"--weight-decay must be >= 0, got {self.weight_decay}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"--dropout must be in [0, 1), got {self.dropout}")
        if not self.c >= 0.0:
            raise ValueError(f"--c must be >= 0, got {self.c}")
        # The SequenceMatch loss checks its own settings; building it fails before any file.
        SequenceMatchLoss.from_settings(self)
        resolve_device(self.device)
        if self.labels not in ("intended", "executed"):
            raise ValueError(f"--labels must be intended or executed, got {self.labels!r}")
        check_disturbance(self.disturbance, self.disturbance_type)
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
        else:
            for name in ("lora_r", "lora_alpha", "lora_dropout"):
                if getattr(self, name) != getattr(TrainConfig, name):
                    raise ValueError(
                        f"--{name.replace('_', '-')} applies to --model only (LoRA adapters of a "
                        "pretrained model); remove it, or pass --model"
                    )
        if self.name:
            check_name(self.name, "--name")
        if self.resume and not self.save:
            raise ValueError("--resume needs --save (the checkpoint folder to resume from)")
        if self.overwrite and not self.save:
            raise ValueError("--overwrite needs --save (the checkpoint folder to replace)")
        if self.resume and self.overwrite:
            raise ValueError("--resume and --overwrite exclude each other")
        self.task_kwargs()  # parses

    def task_kwargs(self) -> dict[str, Any]:
        """``task_args`` parsed; ValueError (one line) unless it is a JSON object."""
        return parse_task_args(self.task_args)

    @property
    def run_name(self) -> str:
        """``name``, or ``AGENT-TASK-sSEED`` when it is empty."""
        return self.name or safe_name(f"{self.agent}-{self.task}-s{self.seed}")


# Settings added after checkpoints were first written, each with the value that trained as the
# library did before it existed: a checkpoint that lacks one resumes as it was trained.
ADDED_SETTINGS: dict[str, Any] = {
    "level_penalty": 0.0,
    "agent_args": "{}",
    # DAgger's settings change no other agent's run: their defaults, as first written.
    "dagger_warmup": 200,
    "dagger_beta": 0.5,
    "dagger_beta_decay": 0.99,
    "dagger_rollouts": 16,
    "dagger_round": 4,
    "dagger_buffer_size": 2048,
    "dagger_demo_share": 0.25,
}


def saved_settings(saved: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint's stored config: settings added since filled in, renamed ones renamed."""
    return {**ADDED_SETTINGS, **renamed_settings(saved)}


def parse_task_args(task_args: str) -> dict[str, Any]:
    """``--task-args`` JSON as a dict; ValueError (one line) unless it is a JSON object."""
    try:
        kwargs = json.loads(task_args)
    except json.JSONDecodeError as err:
        raise ValueError(f"--task-args is not valid JSON ({err.msg})") from None
    if not isinstance(kwargs, dict):
        raise ValueError("--task-args must be a JSON object")
    return kwargs


def resolve_device(name: str) -> torch.device:
    """The torch device ``name`` means; ValueError (one line) if it is unknown or not here."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:  # torch's message for a bad string spans several lines
        raise ValueError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None
    check_device(device, f"--device {name}")  # a CUDA device that is not on this machine
    if device.type == "mps":
        if not torch.backends.mps.is_available():
            raise ValueError("--device mps asked for, but MPS is not available")
    elif device.type not in ("cpu", "cuda"):  # torch knows it (xla, meta, ...); we cannot run it
        raise ValueError(f"--device {name}: not supported here; use auto, cpu, cuda or cuda:N")
    return device
