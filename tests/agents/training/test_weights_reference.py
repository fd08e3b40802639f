"""Final weights for fixed seeds against a reference made before the algorithm registry.

The registry moved each agent's training code into ``agents/algorithms`` without changing what
it computes. These runs cover every path the move touched: MLE, BC (intended and executed
labels), and SequenceMatch through its warm start, rollouts, replay buffer, length-bucketed
model batches and mixture, with the level penalty. The reference
(``tests/data/weights_reference.npz``) was written by ``python -m
tests.agents.training.test_weights_reference`` on the code before the move; a float tolerance, not a
checksum, since float results differ across CPUs in the last bits.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from agents.config import TrainConfig
from agents.training.trainer import Trainer

REFERENCE = Path(__file__).parents[2] / "data" / "weights_reference.npz"

TINY: dict[str, Any] = {
    "task": "dyck",
    "task_args": '{"num_types": 1, "max_depth": 3, "min_brackets": 0, "max_brackets": 6}',
    "max_length": 10,
    "steps": 12,
    "batch_size": 8,
    "layers": 1,
    "width": 16,
    "heads": 2,
    "num_demonstrations": 64,
    "eval_interval": 0,
    "eval_episodes": 4,
    "lr_warmup": 2,
    "logdir": None,
    "progress": False,
    "device": "cpu",
}
RUNS: dict[str, dict[str, Any]] = {
    "mle": {"agent": "mle", "backspace": False},
    # BC as it trained before it read the level penalty (the reference predates that).
    "bc": {"agent": "bc", "level_penalty": 0.0},
    "bc_executed": {"agent": "bc", "labels": "executed", "level_penalty": 0.0},
    "sequencematch": {
        "agent": "sequencematch",
        "sm_warmup": 4,
        "k_sample": 3,
        "rollouts": 8,
        "buffer_size": 16,
        "grad_share_interval": 4,
    },
}


def final_weights(run: str) -> dict[str, np.ndarray]:
    """The weights after training the tiny run ``run`` (seed 3)."""
    torch.set_num_threads(1)
    trainer = Trainer(TrainConfig(**TINY, **RUNS[run], seed=3))
    trainer.train()
    return {f"{run}/{k}": v.detach().numpy().copy() for k, v in trainer.policy.state_dict().items()}


@pytest.mark.parametrize("run", sorted(RUNS))
def test_final_weights_match_the_reference(run: str) -> None:
    reference = np.load(REFERENCE)
    weights = final_weights(run)
    expected = sorted(k for k in reference.files if k.startswith(f"{run}/"))
    assert sorted(weights) == expected
    for key in expected:
        np.testing.assert_allclose(weights[key], reference[key], rtol=1e-4, atol=1e-5, err_msg=key)


if __name__ == "__main__":  # regenerate (only when a change is meant to change the weights)
    everything = {k: v for run in sorted(RUNS) for k, v in final_weights(run).items()}
    np.savez_compressed(REFERENCE, **everything)  # type: ignore[arg-type]
    print(f"wrote {REFERENCE} ({len(everything)} arrays)", file=sys.stderr)
