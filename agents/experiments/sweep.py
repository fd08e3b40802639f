"""Sensitivity of SequenceMatch to its hyperparameters, one at a time around a base config.

    python -m agents.experiments.sweep --config default --out benchmarks/results/sweep [--seeds 2]

For each parameter, SequenceMatch is trained with each value (the others at the base config's
setting) and evaluated with the task's metrics; the report gives mean and 95% interval over
seeds. This is how the defaults of eta, kappa (c * alpha), p, gamma, the warm start, k_sample and
the buffer size were chosen (benchmarks/README.md). Each finished run is kept in
``runs/<agent>-s<seed>[-<field>=<value>].json``, so a stopped sweep resumes where it stopped, and
the base config's run is trained once for all parameters.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import time
from functools import partial
from pathlib import Path
from typing import Any

from agents.config import TrainConfig
from agents.deprecated import RENAMED_SETTINGS, warn_renamed
from agents.evaluation.evaluate import TASK_METRICS
from agents.experiments.compare_config import CompareConfig, load_config
from agents.experiments.report import stat_cell, strict_json
from agents.experiments.single_run import run_one
from agents.experiments.storage import claimed_scan, run_path, stored_or_run, write_json_atomic
from agents.experiments.summary import aggregate
from agents.outputs import record, write_file
from seqenv.tasks import make_task

RESULTS_KEYS = frozenset({"task", "base", "agent", "params"})
"""The keys of a sweep's results.json: how a sweep folder from before the marker is recognised."""
OUTPUTS = ("results.json", "report.md", "runs", "checkpoints")
"""What a sweep writes in its ``--out`` (its manifest lists them)."""

# Parameter -> values; the base config's own value is among them. `kappa` is c * alpha, the one
# knob of the chi^2 divergences (docs/method.md §3): it is set through c at the config's alpha.
GRID: dict[str, list] = {
    "eta": [0.01, 0.1, 0.3, 0.5, 1.0],
    "kappa": [0.0025, 0.025],
    "disturbance": [0.05, 0.1, 0.2],
    "c": [0.05, 0.25, 1.0],
    "disturbance_type": ["random", "ground_truth"],
    "gamma": [0.9, 0.998],
    "sm_warmup": [200, 400, 600],
    "k_sample": [5, 10, 50],
    "buffer_size": [64, 256, 1024],
    "run_cost": ["off", "mbs16", "mbs8"],
    # DAgger's settings (run with --agent dagger): one at a time around its defaults.
    "dagger_beta": [0.0, 0.5, 1.0],
    "dagger_rollouts": [4, 16, 64],
    "dagger_buffer_size": [512, 2048, 8192],
}
RUN_COST: dict[str, dict[str, Any]] = {
    "off": {
        "model_batch_size": "batch_size",
        "model_batch_buckets": 1,
        "rollout_length_factor": None,
    },
    "mbs16": {"model_batch_size": 16, "model_batch_buckets": 4, "rollout_length_factor": 2.0},
    "mbs8": {"model_batch_size": 8, "model_batch_buckets": 4, "rollout_length_factor": 2.0},
}
"""The settings that cut a SequenceMatch run's cost (benchmarks/README.md, `sm_vs_bc_run`), as
bundles: each changes what is optimised, so each is checked against quality before a default.
"off" is the first version's run (a model batch as large as the data batch, one draw, no cap);
"mbs8" is today's default at a batch of 64."""


def _run_cost_bundle(train: dict[str, Any], name: str) -> dict[str, Any]:
    """The trainer fields of a run-cost bundle for a config's train block."""
    batch = train.get("batch_size", TrainConfig.batch_size)
    return {k: batch if v == "batch_size" else v for k, v in RUN_COST[name].items()}


def _run_cost_of(train: dict[str, Any]) -> tuple[int, int, float | None]:
    """(model batch, buckets, rollout factor) that a train block resolves to."""
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    config = TrainConfig(**{k: v for k, v in train.items() if k in names})
    return (
        config.resolved_model_batch_size,
        config.model_batch_buckets,
        config.rollout_length_factor,
    )


def _base_value(config: dict, param: str) -> Any:
    """The base config's value of a swept parameter (kappa: c * alpha)."""
    train = config["train"]
    if param == "kappa":
        return float(train.get("alpha", TrainConfig.alpha)) * float(train.get("c", TrainConfig.c))
    if param == "run_cost":
        resolved = _run_cost_of(train)
        return next(
            (
                n
                for n in RUN_COST
                if _run_cost_of({**train, **_run_cost_bundle(train, n)}) == resolved
            ),
            None,
        )
    return train.get(param, getattr(TrainConfig(), param))


def _override(config: dict, param: str, value: Any) -> dict[str, Any]:
    """The trainer fields setting ``param`` to ``value`` (kappa: through c at the alpha)."""
    if param == "kappa":
        return {"c": value / float(config["train"].get("alpha", TrainConfig.alpha))}
    if param == "run_cost":
        return _run_cost_bundle(config["train"], value)
    return {param: value}


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, (int, float)):
        return math.isclose(a, float(b))
    return a == b


def write_report(results: dict, out: Path) -> str:
    """report.md of a sweep: one table per parameter, mean [95% interval] over seeds."""
    base = results["base"]
    headline = [m for m in TASK_METRICS[results["task"]] if m != "mean_backtrack_length"]
    lines = [
        f"# SequenceMatch sensitivity: {results['task']}",
        "",
        f"Base config `{base.get('name')}` (eta {base['train'].get('eta')}, c "
        f"{base['train'].get('c', 0.25)}, disturbance {base['train'].get('disturbance')}), agent "
        f"`{results['agent']}`, one parameter at a time; wall time "
        f"{results.get('wall_seconds', 0) / 60:.1f} min.",
        "",
    ]
    for param, data in results["params"].items():
        present = [m for m in headline if any(m in s for s in data["by_value"].values())]
        lines += [
            f"## {param}",
            "",
            f"| {param} | " + " | ".join(present) + " |",
            "|---" * (len(present) + 1) + "|",
        ]
        for value, stats in data["by_value"].items():
            cells = [stat_cell(stats.get(m)) for m in present]
            lines.append(f"| {value} | " + " | ".join(cells) + " |")
        lines.append("")
    text = "\n".join(lines)
    write_file(out / "report.md", text)
    return text


def renamed_params(params: str) -> list[str]:
    """``--params`` as a list, an old name (``noise``) replaced by its new one with a warning."""
    out = []
    for param in (p.strip() for p in params.split(",") if p.strip()):
        if param in RENAMED_SETTINGS:
            warn_renamed(param, RENAMED_SETTINGS[param], "sweep --params")
            param = RENAMED_SETTINGS[param]
        out.append(param)
    return out


def main(argv: list[str] | None = None) -> int:
    """Run the sweep and write ``results.json`` and the report to ``--out``; returns 0."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=None, help="named config or path (default: embedded)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/sweep"))
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--params", default=",".join(GRID), help="comma-separated subset")
    parser.add_argument("--agent", default="sequencematch")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument(
        "--skip-base",
        action="store_true",
        help="skip each parameter's value in the base config (already measured elsewhere)",
    )
    args = parser.parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    config = load_config(CompareConfig(config=args.config, seeds=args.seeds, quick=args.quick))
    task = make_task(config["task"], **config.get("task_args", {}))
    params = renamed_params(args.params)
    unknown = [p for p in params if p not in GRID]
    if unknown:
        parser.error(f"--params: unknown {unknown}; known: {', '.join(GRID)}")
    with claimed_scan(args.out, RESULTS_KEYS):
        record(args.out, *OUTPUTS)
        started = time.perf_counter()
        results: dict = {"task": config["task"], "base": config, "agent": args.agent, "params": {}}
        for param in params:
            runs = []
            base_value = _base_value(config, param)
            for value in GRID[param]:
                is_base = _same(value, base_value)
                if args.skip_base and is_base:
                    continue
                # The base value's run is the same run for every parameter: one key, trained once.
                override = {} if is_base else _override(config, param, value)
                for seed in range(args.seeds):
                    path = run_path(args.out / "runs", args.agent, seed, override)
                    train = partial(
                        run_one, config, task, args.agent, seed, args.out, "auto", False, **override
                    )
                    label = f"[sweep] {param}={value} seed {seed}"
                    try:
                        row = stored_or_run(path, config, train, label)
                    except ValueError as err:
                        parser.error(str(err))
                    runs.append({**row, "value": value})
            results["params"][param] = {"runs": runs, "by_value": aggregate(runs, key="value")}
            results["wall_seconds"] = time.perf_counter() - started
            write_json_atomic(args.out / "results.json", strict_json(results))
            write_report(results, args.out)
        text = write_report(results, args.out)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
