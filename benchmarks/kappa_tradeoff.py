"""The kappa trade-off on dyck_hard: a table and a plot from the dyck_hard_kappa comparison.

    seqmatch compare --config dyck_hard_kappa --out benchmarks/results/dyck_hard_kappa --jobs 2
    python benchmarks/kappa_tradeoff.py --results benchmarks/results/dyck_hard_kappa

SequenceMatch at eta 1 after its BC warm start, kappa = c * alpha at alpha 0.01 (the main runs
at c = 0.25, the sweep's at the other c). Writes ``kappa.md`` and ``kappa.png`` beside the
results: the invalid rate, the own-error repair rate, the false-backspace share, the backspace
rate and the mean length against the data's, each mean over seeds [95% bootstrap interval].
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np

from agents.experiments.report import save_figure
from agents.outputs import write_file
from seqenv.tasks import make_task

METRICS = (
    ("invalid_rate", "invalid rate"),
    ("own_error_repair_rate", "own-error repair rate"),
    ("false_backspace_share", "false-backspace share"),
    ("backspace_rate", "backspace rate"),
    ("length", "mean length"),
)


def by_kappa(results: dict[str, Any]) -> dict[float, dict[str, Any]]:
    """kappa -> the aggregated metrics of its runs (main runs and the sweep's c values)."""
    config = results["config"]
    alpha = float(config["train"].get("alpha", 0.01))
    c = float(config["train"].get("c", 0.25))
    rows = {alpha * c: results["agents"]["sequencematch"]}
    for value, stats in results["sweep"]["by_value"]["sequencematch"].items():
        rows[alpha * float(value)] = stats
    return dict(sorted(rows.items()))


def data_length(results: dict[str, Any], n: int = 2000) -> float:
    """The mean generated length of the task's test demonstrations (the data's)."""
    config = results["config"]
    task = make_task(config["task"], **config.get("task_args", {}))
    max_length = config["train"].get("max_length") or task.default_max_length
    demos = task.demonstrations("test", n, max_length, seed=0)
    return float(np.mean([len(d.generated()) for d in demos]))


def cell(stats: dict[str, Any] | None) -> str:
    if not stats or stats.get("mean") is None:
        return "–"
    lo, hi = stats["ci95"]
    return f"{stats['mean']:.3f} [{lo:.3f}, {hi:.3f}]" if lo is not None else f"{stats['mean']:.3f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=Path("benchmarks/results/dyck_hard_kappa"))
    args = parser.parse_args(argv)
    results = json.loads((args.results / "results.json").read_text())
    rows = by_kappa(results)
    reference = data_length(results)
    for prefix, title in (("", "clean"), ("disturbed/", "disturbed")):
        lines = [
            f"### {title} evaluation",
            "",
            "| kappa | " + " | ".join(name for _, name in METRICS) + " |",
            "|---" * (len(METRICS) + 1) + "|",
        ]
        for kappa, stats in rows.items():
            cells = [cell(stats.get(prefix + key)) for key, _ in METRICS]
            lines.append(f"| {kappa:g} | " + " | ".join(cells) + " |")
        lines.append("")
        if title == "clean":
            text = [f"# The kappa trade-off on dyck_hard (data's mean length {reference:.2f})", ""]
        text += lines
    write_file(args.results / "kappa.md", "\n".join(text) + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(METRICS), figsize=(4 * len(METRICS), 3.2))
    kappas = list(rows)
    for ax, (key, name) in zip(axes, METRICS, strict=True):
        means = [rows[k][key]["mean"] for k in kappas]
        lows = [rows[k][key]["ci95"][0] for k in kappas]
        highs = [rows[k][key]["ci95"][1] for k in kappas]
        ax.errorbar(
            kappas,
            means,
            yerr=[np.subtract(means, lows), np.subtract(highs, means)],
            marker="o",
            capsize=3,
        )
        if key == "length":
            ax.axhline(reference, color="grey", linestyle="--", label="data")
            ax.legend()
        ax.set_xscale("log")
        ax.set_xlabel("kappa = c * alpha")
        ax.set_title(name)
    fig.suptitle("SequenceMatch at eta 1 on dyck_hard (clean evaluation, 3 seeds)")
    fig.tight_layout()
    save_figure(fig, args.results / "kappa.png")
    print("\n".join(text))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
