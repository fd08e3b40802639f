"""The masked pass on the GPU in bf16: its logits and gradients equal a pass per state.

The CPU tests (tests/agents/models/test_policy.py) check these equalities in float32 to 1e-5.
Here the subject runs under bf16 autocast (FlexAttention, SDPA with the dense mask, and the
compiled model) and the reference is a float32 pass per state (TF32 off), so the tolerances are
those of bf16 (8 bits of mantissa, relative rounding 2**-9 per operation, accumulated over 2
layers):

- logits: max error <= LOGITS_RTOL of the largest reference logit;
- gradients: ||g - g_ref|| <= GRADS_RTOL ||g_ref||, over all parameters together.

Each test also checks that its tolerance can fail: the same pass under plain causal attention (the
mask a bug would most likely fall back to) is further from the reference than the tolerance.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from agents.collate import TrajectoryBatch, collate
from agents.models.policy import TransformerConfig, TransformerPolicy
from seqenv.trajectory import Trajectory
from seqenv.vocab import CharVocab
from tests.agents.conftest import make_random_trajectory, per_state_logits, visited_states
from tests.gpu.helpers import relative_error, relative_norm_error, requires_cuda

pytestmark = requires_cuda

LOGITS_RTOL = 3e-2
GRADS_RTOL = 5e-2
BACKENDS = ["flex", "sdpa", "flex_compiled"]


@pytest.fixture(autouse=True)
def exact_float32() -> Iterator[None]:
    """The float32 reference without TF32 (which keeps only 10 bits of mantissa)."""
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = before


def make_policy(vocab: CharVocab, device: str, backend: str) -> TransformerPolicy:
    torch.manual_seed(0)
    config = TransformerConfig(
        num_layers=2,
        width=128,
        num_heads=2,  # head size 64, as GPT-2's
        context_length=64,
        attention_backend="sdpa" if backend == "sdpa" else "flex",
    )
    return TransformerPolicy(vocab.special, config).to(device).eval()


def make_batch(vocab: CharVocab, device: str) -> tuple[list[Trajectory], TrajectoryBatch]:
    rng = np.random.default_rng(0)
    trajectories = [make_random_trajectory(rng, vocab, max_steps=24) for _ in range(8)]
    batch = collate(trajectories).to(device)
    assert batch.has_backspace
    return trajectories, batch


def masked_step_logits(
    policy: TransformerPolicy, batch: TrajectoryBatch, backend: str, causal: bool = False
) -> torch.Tensor:
    """Logits (num_steps, A) of every s_t, from one masked pass in bf16 autocast."""
    model = torch.compile(policy) if backend == "flex_compiled" else policy
    attention = None if causal else batch.attention
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=batch.input_ids.is_cuda):
        logits = model(batch.input_ids, batch.position_ids, attention)  # (B, T, A)
    B = batch.input_ids.shape[0]
    rows = batch.state_rows[batch.step_mask]  # (num_steps,)
    owners = torch.arange(B, device=rows.device)[:, None].expand_as(batch.step_mask)
    return logits[owners[batch.step_mask], rows].float()


def reference_step_logits(
    policy: TransformerPolicy, trajectories: list[Trajectory]
) -> torch.Tensor:
    """Logits (num_steps, A) of every s_t, each state in its own float32 causal pass."""
    device = next(policy.parameters()).device

    def on_device(ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return policy(ids.to(device), positions.to(device))

    out = []
    for trajectory in trajectories:
        states = visited_states(trajectory)[: trajectory.num_steps]
        out.append(per_state_logits(on_device, states, policy.special.pad_id))
    return torch.cat(out).float()


@pytest.mark.parametrize("backend", BACKENDS)
def test_masked_pass_equals_a_pass_per_state_in_bf16(backend: str) -> None:
    vocab = CharVocab("abcdef")
    policy = make_policy(vocab, "cuda", backend)
    trajectories, batch = make_batch(vocab, "cuda")
    with torch.no_grad():
        expected = reference_step_logits(policy, trajectories)
        actual = masked_step_logits(policy, batch, backend)
        wrong = masked_step_logits(policy, batch, backend, causal=True)
    assert relative_error(actual, expected) <= LOGITS_RTOL
    assert relative_error(wrong, expected) > LOGITS_RTOL, "the tolerance cannot tell a bad mask"


def _step_loss(step_logits: torch.Tensor, trajectories: list[Trajectory]) -> torch.Tensor:
    actions = torch.from_numpy(np.concatenate([t.actions for t in trajectories]))
    return F.cross_entropy(step_logits, actions.to(step_logits.device))


def _gradient(policy: TransformerPolicy) -> torch.Tensor:
    grads = [p.grad.flatten() for p in policy.parameters() if p.grad is not None]
    assert len(grads) == len(list(policy.parameters()))
    policy.zero_grad(set_to_none=True)
    return torch.cat(grads).float()


@pytest.mark.parametrize("backend", BACKENDS)
def test_masked_pass_gradients_equal_a_pass_per_state_in_bf16(backend: str) -> None:
    vocab = CharVocab("abcdef")
    policy = make_policy(vocab, "cuda", backend).train()
    trajectories, batch = make_batch(vocab, "cuda")
    _step_loss(reference_step_logits(policy, trajectories), trajectories).backward()
    expected = _gradient(policy)
    _step_loss(masked_step_logits(policy, batch, backend), trajectories).backward()
    actual = _gradient(policy)
    _step_loss(masked_step_logits(policy, batch, backend, causal=True), trajectories).backward()
    wrong = _gradient(policy)
    assert relative_norm_error(actual, expected) <= GRADS_RTOL
    assert relative_norm_error(wrong, expected) > GRADS_RTOL, "the tolerance cannot tell"


def test_block_mask_is_built_once_per_batch() -> None:
    vocab = CharVocab("abcdef")
    policy = make_policy(vocab, "cuda", "flex")
    _, batch = make_batch(vocab, "cuda")
    prepared = policy.prepare_attention(batch.attention)
    assert prepared is policy.prepare_attention(batch.forward_attention)
    # Built by the compiled kernel on CUDA: the same blocks as the eager build.
    eager = batch.attention._build_block_mask(128, compiled=False)
    assert torch.equal(prepared.to_dense(), eager.to_dense())
    with torch.no_grad():
        first = policy.forward_batch(batch)
        second = policy.forward_batch(batch)
    torch.testing.assert_close(first, second, atol=0, rtol=0)
