"""One run of a comparison: train one agent with one seed, evaluate it, return its row."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any, cast

import torch

from agents.algorithms import resolve_algorithm
from agents.config import TrainConfig, resolve_device
from agents.evaluation.evaluate import evaluate, exact_metrics
from agents.evaluation.occupancy import GrammarTask
from agents.experiments.compare_config import comparison_disturbance, comparison_task, train_config
from agents.experiments.storage import RunSpec
from agents.training.checkpoint import POINTER
from agents.training.trainer import Trainer
from seqenv.env import noise_of
from seqenv.rules import step_budget
from seqenv.tasks import Task


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
    disturbance = comparison_disturbance(config)
    exact = evaluation.get("exact")
    if exact is not None:
        exact = {"p": disturbance.disturbance if disturbance else 0.0, **exact}
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
            save_and_resume(train, out)
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
        noise_fn = noise_of(disturbance, task)
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


def save_and_resume(train: TrainConfig, out: Path) -> None:
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


def run_spec(
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


def run_in_worker(
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
        return spec, run_spec(config, None, spec, device, False)
    except KeyboardInterrupt as err:
        raise RuntimeError(f"{spec.describe()}: {err or 'interrupted'}") from None
