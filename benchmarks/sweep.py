"""Sensitivity of SequenceMatch to its hyperparameters, one at a time around a base config.

    python benchmarks/sweep.py --config default --out benchmarks/results/sweep [--seeds 2]

For each parameter, SequenceMatch is trained with each value (the others at the base config's
setting) and evaluated with the task's metrics; the report gives mean and 95% interval over
seeds. This is how the defaults of eta, c, p, gamma, the warm start, k_sample and the buffer
size were chosen (benchmarks/README.md).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agents.compare import CompareConfig, aggregate, load_config, run_one
from agents.report import _cell, _clean, metrics_of
from seqenv.tasks import make_task

# Parameter -> values; the base config's own value is among them.
GRID: dict[str, list] = {
    "eta": [0.1, 0.5, 0.9],
    "c": [0.05, 0.25, 1.0],
    "noise": [0.0, 0.1, 0.3],
    "gamma": [0.9, 0.998],
    "sm_warmup": [200, 400, 600],
    "k_sample": [5, 10, 50],
    "buffer_size": [64, 256, 1024],
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=None, help="named config or path (default: embedded)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/sweep"))
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--params", default=",".join(GRID), help="comma-separated subset")
    parser.add_argument("--agent", default="sequencematch")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = parser.parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    config = load_config(CompareConfig(config=args.config, seeds=args.seeds, quick=args.quick))
    task = make_task(config["task"], **config.get("task_args", {}))
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    results: dict = {"task": config["task"], "base": config, "agent": args.agent, "params": {}}
    for param in [p.strip() for p in args.params.split(",") if p.strip()]:
        runs = []
        for value in GRID[param]:
            for seed in range(args.seeds):
                print(f"[sweep] {param}={value} seed {seed}", file=sys.stderr, flush=True)
                row = run_one(
                    config, task, args.agent, seed, args.out, "auto", False, **{param: value}
                )
                row["value"] = value
                runs.append(row)
        results["params"][param] = {"runs": runs, "by_value": aggregate(runs, key="value")}
        results["wall_seconds"] = time.perf_counter() - started
        (args.out / "results.json").write_text(json.dumps(_clean(results), indent=1) + "\n")
    lines = [
        f"# SequenceMatch sensitivity: {config['task']}",
        "",
        f"Base config `{config.get('name')}`, agent `{args.agent}`, {args.seeds} seeds, "
        f"one parameter at a time; wall time {results['wall_seconds'] / 60:.1f} min.",
        "",
    ]
    headline = metrics_of(
        {
            "task": config["task"],
            "agents": {
                "x": next(iter(next(iter(results["params"].values()))["by_value"].values()))
            },
        }
    )
    for param, data in results["params"].items():
        lines += [
            f"## {param}",
            "",
            f"| {param} | " + " | ".join(headline) + " |",
            "|---" * (len(headline) + 1) + "|",
        ]
        for value, stats in data["by_value"].items():
            lines.append(f"| {value} | " + " | ".join(_cell(stats.get(m)) for m in headline) + " |")
        lines.append("")
    (args.out / "report.md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
