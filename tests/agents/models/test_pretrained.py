"""Fine-tuning a pretrained LM: LoRA exactness, <bkspc> rows, vocabularies, payload round trips.

Tiny GPT-2 and Llama models are built from configs with a tiny BPE tokenizer and saved to tmp
folders, as a user's pretrained model would be.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

from agents.collate import collate
from agents.generate import generate
from agents.models.hf import (
    HFPolicy,
    LoraSettings,
    export_pretrained,
    load_hf,
    load_hf_vocab,
    payload_policy,
    save_payload,
)
from agents.training.checkpoint import load_weights
from seqenv.env import SequenceGenEnv
from seqenv.tasks import make_task
from seqenv.trajectory import Trajectory
from seqenv.vocab import PretrainedVocab, vocab_from_json

ATOL = 1e-5
# fp32 rounding differs between the paths compared (masked vs per-state, cached vs recomputed,
# applied vs merged adapters) by up to ~1e-5 of a logit's size: 1e-5 absolute and relative.
RTOL = 1e-5
CORPUS = [
    "In base 10, what is 12 + 7? 19",
    "the cat sat on the mat and the dog sat on the log",
    "a cat and a hat, a dog and a frog",
]


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(CORPUS * 5, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>")


def save_tiny_model(folder: Path, family: str) -> Path:
    """A randomly initialised GPT-2 (tied head) or Llama (untied head) with its tokenizer."""
    tokenizer = tiny_tokenizer()
    eos = tokenizer.eos_token_id
    torch.manual_seed(0)
    if family == "gpt2":
        config = GPT2Config(
            vocab_size=len(tokenizer),
            n_positions=128,
            n_embd=32,
            n_layer=2,
            n_head=2,
            eos_token_id=eos,
            bos_token_id=eos,
        )
        model: torch.nn.Module = GPT2LMHeadModel(config)
    else:
        config = LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=128,
            eos_token_id=eos,
            bos_token_id=eos,
            tie_word_embeddings=False,
        )
        model = LlamaForCausalLM(config)
    model.save_pretrained(folder)  # type: ignore[operator]
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def model_dir(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp(request.param), request.param)


def lora_policy(model_dir: Path, seed: int = 0) -> HFPolicy:
    """A LoRA policy with randomised adapters and <bkspc> rows (a fresh adapter is a no-op)."""
    policy, _ = load_hf(model_dir)
    policy.enable_lora(LoraSettings(r=4, alpha=8.0, dropout=0.0))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if p.requires_grad:
                p.copy_(
                    torch.randn(p.shape, generator=generator) * (0.5 if "lora" in name else 1.5)
                )
    return policy.eval()


def test_special_ids_agree_between_task_env_and_policy(model_dir: Path) -> None:
    vocab = load_hf_vocab(model_dir)
    policy, hf_vocab = load_hf(model_dir)
    task = make_task("arithmetic", vocab=vocab, base=10, max_digits=2)
    env = SequenceGenEnv(task=task)
    tokenizer = hf_vocab.hf_tokenizer
    assert vocab.eos_id == tokenizer.eos_token_id  # the model's own eos
    assert vocab.backspace_id == len(tokenizer) and vocab.pad_id == len(tokenizer) + 1
    for special in (hf_vocab.special, policy.special, task.vocab.special, env.vocab.special):
        assert special == vocab.special
    assert env.action_space.n == vocab.num_actions
    text = make_task(
        "text",
        vocab=vocab,
        corpus=str(corpus_file(model_dir)),
        prompt_tokens=4,
        continuation_tokens=6,
    )
    assert text.vocab.special == vocab.special
    assert vocab_from_json(vocab.to_json()) == vocab
    with pytest.raises(ValueError, match="dyck"):
        make_task("dyck", vocab=vocab)


def corpus_file(folder: Path) -> Path:
    path = folder / "corpus.txt"
    if not path.exists():
        path.write_text("\n\n".join(CORPUS * 4) + "\n")
    return path


def test_backspace_rows_start_at_the_mean(model_dir: Path) -> None:
    policy, vocab = load_hf(model_dir)
    b = vocab.backspace_id
    embedding = policy.model.get_input_embeddings().weight
    head = policy.model.get_output_embeddings().weight
    torch.testing.assert_close(embedding[b], embedding[:b].mean(0))
    torch.testing.assert_close(head[b], head[:b].mean(0))


def test_lora_trains_only_adapters_and_backspace_rows(model_dir: Path) -> None:
    policy, _ = load_hf(model_dir)
    policy.enable_lora(LoraSettings(r=4))
    names = [n for n, p in policy.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n or n.startswith("backspace_rows.") for n in names)
    assert policy.backspace_rows is not None
    assert (policy.backspace_rows.head is None) == (model_dir.name.startswith("gpt2"))


@torch.no_grad()
def test_masked_pass_with_lora_equals_a_forward_pass_per_state(
    model_dir: Path,
    random_trajectory: Callable[..., Trajectory],
    states_of: Callable[[Trajectory], list[list[int]]],
    state_logits: Callable[..., torch.Tensor],
) -> None:
    policy = lora_policy(model_dir)
    plain, _ = load_hf(model_dir)
    s = policy.special
    rng = np.random.default_rng(0)
    trajectories = [random_trajectory(rng, s, max_steps=14, p_backspace=0.35) for _ in range(4)]
    batch = collate(trajectories)
    assert batch.has_backspace
    logits = policy.forward_batch(batch)  # (B, T, A)
    # The adapters and rows are not a no-op: the plain model gives other logits.
    assert not torch.allclose(logits, plain.eval().forward_batch(batch), atol=1e-3)
    for b, trajectory in enumerate(trajectories):
        N = trajectory.num_steps
        expected = state_logits(policy, states_of(trajectory)[:N], s.pad_id)
        torch.testing.assert_close(
            logits[b, batch.state_rows[b, :N]], expected, atol=ATOL, rtol=RTOL
        )


def test_cached_generation_with_lora_equals_recomputation(model_dir: Path) -> None:
    policy = lora_policy(model_dir)
    prompts = [[1], [2, 3, 4], [5, 6]]
    outputs = []
    for use_cache in (True, False):
        outputs.append(
            generate(
                policy,
                prompts,
                max_length=24,
                max_steps=20,
                temperature=1.5,
                generator=torch.Generator().manual_seed(3),
                use_cache=use_cache,
                return_logits=True,
            )
        )
    cached, recomputed = outputs
    assert cached.trajectories == recomputed.trajectories
    assert cached.logits is not None and recomputed.logits is not None
    torch.testing.assert_close(cached.logits, recomputed.logits, atol=ATOL, rtol=RTOL)
    assert sum(t.num_backspaces for t in cached.trajectories) > 0


@pytest.mark.parametrize("lora", [True, False])
def test_payload_round_trip_and_export(model_dir: Path, tmp_path: Path, lora: bool) -> None:
    if lora:
        policy = lora_policy(model_dir)
    else:
        policy, _ = load_hf(model_dir)
        with torch.no_grad():
            policy.model.get_input_embeddings().weight[-1].normal_()
    policy.eval()
    batch = collate(
        [Trajectory([1, 2], [3, policy.special.backspace_id, 4], False, True, policy.special)]
    )
    with torch.no_grad():
        before = policy.forward_batch(batch)
    metadata = save_payload(policy, tmp_path)
    assert not any(tmp_path.rglob("*.bin")) and not any(tmp_path.rglob("*.pt"))  # no pickle
    (tmp_path / "checkpoint.json").write_text("{}")  # makes tmp_path a step folder
    again = payload_policy(tmp_path, metadata)
    load_weights(tmp_path, again)
    again.eval()
    with torch.no_grad():
        torch.testing.assert_close(again.forward_batch(batch), before, atol=ATOL, rtol=0)

    out = export_pretrained(again, tmp_path / "export")
    plain = AutoModelForCausalLM.from_pretrained(out).eval()
    assert plain.get_input_embeddings().num_embeddings == policy.special.backspace_id + 1
    reloaded, vocab = load_hf(out)  # seqmatch.json: <bkspc> is already there
    assert vocab.special == policy.special
    with torch.no_grad():
        torch.testing.assert_close(
            reloaded.eval().forward_batch(batch), before, atol=ATOL, rtol=RTOL
        )


def test_pretrained_vocab_encodes_without_special_tokens(model_dir: Path) -> None:
    vocab = load_hf_vocab(model_dir)
    assert isinstance(vocab, PretrainedVocab)
    ids = vocab.encode("the cat")
    assert vocab.eos_id not in ids
    assert vocab.decode([*ids, vocab.backspace_id, vocab.eos_id]) == "the cat<bkspc>"


@pytest.mark.parametrize("bars_on", [True, False])
def test_the_gguf_loaders_bar_follows_transformers_switch(bars_on: bool) -> None:
    """transformers' GGUF loader calls tqdm itself; with its bars switched off (--no-progress)
    that bar is off too while a GGUF file loads, and the loader is left as it was after."""
    import importlib
    import io

    from transformers.utils import logging as hf_logging

    from agents.models.hf import _gguf_bar_follows_switch

    loader = importlib.import_module("transformers.modeling_gguf_pytorch_utils")
    was_on, original = hf_logging.is_progress_bar_enabled(), loader.tqdm
    (hf_logging.enable_progress_bar if bars_on else hf_logging.disable_progress_bar)()
    try:
        with _gguf_bar_follows_switch(gguf=True):
            bar = loader.tqdm(range(2), file=io.StringIO())
            shown = not bar.disable
            bar.close()
            assert shown is bars_on
        with _gguf_bar_follows_switch(gguf=False):
            assert loader.tqdm is original
    finally:
        (hf_logging.enable_progress_bar if was_on else hf_logging.disable_progress_bar)()
    assert loader.tqdm is original
