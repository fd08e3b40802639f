"""Confidence intervals over seeds."""

from __future__ import annotations

import math
from collections.abc import Sequence

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
    """Mean and percentile-bootstrap 95% interval (2.5th and 97.5th percentiles of the means of
    ``num_resamples`` resamples with replacement). One value gives ``(x, x, x)``.
    """
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        raise ValueError("bootstrap_ci95 needs at least one value")
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(num_resamples, x.size))].mean(axis=1)
    lo, hi = np.percentile(means, [2.5, 97.5])
    return float(x.mean()), float(lo), float(hi)
