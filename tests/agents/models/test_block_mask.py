"""The BlockMask of a batch is built once and reused by every pass over it."""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable

import numpy as np
import torch
from torch.nn.attention.flex_attention import create_mask

from agents.collate import collate
from agents.models.policy import TransformerPolicy
from seqenv.trajectory import Trajectory
from seqenv.vocab import CharVocab


def test_batch_keeps_one_mask_and_one_block_mask(
    vocab: CharVocab, random_trajectory: Callable[..., Trajectory]
) -> None:
    rng = np.random.default_rng(0)
    batch = collate([random_trajectory(rng, vocab) for _ in range(3)])
    assert batch.has_backspace and batch.attention is batch.attention
    assert batch.forward_attention is batch.attention
    first = batch.attention.block_mask()
    assert batch.attention.block_mask() is first
    assert batch.attention.block_mask(block_size=64) is not first  # one per block size
    # The cached BlockMask is the re-feed mask: its mask_mod gives the dense mask.
    B, T = batch.alive_until.shape
    dense = create_mask(first.mask_mod, B, 1, T, T, device="cpu")[:, 0]  # (B, T, T)
    assert torch.equal(dense, batch.attention.dense())


def test_moved_or_replaced_batch_gets_its_own_mask(
    vocab: CharVocab, random_trajectory: Callable[..., Trajectory]
) -> None:
    rng = np.random.default_rng(1)
    batch = collate([random_trajectory(rng, vocab) for _ in range(2)])
    moved = batch.to("cpu")
    assert moved == batch and moved.attention is not batch.attention
    assert torch.equal(moved.attention.alive_until, batch.alive_until)
    replaced = dataclasses.replace(batch, actions=batch.actions.clone())
    assert replaced.attention is not batch.attention


@torch.no_grad()
def test_flex_policy_builds_the_block_mask_once_per_batch(
    vocab: CharVocab,
    random_trajectory: Callable[..., Trajectory],
    tiny_policy: Callable[..., TransformerPolicy],
    monkeypatch: object,
) -> None:
    import agents.collate as collate_module

    policy = tiny_policy(vocab)
    policy.config.attention_backend = "flex"
    rng = np.random.default_rng(2)
    batch = collate([random_trajectory(rng, vocab) for _ in range(3)])
    assert batch.has_backspace
    builds: list[bool] = []
    create = collate_module.create_block_mask

    def counting(*args: object, **kwargs: object) -> object:
        builds.append(bool(kwargs.get("_compile")))
        return create(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(collate_module, "create_block_mask", counting)  # type: ignore[attr-defined]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # eager FlexAttention on the CPU warns it is a reference
        first = policy.forward_batch(batch)
        second = policy.forward_batch(batch)
        policy.hidden_states(batch.input_ids, batch.position_ids, batch.attention)
    assert builds == [False]  # once, and without compilation on the CPU
    torch.testing.assert_close(first, second, atol=0, rtol=0)
