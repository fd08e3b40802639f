"""The training loop of every agent: MLE, BC and SequenceMatch differ only in their objective.

One update, top to bottom (METHOD.md §4):

1. **data**: draw demonstrations; for BC and SequenceMatch, noise-augment them (METHOD.md §5).
2. **rollouts** (SequenceMatch after the warm start): every ``k_sample`` updates, sample fresh
   trajectories from the current policy with KV-cache generation, into a FIFO replay buffer;
   draw this update's model batch from it.
3. **loss**: MLE or BC during the warm start (``sm_warmup`` updates); then
   ``(1 - eta) * BC + eta * SequenceMatch``.
4. **step**: gradient accumulation, clipping, AdamW with warm-up and a cosine schedule.
5. **log / eval / save** at their intervals: TensorBoard scalars, task score of greedy
   generations on held-out prompts, atomic checkpoints.

One process on the CPU or a GPU; several under ``torchrun`` (DDP). Every rank draws the same
global batch from the same seeded stream and keeps its own slice, so N ranks with batch B take
the same steps as one process with batch N * B (the gradients are averaged, and each rank's loss
is normalised by its own B).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import time
from contextlib import AbstractContextManager
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeAlias

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from agents.buffer import ReplayBuffer
from agents.collate import TrajectoryBatch, collate
from agents.evaluation.metrics import episode_metrics, final_generated
from agents.generate import generate
from agents.models.policy import TransformerConfig, TransformerPolicy
from agents.objectives import (
    BC,
    MLE,
    LossOutput,
    Mixture,
    Objective,
    ObjectiveBatch,
    SequenceMatch,
    make_objective,
)
from agents.training.checkpoint import (
    CheckpointError,
    load_policy,
    load_training_state,
    load_weights,
    model_metadata,
    read_metadata,
    save_checkpoint,
)
from agents.training.config import TrainConfig, resolve_device
from agents.training.logger import Logger
from seqenv.tasks import Task, make_task
from seqenv.trajectory import Trajectory, augment, load_demonstrations, random_noise
from seqenv.vocab import SpecialIds, Vocab

if TYPE_CHECKING:
    from agents.models.hf import HFPolicy

Policy: TypeAlias = "TransformerPolicy | HFPolicy"
"""The policies a run trains: our transformer, or a pretrained LM (``--model``)."""


class _BatchForward(nn.Module):
    """``forward(batch)`` of a policy, so that DDP and torch.compile see the whole masked pass."""

    def __init__(self, policy: Policy) -> None:
        super().__init__()
        self.policy = policy

    def forward(self, batch: TrajectoryBatch) -> torch.Tensor:
        return self.policy.forward_batch(batch)


class _PolicyView:
    """What the objectives see: the policy's ids, with ``forward_batch`` routed through the
    (possibly DDP-wrapped, possibly compiled) batch module so gradients are synchronised."""

    def __init__(self, policy: Policy, batch_forward: nn.Module) -> None:
        self.policy = policy
        self.special = policy.special
        self._batch_forward = batch_forward

    def forward_batch(self, batch: TrajectoryBatch) -> torch.Tensor:
        return self._batch_forward(batch)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.policy, name)


class Trainer:
    """Trains one agent on one task. Library code: takes a config, never reads the command line."""

    def __init__(self, config: TrainConfig, task: Task | None = None) -> None:
        """``task``, if given, is used instead of building ``config.task`` (same name)."""
        config.validate()
        self.config = config
        self.rank = int(os.environ.get("RANK", "0"))
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.distributed = self.world_size > 1
        self.device = resolve_device(config.device)
        if self.distributed and not dist.is_initialized():
            backend = "nccl" if self.device.type == "cuda" else "gloo"
            dist.init_process_group(backend)
            if self.device.type == "cuda":
                self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
                torch.cuda.set_device(self.device)
        self.is_main = self.rank == 0

        # Task, data and noise.
        if task is not None and task.name != config.task:
            raise ValueError(f"task object {task.name!r} given for config.task {config.task!r}")
        # With --model the task is built on the model's tokenizer, so ids agree everywhere.
        model_vocab = model_vocabulary(config)
        if task is None:
            task = make_task(config.task, vocab=model_vocab, **config.task_kwargs())
        elif model_vocab is not None and task.vocab.special != model_vocab.special:
            raise ValueError(
                f"the task's vocabulary is not the tokenizer of {config.model}: build the "
                "environment on it (SequenceGenEnv(task=make_task(name, vocab=...)))"
            )
        self.task: Task = task
        self.vocab = self.task.vocab
        self.special = self.vocab.special
        self.max_length = config.max_length or self.task.default_max_length
        self.max_steps = config.max_steps or 2 * self.max_length
        self.demonstrations = (
            self.task.demonstrations(
                "train", config.num_demonstrations, self.max_length, seed=config.seed
            )
            if config.data is None
            else load_demonstrations(
                config.data,
                self.vocab,
                self.max_length,
                prompt_tokens=getattr(self.task, "prompt_tokens", None),
            )
        )
        self.eval_prompts = [
            list(e.prompt)
            for e in self.task.examples("test", config.eval_episodes, seed=config.seed)
        ]
        self.noise_fn = (
            random_noise(self.special)
            if config.noise_type == "random"
            else self.task.ground_truth_noise
        )
        self.use_noise = config.agent != "mle" and config.backspace and config.noise > 0

        # Policy, optimizer, schedule.
        torch.manual_seed(config.seed)
        self.policy = build_policy(config, self.special, self.max_length).to(self.device)
        batch_forward: nn.Module = _BatchForward(self.policy)
        if config.compile:
            batch_forward = torch.compile(batch_forward)  # type: ignore[assignment]
        if self.distributed:
            batch_forward = nn.parallel.DistributedDataParallel(batch_forward)
        self.batch_forward = batch_forward
        self.policy_view = _PolicyView(self.policy, batch_forward)
        self.optimizer = torch.optim.AdamW(
            [p for p in self.policy.parameters() if p.requires_grad],  # LoRA: the adapters
            lr=config.lr,
            weight_decay=config.weight_decay,
            betas=(0.9, 0.95),
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_factor)

        # Objectives: the warm-start one, and the SequenceMatch mixture after it.
        # One normaliser for every term (METHOD.md §3), so that eta weighs like with like.
        common = {"normaliser_length": self.max_steps, "allow_backspace": config.backspace}
        if config.agent == "mle":
            self.warm_objective = make_objective("mle", **common)
        else:
            self.warm_objective = make_objective("bc", noise_targets=config.noise_targets, **common)
        self.sm_objective = None
        if config.agent == "sequencematch":
            sm = make_objective(
                "sequencematch",
                divergence=config.divergence,
                c=config.c,
                gamma=config.gamma,
                value_source=config.value_source,
                **common,
            )
            assert isinstance(self.warm_objective, MLE | BC) and isinstance(sm, SequenceMatch)
            self.sm_objective = Mixture(self.warm_objective, sm, config.eta)

        # Random streams: data order and noise (numpy, shared by every rank), rollouts (torch).
        self.data_rng = np.random.default_rng([config.seed, 1])
        self.rollout_generator = torch.Generator(self.device).manual_seed(config.seed + 2)
        self.buffer = ReplayBuffer(config.buffer_size)
        self.step = 0
        self.num_timesteps = 0  # demonstration actions trained on, all processes together
        self.history: list[dict[str, float]] = []  # the logged means, for learning curves
        self.last_eval: dict[str, float] = {}
        self.autocast_dtype = torch.bfloat16 if config.bf16 and self.device.type == "cuda" else None

    # -- schedule ----------------------------------------------------------------------------
    def _lr_factor(self, step: int) -> float:
        config = self.config
        if step < config.lr_warmup:
            return (step + 1) / config.lr_warmup
        horizon = config.lr_schedule_steps or config.steps
        progress = (step - config.lr_warmup) / max(1, horizon - config.lr_warmup)
        cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        return config.min_lr_ratio + (1 - config.min_lr_ratio) * cosine

    @property
    def in_warm_start(self) -> bool:
        return self.sm_objective is None or self.step < self.config.sm_warmup

    # -- data --------------------------------------------------------------------------------
    def _data_batch(self) -> list[Trajectory]:
        """This rank's slice of the global batch of (noise-augmented) demonstrations."""
        config = self.config
        total = config.batch_size * self.world_size
        index = self.data_rng.integers(0, len(self.demonstrations), size=total)
        noise_seeds = self.data_rng.integers(0, 2**63, size=total)
        mine = slice(self.rank * config.batch_size, (self.rank + 1) * config.batch_size)
        batch = []
        for i, seed in zip(index[mine], noise_seeds[mine], strict=True):
            demo = self.demonstrations[int(i)]
            if self.use_noise:
                demo = augment(
                    demo,
                    self.noise_fn,
                    p=config.noise,
                    k=config.noise_k,
                    rng=np.random.default_rng(int(seed)),
                    max_length=self.max_length,
                    max_steps=self.max_steps,
                )
            batch.append(demo)
        return batch

    def _rollouts(
        self,
        prompts: list[list[int]],
        greedy: bool = False,
        generator: torch.Generator | None = None,
    ) -> list[Trajectory]:
        self.policy.eval()
        out = generate(
            self.policy,
            prompts,
            max_length=self.max_length,
            max_steps=self.max_steps,
            greedy=greedy,
            temperature=self.config.temperature,
            generator=generator or self.rollout_generator,
            allow_backspace=self.config.backspace,
        )
        self.policy.train()
        return out.trajectories

    def _refresh_buffer(self) -> None:
        index = self.data_rng.integers(0, len(self.demonstrations), size=self.config.rollouts)
        prompts = [self.demonstrations[int(i)].prompt.tolist() for i in index]
        self.buffer.add(self._rollouts(prompts))

    # -- one update --------------------------------------------------------------------------
    def train_step(self, logger: Logger) -> None:
        config = self.config
        data = self._data_batch()
        model: list[Trajectory] | None = None
        objective: Objective = self.warm_objective
        if not self.in_warm_start:
            assert self.sm_objective is not None
            if (self.step - config.sm_warmup) % config.k_sample == 0:
                self._refresh_buffer()
            # Every rank holds the same buffer (same weights, same seeded rollouts): draw the
            # global model batch and keep this rank's slice, as for the data.
            total = config.batch_size * self.world_size
            mine = slice(self.rank * config.batch_size, (self.rank + 1) * config.batch_size)
            model = self.buffer.sample(total, self.data_rng)[mine]
            objective = self.sm_objective

        self.optimizer.zero_grad(set_to_none=True)
        micro = config.batch_size // config.grad_accum
        for k in range(config.grad_accum):
            part = slice(k * micro, (k + 1) * micro)
            batch = ObjectiveBatch(
                data=collate(data[part]).to(self.device),
                model=collate(model[part]).to(self.device) if model is not None else None,
            )
            last = k == config.grad_accum - 1
            ddp = self.batch_forward
            sync: AbstractContextManager[Any] = contextlib.nullcontext()
            if isinstance(ddp, nn.parallel.DistributedDataParallel) and not last:
                sync = ddp.no_sync()
            with (
                sync,
                torch.autocast(
                    self.device.type,
                    dtype=self.autocast_dtype or torch.float32,
                    enabled=self.autocast_dtype is not None,
                ),
            ):
                out: LossOutput = objective(self.policy_view, batch)
            (out.loss / config.grad_accum).backward()
            for key, value in out.metrics.items():
                logger.record(f"losses/{key}", value)
        grad_norm = torch.nn.utils.clip_grad_norm_(
            [p for p in self.policy.parameters() if p.requires_grad], config.grad_clip
        )
        lr = self.optimizer.param_groups[0]["lr"]  # this update's (the scheduler moves on below)
        self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        self.num_timesteps += sum(t.num_steps for t in data) * self.world_size

        logger.record("train/grad_norm", grad_norm)
        logger.record("train/lr", lr)
        # Whether this update used SequenceMatch (the step counter has moved on already).
        logger.record("train/sequencematch_active", float(model is not None))
        num_backspaces = sum(t.num_backspaces for t in data)
        logger.record("train/data_backspace_rate", num_backspaces / sum(t.num_steps for t in data))
        if model is not None:
            logger.record(
                "rollout/backspace_rate",
                sum(t.num_backspaces for t in model) / sum(t.num_steps for t in model),
            )
            logger.record("rollout/terminated", sum(t.terminated for t in model) / len(model))

    # -- evaluation --------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, logger: Logger | None = None) -> dict[str, float]:
        """Episodes on held-out prompts: task score, backspace use, samples.

        Sampled episodes draw from their own seeded stream, so evaluating never changes the
        course of training (and a resumed run stays exact).
        """
        greedy = self.config.eval_greedy
        if greedy is None:
            greedy = self.task.name == "arithmetic"
        generator = torch.Generator(self.device).manual_seed(self.config.seed + 3)
        trajectories = self._rollouts(self.eval_prompts, greedy=greedy, generator=generator)
        generated = final_generated(trajectories)
        metrics = {
            f"eval/{key}": value
            for key, value in episode_metrics(self.task, trajectories, generated).items()
        }
        if logger is not None:
            for key, value in metrics.items():
                logger.record(key, value)
            samples = "\n\n".join(
                f"    {self.vocab.decode(p)!r} -> {self.vocab.decode(t.actions)!r} "
                f"=> {self.vocab.decode(g)!r}"
                for p, t, g in list(zip(self.eval_prompts, trajectories, generated, strict=True))[
                    :8
                ]
            )
            logger.text("eval/samples", samples, self.step)
        return metrics

    # -- checkpoints -------------------------------------------------------------------------
    def metadata(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "num_timesteps": self.num_timesteps,
            "config": dataclasses.asdict(self.config),
            "vocab": self.vocab.to_json(),
            "task": {"name": self.task.name, "kwargs": self.task.config()},
            "model": model_metadata(self.policy),
            "max_length": self.max_length,
            "max_steps": self.max_steps,
            # Evaluation and generation read these instead of the task's data (a text corpus).
            "test_prompts": self.eval_prompts,
            "data_rng": self.data_rng.bit_generator.state,
            "buffer": self.buffer.to_json(),
            "eval": self.last_eval,
        }

    def save(self, path: str | Path) -> None:
        if self.is_main:
            save_checkpoint(
                path,
                self.policy,
                self.optimizer,
                self.metadata(),
                {"rollout": self.rollout_generator.get_state()},
            )
        if self.distributed:
            dist.barrier()

    def load(self, path: str | Path) -> None:
        """Restore everything a checkpoint holds, so training continues exactly."""
        metadata = read_metadata(path)
        try:
            self._restore(path, metadata)
        except (KeyError, TypeError) as err:  # a checkpoint.json with missing or odd entries
            raise CheckpointError(
                f"{path}/checkpoint.json is incomplete or corrupt ({type(err).__name__}: {err})"
            ) from None

    def _restore(self, path: str | Path, metadata: dict[str, Any]) -> None:
        if metadata["vocab"] != self.vocab.to_json():
            raise CheckpointError(
                f"{path}: the checkpoint's vocabulary does not match task {self.task.name!r}"
            )
        saved = {k: v for k, v in metadata["config"].items() if k not in _RESUMABLE}
        current = {k: v for k, v in dataclasses.asdict(self.config).items() if k not in _RESUMABLE}
        changed = sorted(k for k in current if saved.get(k) != current[k])
        if changed:
            raise CheckpointError(f"{path}: cannot resume with different settings: {changed}")
        load_weights(path, self.policy)
        rng = load_training_state(path, self.optimizer, metadata)
        self.step = int(metadata["step"])
        self.num_timesteps = int(metadata.get("num_timesteps", 0))
        self.scheduler.last_epoch = self.step
        self.scheduler._last_lr = [g["lr"] for g in self.optimizer.param_groups]
        self.data_rng.bit_generator.state = metadata["data_rng"]
        self.rollout_generator.set_state(rng["rollout"])
        self.buffer.load_json(metadata["buffer"], self.special)
        self.last_eval = metadata.get("eval", {})

    # -- the loop ----------------------------------------------------------------------------
    def train(self) -> dict[str, float]:
        """Run until ``config.steps`` updates; return the final evaluation."""
        config = self.config
        if config.resume:
            self.load(config.save)  # type: ignore[arg-type]
        logdir = Path(config.logdir) / config.run_name if config.logdir else None
        logger = Logger(logdir if self.is_main else None)
        if self.is_main and self.step == 0:
            logger.text(
                "config",
                "    " + json.dumps(dataclasses.asdict(config), indent=1).replace("\n", "\n    "),
                0,
            )
        bar = tqdm(
            total=config.steps,
            initial=self.step,
            disable=not (config.progress and self.is_main),
            desc=config.run_name,
            dynamic_ncols=True,
        )
        self.policy.train()
        start, start_step = time.perf_counter(), self.step
        try:
            while self.step < config.steps:
                self.train_step(logger)
                bar.update(1)
                if self.step % config.log_interval == 0 or self.step == config.steps:
                    elapsed = time.perf_counter() - start
                    logger.record("train/updates_per_s", (self.step - start_step) / elapsed)
                if config.eval_interval and self.step % config.eval_interval == 0:
                    self.last_eval = self.evaluate(logger)
                if self.step % config.log_interval == 0 or self.step == config.steps:
                    means = logger.dump(self.step)  # syncs the recorded tensors: once per interval
                    self.history.append({"step": self.step, **means})
                    bar.set_postfix(
                        loss=f"{means.get('losses/loss', float('nan')):.3f}",
                        score=f"{self.last_eval.get('eval/score', float('nan')):.2f}",
                    )
                if config.save and config.save_interval and self.step % config.save_interval == 0:
                    self.save(config.save)
            if (
                not self.last_eval
                or not config.eval_interval
                or (config.steps % config.eval_interval)
            ):
                self.last_eval = self.evaluate(logger)
                self.history.append({"step": self.step, **logger.dump(self.step)})
            if config.save:
                self.save(config.save)
        finally:
            bar.close()
            logger.close()
        return self.last_eval


__all__ = ["Trainer", "build_policy", "load_policy", "model_vocabulary"]

# Settings that may change between a run and its resume (where things go, how they are shown).
_RESUMABLE = {"resume", "json", "progress", "logdir", "name", "save", "steps", "device"}


def model_vocabulary(config: TrainConfig) -> Vocab | None:
    """The tokenizer vocabulary of ``config.model``; None without a pretrained model."""
    if config.model is None:
        return None
    from agents.models.hf import load_hf_vocab

    return load_hf_vocab(config.model)


def build_policy(config: TrainConfig, special: SpecialIds, max_length: int) -> Policy:
    """The policy a run trains: our transformer, or the pretrained LM of ``config.model``
    (LoRA adapters when ``config.lora_r > 0``, all weights otherwise)."""
    if config.model is None:
        return TransformerPolicy(
            special,
            TransformerConfig(
                num_layers=config.layers,
                width=config.width,
                num_heads=config.heads,
                context_length=max_length,
                dropout=config.dropout,
                positions=config.positions,  # type: ignore[arg-type]
            ),
        )
    from agents.models.hf import LoraSettings, load_hf

    policy, _ = load_hf(config.model)
    if policy.special != special:
        raise ValueError(f"{config.model}: the model's special ids differ from the task's")
    if policy.max_positions is not None and max_length > policy.max_positions:
        raise ValueError(
            f"--max-length {max_length} exceeds the model's {policy.max_positions} positions"
        )
    if config.lora_r > 0:
        policy.enable_lora(LoraSettings(config.lora_r, config.lora_alpha, config.lora_dropout))
    if config.gradient_checkpointing:
        # Non-reentrant: works with a frozen embedding (no input needs a gradient).
        policy.model.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": False}
        )
    return policy
