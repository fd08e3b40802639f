"""The transformer policy: one masked pass equals a forward pass per state (docs/method.md §6)."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from agents.collate import collate
from agents.models.policy import TransformerConfig, TransformerPolicy
from seqenv.trajectory import Trajectory
from seqenv.vocab import CharVocab
from tests.agents.conftest import assert_model_contract

ATOL = 1e-5


def test_policy_implements_the_model_interface(policy: TransformerPolicy) -> None:
    assert_model_contract(policy.eval(), policy.special.num_actions)


@torch.no_grad()
def test_masked_pass_equals_a_forward_pass_per_state(
    policy: TransformerPolicy,
    vocab: CharVocab,
    random_trajectory: Callable[..., Trajectory],
    states_of: Callable[[Trajectory], list[list[int]]],
    state_logits: Callable[..., torch.Tensor],
) -> None:
    rng = np.random.default_rng(0)
    trajectories = [random_trajectory(rng, vocab.special, max_steps=16) for _ in range(8)]
    batch = collate(trajectories)
    assert batch.has_backspace
    logits = policy.forward_batch(batch)  # (B, T, A)
    assert logits.shape == (*batch.input_ids.shape, vocab.num_actions)
    for b, trajectory in enumerate(trajectories):
        states = states_of(trajectory)
        expected = state_logits(policy, states, vocab.pad_id)  # (N + 1, A): s_0 .. s_N
        N = trajectory.num_steps
        torch.testing.assert_close(
            logits[b, batch.state_rows[b, :N]], expected[:N], atol=ATOL, rtol=0
        )
        live = ~batch.terminal[b, :N]
        torch.testing.assert_close(
            logits[b, batch.next_rows[b, :N][live]], expected[1:][live], atol=ATOL, rtol=0
        )


@torch.no_grad()
def test_batch_without_backspace_takes_the_causal_fast_path(
    policy: TransformerPolicy, vocab: CharVocab, monkeypatch: pytest.MonkeyPatch
) -> None:
    s = vocab.special
    trajectories = [
        Trajectory([0, 1], [2, 3, s.eos_id], True, False, s),
        Trajectory([4], [5, 0, 1, 2, 3], False, True, s),
    ]
    batch = collate(trajectories)
    calls: list[dict[str, Any]] = []
    sdpa = F.scaled_dot_product_attention

    def spy(*args: Any, **kwargs: Any) -> torch.Tensor:
        calls.append(kwargs)
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    logits = policy.forward_batch(batch)
    assert calls and all(c.get("is_causal") and c.get("attn_mask") is None for c in calls)

    # The plain causal model on each sequence alone...
    for b, trajectory in enumerate(trajectories):
        sequence = [*trajectory.prompt.tolist(), *trajectory.generated()]
        ids = torch.tensor([sequence])
        alone = policy(ids, torch.arange(len(sequence))[None])[0]
        torch.testing.assert_close(logits[b, : len(sequence)], alone, atol=ATOL, rtol=0)
    # ...and the same batch through the dense re-feed mask.
    calls.clear()
    masked = policy(batch.input_ids, batch.position_ids, batch.attention)
    assert calls and all(c.get("attn_mask") is not None for c in calls)
    rows = batch.row_mask
    torch.testing.assert_close(masked[rows], logits[rows], atol=ATOL, rtol=0)


@torch.no_grad()
def test_flex_attention_backend_equals_dense_mask(
    vocab: CharVocab,
    random_trajectory: Callable[..., Trajectory],
    tiny_policy: Callable[..., TransformerPolicy],
) -> None:
    dense_policy = tiny_policy(vocab, "rotary")
    flex_policy = tiny_policy(vocab, "rotary")
    flex_policy.config.attention_backend = "flex"
    rng = np.random.default_rng(2)
    batch = collate([random_trajectory(rng, vocab.special) for _ in range(3)])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # eager FlexAttention on the CPU warns it is a reference
        flex_logits = flex_policy.forward_batch(batch)
    dense_logits = dense_policy.forward_batch(batch)
    rows = batch.row_mask
    torch.testing.assert_close(flex_logits[rows], dense_logits[rows], atol=ATOL, rtol=0)


@torch.no_grad()
def test_prepared_attention_gives_the_same_logits(
    policy: TransformerPolicy, vocab: CharVocab, random_trajectory: Callable[..., Trajectory]
) -> None:
    batch = collate([random_trajectory(np.random.default_rng(3), vocab.special) for _ in range(2)])
    prepared = policy.prepare_attention(batch.attention)
    assert isinstance(prepared, torch.Tensor) and prepared.shape[1] == 1
    expected = policy.forward_batch(batch)
    torch.testing.assert_close(policy(batch.input_ids, batch.position_ids, prepared), expected)
    dense = batch.attention.dense()  # (B, T, T) is accepted too
    torch.testing.assert_close(policy(batch.input_ids, batch.position_ids, dense), expected)


@torch.no_grad()
def test_decode_with_cache_equals_forward(policy: TransformerPolicy) -> None:
    torch.manual_seed(0)
    ids = torch.randint(0, 6, (2, 7))
    positions = torch.arange(7).expand(2, 7)
    expected = policy(ids, positions)
    cache = policy.init_cache(2, 10)
    first = policy.decode(ids[:, :4], positions[:, :4], cache)
    rest = [policy.decode(ids[:, i : i + 1], positions[:, i : i + 1], cache) for i in range(4, 7)]
    torch.testing.assert_close(torch.cat([first, *rest], dim=1), expected, atol=ATOL, rtol=0)


def test_gradients_reach_every_parameter(
    vocab: CharVocab,
    random_trajectory: Callable[..., Trajectory],
    tiny_policy: Callable[..., TransformerPolicy],
) -> None:
    policy = tiny_policy(vocab).train()
    batch = collate([random_trajectory(np.random.default_rng(4), vocab.special) for _ in range(3)])
    logits = policy.forward_batch(batch)
    q = logits.gather(1, batch.state_rows[..., None].expand(-1, -1, logits.shape[-1]))
    q[batch.step_mask].logsumexp(-1).sum().backward()
    for name, p in policy.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_config_and_limits(vocab: CharVocab) -> None:
    with pytest.raises(ValueError, match="multiple of num_heads"):
        TransformerConfig(width=30, num_heads=4)
    with pytest.raises(ValueError, match="positions"):
        TransformerConfig(positions="sinusoidal")  # type: ignore[arg-type]
    policy = TransformerPolicy(
        vocab.special, TransformerConfig(num_layers=1, width=16, num_heads=2, context_length=8)
    )
    assert policy.max_positions == 8
    assert policy.wte.num_embeddings == vocab.special.num_embeddings
    with pytest.raises(ValueError, match="context_length"):
        policy.init_cache(1, 9)
    untied = TransformerPolicy(
        vocab.special, TransformerConfig(num_layers=1, width=16, num_heads=2, tie_embeddings=False)
    )
    out = untied(torch.tensor([[0, vocab.pad_id]]), torch.tensor([[0, 1]]))
    assert out.shape == (1, 2, vocab.num_actions)
