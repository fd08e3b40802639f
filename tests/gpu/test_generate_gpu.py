"""KV-cache generation with rollback on the GPU equals recomputation (tests/agents/test_generate.py
checks it on the CPU in float32 to 1e-5).

- float32 weights, greedy: the cached and the recomputed runs take the same actions, and their
  logits agree to FLOAT32_ATOL (TF32 off; different kernels sum in other orders).
- bf16 weights: sampled runs could part ways at a near tie, so the comparison is on the actions the
  cached run took: its logits of each visited state against a recomputation of that state alone
  and against the masked pass over the trajectory, to BF16_RTOL of the largest logit.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from agents.collate import collate
from agents.generate import generate
from agents.models.policy import TransformerConfig, TransformerPolicy
from seqenv.vocab import CharVocab
from tests.agents.conftest import per_state_logits, visited_states
from tests.agents.test_generate import PROMPTS, BackspaceBias
from tests.gpu.helpers import relative_error, requires_cuda

pytestmark = requires_cuda

FLOAT32_ATOL = 1e-4
BF16_RTOL = 3e-2


@pytest.fixture(autouse=True)
def exact_float32() -> Iterator[None]:
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = before


def make_model(dtype: torch.dtype, positions: str) -> BackspaceBias:
    torch.manual_seed(0)
    config = TransformerConfig(
        num_layers=2,
        width=128,
        num_heads=2,
        context_length=64,
        positions=positions,  # type: ignore[arg-type]
    )
    policy = TransformerPolicy(CharVocab("abcdef").special, config).to("cuda", dtype).eval()
    return BackspaceBias(policy, strength=6.0)


@pytest.mark.parametrize("positions", ["learned", "rotary"])
def test_greedy_rollback_equals_recomputation_in_float32(positions: str) -> None:
    model = make_model(torch.float32, positions)
    runs = [
        generate(
            model,
            PROMPTS,
            max_length=24,
            max_steps=40,
            greedy=True,
            use_cache=use_cache,
            return_logits=True,
        )
        for use_cache in (True, False)
    ]
    cached, recomputed = runs
    assert sum(t.num_backspaces for t in cached.trajectories) > 0
    assert cached.trajectories == recomputed.trajectories
    assert cached.logits is not None and recomputed.logits is not None
    torch.testing.assert_close(cached.logits, recomputed.logits, atol=FLOAT32_ATOL, rtol=0)


@pytest.mark.parametrize("positions", ["learned", "rotary"])
def test_sampled_rollback_logits_equal_recomputation_in_bf16(positions: str) -> None:
    model = make_model(torch.bfloat16, positions)
    out = generate(
        model,
        PROMPTS * 8,
        max_length=24,
        max_steps=40,
        temperature=1.2,
        generator=torch.Generator("cuda").manual_seed(0),
        return_logits=True,
    )
    assert out.logits is not None
    assert sum(t.num_backspaces for t in out.trajectories) > 0
    batch = collate(out.trajectories).to("cuda")
    with torch.no_grad():
        masked = model.forward_batch(batch).float()  # (B, T, A)
        for b, trajectory in enumerate(out.trajectories):
            N = trajectory.num_steps
            cached = out.logits[b, :N]  # (N, A)
            states = visited_states(trajectory)[:N]

            def on_cuda(ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
                return model(ids.cuda(), positions.cuda())

            alone = per_state_logits(on_cuda, states, model.special.pad_id).float()
            assert relative_error(cached, alone) <= BF16_RTOL, b
            assert relative_error(cached, masked[b, batch.state_rows[b, :N]]) <= BF16_RTOL, b
