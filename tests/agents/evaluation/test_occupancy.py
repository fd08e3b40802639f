"""Exact occupancy measures: against hand values and a brute-force forward enumeration."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable

import numpy as np
import pytest
import torch

from agents.evaluation.occupancy import (
    data_policy_probs,
    disturbance_kernel,
    divergences,
    enumerate_states,
    exact_divergences,
    occupancy_measure,
    policy_probs_from_model,
    random_noise_probs,
)
from seqenv.tasks.dyck import DyckTask

pytest.importorskip("scipy")

# 1 bracket type, depth 1: tokens ^ = 0, ( = 1, ) = 2; <eos> = 3, <bkspc> = 4; A = 5.
START, OPEN, CLOSE, EOS, BKSP = 0, 1, 2, 3, 4
A = 5


@pytest.fixture
def tiny_dyck() -> DyckTask:
    return DyckTask(num_types=1, max_depth=1, min_brackets=0, max_brackets=4)


def wrong_probs(generated: tuple[int, ...]) -> np.ndarray:
    """A deliberately wrong policy: writes ^, closes at depth 0, backspaces, stops early."""
    p = np.zeros(A)
    if not generated:
        p[[OPEN, CLOSE, START, EOS]] = [0.6, 0.2, 0.1, 0.1]
    else:
        p[[OPEN, CLOSE, START, EOS, BKSP]] = [0.3, 0.3, 0.1, 0.1, 0.2]
    return p


def as_policy(fn: Callable[[tuple[int, ...]], np.ndarray], prompt_length: int = 1):
    def policy_probs(states: list[list[int]]) -> np.ndarray:
        return np.array([fn(tuple(s[prompt_length:])) for s in states])

    return policy_probs


def grammar_policy(task: DyckTask) -> Callable[[tuple[int, ...]], np.ndarray]:
    """The grammar as a full policy; uniform without backspace where the grammar never goes."""
    uniform = np.ones(task.vocab.num_actions)
    uniform[task.vocab.backspace_id] = 0.0
    uniform /= uniform.sum()

    def probs(generated: tuple[int, ...]) -> np.ndarray:
        try:
            return task.next_token_probs(generated)
        except ValueError:  # a prefix of probability zero: unreachable for both policies
            return uniform

    return probs


def brute_force(
    fn: Callable[[tuple[int, ...]], np.ndarray],
    gamma: float,
    max_length: int,
    prompt_length: int = 1,
    horizon: int = 200,
) -> tuple[dict, dict]:
    """ρ(s, a) and the absorbing occupancies by enumerating the distribution of s_t, t < horizon.

    Independent of the module: plain dictionaries, the MDP's rules written out again. The
    absorbing state entered at step t+1 after probability q of (s_t, a_t) holds
    Σ_{t' > t} (1-γ) γ^t' q = γ^(t+1) q. The neglected tail is below γ^horizon.
    """
    rho: dict[tuple, float] = defaultdict(float)
    absorbing: dict[tuple, float] = defaultdict(float)
    dist: dict[tuple[int, ...], float] = {(): 1.0}
    for t in range(horizon):
        nxt: dict[tuple[int, ...], float] = defaultdict(float)
        for state, p_state in dist.items():
            probs = fn(state)
            for a in np.flatnonzero(probs):
                q = p_state * probs[a]
                rho[(state, int(a))] += (1 - gamma) * gamma**t * q
                if a == EOS:
                    absorbing[(state, int(a))] += gamma ** (t + 1) * q
                elif a == BKSP:
                    nxt[state[:-1]] += q
                elif prompt_length + len(state) + 1 >= max_length:  # the buffer fills: truncated
                    absorbing[(state, int(a))] += gamma ** (t + 1) * q
                else:
                    nxt[(*state, int(a))] += q
        dist = nxt
    return rho, absorbing


def test_state_space_layout_and_transitions() -> None:
    task = DyckTask(num_types=1, max_depth=1, min_brackets=0, max_brackets=4)
    space = enumerate_states(task.vocab.special, (START,), max_length=4)
    # Live: 1 + g < 4, so g = 0, 1, 2 over 3 tokens: 1 + 3 + 9 states.
    assert space.num_states == 13
    assert space.generated[:5] == [(), (0,), (1,), (2,), (0, 0)]
    index = {g: i for i, g in enumerate(space.generated)}
    root, opened = index[()], index[(OPEN,)]
    assert space.next_state[root, OPEN] == opened
    assert space.next_state[root, BKSP] == root  # the no-op backspace stays
    assert space.next_state[root, EOS] == -1
    assert space.next_state[opened, BKSP] == root
    assert space.next_state[opened, CLOSE] == index[(OPEN, CLOSE)]
    full = index[(OPEN, CLOSE)]  # 3 tokens in a buffer of 4: one more append truncates
    assert list(space.next_state[full, [START, OPEN, CLOSE, EOS]]) == [-1, -1, -1, -1]
    assert space.next_state[full, BKSP] == opened
    assert space.states()[full] == [START, OPEN, CLOSE]


def test_too_many_states_is_refused() -> None:
    task = DyckTask()
    with pytest.raises(ValueError, match="max_states"):
        enumerate_states(task.vocab.special, (0,), max_length=30, max_states=1000)


def test_data_measure_sums_to_one_and_live_mass_is_one_minus_discounted_length(
    tiny_dyck: DyckTask,
) -> None:
    gamma, max_length = 0.9, 6  # every sequence (<= 4 brackets) fits with its <eos>
    space = enumerate_states(tiny_dyck.vocab.special, (START,), max_length)
    occupancy = occupancy_measure(space, data_policy_probs(tiny_dyck, space), gamma)
    assert occupancy.rho.sum() + occupancy.absorbing.sum() == pytest.approx(1.0, abs=1e-12)
    # An episode of a sequence of l brackets takes l + 1 steps: live mass = 1 - E[γ^T].
    expected = 1.0 - sum(p * gamma ** (len(s) + 1) for s, p in tiny_dyck.enumerate_sequences())
    assert occupancy.live_mass == pytest.approx(expected, abs=1e-12)
    assert occupancy.vector(absorbing=True).sum() == pytest.approx(1.0, abs=1e-12)
    assert occupancy.vector(absorbing=False).sum() == pytest.approx(1.0, abs=1e-12)


def test_truncation_by_hand() -> None:
    # A policy that always opens: 3 live steps in a buffer of 4, then truncation.
    task = DyckTask(num_types=1, max_depth=1, min_brackets=0, max_brackets=4)
    space = enumerate_states(task.vocab.special, (START,), max_length=4)
    probs = np.zeros((space.num_states, A))
    probs[:, OPEN] = 1.0
    gamma = 0.5
    occupancy = occupancy_measure(space, probs, gamma)
    index = {g: i for i, g in enumerate(space.generated)}
    for t, state in enumerate([(), (OPEN,), (OPEN, OPEN)]):
        assert occupancy.rho[index[state], OPEN] == pytest.approx((1 - gamma) * gamma**t)
    assert occupancy.live_mass == pytest.approx(1 - gamma**3)
    assert occupancy.absorbing[index[(OPEN, OPEN)], OPEN] == pytest.approx(gamma**3)
    assert occupancy.absorbing.sum() == pytest.approx(gamma**3)


def test_wrong_policy_matches_brute_force(tiny_dyck: DyckTask) -> None:
    gamma, max_length = 0.8, 5
    space = enumerate_states(tiny_dyck.vocab.special, (START,), max_length)
    probs = as_policy(wrong_probs)(space.states())
    occupancy = occupancy_measure(space, probs, gamma)
    rho, absorbing = brute_force(wrong_probs, gamma, max_length)
    exact = {
        (g, a): occupancy.rho[i, a]
        for i, g in enumerate(space.generated)
        for a in range(A)
        if occupancy.rho[i, a] > 0
    }
    assert exact.keys() == rho.keys()
    for key, value in rho.items():
        assert exact[key] == pytest.approx(value, abs=1e-12), key
    exact_absorbing = {
        (g, a): occupancy.absorbing[i, a]
        for i, g in enumerate(space.generated)
        for a in range(A)
        if occupancy.absorbing[i, a] > 0
    }
    assert exact_absorbing.keys() == absorbing.keys()
    for key, value in absorbing.items():
        assert exact_absorbing[key] == pytest.approx(value, abs=1e-12), key
    assert sum(rho.values()) + sum(absorbing.values()) == pytest.approx(1.0, abs=1e-12)

    # The divergences from the data, recomputed on the brute-force dictionaries.
    data_rho, data_absorbing = brute_force(tiny_dyck.next_token_probs, gamma, max_length)
    p = {
        **{("live", *k): v for k, v in data_rho.items()},
        **{("end", *k): v for k, v in data_absorbing.items()},
    }
    q = {
        **{("live", *k): v for k, v in rho.items()},
        **{("end", *k): v for k, v in absorbing.items()},
    }
    keys = sorted(set(p) | set(q), key=repr)
    pv = np.array([p.get(k, 0.0) for k in keys])
    qv = np.array([q.get(k, 0.0) for k in keys])
    tv = 0.5 * np.abs(pv - qv).sum()
    chi2 = sum((a - b) ** 2 / (2 * (a + b)) for a, b in zip(pv, qv, strict=True) if a + b > 0)
    got = exact_divergences(tiny_dyck, as_policy(wrong_probs), gamma, max_length)
    assert got["tv"] == pytest.approx(tv, abs=1e-10)
    assert got["chi2_mixture"] == pytest.approx(chi2, abs=1e-10)
    # The wrong policy gives every action the data takes a positive probability: KL is finite.
    assert 0.0 < got["kl"] < math.inf
    assert 0.0 < got["tv"] < 1.0


@pytest.mark.parametrize("absorbing", [True, False])
@pytest.mark.parametrize("gamma", [0.5, 0.998])
def test_model_equal_to_data_gives_zero(absorbing: bool, gamma: float) -> None:
    task = DyckTask(num_types=2, max_depth=2, min_brackets=0, max_brackets=4)
    got = exact_divergences(
        task, as_policy(grammar_policy(task)), gamma, max_length=6, absorbing=absorbing
    )
    for name in ("chi2_mixture", "kl", "js", "tv"):
        assert abs(got[name]) < 1e-8, (name, got[name])
    assert got["data_live_mass"] == pytest.approx(got["model_live_mass"], abs=1e-12)


def test_divergences_by_hand() -> None:
    p, q = np.array([1.0, 0.0]), np.array([0.5, 0.5])
    got = divergences(p, q)
    assert got["tv"] == pytest.approx(0.5)
    assert got["kl"] == pytest.approx(math.log(2))
    assert got["chi2_mixture"] == pytest.approx(0.25 / 3 + 0.25)  # (p-q)²/(2(p+q)) summed
    # Against the mixture m = (0.75, 0.25).
    js = 0.5 * (math.log(1 / 0.75) + 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25))
    assert got["js"] == pytest.approx(js)
    assert divergences(q, p)["kl"] == math.inf  # q has mass where p has none


def test_policy_row_checks(tiny_dyck: DyckTask) -> None:
    space = enumerate_states(tiny_dyck.vocab.special, (START,), max_length=4)
    probs = np.full((space.num_states, A), 0.3)
    with pytest.raises(ValueError, match="sum to"):
        occupancy_measure(space, probs, 0.9)
    with pytest.raises(ValueError, match="shape"):
        occupancy_measure(space, probs[:, :3], 0.9)
    zero_start = np.zeros((space.num_states, A))
    with pytest.raises(ValueError, match="no action"):
        occupancy_measure(space, zero_start, 0.9)


def test_policy_probs_from_model(tiny_dyck: DyckTask, tiny_policy) -> None:
    special = tiny_dyck.vocab.special
    model = tiny_policy(tiny_dyck.vocab)
    policy_probs = policy_probs_from_model(model, special, "cpu", batch_size=4)
    states = [[START], [START, OPEN], [START, OPEN, CLOSE, START], [START, CLOSE]]
    probs = policy_probs(states)
    assert probs.shape == (4, A)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-12)
    assert probs[0, BKSP] == 0.0 and (probs[1:, BKSP] > 0).all()
    with torch.no_grad():  # each state alone, its own causal pass
        for state, row in zip(states, probs, strict=True):
            ids = torch.tensor([state])
            logits = model(ids, torch.arange(len(state))[None])[0, -1].double()
            if len(state) == 1:
                logits[BKSP] = -math.inf
            np.testing.assert_allclose(row, logits.softmax(-1).numpy(), atol=1e-6)
    no_backspace = policy_probs_from_model(model, special, "cpu", allow_backspace=False)(states)
    assert (no_backspace[:, BKSP] == 0).all()
    np.testing.assert_allclose(no_backspace.sum(axis=1), 1.0, atol=1e-12)
    got = exact_divergences(tiny_dyck, policy_probs, 0.9, max_length=5)
    assert 0.0 < got["tv"] < 1.0 and 0.0 < got["chi2_mixture"] < 1.0
    assert 0.0 < got["kl"] < math.inf  # a softmax puts mass everywhere


# --------------------------------------------------------------------------------------------
# The disturbed MDP


def test_disturbed_random_kernel_by_hand() -> None:
    task = DyckTask(num_types=1, max_depth=1, min_brackets=0, max_brackets=4)
    space = enumerate_states(task.vocab.special, (START,), max_length=4)
    kernel = disturbance_kernel(space, 0.2)
    index = {g: i for i, g in enumerate(space.generated)}
    root, full = index[()], index[(OPEN, CLOSE)]
    # A disturbed "(" runs as itself w.p. 0.8, else as ^ or ) (uniform over the other tokens).
    np.testing.assert_allclose(kernel.row(root, OPEN), [0.1, 0.8, 0.1, 0, 0])
    np.testing.assert_allclose(kernel.row(root, EOS), [0, 0, 0, 1, 0])  # never disturbed
    np.testing.assert_allclose(kernel.row(root, BKSP), [0, 0, 0, 0, 1])
    np.testing.assert_allclose(kernel.row(full, OPEN), [0, 1, 0, 0, 0])  # it fills the buffer
    dense = kernel.dense()
    for s in (root, full):
        for a in range(A):
            np.testing.assert_allclose(dense[s, a], kernel.row(s, a))
    probs = np.tile([0.1, 0.5, 0.2, 0.15, 0.05], (space.num_states, 1))
    np.testing.assert_allclose(
        kernel.executed_probs(probs), np.einsum("sa,sab->sb", probs, dense), atol=1e-15
    )
    same = disturbance_kernel(space, 0.2, random_noise_probs(task.vocab.special))
    np.testing.assert_allclose(same.dense(), dense, atol=1e-15)


def test_disturbed_occupancy_matches_brute_force(tiny_dyck: DyckTask) -> None:
    gamma, max_length, p = 0.8, 5, 0.3
    space = enumerate_states(tiny_dyck.vocab.special, (START,), max_length)
    kernel = disturbance_kernel(space, p)
    occupancy = occupancy_measure(space, as_policy(wrong_probs)(space.states()), gamma, kernel)
    # Brute force: the distribution of s_t, with the disturbance written out again.
    rho: dict[tuple, float] = defaultdict(float)
    dist: dict[tuple[int, ...], float] = {(): 1.0}
    for t in range(150):
        nxt: dict[tuple[int, ...], float] = defaultdict(float)
        for state, p_state in dist.items():
            probs = wrong_probs(state)
            for a in np.flatnonzero(probs):
                q = p_state * probs[a]
                rho[(state, int(a))] += (1 - gamma) * gamma**t * q
                if a == EOS or (1 + len(state) + 1 >= max_length and a != BKSP):
                    continue  # ended (a filling append is never disturbed)
                if a == BKSP:
                    nxt[state[:-1]] += q
                    continue
                nxt[(*state, int(a))] += q * (1 - p)
                for b in {START, OPEN, CLOSE} - {int(a)}:
                    nxt[(*state, b)] += q * p / 2
        dist = nxt
    for (g, a), value in rho.items():
        assert occupancy.rho[space.generated.index(g), a] == pytest.approx(value, abs=1e-12)
    assert occupancy.rho.sum() + occupancy.absorbing.sum() == pytest.approx(1.0, abs=1e-12)
