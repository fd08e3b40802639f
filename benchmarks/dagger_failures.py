"""What limits DAgger's invalid rate on dyck_hard: termination, the step budget, repeats.

    python benchmarks/dagger_failures.py --seeds 0,1 --out benchmarks/results/dyck_hard_dagger

Trains DAgger as the ``dyck_hard`` comparison does (one run per seed), then samples clean
episodes on held-out prompts (as the comparison's evaluation: temperature 1) at the step budget
the runs use and at twice and four times it, and walks each with the task's oracle:

- ``invalid_rate``, ``termination_rate``: episodes not ended correctly; ended with ``<eos>``;
- ``unfinished_valid``: episodes cut off by the budget while their text was still a valid prefix
  (they would need more steps, not a repair);
- ``own_errors_per_error_episode``: the model's own wrong brackets in an episode that has one;
- ``repeat_rate``: per own error the model deleted, whether the next token it wrote at that
  position was the same wrong token (a policy that reads only the text stands, after the
  backspace, in the state where it erred, with the same distribution);
- ``backspace_rate``: backspaces per step.

Writes ``dagger_failures.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from agents.experiments.compare_config import (
    CompareConfig,
    comparison_task,
    load_config,
    train_config,
)
from agents.generate import generate
from agents.outputs import check_file, write_file
from agents.training.trainer import Trainer
from seqenv.tasks import Task
from seqenv.trajectory import Trajectory


def walk(task: Task, episode: Trajectory) -> dict[str, Any]:
    """One clean episode walked with the oracle: its own errors and what followed each."""
    special = episode.special
    prompt = episode.prompt.tolist()
    generated: list[int] = []
    valid = [True]  # of the state with k generated tokens
    error_at: dict[int, int] = {}  # position -> the own wrong token deleted there last
    errors = repeats = retried = 0
    for action in episode.actions.tolist():
        if action == special.backspace_id:
            if generated:
                position = len(generated) - 1
                if valid[-2] and not valid[-1]:  # deleting the token that left the language
                    error_at[position] = generated[-1]
                generated.pop()
                valid.pop()
            continue
        if action == special.eos_id:
            break
        position = len(generated)
        if position in error_at:  # the first token written where an own error was deleted
            retried += 1
            repeats += int(action == error_at.pop(position))
        if valid[-1]:
            probs = task.expert_policy(prompt, generated)
            assert probs is not None
            ok = probs[action] > 0
            errors += int(not ok)
        else:
            ok = False
        generated.append(action)
        valid.append(valid[-1] and ok)
    return {
        "errors": errors,
        "repeats": repeats,
        "retried": retried,
        "valid_prefix": valid[-1],
        "correct": task.score(prompt, episode.generated(), episode.terminated) == 1.0,
    }


def measure(trainer: Trainer, prompts: list[list[int]], max_steps: int, seed: int) -> dict:
    """The figures of the module docstring for episodes at step budget ``max_steps``."""
    generator = torch.Generator().manual_seed(10_000 + seed)
    trainer.policy.eval()
    with torch.no_grad():
        out = generate(
            trainer.policy,
            prompts,
            max_length=trainer.max_length,
            max_steps=max_steps,
            generator=generator,
        )
    walks = [walk(trainer.task, t) for t in out.trajectories]
    erring = [w for w in walks if w["errors"]]
    retried = sum(w["retried"] for w in walks)
    steps = sum(t.num_steps for t in out.trajectories)
    return {
        "max_steps": max_steps,
        "invalid_rate": float(np.mean([not w["correct"] for w in walks])),
        "termination_rate": float(np.mean([t.terminated for t in out.trajectories])),
        "unfinished_valid": float(
            np.mean(
                [
                    not t.terminated and w["valid_prefix"]
                    for t, w in zip(out.trajectories, walks, strict=True)
                ]
            )
        ),
        "error_episode_share": len(erring) / len(walks),
        "own_errors_per_error_episode": float(np.mean([w["errors"] for w in erring]))
        if erring
        else 0.0,
        "repeat_rate": sum(w["repeats"] for w in walks) / retried if retried else float("nan"),
        "retried_positions": retried,
        "backspace_rate": sum(t.num_backspaces for t in out.trajectories) / steps,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="dyck_hard")
    parser.add_argument("--agent", default="dagger")
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--episodes", type=int, default=1000)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/dyck_hard_dagger"))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    path = args.out / f"{args.agent}_failures.json"
    check_file(path, "--out")  # before the training: a bad --out fails first, in one line
    config = load_config(CompareConfig(config=args.config))
    task = comparison_task(config)
    rows = []
    for seed in [int(s) for s in args.seeds.split(",")]:
        train = train_config(config, args.agent, seed, Path("/tmp"), "cpu", False)
        train.logdir = None
        trainer = Trainer(train, task=task)
        trainer.train()
        heldout = task.demonstrations("test", args.episodes, trainer.max_length, seed=seed + 1)
        prompts = [d.prompt.tolist() for d in heldout]
        for factor in (1, 2, 4):
            row = {"agent": args.agent, "seed": seed, "budget_factor": factor}
            row.update(measure(trainer, prompts, factor * trainer.max_steps, seed))
            rows.append(row)
            print(json.dumps(row), flush=True)
    write_file(path, json.dumps({"config": args.config, "rows": rows}, indent=1) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
