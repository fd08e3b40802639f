"""What the GPU tests share: the marks that skip them without CUDA, and error measures."""

from __future__ import annotations

import pytest
import torch

NO_CUDA = "needs a CUDA device: torch.cuda.is_available() is False on this machine"

requires_cuda = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_CUDA),
]
"""``pytestmark`` of every module here: collected everywhere, run only where CUDA is."""


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| over max |expected|: the error on the scale of the values."""
    actual, expected = actual.float(), expected.float()
    return float((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-12))


def relative_norm_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected|| / ||expected|| (for gradients, whose entries span many scales)."""
    actual, expected = actual.float(), expected.float()
    return float((actual - expected).norm() / expected.norm().clamp_min(1e-12))
