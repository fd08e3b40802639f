"""The GPU throughput table's bookkeeping (its measurements run in benchmarks/gpu_check.sh)."""

from __future__ import annotations

import json
from pathlib import Path

from agents.experiments.bench_gpu import gpu_shape, main, merge_json, model_flops_per_token
from agents.models.policy import TransformerConfig


def test_model_flops_per_token_by_hand() -> None:
    config = TransformerConfig(num_layers=1, width=4, num_heads=1, context_length=8)
    # weights: 12 * 1 * 16 + 4 * 10 = 232; attention: 6 * 1 * 8 * 4 = 192
    assert model_flops_per_token(config, num_actions=10, rows=8) == 6 * 232 + 192


def test_gpu_shape_is_gpt2_small_on_cuda() -> None:
    shape = gpu_shape(quick=False, device="cuda")
    assert (shape.config.num_layers, shape.config.width, shape.rows, shape.batch_size) == (
        12,
        768,
        1024,
        16,
    )
    assert (shape.gen_batch, shape.new_tokens, shape.compile, shape.bf16) == (64, 256, True, True)


def test_merge_json_derives_ratios_as_figures_land(tmp_path: Path) -> None:
    path = tmp_path / "gpu.json"
    merge_json(path, {"gpu_masked_train_tokens_per_s": 400.0})
    assert "gpu_masked_vs_hf_eager" not in json.loads(path.read_text())
    document = merge_json(path, {"hf_eager_train_tokens_per_s": 200.0})
    assert document["gpu_masked_vs_hf_eager"] == 2.0
    assert json.loads(path.read_text()) == document


def test_main_records_notes_without_measuring(tmp_path: Path) -> None:
    path = tmp_path / "gpu.json"
    assert main(["--device", "cpu", "--json", str(path), "--set", "gpu_tests_exit_status=0"]) == 0
    assert json.loads(path.read_text()) == {"gpu_tests_exit_status": 0}
