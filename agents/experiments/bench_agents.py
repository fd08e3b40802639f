"""Agent cost: what SequenceMatch costs over MLE, per update and per run.

- ``sm_vs_mle_update``: training tokens/s of one SequenceMatch update over one MLE update, on
  the same policy (target >= 0.85). An update is forward + backward + gradient clipping + AdamW
  step of the objective on batches collated beforehand. SequenceMatch is the trainer's mixture
  ``(1 - eta) BC + eta SM`` (chi^2-mixture, value term on data and model samples) on B
  noise-augmented demonstrations and B rollouts of the policy, and its tokens are those of both
  batches; MLE is teacher forcing on clean demonstrations, as many as make about the same number
  of tokens. The two sides alternate call by call, and each keeps its fastest call, so that a
  shared machine's drift hits both alike.
- ``sm_vs_mle_run``: wall time of a whole SequenceMatch run over an MLE run with the same number
  of updates and batch size, through :class:`agents.trainer.Trainer` (warm start, rollouts every
  ``k_sample`` updates into the replay buffer, the model batches, the final evaluation; no
  TensorBoard, no checkpoint). Target <= 1.5. A SequenceMatch update reads a data batch *and* a
  model batch of the same size, so after the warm start it processes about twice the tokens of
  an MLE update: the per-token figure above is the one that measures waste.
- ``sm_vs_bc_run``: the same over a BC run with the same data (noise-augmented demonstrations,
  the same disturbance), updates and batch size; target <= 1.3. BC is SequenceMatch's warm
  start, so this isolates what the SequenceMatch phase adds: the rollouts and the model batch.
  The three runs (MLE, BC, SequenceMatch) alternate in one process.

Variants of the SequenceMatch run (other ``TrainConfig`` settings, e.g. ``model_batch_size``)
are measured in the same interleaving by ``python -m agents.experiments.bench_agents --run-only
--variant NAME:FIELD=VALUE,...``; they report ``sm[NAME]_vs_bc_run`` and ``sm[NAME]_vs_mle_run``.

Run: ``python benchmarks/throughput.py --only agents`` (or call :func:`measure`).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch

from agents.algorithms import SequenceMatch
from agents.collate import collate
from agents.config import TrainConfig
from agents.experiments.timing import interleaved_fastest
from agents.generate import generate
from agents.models.policy import TransformerPolicy
from agents.objectives import MLELoss, ObjectiveBatch
from agents.outputs import write_json
from agents.training.trainer import Trainer
from seqenv.disturbance import Disturbance
from seqenv.rules import step_budget
from seqenv.tasks import make_task
from seqenv.trajectory import Trajectory, disturbed_demonstrations

TASK = "arithmetic"
"""The default task of the trainer and of `seqmatch compare`."""


def _update_batches(
    policy: TransformerPolicy, config: TrainConfig, device: str
) -> tuple[ObjectiveBatch, ObjectiveBatch, dict[str, float]]:
    """The batches of one SequenceMatch update and of one MLE update of about as many tokens."""
    task = make_task(config.task)
    max_length = task.default_max_length
    max_steps = step_budget(max_length)
    rng = np.random.default_rng(0)
    B = config.batch_size
    demos = task.demonstrations("train", 8 * B, max_length, seed=0)
    noisy = disturbed_demonstrations(
        demos[:B], Disturbance(config.disturbance), max_length, max_steps, rng=rng
    )
    policy.eval()
    rollouts: list[Trajectory] = generate(
        policy, [d.prompt.tolist() for d in demos[B : 2 * B]], max_length=max_length,
        max_steps=max_steps, generator=torch.Generator(device).manual_seed(0),
    ).trajectories  # fmt: skip
    policy.train()
    sm = ObjectiveBatch(data=collate(noisy).to(device), model=collate(rollouts).to(device))
    sm_tokens = sm.data.num_tokens + sm.model.num_tokens  # type: ignore[union-attr]
    clean: list[Trajectory] = []
    for demo in demos[2 * B :]:
        if collate([*clean, demo]).num_tokens > sm_tokens and clean:
            break
        clean.append(demo)
    mle = ObjectiveBatch(data=collate(clean).to(device))
    rows = sm.data.input_ids.numel() + sm.model.input_ids.numel()  # type: ignore[union-attr]
    info = {
        "sm_update_tokens": float(sm_tokens),
        "mle_update_tokens": float(mle.data.num_tokens),
        # Input rows that are not padding: the share of a pass that does useful work.
        "sm_update_token_share": sm_tokens / rows,
        "mle_update_token_share": mle.data.num_tokens / mle.data.input_ids.numel(),
        "sm_update_rollout_backspace_share": float(
            sum(t.num_backspaces for t in rollouts) / sum(t.num_steps for t in rollouts)
        ),
    }
    return sm, mle, info


def _warm_started_policy(quick: bool, device: str) -> tuple[TransformerPolicy, TrainConfig]:
    """The trainer's default policy after its warm start (BC updates only), in train mode.

    SequenceMatch updates run after the warm start, on rollouts of a policy that has learnt the
    shape of the data; a freshly initialised policy's rollouts are far more ragged (a few run to
    the step budget), and their padding would dominate the measurement.
    """
    warm = 20 if quick else 60
    config = TrainConfig(
        agent="sequencematch", task=TASK, steps=warm, sm_warmup=warm, lr_warmup=10,
        num_demonstrations=2000, eval_interval=0, eval_episodes=1, logdir=None, save=None,
        progress=False, device=device,
    )  # fmt: skip
    trainer = Trainer(config)
    trainer.train()
    assert isinstance(trainer.policy, TransformerPolicy)  # no --model here
    return trainer.policy.train(), config


def _measure_update(quick: bool, device: str, sync: Callable[[], None]) -> dict[str, float]:
    policy, config = _warm_started_policy(quick, device)  # the trainer's defaults otherwise
    task = make_task(config.task)
    sm_batch, mle_batch, info = _update_batches(policy, config, device)
    normaliser = 2 * task.default_max_length
    _, mixture = SequenceMatch.losses(config, normaliser, allow_backspace=True)  # as it trains
    objectives = {
        "sm": (mixture, sm_batch),
        "mle": (MLELoss(normaliser_length=normaliser), mle_batch),
    }
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-4, betas=(0.9, 0.95))
    autocast: AbstractContextManager[Any] = (
        torch.autocast("cuda", dtype=torch.bfloat16) if device.startswith("cuda") else nullcontext()
    )

    def update(name: str) -> Callable[[], None]:
        objective, batch = objectives[name]

        def step() -> None:
            optimizer.zero_grad(set_to_none=True)
            with autocast:
                loss = objective(policy, batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(policy.parameters(), config.grad_clip)
            optimizer.step()

        return step

    fns = {name: update(name) for name in objectives}
    for fn in fns.values():  # warm-up
        fn()
    seconds = interleaved_fastest(fns, 5 if quick else 30, sync)
    tokens = {"sm": info["sm_update_tokens"], "mle": info["mle_update_tokens"]}
    rates = {name: tokens[name] / s for name, s in seconds.items()}
    return {
        "sm_vs_mle_update": rates["sm"] / rates["mle"],
        "sm_update_tokens_per_s": rates["sm"],
        "mle_update_tokens_per_s": rates["mle"],
        **info,
    }


def _run_config(agent: str, quick: bool, device: str, **settings: Any) -> TrainConfig:
    steps = 20 if quick else 100
    return TrainConfig(
        agent=agent, task=TASK, steps=steps, sm_warmup=steps // 5, device=device,
        num_demonstrations=2000, eval_interval=0, eval_episodes=16, log_interval=10,
        logdir=None, save=None, progress=False, **settings,
    )  # fmt: skip


class _TimedTrainer(Trainer):
    """The trainer, timing its rollouts (its algorithm's refreshes of the replay buffer)."""

    def __init__(self, config: TrainConfig, sync: Callable[[], None]) -> None:
        super().__init__(config)
        self.rollout_seconds = 0.0
        if isinstance(self.algorithm, SequenceMatch):
            refresh = self.algorithm.refresh_buffer

            def timed_refresh() -> None:
                sync()
                start = time.perf_counter()
                refresh()
                sync()
                self.rollout_seconds += time.perf_counter() - start

            self.algorithm.refresh_buffer = timed_refresh  # type: ignore[method-assign]


def _measure_run(
    quick: bool,
    device: str,
    sync: Callable[[], None],
    variants: dict[str, dict[str, Any]] | None = None,
    repeats: int | None = None,
) -> dict[str, float]:
    """Seconds of ``Trainer.train()`` (building the trainer and its dataset excluded).

    MLE, BC and SequenceMatch (the trainer's defaults) run in turn, ``repeats`` times, each
    keeping its fastest run; ``variants`` adds SequenceMatch runs with other settings (name ->
    TrainConfig fields), interleaved with the others and reported as ``sm[name]_vs_bc_run`` and
    ``sm[name]_vs_mle_run``. BC and SequenceMatch share the data, the updates and the
    disturbance (the trainer's defaults); MLE learns the clean data.
    """
    runs: dict[str, tuple[str, dict[str, Any]]] = {
        "mle": ("mle", {}),
        "bc": ("bc", {}),
        "sm": ("sequencematch", {}),
    }
    for name, settings in (variants or {}).items():
        runs[f"sm[{name}]"] = ("sequencematch", settings)
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    trainers: dict[str, _TimedTrainer] = {}
    for _ in range(repeats or (1 if quick else 2)):  # alternate; keep each one's fastest run
        for name, (agent, settings) in runs.items():
            trainer = _TimedTrainer(_run_config(agent, quick, device, **settings), sync)
            sync()
            start = time.perf_counter()
            trainer.train()
            sync()
            seconds[name].append(time.perf_counter() - start)
            if seconds[name][-1] == min(seconds[name]):
                trainers[name] = trainer
    best = {name: min(s) for name, s in seconds.items()}
    sm = trainers["sm"]
    assert isinstance(sm.algorithm, SequenceMatch)
    refreshes = -(-(sm.config.steps - sm.config.sm_warmup) // sm.config.k_sample)
    buffer = sm.algorithm.buffer.sample(len(sm.algorithm.buffer), np.random.default_rng(0))
    figures = {
        "sm_vs_bc_run": best["sm"] / best["bc"],
        "sm_vs_mle_run": best["sm"] / best["mle"],
        "sm_run_seconds": best["sm"],
        "bc_run_seconds": best["bc"],
        "mle_run_seconds": best["mle"],
        "sm_run_rollout_share": sm.rollout_seconds / best["sm"],
        "run_updates": float(sm.config.steps),
        "run_sm_updates": float(sm.config.steps - sm.config.sm_warmup),
        "run_rollouts": float(refreshes * sm.config.rollouts),
        # Why a model batch costs more than a data batch of the same size: longer episodes.
        "run_rollout_mean_steps": float(np.mean([t.num_steps for t in buffer])),
        "run_demo_mean_steps": float(np.mean([t.num_steps for t in sm.demonstrations])),
    }
    for name in variants or {}:
        key = f"sm[{name}]"
        figures[f"{key}_vs_bc_run"] = best[key] / best["bc"]
        figures[f"{key}_vs_mle_run"] = best[key] / best["mle"]
        figures[f"{key}_run_rollout_share"] = trainers[key].rollout_seconds / best[key]
    return figures


def measure(
    quick: bool = False,
    device: str = "cpu",
    cpu_threads: int | None = 1,
    variants: dict[str, dict[str, Any]] | None = None,
    run_only: bool = False,
    repeats: int | None = None,
) -> dict[str, float]:
    """SequenceMatch's cost over MLE and BC (see the module docstring), with the figures behind it.

    Args:
        quick: short measurements (a smoke test).
        device: "cpu" or "cuda".
        cpu_threads: torch's intra-op threads during a CPU measurement (restored afterwards);
            ``None`` keeps the current setting. One by default: on a shared machine, a thread
            team whose other cores are busy waits at every barrier, and timings swing tenfold.
        variants: SequenceMatch runs with other settings, measured beside the default one.
        run_only: skip the per-update figures.
        repeats: rounds of the run measurement (default 1 with ``quick``, else 2).
    """
    threads = torch.get_num_threads()
    if device == "cpu" and cpu_threads is not None:
        torch.set_num_threads(cpu_threads)
    is_cuda = device.startswith("cuda")

    def sync() -> None:
        if is_cuda:
            torch.cuda.synchronize(device)

    try:
        figures = {} if run_only else _measure_update(quick, device, sync)
        figures.update(_measure_run(quick, device, sync, variants, repeats))
        return figures
    finally:
        torch.set_num_threads(threads)


def _parse_variant(text: str) -> tuple[str, dict[str, Any]]:
    """``NAME:FIELD=VALUE,FIELD=VALUE`` (values read as JSON, else as strings)."""
    name, _, assignments = text.partition(":")
    settings: dict[str, Any] = {}
    for item in filter(None, assignments.split(",")):
        key, _, value = item.partition("=")
        try:
            settings[key] = json.loads(value)
        except json.JSONDecodeError:
            settings[key] = value
    return name, settings


def main(argv: list[str] | None = None) -> int:
    """Measure and print the run-cost figures (optionally as JSON); returns the exit status."""
    parser = argparse.ArgumentParser(description="SequenceMatch's run cost, with variants")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--run-only", action="store_true", help="skip the per-update figures")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument(
        "--variant", action="append", default=[], help="NAME:FIELD=VALUE,... (repeatable)"
    )
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    variants = dict(_parse_variant(v) for v in args.variant)
    figures = measure(args.quick, args.device, variants=variants, run_only=args.run_only,
                      repeats=args.repeats)  # fmt: skip
    for key, value in figures.items():
        print(f"{key:<40} {value:,.3f}")
    if args.json:
        write_json(args.json, {"variants": variants, **figures}, "--json", indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
