"""Fixtures for the agents tests: a tiny vocabulary, tiny policies and random trajectories."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch

from agents.models.policy import TransformerConfig, TransformerPolicy
from seqenv.trajectory import Trajectory
from seqenv.vocab import CharVocab, SpecialIds


@pytest.fixture
def vocab() -> CharVocab:
    """Six characters, then <eos>=6, <bkspc>=7, pad=8."""
    return CharVocab("abcdef")


def make_tiny_policy(
    vocab: CharVocab, positions: str = "learned", seed: int = 0
) -> TransformerPolicy:
    torch.manual_seed(seed)
    config = TransformerConfig(
        num_layers=2,
        width=32,
        num_heads=2,
        context_length=64,
        positions=positions,  # type: ignore[arg-type]
    )
    return TransformerPolicy(vocab.special, config).eval()


@pytest.fixture(params=["learned", "rotary"])
def policy(request: pytest.FixtureRequest, vocab: CharVocab) -> TransformerPolicy:
    return make_tiny_policy(vocab, request.param)


@pytest.fixture
def tiny_policy() -> Callable[..., TransformerPolicy]:
    """Factory: ``tiny_policy(vocab, positions="learned", seed=0)``, in eval mode."""
    return make_tiny_policy


def make_random_trajectory(
    rng: np.random.Generator,
    vocab: CharVocab | SpecialIds,
    max_steps: int = 20,
    p_backspace: float = 0.3,
) -> Trajectory:
    """A random valid episode: tokens and backspaces (never into the prompt), then <eos> or not."""
    special = vocab if isinstance(vocab, SpecialIds) else vocab.special
    tokens = np.array([i for i in range(special.num_actions) if special.is_token(i)])
    prompt = tokens[rng.integers(0, len(tokens), size=int(rng.integers(1, 5)))].tolist()
    actions: list[int] = []
    generated = 0
    for _ in range(int(rng.integers(1, max_steps))):
        if generated and rng.random() < p_backspace:
            actions.append(special.backspace_id)
            generated -= 1
        else:
            actions.append(int(tokens[rng.integers(0, len(tokens))]))
            generated += 1
    terminated = bool(rng.random() < 0.5)
    if terminated:
        actions.append(special.eos_id)
    return Trajectory(prompt, actions, terminated, not terminated, special)


@pytest.fixture
def random_trajectory() -> Callable[..., Trajectory]:
    """Factory: ``random_trajectory(rng, vocab_or_special, max_steps=20, p_backspace=0.3)``."""
    return make_random_trajectory


def visited_states(trajectory: Trajectory) -> list[list[int]]:
    """s_0 .. s_N of a trajectory by the MDP's rules, written out directly (N + 1 states)."""
    s = trajectory.special
    state = trajectory.prompt.tolist()
    states = [list(state)]
    for a in trajectory.actions.tolist():
        if a == s.backspace_id:
            if len(state) > len(trajectory.prompt):
                state.pop()
        elif a != s.eos_id:
            state.append(a)
        states.append(list(state))
    return states


def per_state_logits(
    model: Callable[..., torch.Tensor], states: list[list[int]], pad_id: int
) -> torch.Tensor:
    """Logits (N, A) of each state from its own plain causal pass (one padded row per state)."""
    longest = max(len(state) for state in states)
    ids = torch.tensor([state + [pad_id] * (longest - len(state)) for state in states])
    positions = torch.arange(longest).expand(len(states), longest)
    last = torch.tensor([len(state) - 1 for state in states])
    return model(ids, positions)[torch.arange(len(states)), last]


@pytest.fixture
def states_of() -> Callable[[Trajectory], list[list[int]]]:
    """:func:`visited_states`: s_0 .. s_N of a trajectory."""
    return visited_states


@pytest.fixture
def state_logits() -> Callable[..., torch.Tensor]:
    """:func:`per_state_logits`: ``state_logits(model, states, pad_id)`` -> (N, A)."""
    return per_state_logits


def assert_model_contract(model: Any, num_actions: int, atol: float = 1e-5) -> None:
    """What :class:`agents.models.interface.PolicyModel` promises, checked by behaviour: a whole
    input gives (B, T, A) logits; feeding it through an empty cache in two calls gives the same
    logits; a re-feed batch without backspace is the plain causal pass."""
    from agents.collate import collate
    from agents.models.interface import PolicyModel

    assert isinstance(model, PolicyModel)
    special = model.special
    B, T = 2, 6
    ids = torch.randint(0, num_actions - 2, (B, T))
    positions = torch.arange(T).expand(B, T)
    with torch.no_grad():
        whole = model(ids, positions, None)
        assert whole.shape == (B, T, num_actions)
        cache = model.init_cache(B, T)
        first = model.decode(ids[:, :4], positions[:, :4], cache)
        rest = model.decode(ids[:, 4:], positions[:, 4:], cache)
        torch.testing.assert_close(torch.cat([first, rest], dim=1), whole, atol=atol, rtol=1e-5)
        trajectory = Trajectory(ids[0, :2].tolist(), ids[0, 2:].tolist(), False, True, special)
        batch = collate([trajectory])
        torch.testing.assert_close(model.forward_batch(batch), whole[:1], atol=atol, rtol=1e-5)
    limit = model.max_positions
    assert limit is None or (isinstance(limit, int) and limit >= T)


QUIET_CPU_RUN: dict[str, Any] = {
    "eval_interval": 0, "logdir": None, "save": None, "progress": False, "device": "cpu",
    "lr_warmup": 1, "layers": 1, "width": 32, "heads": 2, "batch_size": 8,
}  # fmt: skip
"""A tiny run's common settings: one small layer, no logs, no checkpoints, the CPU."""


def tiny_run(**settings: Any) -> Any:
    """A :class:`~agents.config.TrainConfig` of :data:`QUIET_CPU_RUN` and ``settings``."""
    from agents.config import TrainConfig

    return TrainConfig(**{**QUIET_CPU_RUN, **settings})
