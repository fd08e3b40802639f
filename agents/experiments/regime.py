"""The regime scan: where does MLE compound its errors?

    python -m agents.experiments.regime --task dyck --out benchmarks/results/regime/dyck

MLE is trained on a grid around a task's base config: the number of demonstrations, the model
size and the sequence length (dyck: nesting depth and bracket count; arithmetic: digits per
operand). Each point records MLE's clean metrics, its metrics under the training disturbance
(``disturbed/...``) and whether it was trained to convergence: the change of its eval curve over
the last quarter of the updates. The points where MLE is clearly imperfect, and converged, are
candidates for a ``*_hard`` config on which SequenceMatch is then compared on fresh seeds (the
scan uses seeds 100, 101, ...; a comparison uses 0, 1, ...).

Each finished run is written to ``runs/<point>-s<seed>.json`` at once, so a stopped scan resumes
where it stopped; ``results.json``, ``report.md`` and ``scan.png`` are rebuilt after every run.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from agents.evaluation.evaluate import METRICS, headline
from agents.evaluation.stats import FLAT_CHANGE, last_quarter_move
from agents.experiments.compare_config import CompareConfig, load_config, merge
from agents.experiments.report import save_figure, stat_cell, strict_json
from agents.experiments.single_run import run_one
from agents.experiments.storage import claimed_scan, stored_or_run, write_json_atomic
from agents.experiments.summary import aggregate
from agents.outputs import record, write_file
from seqenv.tasks import make_task

SCAN_SEED = 100
"""The first seed of the scan; comparisons on the chosen configs use seeds from 0."""

MODELS: dict[str, dict[str, int]] = {
    "1x32": {"layers": 1, "width": 32, "heads": 2},
    "2x64": {"layers": 2, "width": 64, "heads": 2},
}
SCANS: dict[str, dict[str, Any]] = {
    "dyck": {
        "base": "dyck_cpu",
        "num_demonstrations": [100, 300, 1000, 10000],
        "lengths": {
            "depth4-20": {"num_types": 2, "max_depth": 4, "max_brackets": 20},
            "depth8-40": {"num_types": 2, "max_depth": 8, "max_brackets": 40},
        },
    },
    "arithmetic": {
        "base": "arithmetic_cpu",
        "num_demonstrations": [100, 300, 1000, 10000],
        "lengths": {
            "digits1": {"base": 10, "min_digits": 1, "max_digits": 1},
            "digits2": {"base": 10, "min_digits": 1, "max_digits": 2},
        },
    },
}

RESULTS_KEYS = frozenset({"meta", "points"})
"""The keys of a scan's results.json: how a scan folder from before the marker is recognised."""
OUTPUTS = ("results.json", "report.md", "scan.png", "runs")
"""What a scan writes in its ``--out`` (its manifest lists them)."""


def points(task: str, demonstrations: list[int] | None = None) -> list[dict[str, Any]]:
    """The scan's grid for a task: one dict per point (name, task_args, train overrides).

    ``demonstrations`` replaces the scan's list of demonstration counts.
    """
    scan = SCANS[task]
    out = []
    for (length, task_args), (model, size), demos in itertools.product(
        scan["lengths"].items(), MODELS.items(), demonstrations or scan["num_demonstrations"]
    ):
        out.append(
            {
                "name": f"{length}-{model}-n{demos}",
                "length": length,
                "model": model,
                "num_demonstrations": demos,
                "task_args": task_args,
                "train": {**size, "num_demonstrations": demos},
            }
        )
    return out


def summarise(task: str, rows: list[dict[str, Any]], episodes: int) -> list[dict[str, Any]]:
    """One summary per point: its metrics over seeds, the largest last-quarter change.

    A point is converged when every seed's last-quarter change is within its
    :func:`flat_tolerance` (``episodes``: the eval curve's episodes per point).
    """
    head = headline(task)
    by_point: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        by_point.setdefault(row["point"]["name"], []).append(row)
    out = []
    for runs in by_point.values():
        stats = aggregate(runs, key="agent")["mle"]
        key = f"eval/{head}"
        moves = [
            m for r in runs if (m := last_quarter_move(r["curves"], key, episodes)) is not None
        ]
        known = [abs(c) for c, _ in moves]
        flat = [abs(c) <= tolerance for c, tolerance in moves]
        out.append(
            {
                "point": runs[0]["point"],
                "seeds": sorted(r["seed"] for r in runs),
                "metrics": stats,
                "last_quarter_change": max(known) if known else None,
                "converged": bool(flat) and all(flat),
                "train_seconds": float(np.mean([r["train_seconds"] for r in runs])),
            }
        )
    return out


def write_report(task: str, summary: list[dict[str, Any]], meta: dict[str, Any], out: Path) -> str:
    """report.md and scan.png of a scan."""
    head = headline(task)
    columns = [head, f"disturbed/{head}"]
    columns += [m for m in ("backspace_rate", "length_tv") if m in summary[0]["metrics"]]
    lines = [
        f"# Regime scan: MLE on {task}",
        "",
        f"Command: `{meta['command']}`  ",
        f"Base config `{meta['base']}`, MLE only, seeds {meta['seeds']}, disturbance p = "
        f"{meta['disturbance']} for the `disturbed/` column; "
        f"{meta['compute_seconds'] / 60:.1f} min of training and evaluation on {meta['machine']}.",
        "",
        "Mean over seeds [95% interval: bootstrap over seeds, then evaluation episodes]. "
        f"`change`: the largest move of the {head} eval curve ({meta['eval_episodes']} episodes "
        "per point) over the last quarter of the updates, over the seeds; `converged`: in every "
        f"seed the move is within {FLAT_CHANGE} plus twice the sampling noise of a difference of "
        "two eval points (`flat_tolerance`).",
        "",
        "| length | model | demos | " + " | ".join(columns) + " | change | converged | train s |",
        "|---" * (len(columns) + 6) + "|",
    ]
    for s in summary:
        p = s["point"]
        cells = [stat_cell(s["metrics"].get(c)) for c in columns]
        change = s["last_quarter_change"]
        lines.append(
            f"| {p['length']} | {p['model']} | {p['num_demonstrations']} | "
            + " | ".join(cells)
            + f" | {'-' if change is None else f'{change:.3f}'} | "
            f"{'yes' if s['converged'] else 'no'} | {s['train_seconds']:.0f} |"
        )
    lines += ["", "![scan](scan.png)", ""]
    text = "\n".join(lines)
    write_file(out / "report.md", text)
    _plot(task, summary, out / "scan.png")
    return text


def _plot(task: str, summary: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    head = headline(task)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, metric in zip(axes, (head, f"disturbed/{head}"), strict=True):
        curves: dict[str, list[tuple[int, dict[str, Any]]]] = {}
        for s in summary:
            label = f"{s['point']['length']}, {s['point']['model']}"
            if metric in s["metrics"]:
                curves.setdefault(label, []).append(
                    (s["point"]["num_demonstrations"], s["metrics"][metric])
                )
        for label, pts in curves.items():
            pts.sort(key=lambda x: x[0])
            xs = [x for x, _ in pts]
            ax.plot(xs, [m["mean"] for _, m in pts], marker="o", label=label)
            ax.fill_between(
                xs, [m["ci95"][0] for _, m in pts], [m["ci95"][1] for _, m in pts], alpha=0.2
            )
        ax.set_xscale("log")
        ax.set_xlabel("demonstrations")
        ax.set_title(f"MLE {metric}")
        known = METRICS.get(head)
        ax.set_ylabel(f"{head} ({'higher' if known and known.higher_is_better else 'lower'} is "
                      "better)")  # fmt: skip
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    """Run (or resume) the scan of one task; writes results.json, report.md and scan.png."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", choices=sorted(SCANS), required=True)
    parser.add_argument("--out", type=Path, default=None, help="default out/regime/<task>")
    parser.add_argument("--seeds", type=int, default=2, help="seeds per point (from 100)")
    parser.add_argument("--points", default=None, help="comma-separated point names (a subset)")
    parser.add_argument("--steps", type=int, default=None, help="updates (the base config's)")
    parser.add_argument(
        "--demonstrations", default=None, help="comma-separated demonstration counts to scan"
    )
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    out = args.out or Path("out/regime") / args.task
    base = load_config(CompareConfig(config=SCANS[args.task]["base"]))
    if args.steps is not None:
        base["train"]["steps"] = args.steps
    demos = [int(n) for n in args.demonstrations.split(",")] if args.demonstrations else None
    grid = points(args.task, demos)
    if args.points:
        wanted = {p.strip() for p in args.points.split(",")}
        unknown = wanted - {p["name"] for p in grid}
        if unknown:
            parser.error(f"unknown points {sorted(unknown)}; known: {[p['name'] for p in grid]}")
        grid = [p for p in grid if p["name"] in wanted]
    with claimed_scan(out, RESULTS_KEYS):
        record(out, *OUTPUTS)
        meta = {
            "command": "python -m agents.experiments.regime " + " ".join(argv or sys.argv[1:]),
            "base": base["name"],
            "seeds": [SCAN_SEED + i for i in range(args.seeds)],
            "disturbance": base["train"].get("disturbance"),
            "eval_episodes": int(base["train"].get("eval_episodes", 100)),
            "machine": f"{torch.get_num_threads()} torch thread(s), torch {torch.__version__}",
            "wall_seconds": 0.0,
        }
        started = time.perf_counter()
        rows: list[dict[str, Any]] = []
        for point in grid:
            config = merge(base, {"task_args": point["task_args"], "train": point["train"]})
            task = make_task(config["task"], **config["task_args"])
            for seed in meta["seeds"]:
                path = out / "runs" / f"{point['name']}-s{seed}.json"
                # TensorBoard runs go under runs/<point>/, apart from the other points' runs.
                folder = out / "runs" / point["name"]
                train = partial(run_one, config, task, "mle", seed, folder, "cpu", False)
                label = f"[regime] {point['name']} seed {seed}"
                try:
                    row = stored_or_run(path, config, train, label, extra={"point": point})
                except ValueError as err:
                    parser.error(str(err))
                rows.append(row)
            meta["wall_seconds"] = time.perf_counter() - started
            meta["compute_seconds"] = sum(r["train_seconds"] + r["eval_seconds"] for r in rows)
            summary = summarise(args.task, rows, meta["eval_episodes"])
            write_json_atomic(out / "results.json", strict_json({"meta": meta, "points": summary}))
            write_report(args.task, summary, meta, out)
    print((out / "report.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
