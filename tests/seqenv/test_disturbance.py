"""The disturbance: token actions replaced by noise in the MDP, the envs and the demonstrations."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import gymnasium as gym
import numpy as np
import pytest
import torch

import seqenv
from seqenv.checker import check_sequence_env
from seqenv.disturbance import Disturbance, counter_hash, resolve_disturbance
from seqenv.env import SequenceGenEnv
from seqenv.mdp import SequenceMDP
from seqenv.tasks import make_task
from seqenv.trajectory import (
    DemonstrationError,
    Trajectory,
    check_episodes,
    disturbed_demonstration,
    disturbed_demonstrations,
    from_completion,
    replay,
)
from seqenv.vocab import CharVocab

VOCAB = CharVocab("abcdefgh")  # tokens 0..7, <eos>=8, <bkspc>=9, pad=10
S = VOCAB.special
TOKENS = list(range(8))
EOS, BK = S.eos_id, S.backspace_id


def disturbed_mdp(
    p: float, batch_size: int, max_length: int = 64, max_steps: int = 1000, **kwargs: Any
) -> SequenceMDP:
    mdp = SequenceMDP(
        S, max_length, max_steps, batch_size, disturbance=Disturbance(p, **kwargs), seed=0
    )
    mdp.reset([[0]] * batch_size)
    return mdp


# ------------------------------------------------------------------------------------------------
# The counter-based stream and the Disturbance type


def test_counter_hash_is_splitmix64() -> None:
    """The int64 tensor arithmetic gives SplitMix64's 64-bit outputs (numpy uint64 reference)."""
    rng = np.random.default_rng(0)
    keys = rng.integers(2**63, size=2000, dtype=np.int64)
    counters = rng.integers(0, 10**6, size=2000, dtype=np.int64)
    got = counter_hash(torch.from_numpy(keys), torch.from_numpy(counters)).numpy().view(np.uint64)
    with np.errstate(over="ignore"):
        z = keys.astype(np.uint64) + (counters.astype(np.uint64) + np.uint64(1)) * np.uint64(
            0x9E3779B97F4A7C15
        )
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    np.testing.assert_array_equal(got, z)


def test_disturbance_validates_its_fields() -> None:
    assert Disturbance(1).disturbance == 1.0 and Disturbance(0.5, "ground_truth").active
    assert not Disturbance(0.0).active
    with pytest.warns(FutureWarning, match="use .disturbance_type"):
        assert Disturbance(0.5, "ground_truth").kind == "ground_truth"
    with pytest.warns(FutureWarning, match="use .disturbance"):
        assert Disturbance(0.5).p == 0.5
    assert Disturbance(1.0).threshold == 2**32
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        Disturbance(1.5)
    with pytest.raises(ValueError, match="must be a number"):
        Disturbance(True)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="disturbance_type must be one of random, ground_truth"):
        Disturbance(0.1, "typo")  # type: ignore[arg-type]
    assert resolve_disturbance(0.2, "ground_truth") == Disturbance(0.2, "ground_truth")
    assert resolve_disturbance(None) == Disturbance(0.0)
    with pytest.raises(ValueError, match="contradicts"):
        resolve_disturbance(Disturbance(0.2), "ground_truth")
    with pytest.raises(ValueError, match="disturbance_type must be one of"):
        resolve_disturbance(0.2, "gaussian")
    with pytest.raises(ValueError, match="needs noise_fn"):
        SequenceMDP(S, 8, disturbance=Disturbance(0.1, "ground_truth"))
    with pytest.raises(ValueError, match="at least two ordinary tokens"):
        SequenceMDP(CharVocab("a").special, 8, disturbance=Disturbance(0.1))


# ------------------------------------------------------------------------------------------------
# The batched MDP


def test_rate_is_p_within_three_sigma() -> None:
    p, B, num_steps = 0.1, 1000, 10  # 10,000 eligible token steps
    mdp = disturbed_mdp(p, B)
    rng = np.random.default_rng(1)
    disturbed = eligible = 0
    for _ in range(num_steps):
        result = mdp.step(torch.from_numpy(rng.choice(TOKENS, size=B)))
        eligible += B
        disturbed += int(result.disturbed.sum())
    rate = disturbed / eligible
    sigma = np.sqrt(p * (1 - p) / eligible)
    print(f"disturbance rate {rate:.4f} over {eligible} token steps (p = {p}, sigma {sigma:.4f})")
    assert abs(rate - p) < 3 * sigma, f"rate {rate:.4f}, p {p}, sigma {sigma:.4f}"


def test_only_tokens_are_replaced_by_other_tokens_uniformly() -> None:
    mdp = disturbed_mdp(1.0, 400, max_length=64, max_steps=30)
    rng = np.random.default_rng(2)
    noise_of: dict[int, set[int]] = {t: set() for t in TOKENS}
    for _ in range(25):
        actions = rng.choice([*TOKENS, BK, BK, EOS], p=[0.08] * 8 + [0.15, 0.15, 0.06], size=400)
        live = ~mdp.done
        result = mdp.step(torch.from_numpy(actions))
        intended, executed = result.intended.numpy(), result.executed.numpy()
        np.testing.assert_array_equal(intended, actions)
        special = np.isin(actions, [EOS, BK])
        np.testing.assert_array_equal(executed[special], actions[special])
        token = live.numpy() & ~special
        assert (executed[token] != intended[token]).all(), "p = 1 disturbs every token"
        assert np.isin(executed[token], TOKENS).all()
        for a, e in zip(intended[token], executed[token], strict=True):
            noise_of[int(a)].add(int(e))
    for token, drawn in noise_of.items():
        assert drawn == set(TOKENS) - {token}


def test_filling_append_is_never_disturbed() -> None:
    mdp = SequenceMDP(S, max_length=4, max_steps=100, disturbance=Disturbance(1.0), seed=0)
    mdp.reset([[0]])
    # Appends to length 2 and 3 are disturbed; the one to length 4 fills the buffer.
    assert mdp.step(torch.tensor([1])).disturbed.item()
    assert mdp.step(torch.tensor([1])).disturbed.item()
    result = mdp.step(torch.tensor([1]))
    assert not result.disturbed.item() and result.executed.item() == 1
    assert result.truncated.item() and mdp.state(0)[-1] == 1


def test_ground_truth_noise_is_used_and_redrawn_until_it_differs() -> None:
    calls: list[tuple[list[int], list[int], int]] = []

    def constant_b(
        rng: np.random.Generator, prompt: Sequence[int], generated: Sequence[int], true_next: int
    ) -> int:
        calls.append((list(prompt), list(generated), true_next))
        return 1

    mdp = SequenceMDP(
        S, 16, disturbance=Disturbance(1.0, "ground_truth"), noise_fn=constant_b, seed=0
    )
    mdp.reset([[2, 3]])
    assert mdp.step(torch.tensor([0])).executed.item() == 1
    assert calls == [([2, 3], [], 0)]
    mdp.step(torch.tensor([BK]))
    mdp.step(torch.tensor([0]))
    assert calls[-1] == ([2, 3], [], 0)
    # The intended token itself: redrawn, then random noise that differs.
    result = mdp.step(torch.tensor([1]))
    assert result.disturbed.item() and result.executed.item() != 1
    assert calls[-1] == ([2, 3], [1], 1)

    def returns_eos(*args: Any) -> int:
        return EOS

    mdp = SequenceMDP(S, 16, disturbance=Disturbance(1.0, "ground_truth"), noise_fn=returns_eos)
    mdp.reset([[0]])
    with pytest.raises(ValueError, match="not an ordinary token"):
        mdp.step(torch.tensor([0]))


def test_same_keys_same_disturbances_and_p0_changes_nothing() -> None:
    rng = np.random.default_rng(3)
    actions = torch.from_numpy(rng.choice(TOKENS, size=(20, 64)))
    runs = []
    for _ in range(2):
        mdp = SequenceMDP(S, 32, 100, batch_size=64, disturbance=Disturbance(0.3))
        mdp.reset_rows(range(64), [[0]] * 64, keys=range(64))
        runs.append([mdp.step(a).executed for a in actions])
    assert all(torch.equal(x, y) for x, y in zip(*runs, strict=True))
    clean = SequenceMDP(S, 32, 100, batch_size=64, disturbance=Disturbance(0.0))
    clean.reset([[0]] * 64)
    assert all(torch.equal(clean.step(a).executed, a) for a in actions)


# ------------------------------------------------------------------------------------------------
# The environments


def test_env_reports_intended_and_executed_actions() -> None:
    env = gym.make(seqenv.ENV_ID, task="dyck", disturbance=1.0)
    _, info = env.reset(seed=0)
    assert "intended_action" not in info
    vocab = env.unwrapped.vocab
    token = vocab.encode("(")[0]
    _, _, _, _, info = env.step(token)
    assert info["intended_action"] == token and info["executed_action"] != token
    assert info["generated"] == vocab.decode([info["executed_action"]])
    _, _, _, _, info = env.step(vocab.backspace_id)
    assert info["intended_action"] == info["executed_action"] == vocab.backspace_id
    clean = gym.make(seqenv.ENV_ID, task="dyck")
    clean.reset(seed=0)
    _, _, _, _, info = clean.step(token)
    assert info["intended_action"] == info["executed_action"] == token


def test_ground_truth_env_uses_the_tasks_noise(task_kwargs: dict[str, dict[str, Any]]) -> None:
    env = SequenceGenEnv(
        task="arithmetic",
        disturbance=1.0,
        disturbance_type="ground_truth",
        **task_kwargs["arithmetic"],
    )
    digits = set(env.vocab.encode("0123456789"))
    for seed in range(20):
        env.reset(seed=seed)
        token = env.vocab.encode("7")[0]
        info = env.step(token)[4]
        assert info["executed_action"] in digits - {token}


@pytest.mark.parametrize(
    ("task", "kind"), [("arithmetic", "ground_truth"), ("dyck", "random"), ("dyck", "ground_truth")]
)
def test_checker_passes_with_a_disturbance(
    task: str, kind: str, task_kwargs: dict[str, dict[str, Any]]
) -> None:
    env = gym.make(
        seqenv.ENV_ID, task=task, disturbance=0.3, disturbance_type=kind, **task_kwargs[task]
    )
    check_sequence_env(env, seed=0, num_episodes=10)


def test_vector_step_with_disturbance_is_not_much_slower() -> None:
    """Throughput: the disturbance adds a few tensor operations, not a loop over rows."""
    num_envs, num_steps = 64, 150
    envs = {
        p: gym.make_vec(seqenv.ENV_ID, num_envs=num_envs, task="dyck", disturbance=p)
        for p in (0.0, 0.1)
    }
    rng = np.random.default_rng(0)
    num_actions = envs[0.0].unwrapped.vocab.num_actions
    actions = torch.from_numpy(rng.integers(0, num_actions, size=(num_steps, num_envs)))
    best = {p: float("inf") for p in envs}
    for _ in range(3):  # interleaved repeats, best of each: robust to a busy machine
        for p, env in envs.items():
            env.reset(seed=0)
            start = time.perf_counter()
            for a in actions:
                env.step(a)
            best[p] = min(best[p], time.perf_counter() - start)
    ratio = best[0.1] / best[0.0]
    print(f"vector env step, {num_envs} envs: p=0.1 / p=0 time ratio {ratio:.2f}")
    assert ratio < 2.0


# ------------------------------------------------------------------------------------------------
# Demonstrations in the disturbed MDP


def clean_demonstrations(num: int, rng: np.random.Generator, max_length: int) -> list[Trajectory]:
    return [
        from_completion([0], rng.choice(TOKENS, size=int(rng.integers(5, 30))), S, max_length)
        for _ in range(num)
    ]


def test_demonstrations_backspace_at_rate_p_over_1_plus_p_and_replay_to_the_clean_text() -> None:
    p, max_length = 0.2, 64
    rng = np.random.default_rng(4)
    clean = clean_demonstrations(500, rng, max_length)
    demos = disturbed_demonstrations(clean, Disturbance(p), max_length, rng=rng)
    assert replay(demos, max_length, 2 * max_length) == replay(clean)
    token_steps = sum(d.num_steps - 1 for d in demos)  # every step but the final <eos>
    rate = sum(d.num_backspaces for d in demos) / token_steps
    print(f"demonstrations' backspace rate {rate:.4f} over {token_steps} token steps")
    assert abs(rate - p / (1 + p)) < 0.01, f"backspace rate {rate:.4f}, expected {p / (1 + p):.4f}"
    for c, d in zip(clean, demos, strict=True):
        assert d.terminated and d.intended is not None
        disturbed = np.flatnonzero(d.disturbed)
        # Each disturbance is followed by an intended backspace; the rest is the clean plan.
        assert (d.intended[disturbed + 1] == BK).all() and (d.actions[disturbed + 1] == BK).all()
        keep = np.ones(d.num_steps, dtype=bool)
        keep[disturbed] = keep[disturbed + 1] = False
        np.testing.assert_array_equal(d.intended[keep], c.actions)


def test_demonstrations_respect_the_budget_and_the_buffer() -> None:
    rng = np.random.default_rng(5)
    clean = clean_demonstrations(200, rng, max_length=40)
    demos = disturbed_demonstrations(clean, Disturbance(0.5), 40, max_steps=40, rng=rng)
    assert any(d.truncated for d in demos) and all(d.num_steps <= 40 for d in demos)
    replay(demos, max_length=40, max_steps=40)  # raises unless each is an episode of this MDP
    # A passage cut at max_length: its last append fills the buffer and is never disturbed.
    passage = Trajectory([0], [1, 2, 3], False, True, S)
    for key in range(50):
        d = disturbed_demonstration(passage, Disturbance(0.9), 4, max_steps=1000, key=key)
        assert d.truncated and d.generated() == [1, 2, 3] and d.actions[-1] == 3


def test_ground_truth_demonstrations(task_kwargs: dict[str, dict[str, Any]]) -> None:
    task = make_task("arithmetic", **task_kwargs["arithmetic"])
    max_length = task.default_max_length
    clean = task.demonstrations("train", 50, max_length)
    demos = disturbed_demonstrations(
        clean,
        Disturbance(0.3, "ground_truth"),
        max_length,
        noise_fn=task.ground_truth_noise,
        rng=np.random.default_rng(6),
    )
    assert replay(demos) == replay(clean)
    assert sum(d.num_disturbances for d in demos) > 10
    digits = set(task.vocab.encode("0123456789"))
    for d in demos:
        assert set(d.actions[d.disturbed].tolist()) <= digits
    again = disturbed_demonstrations(
        clean,
        Disturbance(0.3, "ground_truth"),
        max_length,
        noise_fn=task.ground_truth_noise,
        rng=np.random.default_rng(6),
    )
    assert again == demos


def expert_in_the_env(
    clean: Sequence[Trajectory],
    disturbance: Disturbance,
    max_length: int,
    max_steps: int,
    keys: Sequence[int],
    noise_fn: Any = None,
) -> list[Trajectory]:
    """The reference: the expert stepping a batched SequenceMDP, one MDP step at a time."""
    special = clean[0].special
    mdp = SequenceMDP(
        special, max_length, max_steps, batch_size=len(clean), disturbance=disturbance,
        noise_fn=noise_fn,
    )  # fmt: skip
    mdp.reset_rows(range(len(clean)), [t.prompt.tolist() for t in clean], keys=keys)
    plans = [t.actions.tolist() for t in clean]
    position, repairing = [0] * len(clean), [False] * len(clean)
    intended: list[list[int]] = [[] for _ in clean]
    executed: list[list[int]] = [[] for _ in clean]
    while not bool(mdp.done.all()):
        live = (~mdp.done).tolist()
        chosen = [
            special.backspace_id if repairing[i] else plans[i][min(position[i], len(plans[i]) - 1)]
            for i in range(len(clean))
        ]
        ran = mdp.step(torch.tensor(chosen)).executed.tolist()
        for i in range(len(clean)):
            if not live[i]:
                continue
            intended[i].append(chosen[i])
            executed[i].append(ran[i])
            if repairing[i]:
                repairing[i] = False
            elif ran[i] != chosen[i]:
                repairing[i] = True
            else:
                position[i] += 1
    return [
        Trajectory(
            t.prompt,
            executed[i],
            bool(mdp.terminated[i]),
            bool(mdp.truncated[i]),
            special,
            intended=intended[i],
        )
        for i, t in enumerate(clean)
    ]


@pytest.mark.parametrize(("p", "max_length", "max_steps"), [(0.1, 64, 128), (0.5, 40, 40)])
def test_demonstrations_equal_the_expert_stepping_the_env(
    p: float, max_length: int, max_steps: int
) -> None:
    """The per-row walk of disturbed_demonstrations is the environment's dynamics exactly:
    the same draws, the same eligibility, budget and buffer ends (truncation included)."""
    rng = np.random.default_rng(11)
    clean = clean_demonstrations(300, rng, max_length)
    keys = rng.integers(0, 2**63, size=len(clean)).tolist()
    fast = disturbed_demonstrations(clean, Disturbance(p), max_length, max_steps, keys=keys)
    reference = expert_in_the_env(clean, Disturbance(p), max_length, max_steps, keys)
    assert fast == reference
    assert any(d.truncated for d in fast) == (p == 0.5)


def test_ground_truth_demonstrations_equal_the_expert_stepping_the_env(
    task_kwargs: dict[str, dict[str, Any]],
) -> None:
    task = make_task("arithmetic", **task_kwargs["arithmetic"])
    max_length = task.default_max_length
    clean = task.demonstrations("train", 200, max_length)
    keys = list(range(1000, 1200))
    disturbance = Disturbance(0.4, "ground_truth")
    budget = 2 * max_length
    fast = disturbed_demonstrations(
        clean, disturbance, max_length, budget, noise_fn=task.ground_truth_noise, keys=keys
    )
    reference = expert_in_the_env(
        clean, disturbance, max_length, budget, keys, noise_fn=task.ground_truth_noise
    )
    assert fast == reference and sum(d.num_disturbances for d in fast) > 20


def test_check_episodes_names_the_bad_trajectory_across_chunks() -> None:
    rng = np.random.default_rng(12)
    clean = clean_demonstrations(10, rng, 64)
    check_episodes(clean, 64, 128, chunk=3)
    # 46 steps do not fit a step budget of 40: trajectory 7 (in the third chunk) is named.
    long = from_completion([0], [1] * 45, S, 64)
    with pytest.raises(DemonstrationError, match=r"^trajectory 7 "):
        check_episodes([*clean[:7], long, *clean[8:]], 64, 40, chunk=3)
