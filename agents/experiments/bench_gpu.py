"""GPU throughput of the policy against transformers' GPT-2, each figure measured in one run.

    python -m agents.experiments.bench_gpu --json benchmarks/results/gpu.json [--stages train,...]

Keys (targets from docs/method.md §6 and the project's goals, on one H200):

- ``gpu_masked_train_tokens_per_s``: an MLE training step (forward, backward, AdamW) of the re-feed
  masked pass on FlexAttention at the GPT-2-small shape (12 layers, width 768, 1,024 rows, batch
  16, bf16 autocast, ``torch.compile``), its BlockMask built in each step (target >= 350k);
  ``..._prebuilt`` without the build, and ``gpu_block_mask_build_ms`` the build alone.
- ``gpu_masked_vs_hf_eager``: that rate over the same step on the same token ids through
  transformers' GPT-2 with eager attention (target >= 1.8).
- ``gpu_rollback_generate_tokens_per_s``: actions per second of :func:`agents.generate.generate`
  with backspaces and cache rollback, batch 64, 256 new tokens, bf16 weights (target >= 18k).
- ``gpu_rollback_vs_hf_generate``: over transformers' ``generate`` (sampling, its default cache)
  of as many new tokens from the same prompts (target >= 5).
- ``gpu_mle_mfu``: model FLOPs of the MLE step per second over 989 TFLOP/s, the H200's dense bf16
  peak (target >= 0.36).

Each stage runs alone (``--stages``) and merges its figures into the ``--json`` file as soon as it
ends, so a stage that overruns its time box loses only itself. On the CPU the same code runs at a
tiny shape (a smoke test of the code paths, not a measurement of anything).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from agents.collate import RefeedMask, TrajectoryBatch, collate
from agents.experiments.bench_policy import LogitBias, Shape, bench_trajectories, special_ids
from agents.experiments.timing import interleaved_fastest
from agents.generate import generate
from agents.models.policy import TransformerConfig, TransformerPolicy
from agents.outputs import write_json

PEAK_BF16_FLOPS = 989e12
"""Dense bf16 FLOP/s of an H100/H200 SXM (the vendor's datasheet), the denominator of MFU."""


def gpu_shape(quick: bool, device: str) -> Shape:
    """GPT-2 small on CUDA (generation at batch 64, 256 new tokens); a tiny model elsewhere."""
    if device.startswith("cuda"):
        config = TransformerConfig(num_layers=12, width=768, num_heads=12, context_length=1024)
        return Shape(
            config,
            num_tokens=50257,
            batch_size=16,
            rows=1024,
            noise=0.05,
            train_iters=5 if quick else 10,
            gen_batch=64,
            prompt_length=16,
            new_tokens=256,
            backspace_bias=9.0,
            compile=True,
            bf16=True,
            flex=True,
        )
    config = TransformerConfig(num_layers=2, width=64, num_heads=2, context_length=128)
    return Shape(
        config,
        num_tokens=256,
        batch_size=2,
        rows=128,
        noise=0.1,
        train_iters=2,
        gen_batch=4,
        prompt_length=8,
        new_tokens=16,
        backspace_bias=3.8,  # FlexAttention has no backward on the CPU: the dense mask there
    )


def model_flops_per_token(config: TransformerConfig, num_actions: int, rows: int) -> float:
    """Training FLOPs per token.

    6 per weight that multiplies it (blocks and head, not the embeddings) plus causal
    attention's 6 * layers * rows * width (half of the full 12).
    """
    L, C = config.num_layers, config.width
    weights = 12 * L * C * C + C * num_actions  # attention 4 C^2 + MLP 8 C^2 per layer; head
    return 6.0 * weights + 6.0 * L * rows * C


def _sync(device: str) -> Callable[[], None]:
    def sync() -> None:
        if device.startswith("cuda"):
            torch.cuda.synchronize(device)

    return sync


def _autocast(shape: Shape, device: str) -> AbstractContextManager[Any]:
    if shape.bf16:
        return torch.autocast(device_type=device.split(":")[0], dtype=torch.bfloat16)
    return nullcontext()


def _batch(shape: Shape, device: str) -> TrajectoryBatch:
    special = special_ids(shape.num_tokens)
    trajectories = bench_trajectories(shape, special, np.random.default_rng(0))
    return collate(trajectories, pad_to_multiple=shape.rows).to(device)


def _time_train_steps(
    fns: dict[str, Callable[[], Any]], shape: Shape, device: str
) -> dict[str, float]:
    for fn in fns.values():  # warm-up: compilation, autotuning, the allocator's pools
        fn()
        fn()
    return interleaved_fastest(fns, shape.train_iters, _sync(device))


def stage_train(shape: Shape, device: str) -> dict[str, float]:
    """The MLE step on the masked pass (FlexAttention): tokens/s, BlockMask cost, MFU."""
    torch.manual_seed(0)
    special = special_ids(shape.num_tokens)
    policy = TransformerPolicy(special, shape.config).to(device).train()
    policy.config.attention_backend = "flex" if shape.flex else "sdpa"
    model: nn.Module = torch.compile(policy) if shape.compile else policy  # type: ignore[assignment]
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-4, fused=device.startswith("cuda"))
    batch = _batch(shape, device)
    B, T = batch.input_ids.shape
    owners = torch.arange(B, device=device)[:, None].expand_as(batch.step_mask)
    owners, rows = owners[batch.step_mask], batch.state_rows[batch.step_mask]
    targets = batch.actions[batch.step_mask]
    autocast = _autocast(shape, device)

    def build() -> Any:  # a fresh mask object, as a new batch would bring
        return policy.prepare_attention(RefeedMask(batch.alive_until))

    def step(prepared: Any) -> None:
        with autocast:
            logits = model(batch.input_ids, batch.position_ids, prepared)  # (B, T, A)
            loss = F.cross_entropy(logits[owners, rows].float(), targets)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    prebuilt = build()
    seconds = _time_train_steps(
        {
            "masked": lambda: step(build()),
            "masked_prebuilt": lambda: step(prebuilt),
            "mask_build": build,
        },
        shape,
        device,
    )
    tokens = B * T
    flops = model_flops_per_token(shape.config, special.num_actions, T) * tokens
    return {
        "gpu_masked_train_tokens_per_s": tokens / seconds["masked"],
        "gpu_masked_prebuilt_train_tokens_per_s": tokens / seconds["masked_prebuilt"],
        "gpu_block_mask_build_ms": 1000 * seconds["mask_build"],
        "gpu_mle_mfu": flops / seconds["masked"] / PEAK_BF16_FLOPS,
        "gpu_mle_tflops": flops / seconds["masked"] / 1e12,
        "gpu_train_rows": float(T),
        "gpu_train_batch": float(B),
    }


def _hf_gpt2(shape: Shape, device: str, attention: str) -> nn.Module:
    from transformers import AutoModelForCausalLM, GPT2Config

    config = shape.config
    hf_config = GPT2Config(
        vocab_size=shape.num_tokens,
        n_positions=max(shape.rows, shape.prompt_length + shape.new_tokens + 1),
        n_embd=config.width,
        n_layer=config.num_layers,
        n_head=config.num_heads,
        bos_token_id=None,  # no special tokens: generation runs the whole budget
        eos_token_id=None,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(hf_config, attn_implementation=attention)
    assert model.config._attn_implementation == attention
    return model.to(device)


def stage_hf_train(shape: Shape, device: str) -> dict[str, float]:
    """The same step on the same token ids through transformers' GPT-2, eager attention."""
    model = _hf_gpt2(shape, device, "eager").train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.startswith("cuda"))
    batch = _batch(shape, device)
    ids = batch.input_ids.clamp_max(shape.num_tokens - 1)  # pad and specials: ordinary ids
    autocast = _autocast(shape, device)

    def step() -> None:
        with autocast:
            logits = model(input_ids=ids).logits  # (B, T, V)
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    seconds = _time_train_steps({"hf": step}, shape, device)
    return {"hf_eager_train_tokens_per_s": ids.numel() / seconds["hf"]}


def _prompts(shape: Shape, device: str) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    size = (shape.gen_batch, shape.prompt_length)
    return torch.randint(0, shape.num_tokens, size, generator=generator).to(device)


def stage_generate(shape: Shape, device: str) -> dict[str, float]:
    """Rollback generation (bf16 weights on CUDA): actions per second, backspaces included."""
    torch.manual_seed(0)
    special = special_ids(shape.num_tokens)
    policy = TransformerPolicy(special, shape.config).to(device).eval()
    if shape.bf16:
        policy = policy.to(torch.bfloat16)
    bias = torch.zeros(special.num_actions, device=device)
    bias[special.eos_id] = -1e4  # every row runs the whole budget
    bias[special.backspace_id] = shape.backspace_bias
    model = LogitBias(policy, bias).eval()
    prompts = _prompts(shape, device).tolist()
    counts: dict[str, int] = {}

    def run() -> None:
        out = generate(
            model,
            prompts,
            max_length=shape.prompt_length + shape.new_tokens + 1,
            max_steps=shape.new_tokens,
            generator=torch.Generator(device).manual_seed(0),
        )
        counts["actions"] = sum(t.num_steps for t in out.trajectories)
        counts["backspaces"] = sum(t.num_backspaces for t in out.trajectories)

    run()  # warm-up
    seconds = interleaved_fastest({"rollback": run}, 2, _sync(device))["rollback"]
    return {
        "gpu_rollback_generate_tokens_per_s": counts["actions"] / seconds,
        "gpu_generate_backspace_share": counts["backspaces"] / counts["actions"],
        "gpu_generate_batch": float(shape.gen_batch),
        "gpu_generate_new_tokens": float(shape.new_tokens),
    }


def stage_hf_generate(shape: Shape, device: str) -> dict[str, float]:
    """Transformers' ``generate`` (sampling, default cache and attention) on the same prompts."""
    model = _hf_gpt2(shape, device, "sdpa").eval()
    if shape.bf16:
        model = model.to(torch.bfloat16)
    prompts = _prompts(shape, device)

    def run() -> None:
        with torch.no_grad():
            model.generate(  # type: ignore[operator]
                prompts,
                attention_mask=torch.ones_like(prompts),
                do_sample=True,
                max_new_tokens=shape.new_tokens,
                pad_token_id=0,
            )

    run()  # warm-up
    seconds = interleaved_fastest({"hf": run}, 2, _sync(device))["hf"]
    return {"hf_generate_tokens_per_s": shape.gen_batch * shape.new_tokens / seconds}


STAGES: dict[str, Callable[[Shape, str], dict[str, float]]] = {
    "train": stage_train,
    "hf_train": stage_hf_train,
    "generate": stage_generate,
    "hf_generate": stage_hf_generate,
}

RATIOS = {
    "gpu_masked_vs_hf_eager": ("gpu_masked_train_tokens_per_s", "hf_eager_train_tokens_per_s"),
    "gpu_rollback_vs_hf_generate": (
        "gpu_rollback_generate_tokens_per_s",
        "hf_generate_tokens_per_s",
    ),
}


def derive_ratios(figures: dict[str, Any]) -> dict[str, float]:
    """The ratios whose two rates are both in ``figures``."""
    return {
        name: figures[top] / figures[bottom]
        for name, (top, bottom) in RATIOS.items()
        if top in figures and bottom in figures
    }


def measure(device: str = "cuda", quick: bool = False) -> dict[str, float]:
    """Every stage in this process, then the ratios (see the module docstring)."""
    shape = gpu_shape(quick, device)
    figures: dict[str, float] = {}
    for stage in STAGES.values():
        figures.update(stage(shape, device))
    figures.update(derive_ratios(figures))
    return figures


def machine(device: str) -> dict[str, Any]:
    """Where the figures come from."""
    name = torch.cuda.get_device_name(device) if device.startswith("cuda") else platform.machine()
    return {
        "device": device,
        "device_name": name,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
    }


def merge_json(path: Path, update: dict[str, Any]) -> dict[str, Any]:
    """Merge ``update`` into the JSON object at ``path`` (atomically), re-deriving the ratios."""
    document: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {}
    document.update(update)
    document.update(derive_ratios(document))
    write_json(path, document, "--json", indent=2)  # the output rule: agents/outputs.py
    return document


def _value(text: str) -> Any:
    """A note's value: a JSON number, boolean or null where it parses as one, else the text."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def main(argv: list[str] | None = None) -> int:
    """Run the stages, print each figure and merge them (or ``--set`` notes) into ``--json``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="merge the figures into this file")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="fewer timed iterations")
    parser.add_argument("--stages", default=",".join(STAGES), help="comma-separated stages")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="record a note, no run"
    )
    args = parser.parse_args(argv)
    stages = [s.strip() for s in args.stages.split(",") if s.strip()] if not args.set else []
    unknown = sorted(set(stages) - set(STAGES))
    if unknown:
        parser.error(f"unknown stages {unknown}; known: {sorted(STAGES)}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda asked for, but no CUDA device is available")
    notes = {key: _value(text) for key, text in (item.split("=", 1) for item in args.set)}
    if args.json and notes:
        merge_json(args.json, notes)
    shape = gpu_shape(args.quick, args.device)
    for stage in stages:
        start = time.perf_counter()
        figures = STAGES[stage](shape, args.device)
        seconds = time.perf_counter() - start
        for key, value in figures.items():
            print(f"{stage:>12}  {key:<40} {value:,.3f}", flush=True)
        if args.json:
            update = {"machine": machine(args.device), "quick": args.quick, **figures}
            update[f"stage_seconds_{stage}"] = seconds
            document = merge_json(args.json, update)
            for name, (top, bottom) in RATIOS.items():
                if name in document and (top in figures or bottom in figures):
                    print(f"{'ratio':>12}  {name:<40} {document[name]:,.3f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
