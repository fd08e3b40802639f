"""Training on the GPU: 20 SequenceMatch updates, compiled and in bf16, lower the data NLL; DDP with
NCCL over two GPUs runs where two are present.

The NLL is measured in float32, eagerly, on a fixed batch of demonstrations before and after, so it
does not depend on which objective (warm start or mixture) an update used. The first updates
compile the model (and recompile once as batch lengths vary), which is most of the test's time.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from agents.collate import collate
from agents.config import TrainConfig
from agents.training.logger import Logger
from agents.training.trainer import Trainer
from tests.gpu.helpers import requires_cuda
from tests.integration.conftest import TINY, check_ok, cli_env, free_port

pytestmark = requires_cuda


def data_nll(trainer: Trainer) -> float:
    """Mean -log pi(a_t | s_t) of the first 64 demonstrations, float32, no autocast."""
    batch = collate(trainer.demonstrations[:64]).to(trainer.device)
    trainer.policy.eval()
    with torch.no_grad():
        logits = trainer.policy.forward_batch(batch).float()  # (B, T, A)
    trainer.policy.train()
    rows = logits.gather(1, batch.state_rows[..., None].expand(-1, -1, logits.shape[-1]))
    log_probs = rows.log_softmax(-1).gather(-1, batch.actions[..., None])[..., 0]  # (B, S)
    return float(-log_probs[batch.step_mask].mean())


def test_sequencematch_compiled_bf16_lowers_the_loss_in_20_updates() -> None:
    config = TrainConfig(
        agent="sequencematch",
        task="dyck",
        device="cuda",
        compile=True,
        bf16=True,
        steps=20,
        sm_warmup=10,  # 10 BC updates, then 10 of the mixture with fresh rollouts
        k_sample=5,
        rollouts=32,
        batch_size=32,
        num_demonstrations=256,
        lr=3e-3,
        lr_warmup=2,
        eval_interval=0,
        progress=False,
    )
    trainer = Trainer(config)
    assert trainer.device.type == "cuda" and trainer.autocast_dtype == torch.bfloat16
    before = data_nll(trainer)
    logger = Logger(None)
    for _ in range(config.steps):
        trainer.train_step(logger)
    metrics = logger.dump(trainer.step)
    after = data_nll(trainer)
    assert trainer.step == 20 and metrics["train/sequencematch_active"] == 0.5
    assert all(torch.isfinite(p).all() for p in trainer.policy.parameters())
    assert after < 0.85 * before, (before, after)  # 2.00 -> 1.38 in a float32 run on the CPU


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="DDP with NCCL needs two CUDA devices")
def test_ddp_with_nccl_on_two_gpus(tmp_path: Path) -> None:
    on_cuda = [a if a != "cpu" else "cuda" for a in TINY]
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
        "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
        "-m", "agents.cli", "train", "--agent", "bc", *on_cuda, "--steps", "5",
        "--eval-interval", "0", "--eval-episodes", "4", "--save", "ckpt", "--logdir", "runs",
    ]  # fmt: skip
    result = subprocess.run(
        command, cwd=tmp_path, env=cli_env(), capture_output=True, text=True, timeout=240,
        check=False,
    )  # fmt: skip
    check_ok(result)
    assert (tmp_path / "ckpt" / "model.safetensors").exists()
