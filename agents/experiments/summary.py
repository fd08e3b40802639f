"""What a comparison's runs say together: intervals, differences, convergence, targets.

Pure functions of the finished runs' rows (``runs/<agent>-s<seed>.json``), so the report of a
stopped or resumed comparison is rebuilt from disk: each metric's mean and 95% interval per
agent (a percentile bootstrap over seeds, and over each seed's evaluation episodes where a run
stored them), the differences of :data:`DIFFERENCES`, whether each agent's curve flattened, and
the config's targets.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from agents.config import TrainConfig
from agents.evaluation.evaluate import headline, metric_spec
from agents.evaluation.stats import (
    NUM_RESAMPLES,
    RunValues,
    bootstrap_diff_ci95,
    hierarchical_bootstrap_ci95,
    last_quarter_move,
)

DIFFERENCES = (
    ("sequencematch", "mle"),
    ("sequencematch", "bc"),  # BC has the same level penalty: the SequenceMatch term's own effect
    ("sequencematch", "sequencematch_eta0"),  # the same, within SequenceMatch's own run
    ("dagger", "bc"),
    ("dagger", "dagger_demos"),  # the same expert-labelled states: the on-policy states' effect
    ("dagger", "sequencematch"),
    ("sequencematch", "untuned"),
    ("mle", "untuned"),
)
"""The pairs whose difference of means the report shows, with its interval."""


def _run_values(run: dict[str, Any], metric: str) -> RunValues | None:
    """What the bootstrap resamples for one run.

    Its episodes' values if given, else its metric (None where the metric is missing or not
    finite).
    """
    episodes = (run.get("episode_values") or {}).get(metric)
    if episodes:
        return [float(v) for v in episodes]
    value = run["metrics"].get(metric)
    if value is None or not np.isfinite(value):
        return None
    return float(value)


def interval_method(runs: Sequence[RunValues]) -> str:
    """How :func:`hierarchical_bootstrap_ci95` treats ``runs``, in words for a report."""
    with_episodes = sum(not isinstance(r, int | float) for r in runs)
    if len(runs) == 1 and not with_episodes:
        return "one seed: no interval"
    if with_episodes == len(runs):
        level = "seeds and episodes"
    elif with_episodes:
        level = "seeds (and episodes where given)"
    else:
        level = "seeds"
    return f"bootstrap over {level}, {NUM_RESAMPLES:,} resamples"


def aggregate(runs: Sequence[dict[str, Any]], key: str = "agent") -> dict[str, Any]:
    """{group: {metric: {"mean", "ci95": [lo, hi], "n", "method"}}} over the seeds of each group.

    The interval is a percentile bootstrap: seeds resampled with replacement and, for runs
    whose row has ``episode_values[metric]`` (the values the metric is the mean of), the
    episodes of each resampled seed as well; it is clipped to the metric's bounds.
    """
    groups: dict[str, list[dict[str, Any]]] = {}
    for run in runs:
        groups.setdefault(str(run[key]), []).append(run)
    out: dict[str, Any] = {}
    for group, rows in groups.items():
        out[group] = {}
        for metric in rows[0]["metrics"]:
            values = [v for v in (_run_values(r, metric) for r in rows) if v is not None]
            if not values:
                continue
            known = metric_spec(metric)
            bounds = known.bounds if known else (-np.inf, np.inf)
            mean, lo, hi = hierarchical_bootstrap_ci95(values, bounds=bounds)
            out[group][metric] = {
                "mean": mean,
                "ci95": [lo, hi],
                "n": len(values),
                "method": interval_method(values),
            }
    return out


def differences(
    runs: Sequence[dict[str, Any]], pairs: Sequence[tuple[str, str]] = DIFFERENCES
) -> dict[str, Any]:
    """{"a - b": {metric: {"diff", "ci95", "better"}}} for each pair of agents that both ran.

    ``better`` is "a", "b" or None: whose mean is better where the bootstrap interval of the
    difference excludes zero (None where it does not, or the metric has no direction).
    """
    out: dict[str, Any] = {}
    for a, b in pairs:
        a_rows = [r for r in runs if r["agent"] == a]
        b_rows = [r for r in runs if r["agent"] == b]
        if not a_rows or not b_rows:
            continue
        pair: dict[str, Any] = {}
        for metric in a_rows[0]["metrics"]:
            a_values = [v for v in (_run_values(r, metric) for r in a_rows) if v is not None]
            b_values = [v for v in (_run_values(r, metric) for r in b_rows) if v is not None]
            if not a_values or not b_values:
                continue
            diff, lo, hi = bootstrap_diff_ci95(a_values, b_values)
            known = metric_spec(metric)
            better = None
            if known is not None and known.higher_is_better is not None and (lo > 0 or hi < 0):
                better = a if (lo > 0) == known.higher_is_better else b
            pair[metric] = {"diff": diff, "ci95": [lo, hi], "better": better}
        out[f"{a} - {b}"] = pair
    return out


def convergence(runs: Sequence[dict[str, Any]], config: dict[str, Any]) -> dict[str, Any]:
    """Per agent: has its headline eval curve flattened over the last quarter of the updates?

    ``change`` is the largest last-quarter move over the seeds and ``flat`` whether every seed
    moved within :func:`~agents.evaluation.stats.flat_tolerance` (a fixed 0.03 plus the eval
    curve's own binomial noise). Only for headlines that are shares of episodes (accuracy, the
    invalid rate), whose noise is binomial; agents without an eval curve (PPO) are left out.
    """
    if headline(config["task"]) not in ("accuracy", "invalid_rate"):
        return {}
    key = f"eval/{headline(config['task'])}"
    out: dict[str, Any] = {}
    for agent in dict.fromkeys(r["agent"] for r in runs):
        fields = {**config.get("train", {}), **config.get("agents", {}).get(agent, {})}
        episodes = int(fields.get("eval_episodes", TrainConfig.eval_episodes))
        moves = [
            move
            for r in runs
            if r["agent"] == agent
            and (move := last_quarter_move(r.get("curves", []), key, episodes)) is not None
        ]
        if moves:
            worst = max(moves, key=lambda m: abs(m[0]) - m[1])  # the seed nearest to failing
            out[agent] = {
                "change": max(abs(c) for c, _ in moves),
                "flat": all(abs(c) <= tolerance for c, tolerance in moves),
                "flat_seeds": sum(abs(c) <= tolerance for c, tolerance in moves),
                "seeds": len(moves),
                "worst": {"change": worst[0], "tolerance": worst[1]},
            }
    return out


def check_targets(
    runs: Sequence[dict[str, Any]], targets: Sequence[dict[str, Any]]
) -> list[dict[str, Any]]:
    """Answer a config's ``targets`` on the mean over seeds.

    A target is ``{"text", "metric", "agent", "other", "relation": "<=" | ">=", "scale": 1,
    "offset": 0}``: met when mean(agent) relation scale * mean(other) + offset. Each answer adds
    both means, the bound, ``met`` (None while a side has no runs) and the bootstrap interval of
    mean(agent) - scale * mean(other) - offset (``ci95``), so a reader sees how sure the answer is.
    """
    answers = []
    for target in targets:
        metric, scale = target["metric"], float(target.get("scale", 1.0))
        offset, relation = float(target.get("offset", 0.0)), target["relation"]
        if relation not in ("<=", ">="):
            raise ValueError(f"target relation must be '<=' or '>=', got {relation!r}")
        sides = [
            [
                v
                for v in (_run_values(r, metric) for r in runs if r["agent"] == agent)
                if v is not None
            ]
            for agent in (target["agent"], target["other"])
        ]
        answer: dict[str, Any] = {**target, "met": None}
        if all(sides):
            means = [float(np.mean([np.mean(v) for v in side])) for side in sides]
            bound = scale * means[1] + offset
            diff, lo, hi = bootstrap_diff_ci95(sides[0], sides[1], factor=scale)
            met = means[0] <= bound if relation == "<=" else means[0] >= bound
            answer.update(
                mean=means[0], other_mean=means[1], bound=bound, met=bool(met),
                diff=diff - offset, ci95=[lo - offset, hi - offset],
            )  # fmt: skip
        answers.append(answer)
    return answers
