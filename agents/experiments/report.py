"""The outputs of `seqmatch compare`: results.json, report.md and PNG plots."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path
from typing import Any

from agents.algorithms import ALGORITHMS, resolve_algorithm
from agents.evaluation.episodes import OWN_ERROR_DENOMINATORS
from agents.evaluation.evaluate import (
    METRICS,
    OWN_ERROR_METRICS,
    TASK_METRICS,
    headline,
    metric_spec,
)
from agents.evaluation.stats import FLAT_CHANGE
from agents.outputs import owner, record, write_file


def agent_label(agent: str) -> str:
    """An agent's name in tables and legends (its registered label; the name if unknown)."""
    try:
        return resolve_algorithm(agent).label
    except ValueError:  # a module:Class that no longer imports: its results still show
        return agent


def agent_short(agent: str) -> str:
    """An agent's short name, in the difference table and the verdicts."""
    try:
        return resolve_algorithm(agent).short_label
    except ValueError:
        return agent


REFERENCE_LABELS = {"human_text": "human text (same prompts and sample size)"}
"""Rows of measured references that are not agents (the held-out text's own statistics)."""


def _arrow(metric: str) -> str:
    """↑ where higher is better, ↓ where lower is, nothing where neither is."""
    known = metric_spec(metric)
    if known is None or known.higher_is_better is None:
        return ""
    return "↑" if known.higher_is_better else "↓"


def _higher_is_better(metric: str) -> bool:
    """Whether a larger value of ``metric`` is better (False also where neither is)."""
    known = metric_spec(metric)
    return bool(known and known.higher_is_better)


def strict_json(value: Any) -> Any:
    """JSON without NaN or infinity (they are not JSON): such values become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [strict_json(v) for v in value]
    return value


def stat_cell(stats: dict[str, Any] | None) -> str:
    """A table cell: the mean and its 95% interval to three decimals (a dash for none)."""
    if not stats:
        return "–"
    mean, (lo, hi) = stats["mean"], stats["ci95"]
    if lo is None or hi is None or not (math.isfinite(lo) and math.isfinite(hi)):
        return f"{mean:.3f}"
    return f"{mean:.3f} [{lo:.3f}, {hi:.3f}]"


def metrics_of(results: dict[str, Any]) -> list[str]:
    """The task's metrics that some agent in ``results`` reports, in the task's order."""
    present = {m for stats in results["agents"].values() for m in stats}
    return [m for m in TASK_METRICS[results["task"]] if m in present]


def disturbed_metrics_of(results: dict[str, Any]) -> list[str]:
    """The task's metrics measured under the training disturbance (``disturbed/<metric>``)."""
    present = {m for stats in results["agents"].values() for m in stats}
    wanted = [f"disturbed/{m}" for m in TASK_METRICS[results["task"]]]
    return [m for m in wanted if m in present]


def table(results: dict[str, Any], metrics: list[str] | None = None) -> str:
    """The markdown table: one row per agent, mean [95% bootstrap interval] over seeds.

    ``metrics``: the columns (default: the task's metrics, clean evaluation).
    """
    metrics = metrics_of(results) if metrics is None else metrics
    arrows = [f"{m} {_arrow(m.removeprefix('disturbed/'))}".rstrip() for m in metrics]
    lines = ["| agent | " + " | ".join(arrows) + " |", "|---" * (len(metrics) + 1) + "|"]
    for agent, stats in results["agents"].items():
        cells = [stat_cell(stats.get(m)) for m in metrics]
        lines.append(f"| {agent_label(agent)} | " + " | ".join(cells) + " |")
    for name, values in results.get("reference", {}).items():
        cells = [f"{values[m]:.3f}" if m in values else "–" for m in metrics]
        lines.append(f"| {REFERENCE_LABELS.get(name, name)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _diff_cell(stats: dict[str, Any] | None) -> str:
    if not stats:
        return "–"
    lo, hi = stats["ci95"]
    if lo is None or hi is None or not (math.isfinite(lo) and math.isfinite(hi)):
        return f"{stats['diff']:+.3f} (no interval: one seed)"
    better = stats["better"]
    verdict = f", {agent_short(better)} better" if better else ""
    return f"{stats['diff']:+.3f} [{lo:+.3f}, {hi:+.3f}]{verdict}"


def difference_table(results: dict[str, Any], metrics: list[str] | None = None) -> list[str]:
    """For each metric with a direction: SequenceMatch minus MLE and minus BC.

    Each with the bootstrap interval of the difference (a difference is called where the
    interval excludes zero). ``metrics``: the rows (default: the task's metrics, clean).
    """
    pairs = {k: v for k, v in results.get("differences", {}).items() if v}
    rows = metrics_of(results) if metrics is None else metrics
    metrics = [m for m in rows if (spec := metric_spec(m)) and spec.higher_is_better is not None]
    if not pairs or not metrics:
        return []
    names = [" − ".join(agent_short(a) for a in pair.split(" - ")) for pair in pairs]
    lines = ["| metric | " + " | ".join(names) + " |", "|---" * (len(pairs) + 1) + "|"]
    for metric in metrics:
        cells = [_diff_cell(pair.get(metric)) for pair in pairs.values()]
        lines.append(f"| {metric} {_arrow(metric)} | " + " | ".join(cells) + " |")
    return lines


def verdicts(results: dict[str, Any]) -> list[str]:
    """Plain statements of where SequenceMatch beats MLE and where it does not.

    Judged by the bootstrap interval of the difference of their means.
    """
    pair = results.get("differences", {}).get("sequencematch - mle")
    agents = results["agents"]
    if not pair or "sequencematch" not in agents or "mle" not in agents:
        return []
    out = []
    for metric in metrics_of(results):
        stats = pair.get(metric)
        if not stats or METRICS[metric].higher_is_better is None:
            continue
        sm, mle = agents["sequencematch"][metric]["mean"], agents["mle"][metric]["mean"]
        lo, hi = stats["ci95"]
        if lo is None or hi is None or not (math.isfinite(lo) and math.isfinite(hi)):
            out.append(f"- **{metric}**: SequenceMatch {sm:.3f} vs MLE {mle:.3f} (one seed).")
            continue
        if stats["better"] is None:
            certainty = "not a clear difference: the 95% interval of the difference holds 0"
            word = (
                "equal"
                if sm == mle
                else "better"
                if (sm > mle) == _higher_is_better(metric)
                else "worse"
            )
        else:
            word = "better" if stats["better"] == "sequencematch" else "worse"
            certainty = "the 95% interval of the difference excludes 0"
        out.append(
            f"- **{metric}**: SequenceMatch {sm:.3f} vs MLE {mle:.3f}, {word} by "
            f"{stats['diff']:+.3f} [{lo:+.3f}, {hi:+.3f}]; {certainty}."
        )
    return out


def target_lines(results: dict[str, Any]) -> list[str]:
    """The config's targets, each answered on the mean over seeds (summary.check_targets)."""
    lines = []
    for t in results.get("targets", []):
        name = agent_short(t["agent"])
        if t.get("met") is None:
            lines.append(f"- {t['text']}: **not measured** (a side has no finished runs).")
            continue
        lo, hi = t["ci95"]
        if lo is None or hi is None or not (math.isfinite(lo) and math.isfinite(hi)):
            interval, sure = "", "no interval (too few runs)"
        else:
            interval = f" [{lo:+.3f}, {hi:+.3f}]"
            sure = (
                "the interval of the margin excludes 0"
                if (lo > 0 or hi < 0)
                else "the interval of the margin includes 0: not a clear difference"
            )
        lines.append(
            f"- {t['text']}: **{'met' if t['met'] else 'not met'}**. {t['metric']}: {name} "
            f"{t['mean']:.3f}, {agent_short(t['other'])} {t['other_mean']:.3f}, "
            f"bound {t['bound']:.3f}; margin {t['diff']:+.3f}{interval}, {sure}."
        )
    return lines


def disturbed_section(results: dict[str, Any]) -> list[str]:
    """The table of the evaluation under the training disturbance, when it was measured."""
    metrics = disturbed_metrics_of(results)
    if not metrics:
        return []
    return [
        "Under the training disturbance (the environment replaces a token action by noise with "
        "the training probability: can the agent repair errors it did not choose?):",
        "",
        table(results, metrics),
        "",
    ]


def own_error_section(results: dict[str, Any]) -> list[str]:
    """The own-error measures, clean and disturbed, where the task has an oracle."""
    present = {m for stats in results["agents"].values() for m in stats}
    clean = [m for m in OWN_ERROR_METRICS if m in present]
    disturbed = [f"disturbed/{m}" for m in OWN_ERROR_METRICS if f"disturbed/{m}" in present]
    if not clean and not disturbed:
        return []
    denominators = "; ".join(f"`{m}` per {d}" for m, d in OWN_ERROR_DENOMINATORS.items())
    lines = [
        "## Own errors",
        "",
        "The agent's own mistakes, judged by the task's oracle (the expert at every state), "
        "told apart from the environment's noise. An own error is a token the agent chose and "
        "wrote at a valid state that the oracle gives no mass; `early_eos_rate` counts an "
        "`<eos>` there apart (it cannot be repaired), `noise_unrepaired` writing on after a "
        f"noise token that left the language. Denominators: {denominators}. Intervals resample "
        "seeds, then these units within each seed.",
        "",
    ]
    if clean:
        lines += ["Clean evaluation:", "", table(results, clean), ""]
    if disturbed:
        lines += ["Under the training disturbance:", "", table(results, disturbed), ""]
    diffs = difference_table(results, [*clean, *disturbed])
    if diffs:
        lines += ["Differences of means [95% bootstrap interval]:", "", *diffs, ""]
    return lines


def target_section(results: dict[str, Any]) -> list[str]:
    """The report's section of targets, or nothing when the config states none."""
    if not results.get("targets"):
        return []
    head = ["## Targets", "", "Judged on the mean over seeds (clean evaluation).", ""]
    return [*head, *target_lines(results), ""]


def convergence_lines(results: dict[str, Any]) -> list[str]:
    """Whether each agent's headline eval curve flattened over the last quarter of training."""
    flat = results.get("convergence") or {}
    if not flat:
        return []
    parts = [
        f"{agent_short(agent)}: {c['flat_seeds']} of {c['seeds']} seeds flat "
        f"(nearest to the bound: moved {c['worst']['change']:+.3f}, allowed "
        f"{c['worst']['tolerance']:.3f})"
        for agent, c in flat.items()
    ]
    return [
        "Converged? Each seed's eval curve from three quarters of the updates to the end may move "
        f"by {FLAT_CHANGE} plus twice the binomial noise of its two points: "
        + "; ".join(parts)
        + ".",
        "",
    ]


def budgets(results: dict[str, Any]) -> list[str]:
    """What each agent was trained with: updates and batch, or PPO's environment steps."""
    config = results["config"]
    runs = [r for r in results.get("runs", []) if "labelled_states" in r]
    lines = []
    for agent in config.get("agent_list", []):
        fields = {**config.get("train", {}), **config.get("agents", {}).get(agent, {})}
        own_loop = agent in ALGORITHMS and ALGORITHMS[agent].cls.own_loop
        untrained = agent in ALGORITHMS and not ALGORITHMS[agent].cls.trains
        if own_loop:
            why = (
                " (a small budget: on arithmetic it learns nothing, 0.0 accuracy at 8,000 steps)"
                if config.get("name") == "default"
                else ""
            )
            lines.append(
                f"- {agent_label(agent)}: {fields.get('timesteps', '?')} environment steps on "
                f"the task reward{why}"
            )
        elif untrained:
            lines.append(f"- {agent_label(agent)}: no update (its fresh adapter is a no-op)")
        else:
            states = [r["labelled_states"] for r in runs if r["agent"] == agent]
            labelled = (
                f", {sum(states) / len(states):,.0f} expert-labelled states read per run"
                if states and all(states)
                else ""
            )
            lines.append(
                f"- {agent_label(agent)}: {fields.get('steps', '?')} updates of "
                f"batch {fields.get('batch_size', '?')}{labelled}"
            )
    if "ppo" not in config.get("agent_list", []) and results["task"] != "text":
        lines.append("- PPO: not in this run (`--agents ...,ppo` adds it)")
    return lines


def interval_methods(results: dict[str, Any]) -> str:
    """The interval methods used in the table, in words."""
    methods = sorted(
        {
            s["method"]
            for stats in results["agents"].values()
            for s in stats.values()
            if "method" in s
        }
    )
    return "; ".join(methods) or "none"


def plot_files(results: dict[str, Any]) -> list[str]:
    """The curve plots of ``results``, their file names in report order."""
    return [name for _, name, _ in curve_keys(results)]


def report(results: dict[str, Any]) -> str:
    """The markdown of report.md: setup, table, differences, verdicts and any sweep."""
    config = results["config"]
    untuned = "untuned" in config.get("agent_list", [])
    status = []
    if not results.get("complete", True):
        status = [
            f"**Partial: {results['runs_done']} of {results['runs_total']} runs finished.** "
            "Run the same command again to resume.",
            "",
        ]
    lines = [
        f"# seqmatch compare: {results['task']}",
        "",
        *status,
        f"Command: `{results['command']}`  ",
        f"Config: `{config.get('name', 'default')}`, {config['seeds']} seed(s) per agent, "
        f"wall time {results['wall_seconds'] / 60:.1f} min "
        f"(runs: {results.get('run_seconds', 0) / 60:.1f} min in total, "
        f"{results.get('cpu_seconds', 0) / 60:.1f} CPU-min, "
        f"{results['machine'].get('jobs', 1)} at once) on {results['machine']['device']} "
        f"({results['machine']['cpus']} CPUs, torch {results['machine']['torch']}).",
        "",
        f"Mean over seeds [95% interval: {interval_methods(results)}]. "
        "↑ higher is better, ↓ lower is better.",
        "",
        table(results),
        "",
        *disturbed_section(results),
        "Budgets:",
        "",
        *budgets(results),
        "",
        *convergence_lines(results),
        "## SequenceMatch against MLE and BC"
        + (" (and the fine-tunes against the untuned model)" if untuned else ""),
        "",
        "Difference of means [95% bootstrap interval of the difference]; a difference is called "
        "where the interval excludes 0.",
        "",
        *(difference_table(results) or ["(needs SequenceMatch and MLE or BC)"]),
        "",
        *verdicts(results),
        "",
        *own_error_section(results),
        *target_section(results),
    ]
    if "sweep" in results:
        sweep = results["sweep"]
        lines += [f"## Sweep over `{sweep['param']}`", ""]
        headline = metrics_of(results)[:2]
        lines.append(f"| agent | {sweep['param']} | " + " | ".join(headline) + " |")
        lines.append("|---" * (len(headline) + 2) + "|")
        for agent, by_value in sweep["by_value"].items():
            for value, stats in by_value.items():
                cells = [stat_cell(stats.get(m)) for m in headline]
                lines.append(f"| {agent_label(agent)} | {value} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += [
        "## Plots",
        "",
        "Curves: mean over seeds per agent, the band from the lowest to the highest seed.",
        "",
        *(f"![{name.removesuffix('.png')}]({name})\n" for name in plot_files(results)),
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


def agent_colours(agents: list[str]) -> dict[str, Any]:
    """One colour per agent, fixed by the agent's place among the known agents."""
    import matplotlib

    palette = matplotlib.colormaps["tab10"]
    known = list(ALGORITHMS)
    order = known + sorted(a for a in agents if a not in known)
    return {a: palette(order.index(a) % palette.N) for a in agents}


def curve_keys(results: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(curve key, file name, y label) of each curve plot.

    The headline, the divergence estimate, then every other ``eval/`` curve present in the runs.
    """
    head = headline(results["task"])
    keys = [
        (f"eval/{head}", "curves_score.png", f"{head} (eval)"),
        ("losses/sm/divergence", "curves_divergence.png", "divergence estimate -J"),
    ]
    present = {k for run in results["runs"] for row in run["curves"] for k in row}
    for key in sorted(present):
        if key.startswith("eval/") and key != f"eval/{head}":
            name = key.removeprefix("eval/").replace("/", "_")
            keys.append((key, f"curves_eval_{name}.png", f"{name} (eval)"))
    return keys


def grouped_curve(runs: list[dict[str, Any]], key: str) -> tuple[list[float], ...] | None:
    """(steps, mean, low, high) of ``key`` over the seeds in ``runs``.

    At every step some seed logged it; None where no run has the curve.
    """
    by_step: dict[float, list[float]] = {}
    for run in runs:
        for row in run["curves"]:
            value = row.get(key)
            if value is not None and math.isfinite(value):
                by_step.setdefault(row["step"], []).append(value)
    if not by_step:
        return None
    steps = sorted(by_step)
    return (
        steps,
        [sum(by_step[s]) / len(by_step[s]) for s in steps],
        [min(by_step[s]) for s in steps],
        [max(by_step[s]) for s in steps],
    )


def plots(results: dict[str, Any], out: Path) -> None:
    """Learning curves per agent and the metric bars with their intervals.

    Curves show the mean over seeds with a min–max band.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    agents = list(results["agents"])
    colours = agent_colours(agents)
    for key, name, ylabel in curve_keys(results):
        fig, ax = plt.subplots(figsize=(6, 4))
        for agent in agents:
            curve = grouped_curve([r for r in results["runs"] if r["agent"] == agent], key)
            if curve is None:
                continue
            steps, centre, low, high = curve
            seeds = sum(r["agent"] == agent for r in results["runs"])
            ax.plot(steps, centre, color=colours[agent], label=f"{agent} ({seeds} seeds)")
            ax.fill_between(steps, low, high, color=colours[agent], alpha=0.2, linewidth=0)
        ax.set_xlabel("update")
        ax.set_ylabel(ylabel)
        if ax.lines:
            ax.legend(fontsize=7)
        else:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
        fig.tight_layout()
        save_figure(fig, out / name)

    metrics = metrics_of(results)
    fig, axes = plt.subplots(1, max(1, len(metrics)), figsize=(3 * max(1, len(metrics)), 3.5))
    axes = axes if len(metrics) > 1 else [axes]
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
        ax.bar(
            range(len(agents)),
            means,
            yerr=errors,
            capsize=3,
            color=[colours[a] for a in agents],
        )
        ax.set_xticks(range(len(agents)), agents, rotation=60, ha="right", fontsize=7)
        ax.set_title(f"{metric} {_arrow(metric)}".rstrip(), fontsize=9)
    fig.suptitle("mean over seeds, 95% bootstrap interval", fontsize=8)
    fig.tight_layout()
    save_figure(fig, out / "metrics.png")


def save_figure(fig: Any, path: Path, dpi: int = 100) -> None:
    """Draw ``fig`` as a PNG and write it by the output rule (atomically); close it."""
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    plt.close(fig)
    write_file(path, buffer.getvalue())


def output_names(results: dict[str, Any]) -> list[str]:
    """The files :func:`write_outputs` writes for ``results``, relative to its folder."""
    return ["results.json", "report.md", "metrics.png", *(n for _, n, _ in curve_keys(results))]


def write_outputs(results: dict[str, Any], out: Path, with_plots: bool = True) -> None:
    """Write results.json and report.md (each atomically), and the plots if ``with_plots``.

    In a comparison folder, each is listed in its manifest before it is written.
    """
    out.mkdir(parents=True, exist_ok=True)
    if owner(out) == "comparison":
        record(out, *output_names(strict_json(results)))
    write_file(out / "results.json", json.dumps(strict_json(results), indent=1) + "\n")
    write_file(out / "report.md", report(strict_json(results)))
    if with_plots:
        plots(strict_json(results), out)
