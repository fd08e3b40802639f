"""The two-level bootstrap of agents.evaluation.stats and the intervals of compare's aggregate."""

from __future__ import annotations

import numpy as np
import pytest

from agents.evaluation.evaluate import METRICS
from agents.evaluation.stats import (
    bootstrap_ci95,
    bootstrap_diff_ci95,
    hierarchical_bootstrap_ci95,
    is_better,
)
from agents.experiments.summary import aggregate, differences


def test_identical_seeds_give_the_interval_of_the_episodes_alone() -> None:
    episodes = [0.0, 1.0, 1.0, 0.0, 1.0, 1.0, 1.0, 0.0, 1.0, 1.0]
    mean, lo, hi = hierarchical_bootstrap_ci95([episodes] * 3, num_resamples=4000, seed=3)
    assert mean == pytest.approx(0.7)
    # Three copies of one seed: resampling seeds changes nothing, and each pick draws its
    # episodes afresh, so the mean of 3 picks is the mean of 30 episode draws.
    _, pooled_lo, pooled_hi = bootstrap_ci95(episodes * 3, num_resamples=4000, seed=3)
    assert lo == pytest.approx(pooled_lo, abs=0.03) and hi == pytest.approx(pooled_hi, abs=0.03)
    # Each seed's own episode interval is wider (10 episodes, not 30): the levels combine.
    _, one_lo, one_hi = bootstrap_ci95(episodes, num_resamples=4000, seed=3)
    assert hi - lo < one_hi - one_lo
    assert lo < mean < hi


def test_seed_level_only_without_episodes() -> None:
    mean, lo, hi = hierarchical_bootstrap_ci95([0.2, 0.4, 0.6], num_resamples=4000)
    assert mean == pytest.approx(0.4)
    # Resampled means of 3 values from {0.2, 0.4, 0.6}: the tails are 0.2 and 0.6 (prob 1/27
    # each > 2.5%), so the percentile interval reaches them.
    assert (lo, hi) == pytest.approx((0.2, 0.6))
    equal = hierarchical_bootstrap_ci95([0.5, 0.5, 0.5])
    assert equal == (0.5, 0.5, 0.5)
    single = hierarchical_bootstrap_ci95([0.5])
    assert single[0] == 0.5 and np.isnan(single[1]) and np.isnan(single[2])
    with pytest.raises(ValueError, match="at least one"):
        hierarchical_bootstrap_ci95([[0.1], []])


def test_intervals_of_zero_one_episodes_stay_in_the_unit_range() -> None:
    runs = [[0.0] * 20, [0.0] * 19 + [1.0], [1.0] * 20]
    mean, lo, hi = hierarchical_bootstrap_ci95(runs, bounds=METRICS["accuracy"].bounds)
    assert 0.0 <= lo <= mean <= hi <= 1.0
    # A Student's t interval of these three seeds would reach below 0 and above 1.
    assert lo < 0.1 and hi > 0.9
    # All failures: the interval is the point 0, not a band around it.
    assert hierarchical_bootstrap_ci95([[0.0] * 10] * 3) == (0.0, 0.0, 0.0)
    # The bounds clip an interval that would leave them (values given outside the range).
    clipped = hierarchical_bootstrap_ci95([-0.5, 0.5, 1.5], bounds=(0.0, 1.0))
    assert clipped[1] == 0.0 and clipped[2] == 1.0


def test_bootstrap_is_reproducible_and_seeded() -> None:
    runs = [list(np.linspace(0.0, 1.0, 7) ** k) for k in (1, 2, 3)] + [0.7]
    first = hierarchical_bootstrap_ci95(runs, num_resamples=300, seed=1)
    assert hierarchical_bootstrap_ci95(runs, num_resamples=300, seed=1) == first
    assert hierarchical_bootstrap_ci95(runs, num_resamples=300, seed=2) != first


def test_difference_interval_and_the_better_helper() -> None:
    low = [[0.0] * 18 + [1.0] * 2] * 3  # invalid rate 0.1
    high = [[0.0] * 12 + [1.0] * 8] * 3  # invalid rate 0.4
    diff, lo, hi = bootstrap_diff_ci95(low, high)
    assert diff == pytest.approx(-0.3) and lo < -0.3 < hi < 0.0
    better, (d, _, upper) = is_better(low, high, higher_is_better=False)
    assert better and d == pytest.approx(-0.3) and upper < 0
    assert not is_better(high, low, higher_is_better=False)[0]
    # "A's rate is at most half of B's": 0.1 - 0.5 * 0.4 = -0.1, held by these samples? The
    # interval of A - B/2 is about [-0.22, 0.01] with 60 episodes a side: not established.
    better_half, (half, half_lo, half_hi) = is_better(low, high, False, factor=0.5)
    assert half == pytest.approx(-0.1) and half_lo < -0.1 < half_hi
    assert better_half == (half_hi < 0)
    same = bootstrap_diff_ci95([0.5, 0.5], [0.5, 0.5])
    assert same == (0.0, 0.0, 0.0)
    one_seed = bootstrap_diff_ci95([0.9], [0.1, 0.2])  # no spread known for A: no interval
    assert one_seed[0] == pytest.approx(0.75) and np.isnan(one_seed[1]) and np.isnan(one_seed[2])
    assert not is_better([0.9], [0.1, 0.2], higher_is_better=True)[0]


def test_aggregate_uses_episodes_where_given_and_says_so() -> None:
    runs = [
        {
            "agent": "sm",
            "metrics": {"accuracy": float(np.mean(e)), "length": 3.0 + i},
            "episode_values": {"accuracy": e},
        }
        for i, e in enumerate([[1.0, 0.0, 1.0, 1.0], [1.0, 1.0, 1.0, 1.0], [0.0, 1.0, 1.0, 1.0]])
    ]
    stats = aggregate(runs)["sm"]
    accuracy, length = stats["accuracy"], stats["length"]
    assert set(accuracy) == {"mean", "ci95", "n", "method"} and accuracy["n"] == 3
    assert accuracy["method"] == "bootstrap over seeds and episodes, 10,000 resamples"
    assert length["method"] == "bootstrap over seeds, 10,000 resamples"
    assert accuracy["mean"] == pytest.approx(10 / 12)
    assert 0.0 <= accuracy["ci95"][0] < accuracy["mean"] < accuracy["ci95"][1] <= 1.0
    assert length["ci95"] == pytest.approx([3.0, 5.0])
    one = aggregate([{"agent": "mle", "metrics": {"accuracy": 0.5}}])["mle"]["accuracy"]
    assert one["method"] == "one seed: no interval" and np.isnan(one["ci95"][0])


def test_differences_name_the_better_agent() -> None:
    def run(agent: str, accuracy: float) -> dict:
        return {"agent": agent, "metrics": {"accuracy": accuracy, "backspace_rate": 0.1}}

    runs = [run("sequencematch", a) for a in (0.8, 0.82, 0.84)]
    runs += [run("mle", a) for a in (0.5, 0.52, 0.54)] + [run("bc", a) for a in (0.7, 0.9, 0.8)]
    result = differences(runs)
    assert set(result) == {"sequencematch - mle", "sequencematch - bc"}
    vs_mle = result["sequencematch - mle"]["accuracy"]
    assert vs_mle["diff"] == pytest.approx(0.3) and vs_mle["better"] == "sequencematch"
    assert result["sequencematch - bc"]["accuracy"]["better"] is None  # intervals overlap 0
    assert result["sequencematch - mle"]["backspace_rate"]["better"] is None  # no direction
    assert differences([run("mle", 0.5)]) == {}
    # The eta-0 ablation: what the SequenceMatch term adds within its own run.
    ablation = [run("sequencematch_eta0", a) for a in (0.81, 0.83, 0.85)]
    both = differences(runs + ablation)
    assert "sequencematch - sequencematch_eta0" in both
    assert both["sequencematch - sequencematch_eta0"]["accuracy"]["diff"] == pytest.approx(-0.01)


def test_a_disturbed_metric_keeps_its_direction() -> None:
    # disturbed/<metric> is the same metric measured under the disturbance: its difference is
    # called as the clean one's is, a lower own-error rate being the better.
    def run(agent: str, rate: float) -> dict:
        return {"agent": agent, "metrics": {"disturbed/own_error_rate": rate}}

    runs = [run("sequencematch", r) for r in (0.15, 0.16, 0.14)]
    runs += [run("mle", r) for r in (0.07, 0.08, 0.06)]
    pair = differences(runs)["sequencematch - mle"]["disturbed/own_error_rate"]
    assert pair["diff"] == pytest.approx(0.08) and pair["better"] == "mle"
