"""The outputs of `seqmatch compare`: results.json, report.md and PNG plots."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from agents.evaluation.evaluate import METRICS, TASK_METRICS, headline

AGENT_LABELS = {
    "mle": "MLE",
    "bc": "BC (intended actions, disturbed data)",
    "bc_executed": "BC (executed actions: noise as targets, the paper's)",
    "sequencematch": "SequenceMatch",
    "sequencematch_no_bkspc": "SequenceMatch, no backspace",
    "ppo": "PPO (task reward)",
}


REFERENCE_LABELS = {"human_text": "human text (same prompts and sample size)"}
"""Rows of measured references that are not agents (the held-out text's own statistics)."""


def _arrow(metric: str) -> str:
    """↑ where higher is better, ↓ where lower is, nothing where neither is."""
    known = METRICS.get(metric)
    if known is None or known.higher_is_better is None:
        return ""
    return "↑" if known.higher_is_better else "↓"


def _higher_is_better(metric: str) -> bool:
    """Whether a larger value of ``metric`` is better (False also where neither is)."""
    known = METRICS.get(metric)
    return bool(known and known.higher_is_better)


def _clean(value: Any) -> Any:
    """JSON without NaN or infinity (they are not JSON): such values become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    return value


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _cell(stats: dict[str, Any] | None) -> str:
    if not stats:
        return "–"
    mean, (lo, hi) = stats["mean"], stats["ci95"]
    if lo is None or hi is None or not (math.isfinite(lo) and math.isfinite(hi)):
        return f"{mean:.3f}"
    return f"{mean:.3f} [{lo:.3f}, {hi:.3f}]"


def metrics_of(results: dict[str, Any]) -> list[str]:
    present = {m for stats in results["agents"].values() for m in stats}
    return [m for m in TASK_METRICS[results["task"]] if m in present]


def table(results: dict[str, Any]) -> str:
    """The markdown table: one row per agent, mean [95% interval] over seeds."""
    metrics = metrics_of(results)
    arrows = [f"{m} {_arrow(m)}".rstrip() for m in metrics]
    lines = ["| agent | " + " | ".join(arrows) + " |", "|---" * (len(metrics) + 1) + "|"]
    for agent, stats in results["agents"].items():
        cells = [_cell(stats.get(m)) for m in metrics]
        lines.append(f"| {AGENT_LABELS.get(agent, agent)} | " + " | ".join(cells) + " |")
    for name, values in results.get("reference", {}).items():
        cells = [f"{values[m]:.3f}" if m in values else "–" for m in metrics]
        lines.append(f"| {REFERENCE_LABELS.get(name, name)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def verdicts(results: dict[str, Any]) -> list[str]:
    """Plain statements of where SequenceMatch beats MLE and where it does not."""
    agents = results["agents"]
    if "sequencematch" not in agents or "mle" not in agents:
        return []
    out = []
    for metric in metrics_of(results):
        sm, mle = agents["sequencematch"].get(metric), agents["mle"].get(metric)
        if not sm or not mle or metric in ("backspace_rate", "mean_backtrack_length"):
            continue
        better = sm["mean"] > mle["mean"] if _higher_is_better(metric) else sm["mean"] < mle["mean"]
        (sl, sh), (ml, mh) = sm["ci95"], mle["ci95"]
        separated = None not in (sl, sh, ml, mh) and (sl > mh or ml > sh)
        word = "better" if better else "worse" if sm["mean"] != mle["mean"] else "equal"
        certainty = (
            "the 95% intervals do not overlap"
            if separated
            else "the 95% intervals overlap: not a clear difference"
        )
        out.append(
            f"- **{metric}**: SequenceMatch {sm['mean']:.3f} vs MLE {mle['mean']:.3f}, "
            f"{word}; {certainty}."
        )
    return out


def report(results: dict[str, Any]) -> str:
    config = results["config"]
    lines = [
        f"# seqmatch compare: {results['task']}",
        "",
        f"Command: `{results['command']}`  ",
        f"Config: `{config.get('name', 'default')}`, {config['seeds']} seeds per agent, "
        f"wall time {results['wall_seconds'] / 60:.1f} min on {results['machine']['device']} "
        f"({results['machine']['cpus']} CPUs, torch {results['machine']['torch']}).",
        "",
        "Mean over seeds [95% interval, Student's t]. ↑ higher is better, ↓ lower is better.",
        "",
        table(results),
        "",
        "## SequenceMatch against MLE",
        "",
        *(verdicts(results) or ["- (needs both agents)"]),
        "",
    ]
    if "sweep" in results:
        sweep = results["sweep"]
        lines += [f"## Sweep over `{sweep['param']}`", ""]
        headline = metrics_of(results)[:2]
        lines.append(f"| agent | {sweep['param']} | " + " | ".join(headline) + " |")
        lines.append("|---" * (len(headline) + 2) + "|")
        for agent, by_value in sweep["by_value"].items():
            for value, stats in by_value.items():
                cells = [_cell(stats.get(m)) for m in headline]
                lines.append(
                    f"| {AGENT_LABELS.get(agent, agent)} | {value} | " + " | ".join(cells) + " |"
                )
        lines.append("")
    lines += [
        "## Plots",
        "",
        "![score](curves_score.png)",
        "",
        "![divergence](curves_divergence.png)",
        "",
        "![metrics](metrics.png)",
        "",
        "## Config",
        "",
        "```json",
        json.dumps(config, indent=1),
        "```",
        "",
    ]
    return "\n".join(lines)


def plots(results: dict[str, Any], out: Path) -> None:
    """Learning curves of the task score and of the divergence estimate; metric bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for key, name, ylabel in (
        (
            f"eval/{headline(results['task'])}",
            "curves_score.png",
            f"{headline(results['task'])} (eval)",
        ),
        ("losses/sm/divergence", "curves_divergence.png", "divergence estimate -J"),
    ):
        fig, ax = plt.subplots(figsize=(6, 4))
        for agent in results["agents"]:
            for run in (r for r in results["runs"] if r["agent"] == agent):
                points = [(row["step"], row[key]) for row in run["curves"] if key in row]
                if points:
                    steps, values = zip(*points, strict=True)
                    ax.plot(steps, values, label=f"{agent} s{run['seed']}", alpha=0.8)
        ax.set_xlabel("update")
        ax.set_ylabel(ylabel)
        if ax.lines:
            ax.legend(fontsize=7)
        else:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
        fig.tight_layout()
        fig.savefig(out / name, dpi=100)
        plt.close(fig)

    metrics = metrics_of(results)
    fig, axes = plt.subplots(1, max(1, len(metrics)), figsize=(3 * max(1, len(metrics)), 3.5))
    axes = axes if len(metrics) > 1 else [axes]
    agents = list(results["agents"])
    for ax, metric in zip(axes, metrics, strict=False):
        means: list[float] = []
        errors: list[list[float]] = [[], []]
        for agent in agents:
            stats = results["agents"][agent].get(metric)
            mean = stats["mean"] if stats else float("nan")
            lo, hi = stats["ci95"] if stats else (None, None)
            means.append(mean)
            errors[0].append(mean - lo if lo is not None and math.isfinite(lo) else 0.0)
            errors[1].append(hi - mean if hi is not None and math.isfinite(hi) else 0.0)
        ax.bar(range(len(agents)), means, yerr=errors, capsize=3, color="tab:blue")
        ax.set_xticks(range(len(agents)), agents, rotation=60, ha="right", fontsize=7)
        ax.set_title(metric, fontsize=9)
    fig.tight_layout()
    fig.savefig(out / "metrics.png", dpi=100)
    plt.close(fig)


def write_outputs(results: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    _write(out / "results.json", json.dumps(_clean(results), indent=1) + "\n")
    _write(out / "report.md", report(_clean(results)))
    plots(_clean(results), out)
