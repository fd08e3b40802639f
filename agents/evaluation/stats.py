"""Confidence intervals over seeds, and whether a training curve has flattened."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

# --------------------------------------------------------------------------------------------
# Statistics over seeds


def mean_ci95(values: Sequence[float]) -> tuple[float, float, float]:
    """Mean and two-sided 95% confidence interval by Student's t: ``mean ± t(0.975, n-1) s/√n``.

    With one value the interval is undefined: returns ``(x, nan, nan)``. Values that are all
    equal give ``(x, x, x)``.

    Raises:
        ValueError: for no values.
    """
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        raise ValueError("mean_ci95 needs at least one value")
    try:
        from scipy import stats
    except ImportError as err:
        raise ImportError("mean_ci95 needs scipy for Student's t: pip install scipy") from err
    mean = float(x.mean())
    if x.size == 1:
        return mean, math.nan, math.nan
    half = float(stats.t.ppf(0.975, df=x.size - 1)) * float(x.std(ddof=1)) / math.sqrt(x.size)
    return mean, mean - half, mean + half


def bootstrap_ci95(
    values: Sequence[float], num_resamples: int = 10_000, seed: int = 0
) -> tuple[float, float, float]:
    """Mean and percentile-bootstrap 95% interval.

    The interval is the 2.5th and 97.5th percentiles of the means of ``num_resamples`` resamples
    with replacement. One value gives ``(x, x, x)``.
    """
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        raise ValueError("bootstrap_ci95 needs at least one value")
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(num_resamples, x.size))].mean(axis=1)
    lo, hi = np.percentile(means, [2.5, 97.5])
    return float(x.mean()), float(lo), float(hi)


# --------------------------------------------------------------------------------------------
# Hierarchical bootstrap: seeds, then the evaluation episodes of each seed

RunValues = float | Sequence[float]
"""One run of an agent: its metric (a float), or the per-episode values it is the mean of."""

NUM_RESAMPLES = 10_000


def _resampled_means(
    runs: Sequence[RunValues], num_resamples: int, rng: np.random.Generator
) -> np.ndarray:
    """``num_resamples`` bootstrap means of ``runs``: (num_resamples,) float64.

    Each resample draws len(runs) seeds with replacement; a drawn run given by its episodes
    contributes the mean of its episodes resampled with replacement (a fresh draw at every
    pick, so a seed drawn twice counts with two episode resamples); a run given by one value
    contributes that value.
    """
    if not runs:
        raise ValueError("a bootstrap needs at least one run")
    picks = rng.integers(0, len(runs), size=(num_resamples, len(runs)))  # (R, S)
    totals = np.zeros(num_resamples)
    for index, run in enumerate(runs):
        count = picks == index  # (R, S): where this run was drawn
        drawn = int(count.sum())
        if drawn == 0:
            continue
        if isinstance(run, int | float):
            values = np.full(drawn, float(run))
        else:
            episodes = np.asarray(run, dtype=np.float64)
            if episodes.size == 0:
                raise ValueError("a run given by its episodes needs at least one episode")
            draws = rng.integers(0, episodes.size, size=(drawn, episodes.size))
            values = episodes[draws].mean(axis=1)
        rows = np.nonzero(count)[0]  # the resample of each draw, in the order of `values`
        np.add.at(totals, rows, values)
    return totals / len(runs)


def _run_mean(run: RunValues) -> float:
    return float(run) if isinstance(run, int | float) else float(np.mean(run))


def hierarchical_bootstrap_ci95(
    runs: Sequence[RunValues],
    num_resamples: int = NUM_RESAMPLES,
    seed: int = 0,
    bounds: tuple[float, float] = (-math.inf, math.inf),
) -> tuple[float, float, float]:
    """Mean over runs and its two-level percentile-bootstrap 95% interval.

    Args:
        runs: one entry per seed: the run's metric, or the per-episode values it is the mean of
            (then episodes are resampled within each resampled seed).
        num_resamples: bootstrap resamples.
        seed: seed of the resampling stream (the interval is reproducible).
        bounds: the metric's range; the interval is clipped to it (a safeguard: resampled means
            of values inside a range stay inside it).

    Returns:
        ``(mean, lo, hi)``. One run given by a single value has no interval: ``(x, nan, nan)``.
    """
    if not runs or any(not isinstance(r, int | float) and len(r) == 0 for r in runs):
        raise ValueError("a bootstrap needs at least one run, and one episode in each run")
    mean = float(np.mean([_run_mean(r) for r in runs]))
    if len(runs) == 1 and isinstance(runs[0], int | float):
        return mean, math.nan, math.nan
    means = _resampled_means(runs, num_resamples, np.random.default_rng(seed))
    lo, hi = np.percentile(means, [2.5, 97.5])
    low, high = bounds
    return mean, float(np.clip(lo, low, high)), float(np.clip(hi, low, high))


def bootstrap_diff_ci95(
    a_runs: Sequence[RunValues],
    b_runs: Sequence[RunValues],
    factor: float = 1.0,
    num_resamples: int = NUM_RESAMPLES,
    seed: int = 0,
) -> tuple[float, float, float]:
    """``mean(A) - factor * mean(B)`` and its 95% interval, A and B resampled independently.

    Each side is resampled as in :func:`hierarchical_bootstrap_ci95` (seeds, then episodes
    where given). ``factor`` states targets such as "A's invalid rate is at most half of B's"
    (``factor=0.5``: A - B/2 <= 0). A side of one run given by a single value has no spread
    to resample: the interval is then ``(nan, nan)``.
    """
    a_mean = np.mean([_run_mean(r) for r in a_runs])
    diff = float(a_mean - factor * np.mean([_run_mean(r) for r in b_runs]))
    if any(len(runs) == 1 and isinstance(runs[0], int | float) for runs in (a_runs, b_runs)):
        return diff, math.nan, math.nan
    rng = np.random.default_rng(seed)
    a = _resampled_means(a_runs, num_resamples, rng)
    b = _resampled_means(b_runs, num_resamples, rng)
    lo, hi = np.percentile(a - factor * b, [2.5, 97.5])
    return diff, float(lo), float(hi)


def is_better(
    a_runs: Sequence[RunValues],
    b_runs: Sequence[RunValues],
    higher_is_better: bool,
    factor: float = 1.0,
    num_resamples: int = NUM_RESAMPLES,
    seed: int = 0,
) -> tuple[bool, tuple[float, float, float]]:
    """Whether A beats ``factor`` times B, judged by the 95% interval of the difference.

    Returns:
        ``(better, (diff, lo, hi))`` with ``diff = mean(A) - factor * mean(B)``; ``better`` is
        True when the whole interval lies on the good side of zero (above it when higher is
        better, below it otherwise); False where there is no interval.
    """
    diff, lo, hi = bootstrap_diff_ci95(a_runs, b_runs, factor, num_resamples, seed)
    better = lo > 0 if higher_is_better else hi < 0
    return better, (diff, lo, hi)


# --------------------------------------------------------------------------------------------
# Convergence of a training curve


FLAT_CHANGE = 0.03
"""The largest change of the headline eval metric over the last quarter of the updates for a run
to count as converged, beyond the eval curve's own sampling noise (:func:`flat_tolerance`)."""


def _last_quarter(curves: list[dict[str, Any]], key: str) -> tuple[float, float] | None:
    """The eval metric at three quarters of training (last point up to there) and at the end."""
    series = [(row["step"], row[key]) for row in curves if key in row]
    if len(series) < 2:
        return None
    before = [v for s, v in series if s <= 0.75 * series[-1][0]]
    return (float(before[-1]), float(series[-1][1])) if before else None


def _tolerance(points: tuple[float, float], episodes: int) -> float:
    rates = np.clip(points, 0.0, 1.0)
    variance = float(np.sum(rates * (1.0 - rates)))
    return FLAT_CHANGE + 2.0 * float(np.sqrt(variance / max(episodes, 1)))


def flat_tolerance(curves: list[dict[str, Any]], key: str, episodes: int) -> float:
    """FLAT_CHANGE plus twice the sampling noise of the difference of the two eval points.

    The headline metrics are rates in [0, 1] measured on ``episodes`` episodes, so each eval
    point has a binomial variance p (1 - p) / episodes at its own p: at 100 episodes, points at
    0.2 and 0.3 differ by noise 0.061, larger than FLAT_CHANGE itself. (A point near 1 has
    little noise; one at 0.9 before it still has its own.)
    """
    points = _last_quarter(curves, key)
    if points is None:
        return FLAT_CHANGE + 2.0 * float(np.sqrt(2.0 * 0.25 / max(episodes, 1)))
    return _tolerance(points, episodes)


def last_quarter_change(curves: list[dict[str, Any]], key: str) -> float | None:
    """The eval metric's last value minus its value at three quarters of training (or None)."""
    points = _last_quarter(curves, key)
    return None if points is None else points[1] - points[0]


def last_quarter_move(
    curves: list[dict[str, Any]], key: str, episodes: int
) -> tuple[float, float] | None:
    """(change, tolerance) of the last quarter from one read of the curve, or None.

    The two are :func:`last_quarter_change` and :func:`flat_tolerance`; the run is flat when
    abs(change) <= tolerance.
    """
    points = _last_quarter(curves, key)
    return None if points is None else (points[1] - points[0], _tolerance(points, episodes))
