"""Policy throughput: the cost of backspaces in training (masked pass) and in generation (rollback).

Each ratio compares two rates measured in one run, on the same model and inputs, with the two
sides interleaved iteration by iteration so that drift of a shared machine hits both alike:

- ``masked_vs_causal_train``: training tokens/s (forward + backward) of the re-feed masked pass
  on trajectories with backspaces, over the plain causal pass on as many tokens (target >= 0.9).
- ``rollback_vs_plain_generate``: generation tokens/s (actions per second) of
  :func:`agents.generate.generate` with backspaces and cache rollback, over a plain append-only
  KV-cache sampling loop (target >= 0.9).
- ``rollback_vs_recompute_generate``: the same, over recomputing every live state from scratch at
  each step (target >= 5 at 256 new tokens).
- ``hf_masked_vs_causal_train``: the masked pass of a Hugging Face model (a GPT-2 built from a
  config) over its plain causal pass on the same tokens (target >= 0.9), at a small shape where
  attention is a visible share of the cost (at a real LM's size the output layer dominates and
  the ratio is about 1 whatever the mask costs). Needs ``transformers``; skipped without it.

On ``device="cuda"`` the model has the GPT-2-small shape (12 layers, width 768, 1,024 tokens,
batch 16, bf16 autocast, ``torch.compile``), and the masked pass runs on FlexAttention; the rates
of the dense-mask pass are reported beside it. Run: ``python -m agents.experiments.throughput --only
policy`` (or call :func:`measure`).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from agents.collate import RefeedMask, TrajectoryBatch, collate, refeed_layout
from agents.experiments.timing import interleaved_fastest
from agents.generate import generate, select_actions
from agents.models.policy import TransformerConfig, TransformerPolicy
from seqenv.trajectory import Trajectory, augment, random_noise
from seqenv.vocab import SpecialIds


@dataclass(frozen=True)
class Shape:
    """One benchmark setting: the model, the training batch and the generation run."""

    config: TransformerConfig
    num_tokens: int  # ordinary tokens of the vocabulary
    batch_size: int
    rows: int  # T, the re-feed rows of the training batch (the batch is padded to exactly this)
    noise: float  # docs/method.md §5 noise level: share of positions preceded by a token + <bkspc>
    train_iters: int
    gen_batch: int
    prompt_length: int
    new_tokens: int
    backspace_bias: float  # added to the <bkspc> logit in generation: ~15% of actions
    compile: bool = False  # torch.compile the training model
    bf16: bool = False  # autocast the training pass, and generate with bf16 weights
    flex: bool = False  # also time the masked pass on FlexAttention (and report it)


def _shape(quick: bool, device: str) -> Shape:
    if device.startswith("cuda"):
        gpt2_small = TransformerConfig(num_layers=12, width=768, num_heads=12, context_length=1024)
        return Shape(
            gpt2_small,
            num_tokens=50257,
            batch_size=16,
            rows=1024,
            noise=0.05,
            train_iters=5 if quick else 20,
            gen_batch=16,
            prompt_length=16,
            new_tokens=64 if quick else 256,
            backspace_bias=9.0,
            compile=True,
            bf16=True,
            flex=True,
        )
    # CPU: the default policy; 8 rows in generation so that matrix work, not Python, is most of
    # a decoding step. Recomputation is the slow part (~25 s of the minute at 256 new tokens).
    cpu = TransformerConfig(num_layers=4, width=256, num_heads=4, context_length=512)
    return Shape(
        cpu,
        num_tokens=256,
        batch_size=4,
        rows=256,
        noise=0.1,
        train_iters=3 if quick else 12,
        gen_batch=8,
        prompt_length=16,
        new_tokens=32 if quick else 256,
        backspace_bias=3.8,
    )


def special_ids(num_tokens: int) -> SpecialIds:
    """The special ids of a vocabulary of ``num_tokens`` tokens (<bkspc> and <eos> after them)."""
    return SpecialIds(
        num_actions=num_tokens + 2,
        eos_id=num_tokens,
        backspace_id=num_tokens + 1,
        pad_id=num_tokens + 2,
    )


def bench_trajectories(
    shape: Shape, special: SpecialIds, rng: np.random.Generator
) -> list[Trajectory]:
    """Random text with noise augmentation: each fits in ``shape.rows`` re-feed rows."""
    noise = random_noise(special)
    # rows = prompt + n tokens + 2 rows per noise insertion (the noise token and the re-feed)
    completion = int((shape.rows - shape.prompt_length) / (1 + 2 * shape.noise) * 0.95)
    trajectories: list[Trajectory] = []
    while len(trajectories) < shape.batch_size:
        ids = rng.integers(0, shape.num_tokens, size=shape.prompt_length + completion).tolist()
        clean = Trajectory(
            ids[: shape.prompt_length], ids[shape.prompt_length :], False, True, special
        )
        noisy = augment(clean, noise, p=shape.noise, rng=rng)
        if len(refeed_layout(noisy).input_ids) <= shape.rows:
            trajectories.append(noisy)
    return trajectories


def _measure_train(
    model: nn.Module,
    policy: TransformerPolicy,
    batch: TrajectoryBatch,
    shape: Shape,
    device: str,
    autocast: AbstractContextManager[Any],
    sync: Callable[[], None],
) -> dict[str, float]:
    """Forward + backward tokens/s of the masked pass (flex and/or dense) and the causal pass."""
    B, T = batch.input_ids.shape
    causal_positions = torch.arange(T, device=device).expand(B, T)
    targets = torch.randint(0, policy.special.num_actions, (B, T), device=device)

    def step(attention: Callable[[], Any], positions: torch.Tensor) -> None:
        prepared = attention()  # building the mask is part of each training step
        with autocast:
            logits = model(batch.input_ids, positions, prepared)
            loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
        loss.backward()
        policy.zero_grad(set_to_none=True)

    def prepare(backend: str) -> Callable[[], Any]:
        def build() -> Any:
            policy.config.attention_backend = backend  # type: ignore[assignment]
            return policy.prepare_attention(RefeedMask(batch.alive_until))

        return build

    fns: dict[str, Callable[[], Any]] = {
        "causal": lambda: step(lambda: None, causal_positions),
        "masked_dense": lambda: step(prepare("sdpa"), batch.position_ids),
    }
    if shape.flex:
        fns["masked_flex"] = lambda: step(prepare("flex"), batch.position_ids)
        block_mask = prepare("flex")()
        fns["masked_flex_prebuilt"] = lambda: step(lambda: block_mask, batch.position_ids)
        fns["flex_mask_build"] = prepare("flex")
    for fn in fns.values():  # warm-up (and compilation)
        fn()
        fn()
    seconds = interleaved_fastest(fns, shape.train_iters, sync)
    rates = {name: B * T / s for name, s in seconds.items()}
    masked = rates.get("masked_flex", rates["masked_dense"])
    figures = {
        "masked_vs_causal_train": masked / rates["causal"],
        "masked_train_tokens_per_s": masked,
        "causal_train_tokens_per_s": rates["causal"],
    }
    if shape.flex:  # diagnostics: the dense-mask pass, and the flex pass without its mask build
        figures["masked_dense_train_tokens_per_s"] = rates["masked_dense"]
        figures["masked_flex_prebuilt_train_tokens_per_s"] = rates["masked_flex_prebuilt"]
        figures["flex_mask_build_ms"] = 1000 * seconds["flex_mask_build"]
    return figures


class LogitBias(nn.Module):
    """The policy with a constant logit bias: no <eos>, some <bkspc> (generation workload)."""

    def __init__(self, inner: TransformerPolicy, bias: torch.Tensor) -> None:
        super().__init__()
        self.inner = inner
        self.special = inner.special
        self.logit_bias = bias  # (A,), on the device of the policy

    @property
    def max_positions(self) -> int | None:
        """The inner policy's."""
        return self.inner.max_positions

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        attention: RefeedMask | None = None,
    ) -> torch.Tensor:
        """The inner policy's logits plus the bias."""
        return self.inner(input_ids, position_ids, attention) + self.logit_bias

    def forward_batch(self, batch: TrajectoryBatch) -> torch.Tensor:
        """The inner policy's logits of a batch plus the bias."""
        return self.inner.forward_batch(batch) + self.logit_bias

    def init_cache(self, batch_size: int, capacity: int) -> Any:
        """The inner policy's cache."""
        return self.inner.init_cache(batch_size, capacity)

    def decode(
        self, input_ids: torch.Tensor, position_ids: torch.Tensor, cache: Any
    ) -> torch.Tensor:
        """One decoding step of the inner policy plus the bias."""
        return self.inner.decode(input_ids, position_ids, cache) + self.logit_bias


@torch.no_grad()
def _plain_generate(
    model: LogitBias, prompts: torch.Tensor, new_tokens: int, generator: torch.Generator
) -> torch.Tensor:
    """The baseline: append-only KV-cache sampling of ordinary tokens, no MDP, no backspace."""
    B, P = prompts.shape
    special = model.special
    cache = model.init_cache(B, P + new_tokens)
    positions = torch.arange(P, device=prompts.device).expand(B, P)
    logits = model.decode(prompts, positions, cache)[:, -1]  # (B, A)
    allowed = torch.ones_like(logits, dtype=torch.bool)
    allowed[:, [special.eos_id, special.backspace_id]] = False
    out = []
    for step in range(new_tokens):
        tokens = select_actions(logits, allowed, generator=generator)  # (B,)
        out.append(tokens)
        position = torch.full((B, 1), P + step, device=prompts.device)
        logits = model.decode(tokens[:, None], position, cache)[:, 0]
    return torch.stack(out, dim=1)


def _measure_generate(
    policy: TransformerPolicy, shape: Shape, device: str, sync: Callable[[], None]
) -> dict[str, float]:
    special = policy.special
    bias = torch.zeros(special.num_actions, device=device)
    bias[special.eos_id] = -1e4  # every row runs the whole budget: equal work on every side
    bias[special.backspace_id] = shape.backspace_bias
    model = LogitBias(policy, bias).eval()
    prompts = torch.randint(
        0,
        shape.num_tokens,
        (shape.gen_batch, shape.prompt_length),
        generator=torch.Generator().manual_seed(1),
    ).to(device)
    prompt_lists = prompts.tolist()
    max_length = shape.prompt_length + shape.new_tokens + 1
    actions: dict[str, int] = {}

    def run(use_cache: bool, name: str) -> None:
        out = generate(
            model,
            prompt_lists,
            max_length=max_length,
            max_steps=shape.new_tokens,
            use_cache=use_cache,
            generator=torch.Generator(device).manual_seed(0),
        )
        actions[name] = sum(t.num_steps for t in out.trajectories)
        actions[name + "_backspaces"] = sum(t.num_backspaces for t in out.trajectories)

    def plain() -> None:
        _plain_generate(model, prompts, shape.new_tokens, torch.Generator(device).manual_seed(0))
        actions["plain"] = shape.gen_batch * shape.new_tokens

    fns: dict[str, Callable[[], Any]] = {
        "plain": plain,
        "rollback": lambda: run(True, "rollback"),
        "recompute": lambda: run(False, "recompute"),
    }
    fns["plain"]()  # warm-up
    fns["rollback"]()
    seconds = interleaved_fastest({"plain": fns["plain"], "rollback": fns["rollback"]}, 3, sync)
    # Recomputation is slow enough that one run of it is a measurement.
    seconds.update(interleaved_fastest({"recompute": fns["recompute"]}, 1, sync))
    rates = {name: actions[name] / s for name, s in seconds.items()}
    return {
        "rollback_vs_plain_generate": rates["rollback"] / rates["plain"],
        "rollback_vs_recompute_generate": rates["rollback"] / rates["recompute"],
        "rollback_generate_tokens_per_s": rates["rollback"],
        "plain_generate_tokens_per_s": rates["plain"],
        "recompute_generate_tokens_per_s": rates["recompute"],
        "generate_backspace_share": actions["rollback_backspaces"] / actions["rollback"],
        "generate_new_tokens": float(shape.new_tokens),
    }


def _measure_hf_train(quick: bool, device: str, sync: Callable[[], None]) -> dict[str, float]:
    """Forward + backward tokens/s of a transformers GPT-2's masked pass over its causal pass."""
    try:
        from transformers import GPT2Config

        from agents.models.hf import HFPolicy
    except ImportError:
        return {}
    num_tokens = 254  # + <eos> in the model's vocabulary, + <bkspc> added by HFPolicy
    config = GPT2Config(
        vocab_size=num_tokens + 1, n_positions=512, n_embd=128, n_layer=2, n_head=4,
        eos_token_id=num_tokens, bos_token_id=num_tokens,
    )  # fmt: skip
    torch.manual_seed(0)
    policy = HFPolicy.from_config(config).to(device).train()
    shape = Shape(
        TransformerConfig(), num_tokens=num_tokens, batch_size=4, rows=256, noise=0.1,
        train_iters=3 if quick else 10, gen_batch=1, prompt_length=16, new_tokens=1,
        backspace_bias=0.0,
    )  # fmt: skip
    trajectories = bench_trajectories(shape, policy.special, np.random.default_rng(0))
    batch = collate(trajectories, pad_to_multiple=shape.rows).to(device)
    B, T = batch.input_ids.shape
    causal_positions = torch.arange(T, device=device).expand(B, T)
    targets = torch.randint(0, policy.special.num_actions, (B, T), device=device)

    def step(masked: bool) -> None:
        if masked:
            logits = policy.forward_batch(batch)  # the re-feed mask: built in every step
        else:
            logits = policy(batch.input_ids, causal_positions, None)
        F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten()).backward()
        policy.zero_grad(set_to_none=True)

    fns: dict[str, Callable[[], Any]] = {
        "causal": lambda: step(False),
        "masked": lambda: step(True),
    }
    for fn in fns.values():  # warm-up
        fn()
    seconds = interleaved_fastest(fns, shape.train_iters, sync)
    rates = {name: B * T / s for name, s in seconds.items()}
    return {
        "hf_masked_vs_causal_train": rates["masked"] / rates["causal"],
        "hf_masked_train_tokens_per_s": rates["masked"],
        "hf_causal_train_tokens_per_s": rates["causal"],
    }


def measure(
    quick: bool = False,
    device: str = "cpu",
    shape: Shape | None = None,
    cpu_threads: int | None = 1,
) -> dict[str, float]:
    """Throughput ratios of the policy (see the module docstring), with the rates behind them.

    Args:
        quick: short runs (a smoke test; the generation ratio then covers fewer new tokens).
        device: "cpu", or "cuda" for the GPT-2-small setting.
        shape: override the setting (to run the CUDA code path at a tiny shape on the CPU).
        cpu_threads: torch's intra-op threads during a CPU measurement (restored afterwards);
            ``None`` keeps the current setting. One by default: on a shared machine, a thread
            team whose other cores are busy waits at every barrier, and timings swing tenfold.
    """
    threads = torch.get_num_threads()
    if device == "cpu" and cpu_threads is not None:
        torch.set_num_threads(cpu_threads)
    try:
        return _measure(quick, device, shape)
    finally:
        torch.set_num_threads(threads)


def _measure(quick: bool, device: str, shape: Shape | None) -> dict[str, float]:
    shape = _shape(quick, device) if shape is None else shape
    torch.manual_seed(0)
    special = special_ids(shape.num_tokens)
    policy = TransformerPolicy(special, shape.config).to(device)
    is_cuda = device.startswith("cuda")

    def sync() -> None:
        if is_cuda:
            torch.cuda.synchronize(device)

    autocast: AbstractContextManager[Any] = (
        torch.autocast(device_type="cuda", dtype=torch.bfloat16) if shape.bf16 else nullcontext()
    )
    trajectories = bench_trajectories(shape, special, np.random.default_rng(0))
    batch = collate(trajectories, pad_to_multiple=shape.rows).to(device)
    model: nn.Module = torch.compile(policy) if shape.compile else policy  # type: ignore[assignment]
    figures = _measure_train(model, policy.train(), batch, shape, device, autocast, sync)
    figures["train_backspace_share"] = float(
        sum(t.num_backspaces for t in trajectories) / sum(t.num_steps for t in trajectories)
    )
    figures["train_rows"] = float(batch.input_ids.shape[1])

    generator_policy = policy.eval()
    if shape.bf16:
        generator_policy = generator_policy.to(torch.bfloat16)
    figures.update(_measure_generate(generator_policy, shape, device, sync))
    figures.update(_measure_hf_train(quick, device, sync))
    return figures
