"""The policy throughput benchmark's Hugging Face ratio runs and reports its rates."""

from __future__ import annotations

import math

from agents.experiments.bench_policy import _measure_hf_train


def test_hf_masked_vs_causal_train_is_measured() -> None:
    figures = _measure_hf_train(quick=True, device="cpu", sync=lambda: None)
    ratio = figures["hf_masked_vs_causal_train"]
    masked, causal = (
        figures["hf_masked_train_tokens_per_s"],
        figures["hf_causal_train_tokens_per_s"],
    )
    assert masked > 0 and causal > 0
    assert math.isclose(ratio, masked / causal)
