"""KV-cache generation with backspace rollback equals recomputation and obeys the MDP."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

from agents.collate import RefeedMask, TrajectoryBatch, collate
from agents.generate import generate, select_actions
from agents.models.interface import PolicyModel
from agents.models.policy import TransformerPolicy
from seqenv.vocab import CharVocab
from tests.agents.conftest import assert_model_contract

ATOL = 1e-5
PROMPTS = [[0], [1, 2, 3], [4, 5], [2, 2, 2, 2, 1]]


class BackspaceBias(nn.Module):
    """A policy whose logits favour <bkspc> after some tokens: it forces rollbacks.

    The bias depends only on the token fed in a row, so it is the same function of the state on
    every path (masked pass, cache, recomputation).
    """

    def __init__(self, inner: TransformerPolicy, strength: float, every: int = 3) -> None:
        super().__init__()
        self.inner = inner
        self.special = inner.special
        self.strength = strength
        self.every = every

    @property
    def max_positions(self) -> int | None:
        return self.inner.max_positions

    def _bias(self, input_ids: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        favoured = (input_ids % self.every == 0).float() * self.strength  # (B, T)
        bias = torch.zeros_like(logits)
        bias[..., self.special.backspace_id] = favoured
        return logits + bias

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        attention: RefeedMask | None = None,
    ) -> torch.Tensor:
        return self._bias(input_ids, self.inner(input_ids, position_ids, attention))

    def forward_batch(self, batch: TrajectoryBatch) -> torch.Tensor:
        return self(batch.input_ids, batch.position_ids, batch.forward_attention)

    def init_cache(self, batch_size: int, capacity: int) -> Any:
        return self.inner.init_cache(batch_size, capacity)

    def decode(
        self, input_ids: torch.Tensor, position_ids: torch.Tensor, cache: Any
    ) -> torch.Tensor:
        return self._bias(input_ids, self.inner.decode(input_ids, position_ids, cache))


@pytest.fixture
def model(policy: TransformerPolicy) -> BackspaceBias:
    return BackspaceBias(policy, strength=6.0)


def assert_same_generation(model: PolicyModel, **kwargs: Any) -> list:
    seed = kwargs.pop("seed", None)
    outputs = []
    for use_cache in (True, False):
        generator = None if seed is None else torch.Generator().manual_seed(seed)
        outputs.append(
            generate(
                model,
                PROMPTS,
                use_cache=use_cache,
                return_logits=True,
                generator=generator,
                **kwargs,
            )
        )
    cached, recomputed = outputs
    assert cached.trajectories == recomputed.trajectories
    assert cached.generated == recomputed.generated
    assert cached.logits is not None and recomputed.logits is not None
    torch.testing.assert_close(cached.logits, recomputed.logits, atol=ATOL, rtol=0)
    return outputs


def test_model_interface(model: BackspaceBias) -> None:
    assert_model_contract(model, model.special.num_actions)


def test_greedy_cache_equals_recomputation_with_backspaces(model: BackspaceBias) -> None:
    cached, _ = assert_same_generation(model, max_length=16, max_steps=24, greedy=True)
    assert sum(t.num_backspaces for t in cached.trajectories) > 0


def test_sampled_cache_equals_recomputation_with_backspaces(model: BackspaceBias) -> None:
    cached, _ = assert_same_generation(
        model, max_length=16, max_steps=24, temperature=1.3, top_k=5, top_p=0.95, seed=7
    )
    assert sum(t.num_backspaces for t in cached.trajectories) > 0


def test_generation_logits_are_those_of_the_masked_pass(model: BackspaceBias) -> None:
    out = generate(model, PROMPTS, max_length=16, max_steps=24, greedy=True, return_logits=True)
    batch = collate(out.trajectories)
    assert batch.has_backspace
    with torch.no_grad():
        logits = model.forward_batch(batch)  # (B, T, A)
    assert out.logits is not None
    for b in range(len(PROMPTS)):
        steps = batch.step_mask[b]
        torch.testing.assert_close(
            logits[b, batch.state_rows[b, steps]], out.logits[b, steps], atol=ATOL, rtol=0
        )


def test_never_deletes_the_prompt(policy: TransformerPolicy) -> None:
    """A policy that wants <bkspc> everywhere alternates token / <bkspc> and keeps the prompt."""
    eager = BackspaceBias(policy, strength=50.0, every=1)
    out = generate(eager, PROMPTS, max_length=12, max_steps=9, greedy=True)
    s = policy.special
    for prompt, trajectory, generated in zip(PROMPTS, out.trajectories, out.generated, strict=True):
        assert trajectory.prompt.tolist() == prompt
        actions = trajectory.actions.tolist()
        assert actions[0] != s.backspace_id  # masked while nothing is generated
        assert actions[1::2] == [s.backspace_id] * (len(actions) // 2)
        assert trajectory.truncated and trajectory.num_steps == 9
        assert len(generated) == 1 and generated == trajectory.generated()


def test_respects_budget_and_length(model: BackspaceBias, vocab: CharVocab) -> None:
    out = generate(
        model,
        PROMPTS,
        max_length=8,
        max_steps=5,
        temperature=2.0,
        generator=torch.Generator().manual_seed(0),
    )
    for prompt, trajectory in zip(PROMPTS, out.trajectories, strict=True):
        assert trajectory.num_steps <= 5
        if trajectory.truncated:
            final = len(prompt) + len(trajectory.generated())
            assert trajectory.num_steps == 5 or final == 8
        else:
            assert trajectory.actions[-1] == vocab.eos_id
    no_backspace = BackspaceBias(model.inner, strength=-50.0, every=1)
    long_budget = generate(
        no_backspace,
        [[0], [1]],
        max_length=4,
        max_steps=100,
        temperature=0.5,
        generator=torch.Generator().manual_seed(0),
    )
    for trajectory in long_budget.trajectories:
        assert trajectory.num_backspaces == 0
        assert trajectory.terminated or len(trajectory.generated()) == 3  # ended by max_length


def test_rejects_lengths_beyond_the_positions(
    tiny_policy: Callable[..., TransformerPolicy], vocab: CharVocab
) -> None:
    with pytest.raises(ValueError, match="positions"):
        generate(tiny_policy(vocab, "learned"), PROMPTS, max_length=65)


def test_select_actions_filters() -> None:
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0], [0.0, 1.0, 2.0, 5.0]])
    mask = torch.tensor([[True, True, True, True], [True, True, True, False]])
    greedy = select_actions(logits, mask, greedy=True)
    assert greedy.tolist() == [0, 2]  # the masked best action of row 1 is never chosen
    generator = torch.Generator().manual_seed(0)
    for _ in range(20):
        assert select_actions(logits, mask, top_k=1, generator=generator).tolist() == [0, 2]
        assert select_actions(logits, mask, top_p=1e-3, generator=generator).tolist() == [0, 2]
        top2 = select_actions(logits, mask, top_k=2, temperature=5.0, generator=generator)
        assert top2[0] in (0, 1) and top2[1] in (1, 2)
    with pytest.raises(ValueError, match="temperature"):
        select_actions(logits, mask, temperature=0.0)


def test_sampling_follows_the_policy(
    tiny_policy: Callable[..., TransformerPolicy], vocab: CharVocab
) -> None:
    """Frequencies of the first action match softmax over the allowed actions."""
    policy = tiny_policy(vocab)
    with torch.no_grad():
        logits = policy(torch.tensor([[1, 2]]), torch.tensor([[0, 1]]))[0, -1]
    allowed = torch.ones(vocab.num_actions, dtype=torch.bool)
    allowed[vocab.backspace_id] = False
    expected = logits.masked_fill(~allowed, float("-inf")).softmax(-1)
    out = generate(
        policy,
        [[1, 2]] * 4000,
        max_length=4,
        max_steps=1,
        generator=torch.Generator().manual_seed(1),
    )
    first = torch.tensor([t.actions[0] for t in out.trajectories])
    frequencies = torch.bincount(first, minlength=vocab.num_actions).float() / 4000
    assert frequencies[vocab.backspace_id] == 0
    torch.testing.assert_close(frequencies, expected, atol=0.03, rtol=0)


def test_disturbed_generation_keeps_intended_and_executed(policy: TransformerPolicy) -> None:
    """Under a disturbance the trajectory's actions are what ran, ``intended`` what was chosen;
    the two differ only at ordinary tokens, and the run replays to the MDP's final state."""
    from seqenv.disturbance import Disturbance
    from seqenv.trajectory import replay

    special = policy.special
    prompts = [[0]] * 64
    generator = torch.Generator().manual_seed(0)
    out = generate(policy, prompts, max_length=8, generator=generator, disturbance=Disturbance(0.5))
    disturbed = sum(t.num_disturbances for t in out.trajectories)
    tokens = sum(
        int(special.is_token(int(a))) for t in out.trajectories for a in t.intended_actions
    )
    assert 0.3 < disturbed / tokens < 0.7  # p = 0.5 (filling appends are never disturbed)
    for t in out.trajectories:
        differ = t.actions != t.intended_actions
        assert all(special.is_token(int(a)) for a in t.actions[differ])
        assert all(special.is_token(int(a)) for a in t.intended_actions[differ])
    assert replay(out.trajectories) == out.generated
    # Without a disturbance nothing is recorded twice, and the random stream is unchanged.
    plain = generate(policy, prompts, max_length=8, generator=torch.Generator().manual_seed(0))
    again = generate(
        policy, prompts, max_length=8, generator=torch.Generator().manual_seed(0),
        disturbance=Disturbance(0.0),
    )  # fmt: skip
    assert all(t.intended is None for t in plain.trajectories)
    assert [t.actions.tolist() for t in plain.trajectories] == [
        t.actions.tolist() for t in again.trajectories
    ]


@pytest.mark.parametrize("kind", ["ours", "gpt2", "llama"])
def test_dropping_done_rows_from_the_cache_changes_nothing(
    kind: str, policy: TransformerPolicy, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Generation decodes only live rows once enough are done; the output is the same as
    decoding every row to the end (episodes, and logits to float tolerance)."""
    from agents import generate as generation
    from tests.agents.models.test_hf import make_policy

    model: Any = policy if kind == "ours" else make_policy(kind, "eager", backspace_scale=1.5)
    prompts = [[1], [2, 3], [4, 5, 1], [3]] * 6
    if kind != "ours":
        prompts = [[t % 10 for t in p] for p in prompts]  # the tiny HF vocabulary

    kept: list[int] = []
    cache_type = type(model.init_cache(1, 4))
    original = cache_type.keep_rows

    def spy(self: Any, index: torch.Tensor) -> None:
        kept.append(int(index.numel()))
        original(self, index)

    def run(compact_at: float) -> Any:
        monkeypatch.setattr(generation, "COMPACT_AT", compact_at)
        with torch.no_grad():
            return generate(
                model, prompts, max_length=20, max_steps=30, temperature=1.5, return_logits=True,
                generator=torch.Generator().manual_seed(3),
            )  # fmt: skip

    monkeypatch.setattr(cache_type, "keep_rows", spy)
    compacted = run(0.75)
    assert kept and kept[-1] < len(prompts)  # rows were dropped along the way
    lengths = [t.num_steps for t in compacted.trajectories]
    assert min(lengths) < max(lengths)
    kept.clear()
    full = run(0.0)  # never compacts
    assert not kept
    assert compacted.trajectories == full.trajectories
    assert compacted.logits is not None and full.logits is not None
    torch.testing.assert_close(compacted.logits, full.logits, atol=ATOL, rtol=0)
