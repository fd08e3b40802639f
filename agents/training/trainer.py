"""The training loop of every agent; what differs between agents is their algorithm's.

The run's algorithm (:mod:`agents.algorithms`, looked up by ``config.agent``) says what data it
learns from, whether it needs rollouts and the loss of each update; this loop names no agent.
One update, top to bottom (docs/method.md §4):

1. **data**: draw demonstrations; in the disturbed environment for an algorithm that learns
   from it (docs/method.md §5).
2. **rollouts**: the algorithm's model batch, if it has one (SequenceMatch after its warm
   start: KV-cache generations of the current policy through a replay buffer).
3. **loss**: the algorithm's loss of this update. Where it has a SequenceMatch part, at log
   intervals ``train/grad_share_sm`` and ``train/grad_share_kappa`` give the shares of the
   gradient norm that come from it and from its chi^2 (kappa) terms
   (:func:`agents.objectives.gradient_shares`; one process, not compiled, first micro-batch).
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
import errno
import json
import math
import os
import shutil
import threading
import time
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from agents.algorithms import resolve_algorithm
from agents.config import RunError, TrainConfig, resolve_device
from agents.evaluation.evaluate import headline
from agents.objectives import LossOutput, SequenceMatchLoss, gradient_shares
from agents.outputs import check_folder, first_missing
from agents.training.checkpoint import (
    MARKER,
    CheckpointError,
    check_save_target,
    holding,
    is_checkpoint,
    mark_checkpoint,
    read_metadata,
    resolve_checkpoint,
    save_checkpoint,
)
from agents.training.logger import Logger
from agents.training.memory import check_host_memory, check_memory, training_bytes
from agents.training.policies import BatchForward, PolicyView, build_policy, model_vocabulary
from agents.training.run_eval import evaluate_run
from agents.training.run_state import restore_run, run_metadata
from agents.training.signals import stop_on_sigint
from seqenv.disturbance import KEY_BOUND, Disturbance
from seqenv.env import noise_of
from seqenv.rules import step_budget
from seqenv.tasks import Task, make_task
from seqenv.trajectory import (
    Trajectory,
    check_episodes,
    disturbed_demonstrations,
    load_demonstrations,
)


class Trainer:
    """Trains one agent on one task. Library code: takes a config, never reads the command line."""

    def __init__(self, config: TrainConfig, task: Task | None = None) -> None:
        """``task``, if given, is used instead of building ``config.task`` (same name)."""
        config.validate()
        self.spec = resolve_algorithm(config.agent)  # the registered name, or module:Class
        self.spec.cls.validate(config)  # its own settings, before any work
        check_outputs(config)
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
        self.max_steps = step_budget(self.max_length, config.max_steps)
        if config.model is None:  # a pretrained model's size is known only once it is read
            check_memory(
                training_bytes(config, self.special.num_actions, self.max_length, self.max_steps),
                self.device,
                "the model, its optimizer and a batch",
            )
        check_host_memory(config, self.max_length, self.world_size)
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
        self.eval_key = f"eval/{headline(self.task.name)}"  # shown beside the progress bar
        self.heldout = self.task.demonstrations(
            "test", config.eval_episodes, self.max_length, seed=config.seed
        )
        # The environment's disturbance (docs/method.md §5): demonstrations, rollouts and the
        # disturbed evaluation share it, for an algorithm that learns from it.
        self.disturbance = (
            Disturbance(config.disturbance, config.disturbance_type)
            if self.spec.cls.uses_disturbance(config)
            else None
        )
        self.noise_fn = noise_of(self.disturbance, self.task) if self.disturbance else None
        if self.disturbance is not None:
            # Checked once here: every batch then draws its disturbances without rechecking.
            check_episodes(self.demonstrations, self.max_length, self.max_steps)

        # Policy, optimizer, schedule.
        torch.manual_seed(config.seed)
        self.policy = build_policy(config, self.special, self.max_length).to(self.device)
        batch_forward: nn.Module = BatchForward(self.policy)
        if config.compile:
            batch_forward = torch.compile(batch_forward)  # type: ignore[assignment]
        if self.distributed:
            batch_forward = nn.parallel.DistributedDataParallel(batch_forward)
        self.batch_forward = batch_forward
        self.policy_view = PolicyView(self.policy, batch_forward)
        self.optimizer = torch.optim.AdamW(
            [p for p in self.policy.parameters() if p.requires_grad],  # LoRA: the adapters
            lr=config.lr,
            weight_decay=config.weight_decay,
            betas=(0.9, 0.95),
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_factor)

        # Every agent's occupancy-divergence estimate d_hat = J + alpha H, measured the same way
        # at eval intervals (held-out demonstrations against the agent's own evaluation
        # episodes), so that the curves of all agents overlay.
        self.divergence_probe = SequenceMatchLoss.from_settings(
            config,
            normaliser_length=self.max_steps,
            allow_backspace=config.backspace,
            value_source="mix",
        )

        # Random streams: data order and noise (numpy, shared by every rank), rollouts (torch).
        self.data_rng = np.random.default_rng([config.seed, 1])
        self.rollout_generator = torch.Generator(self.device).manual_seed(config.seed + 2)
        self.algorithm = self.spec.cls(self)  # reads the streams, data and policy above
        self.step = 0
        self.num_timesteps = 0  # demonstration actions trained on, all processes together
        self.num_labelled_states = 0  # states an expert labelled that updates read, likewise
        self.history: list[dict[str, float]] = []  # the logged means, for learning curves
        self.last_eval: dict[str, float] = {}
        self.autocast_dtype = torch.bfloat16 if config.bf16 and self.device.type == "cuda" else None
        self._first_step = 0  # the step this process started training from (set by train)
        self._saved_step: int | None = None  # the update of the last save

    # -- schedule ----------------------------------------------------------------------------
    def _lr_factor(self, step: int) -> float:
        config = self.config
        if step < config.lr_warmup:
            return (step + 1) / config.lr_warmup
        horizon = config.lr_schedule_steps or config.steps
        progress = (step - config.lr_warmup) / max(1, horizon - config.lr_warmup)
        cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        return config.min_lr_ratio + (1 - config.min_lr_ratio) * cosine

    # -- data --------------------------------------------------------------------------------
    def _data_batch(self) -> list[Trajectory]:
        """This rank's slice of the global batch of demonstrations.

        The expert acting in the disturbed environment (it backspaces each disturbance), or
        clean ones without it.
        """
        config = self.config
        total = config.batch_size * self.world_size
        index = self.data_rng.integers(0, len(self.demonstrations), size=total)
        keys = self.data_rng.integers(0, KEY_BOUND, size=total)  # each episode's noise stream
        mine = slice(self.rank * config.batch_size, (self.rank + 1) * config.batch_size)
        clean = [self.demonstrations[int(i)] for i in index[mine]]
        if self.disturbance is None:
            return clean
        return disturbed_demonstrations(
            clean,
            self.disturbance,
            self.max_length,
            self.max_steps,
            noise_fn=self.noise_fn,
            keys=keys[mine].tolist(),
            check=False,
        )

    # -- one update --------------------------------------------------------------------------
    def train_step(self, logger: Logger) -> None:
        """One optimiser update over the gradient-accumulated batch; records to ``logger``."""
        config = self.config
        data = self._data_batch()
        objective = self.algorithm.loss(self.step)
        model = self.algorithm.model_batch(self.step)  # drawn after the data: one stream

        self.optimizer.zero_grad(set_to_none=True)
        losses: list[torch.Tensor] = []
        micro = config.batch_size // config.grad_accum
        model_micro = len(model) // config.grad_accum if model is not None else 0
        # Gradient shares cost three extra backward passes: every grad_share_interval updates
        # (and at the last), on the first micro-batch (shares are ratios, so grad_accum's 1/k
        # cancels). Not under DDP: torch.autograd.grad bypasses its reducer, so each rank would
        # see only its own slice; the shares would need an all-reduce of every part's gradient.
        # Not under torch.compile: its backward donates buffers and refuses retain_graph=True.
        every = config.grad_share_interval
        sampled = every > 0 and ((self.step + 1) % every == 0 or self.step + 1 == config.steps)
        measure_shares = sampled and not self.distributed and not config.compile
        labelled = 0  # the steps of the data batches read: states an expert labelled
        for k in range(config.grad_accum):
            part = slice(k * micro, (k + 1) * micro)
            model_part = slice(k * model_micro, (k + 1) * model_micro)
            built = self.algorithm.batch(
                data[part], model[model_part] if model is not None else None
            )
            labelled += int(built.data.step_mask.sum())  # on the host, before the copy
            batch = built.to(self.device)
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
            if measure_shares and k == 0 and "sm" in out.parts:  # a SequenceMatch part
                shares = gradient_shares(out.parts, self.policy.parameters())
                for key, value in shares.items():
                    logger.record(f"train/{key}", value)
            (out.loss / config.grad_accum).backward()
            losses.append(out.loss.detach())
            for key, value in out.metrics.items():
                logger.record(f"losses/{key}", value)
        grad_norm = torch.nn.utils.clip_grad_norm_(
            [p for p in self.policy.parameters() if p.requires_grad], config.grad_clip
        )
        self._check_finite(torch.stack(losses), grad_norm)
        lr = self.optimizer.param_groups[0]["lr"]  # this update's (the scheduler moves on below)
        self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        self.num_timesteps += sum(t.num_steps for t in data) * self.world_size
        self.num_labelled_states += labelled * self.world_size
        for name, figure in self.algorithm.metrics().items():
            logger.record(f"train/{name}", figure)

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

    def _check_finite(self, losses: torch.Tensor, grad_norm: torch.Tensor) -> None:
        """Stop before a non-finite loss or gradient reaches the weights.

        One host sync per update: a NaN must never be stepped into the weights, nor saved.
        """
        if bool(torch.isfinite(losses).all() & torch.isfinite(grad_norm)):
            return
        last = "none was saved"
        if self.config.save:
            with contextlib.suppress(CheckpointError):
                last = f"{self.config.save} (step {read_metadata(self.config.save)['step']})"
        raise RunError(
            f"update {self.step + 1}: non-finite loss ({losses.max().item():.4g}) or gradient "
            f"norm ({grad_norm.item():.4g}); training stopped, nothing saved; last good "
            f"checkpoint: {last}"
        )

    # -- evaluation --------------------------------------------------------------------------
    def evaluate(self, logger: Logger | None = None) -> dict[str, float]:
        """Episodes on held-out prompts, clean and disturbed, and d_hat (:mod:`.run_eval`).

        Sampled episodes draw from their own seeded stream, so evaluating never changes the
        course of training (and a resumed run stays exact).
        """
        return evaluate_run(self, logger)

    # -- checkpoints -------------------------------------------------------------------------
    def metadata(self) -> dict[str, Any]:
        """What a checkpoint stores besides the weights: step, config, vocabulary, task."""
        return run_metadata(self)

    def save(self, path: str | Path) -> None:
        """Save an atomic checkpoint (a failure leaves the previous one current)."""
        if self.is_main:
            try:
                save_checkpoint(
                    path,
                    self.policy,
                    self.optimizer,
                    self.metadata(),
                    {"rollout": self.rollout_generator.get_state()},
                )
            except OSError as err:
                if isinstance(err, FileExistsError | NotADirectoryError | PermissionError):
                    raise
                reason = "the disk is full" if err.errno == errno.ENOSPC else _reason(err)
                raise RunError(
                    f"could not save the checkpoint of step {self.step} to {path} ({reason}); "
                    "the previous checkpoint there is intact"
                ) from None
        self._saved_step = self.step
        if self.distributed:
            dist.barrier()

    def load(self, path: str | Path) -> None:
        """Restore everything a checkpoint holds, so training continues exactly."""
        metadata = read_metadata(path)
        path = resolve_checkpoint(path)
        try:
            restore_run(self, path, metadata)
        except (KeyError, TypeError, AttributeError) as err:  # missing or odd entries
            raise CheckpointError(
                f"{path}/checkpoint.json is incomplete or corrupt ({type(err).__name__}: {err})"
            ) from None

    # -- the loop ----------------------------------------------------------------------------
    def train(self) -> dict[str, float]:
        """Run until ``config.steps`` updates; return the final evaluation.

        Ctrl-C (SIGINT) stops after the update in progress, saves a checkpoint when ``--save``
        is set and raises KeyboardInterrupt; a second Ctrl-C stops at once. A run that fails
        before its first update removes the TensorBoard run folder it created. The ``--save``
        folder's lock is held throughout (by rank 0): one writer per folder.
        """
        config = self.config
        save = config.save if self.is_main else None
        again = self._saved_step is not None  # a later call continues what this one saved
        resume, overwrite = config.resume or again, config.overwrite and not again
        with holding(save, resume=resume, overwrite=overwrite):
            return self._train()

    def _train(self) -> dict[str, float]:
        config = self.config
        if config.resume:
            self.load(config.save)  # type: ignore[arg-type]
        logdir = Path(config.logdir) / config.run_name if config.logdir else None
        created = first_missing(logdir) if logdir is not None and self.is_main else None
        # Claim the --save folder now (its marker), so that nothing this run writes (a logdir
        # inside it) makes it look like a user's folder at the first save.
        claimed = None
        if config.save and self.is_main and not is_checkpoint(config.save):
            claimed = first_missing(config.save) or Path(config.save) / MARKER
            mark_checkpoint(config.save)
        with stop_on_sigint() as stop:
            try:
                return self._loop(logdir, stop)
            except BaseException:
                if created is not None and self.step == self._first_step:
                    shutil.rmtree(created, ignore_errors=True)
                if claimed is not None and self._saved_step is None:  # nothing saved: unclaim it
                    if claimed.is_dir():
                        shutil.rmtree(claimed, ignore_errors=True)
                    else:
                        claimed.unlink(missing_ok=True)
                raise

    def _loop(self, logdir: Path | None, stop: threading.Event) -> dict[str, float]:
        config = self.config
        self._first_step = self.step
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
                if stop.is_set():
                    if config.save:
                        self.save(config.save)
                    raise KeyboardInterrupt(self._interrupt_message())
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
                        eval=f"{self.last_eval.get(self.eval_key, float('nan')):.2f}",
                    )
                # The last update's checkpoint is written once, after the final evaluation.
                interval = config.save_interval and self.step % config.save_interval == 0
                if config.save and interval and self.step < config.steps:
                    self.save(config.save)
            if (
                not self.last_eval
                or not config.eval_interval
                or (config.steps % config.eval_interval)
            ):
                self.last_eval = self.evaluate(logger)
                self.history.append({"step": self.step, **logger.dump(self.step)})
            # Not saved just now: an evaluation repeated at the same update gives the same
            # values (its own seeded stream), so the update alone says the state is saved.
            if config.save and self._saved_step != self.step:
                self.save(config.save)
        finally:
            bar.close()
            logger.close()
        return self.last_eval

    def _interrupt_message(self) -> str:
        where = f"; checkpoint saved to {self.config.save} (--resume continues it)"
        return f"interrupted after update {self.step}" + (where if self.config.save else "")


__all__ = ["Trainer"]


def _reason(err: OSError) -> str:
    return err.strerror or str(err) or type(err).__name__


# -- checks before the work ------------------------------------------------------------------
def check_outputs(config: TrainConfig) -> None:
    """Refuse output paths a run could not write, or must not write into, before any work.

    The rule of :mod:`agents.outputs`: no input, none of seqmatch's own files, a ``--save``
    folder that no other process holds.
    """
    inputs = (("--data", config.data), ("--model", config.model))
    if config.save:
        check_save_target(
            config.save, resume=config.resume, overwrite=config.overwrite, inputs=inputs
        )
    if config.logdir:
        check_folder(Path(config.logdir) / config.run_name, "--logdir", None, inputs)
