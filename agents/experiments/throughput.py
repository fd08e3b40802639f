"""Throughput ratios, each measured in one run (timings on shared machines are noisy, ratios less).

    python -m agents.experiments.throughput --json out/throughput.json [--quick] [--only env,policy]

Keys: ``vector_vs_sync_env`` (environment), ``masked_vs_causal_train``,
``rollback_vs_plain_generate``, ``rollback_vs_recompute_generate`` (policy), ``sm_vs_mle_update``,
``sm_vs_mle_run``, ``sm_vs_bc_run`` (agents), each with the raw rates behind it.
"""

from __future__ import annotations

import argparse
import importlib
import platform
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from agents.outputs import write_json

# Each group: a module of this folder with `measure(quick: bool, ...) -> dict[str, float]`.
GROUPS = {
    "env": "agents.experiments.bench_env",
    "policy": "agents.experiments.bench_policy",
    "agents": "agents.experiments.bench_agents",
}


def _measure(group: str, quick: bool, device: str) -> dict[str, float]:
    module = importlib.import_module(GROUPS[group])
    measure: Callable[..., dict[str, float]] = module.measure
    if "device" in measure.__code__.co_varnames:
        return measure(quick=quick, device=device)
    return measure(quick=quick)


def main(argv: list[str] | None = None) -> int:
    """Measure the groups, print each figure and optionally write them to ``--json``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="write the figures to this file")
    parser.add_argument("--quick", action="store_true", help="short measurements (smoke runs)")
    parser.add_argument("--only", default=",".join(GROUPS), help="comma-separated groups")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    groups = [g.strip() for g in args.only.split(",") if g.strip()]
    unknown = sorted(set(groups) - set(GROUPS))
    if unknown:
        parser.error(f"unknown groups {unknown}; known: {sorted(GROUPS)}")
    results: dict[str, Any] = {
        "machine": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "cpus": torch.get_num_threads(),
            "device": args.device,
        },
        "quick": args.quick,
    }
    for group in groups:
        try:
            figures = _measure(group, args.quick, args.device)
        except ModuleNotFoundError as err:
            print(f"{group}: skipped ({err})", file=sys.stderr)
            continue
        for key, value in figures.items():
            print(f"{group:>7}  {key:<34} {value:,.3f}")
        results.update(figures)
    if args.json:
        write_json(args.json, results, "--json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
