"""The policy interface over transformers causal LMs (GPT-2, Llama), tiny models from configs."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import GPT2Config, LlamaConfig, PreTrainedTokenizerFast

from agents.collate import collate
from agents.generate import generate
from agents.models.hf import HFPolicy, HFVocab, load_hf
from seqenv.trajectory import Trajectory
from seqenv.vocab import VocabularyError
from tests.agents.conftest import assert_model_contract

ATOL = 1e-5
NUM_TOKENS = 12  # ids 0..11; eos is 11, <bkspc> becomes 12
EOS = 11


def tiny_config(kind: str, attn_implementation: str) -> GPT2Config | LlamaConfig:
    if kind == "gpt2":
        return GPT2Config(
            vocab_size=NUM_TOKENS,
            n_positions=48,
            n_embd=32,
            n_layer=2,
            n_head=2,
            bos_token_id=EOS,
            eos_token_id=EOS,
            attn_implementation=attn_implementation,
        )
    return LlamaConfig(
        vocab_size=NUM_TOKENS,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=48,
        bos_token_id=EOS,
        eos_token_id=EOS,
        pad_token_id=None,
        attn_implementation=attn_implementation,
    )


def make_policy(kind: str, attn_implementation: str, backspace_scale: float = 0.0) -> HFPolicy:
    torch.manual_seed(0)
    policy = HFPolicy.from_config(tiny_config(kind, attn_implementation)).eval()
    if backspace_scale:
        # A long <bkspc> output row: its logit is large in some states, very negative in others.
        head = policy.model.get_output_embeddings().weight
        with torch.no_grad():
            head[policy.special.backspace_id] = backspace_scale * torch.randn(head.shape[1])
    return policy


MODELS = [(k, a) for k in ("gpt2", "llama") for a in ("eager", "sdpa")]


@pytest.fixture(params=MODELS, ids=["-".join(m) for m in MODELS])
def hf_policy(request: pytest.FixtureRequest) -> HFPolicy:
    return make_policy(*request.param, backspace_scale=1.5)


def test_special_ids_and_interface(hf_policy: HFPolicy) -> None:
    s = hf_policy.special
    assert (s.num_actions, s.eos_id, s.backspace_id, s.pad_id) == (13, EOS, 12, 13)
    assert hf_policy.model.get_input_embeddings().num_embeddings == 13
    assert hf_policy.model.get_output_embeddings().weight.shape[0] == 13
    assert hf_policy.max_positions == 48
    assert_model_contract(hf_policy.eval(), 13)


@torch.no_grad()
def test_masked_pass_equals_a_forward_pass_per_state(
    hf_policy: HFPolicy,
    random_trajectory: Callable[..., Trajectory],
    states_of: Callable[[Trajectory], list[list[int]]],
    state_logits: Callable[..., torch.Tensor],
) -> None:
    s = hf_policy.special
    rng = np.random.default_rng(0)
    trajectories = [random_trajectory(rng, s, max_steps=14, p_backspace=0.35) for _ in range(5)]
    batch = collate(trajectories)
    assert batch.has_backspace
    logits = hf_policy.forward_batch(batch)  # (B, T, A)
    for b, trajectory in enumerate(trajectories):
        N = trajectory.num_steps
        expected = state_logits(hf_policy, states_of(trajectory)[:N], s.pad_id)  # s_0 .. s_N-1
        torch.testing.assert_close(logits[b, batch.state_rows[b, :N]], expected, atol=ATOL, rtol=0)


@torch.no_grad()
def test_batch_without_backspace_equals_causal_model(hf_policy: HFPolicy) -> None:
    s = hf_policy.special
    trajectories = [
        Trajectory([1, 2], [3, 4, s.eos_id], True, False, s),
        Trajectory([5], [6, 7, 8, 9], False, True, s),
    ]
    batch = collate(trajectories)
    logits = hf_policy.forward_batch(batch)
    masked = hf_policy(batch.input_ids, batch.position_ids, batch.attention)
    torch.testing.assert_close(logits[batch.row_mask], masked[batch.row_mask], atol=ATOL, rtol=0)


@pytest.mark.parametrize("sampled", [False, True])
def test_cached_generation_equals_recomputation(hf_policy: HFPolicy, sampled: bool) -> None:
    prompts = [[1], [2, 3, 4], [5, 6]]
    kwargs: dict = {"max_length": 16, "max_steps": 14, "return_logits": True}
    if sampled:
        kwargs.update(temperature=1.5, top_p=0.95)
    outputs = []
    for use_cache in (True, False):
        generator = torch.Generator().manual_seed(3)
        outputs.append(
            generate(
                hf_policy,
                prompts,
                greedy=not sampled,
                generator=generator,
                use_cache=use_cache,
                **kwargs,
            )
        )
    cached, recomputed = outputs
    assert cached.trajectories == recomputed.trajectories
    assert cached.logits is not None and recomputed.logits is not None
    torch.testing.assert_close(cached.logits, recomputed.logits, atol=ATOL, rtol=0)
    assert sum(t.num_backspaces for t in cached.trajectories) > 0
    for prompt, trajectory in zip(prompts, cached.trajectories, strict=True):
        assert trajectory.prompt.tolist() == prompt


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=270,
        special_tokens=["<unk>", "<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(["the cat sat on the mat", "a cat and a hat"] * 5, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, eos_token="<|endoftext|>", unk_token="<unk>"
    )


def test_load_from_a_local_folder(tmp_path: Path) -> None:
    tokenizer = tiny_tokenizer()
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=32,
        n_embd=16,
        n_layer=1,
        n_head=2,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    from transformers import GPT2LMHeadModel

    GPT2LMHeadModel(config).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)

    policy, vocab = load_hf(tmp_path)
    assert policy.special == vocab.special
    assert vocab.eos_id == tokenizer.eos_token_id and vocab.backspace_id == len(tokenizer)
    ids = vocab.encode("the cat")
    assert vocab.decode([*ids, vocab.backspace_id, vocab.eos_id]) == "the cat<bkspc>"
    out = generate(policy, [ids], max_length=12, max_steps=6, greedy=True)
    assert out.trajectories[0].prompt.tolist() == ids
    with pytest.raises(FileNotFoundError):
        load_hf(tmp_path / "missing")


def test_hf_vocab_needs_an_eos() -> None:
    class NoEos:
        eos_token_id = None

        def __len__(self) -> int:
            return 3

    with pytest.raises(VocabularyError, match="eos"):
        HFVocab(NoEos())
