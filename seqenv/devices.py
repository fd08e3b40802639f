"""Device names to ``torch.device``, with one clear error where the device does not exist here."""

from __future__ import annotations

import torch


def check_device(device: torch.device | str) -> torch.device:
    """``device`` as a ``torch.device``, checked to exist on this machine.

    Raises:
        ValueError: (one line) the name is not a device, CUDA is asked for on a machine without
            it, or a CUDA index is beyond the devices present.
    """
    try:
        resolved = torch.device(device)
    except RuntimeError:  # torch's message for a bad string spans several lines
        raise ValueError(f"unknown device {device!r}; use cpu, cuda or cuda:N") from None
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                f"device {str(device)!r} asked for, but no CUDA device is available "
                "(torch.cuda.is_available() is False); use device='cpu'"
            )
        count = torch.cuda.device_count()
        if resolved.index is not None and resolved.index >= count:
            raise ValueError(
                f"device {str(device)!r} asked for, but only {count} CUDA device(s) are present"
            )
    return resolved
