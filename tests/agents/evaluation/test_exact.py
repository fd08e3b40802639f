"""Exact evaluation in the disturbed MDP: the expert's chain, its marginal, the report."""

from __future__ import annotations

import numpy as np
import pytest

from agents.evaluation.exact import (
    ending_probs,
    exact_report,
    expert_chain,
    marginal_policy,
)
from agents.evaluation.occupancy import (
    chain_occupancy,
    data_policy_probs,
    disturbance_kernel,
    enumerate_states,
    occupancy_measure,
)
from seqenv.tasks.dyck import DyckTask

pytest.importorskip("scipy")


@pytest.fixture
def small() -> tuple[DyckTask, object]:
    task = DyckTask(num_types=1, max_depth=2, min_brackets=0, max_brackets=4)
    return task, enumerate_states(task.vocab.special, (0,), 7)


def grammar_everywhere(task: DyckTask, space) -> np.ndarray:  # type: ignore[no-untyped-def]
    """The grammar, and uniform without backspace on the prefixes it never produces."""
    probs = data_policy_probs(task, space)
    uniform = np.ones(task.vocab.num_actions)
    uniform[task.vocab.backspace_id] = 0.0
    probs[probs.sum(axis=1) == 0] = uniform / uniform.sum()
    return probs


@pytest.mark.parametrize("gamma", [0.5, 0.9])
def test_marginal_expert_has_the_experts_occupancy(small, gamma: float) -> None:  # type: ignore[no-untyped-def]
    task, space = small
    kernel = disturbance_kernel(space, 0.2)
    target = chain_occupancy(space, expert_chain(task, space, kernel), gamma)
    assert target.rho.sum() + target.absorbing.sum() == pytest.approx(1.0, abs=1e-12)
    marginal = occupancy_measure(space, marginal_policy(target), gamma, kernel)
    np.testing.assert_allclose(marginal.rho, target.rho, atol=1e-13)
    # The expert backspaces somewhere, and on texts that the grammar can produce too.
    bkspc = task.vocab.backspace_id
    grammar = data_policy_probs(task, space)
    assert (target.rho[grammar.sum(axis=1) > 0, bkspc] > 0).any()


def test_expert_repairs_every_disturbance(small) -> None:  # type: ignore[no-untyped-def]
    task, space = small
    p = 0.1
    report = exact_report(task, space, grammar_everywhere(task, space), 0.9, p)
    assert report["expert/output_tv"] < 1e-12
    assert report["expert/invalid"] < 1e-12
    # Each token takes 1/(1-p) attempts, each failed one a backspace: with E[L] tokens and an
    # <eos>, backspaces per step = p E[L] / ((1 + p) E[L] + 1 - p).
    mean_length = sum(len(s) * q for s, q in task.enumerate_sequences())
    expected = p * mean_length / ((1 + p) * mean_length + 1 - p)
    assert report["expert/backspace_rate"] == pytest.approx(expected, rel=1e-10)
    assert report["expert/mean_steps"] == pytest.approx((1 + p) / (1 - p) * mean_length + 1)
    # The grammar itself: exact on clean metrics, never repairs in the disturbed MDP.
    for name in ("chi2_mixture", "kl", "tv", "live_tv"):
        assert report[f"clean/{name}"] < 1e-12
    assert report["clean/output_tv"] < 1e-12
    assert report["disturbed/backspace_rate"] == 0.0
    # A random noise token is invalid unless it happens to continue a valid prefix.
    assert 0.05 < report["disturbed/invalid"] < 0.3
    assert report["disturbed/kl"] == np.inf  # the target backspaces, the grammar never does
    # The floor: the marginal expert, run clean, still backspaces (valid-looking noise).
    assert 0 < report["floor/backspace_rate"] < report["expert/backspace_rate"]
    assert 0 < report["floor/chi2_mixture"] < report["disturbed/chi2_mixture"]
    assert report["floor/invalid"] < 1e-12


def test_no_disturbance_makes_target_and_floor_the_grammar(small) -> None:  # type: ignore[no-untyped-def]
    task, space = small
    report = exact_report(task, space, grammar_everywhere(task, space), 0.9, 0.0)
    for run in ("disturbed", "floor"):
        for name in ("chi2_mixture", "kl", "js", "tv", "live_chi2_mixture"):
            assert report[f"{run}/{name}"] < 1e-12, (run, name)
    assert report["expert/backspace_rate"] == 0.0


def test_ending_probs_of_a_truncating_policy() -> None:
    task = DyckTask(num_types=1, max_depth=1, min_brackets=0, max_brackets=4)
    space = enumerate_states(task.vocab.special, (0,), max_length=4)
    probs = np.zeros(space.next_state.shape)
    probs[:, 1] = 1.0  # always "(": truncated after 3 appends
    from agents.evaluation.occupancy import policy_chain

    ends = ending_probs(space, policy_chain(space, probs))
    assert ends.sum() == pytest.approx(1.0)
    assert ends[space.generated.index((1, 1)), 1] == pytest.approx(1.0)


def test_dyck_small_floor_figures() -> None:
    """The figures quoted in the docs: dyck_small_cpu's grammar, p = 0.1, γ = 0.9."""
    task = DyckTask(num_types=1, max_depth=3, min_brackets=0, max_brackets=6)
    space = enumerate_states(task.vocab.special, (0,), 10)
    report = exact_report(task, space, grammar_everywhere(task, space), 0.9, 0.1)
    assert report["num_states"] == 9841
    assert report["floor/chi2_mixture"] == pytest.approx(0.00261, abs=1e-5)
    assert report["floor/kl"] == pytest.approx(0.00521, abs=1e-5)
    assert report["floor/tv"] == pytest.approx(0.0239, abs=1e-4)
    assert report["expert/backspace_rate"] == pytest.approx(0.06657, abs=1e-5)
