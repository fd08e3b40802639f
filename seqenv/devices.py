"""Device names to ``torch.device``, with one clear error where the device does not exist here."""

from __future__ import annotations

import torch


def check_device(device: torch.device | str, label: str | None = None) -> torch.device:
    """``device`` as a ``torch.device``, checked to exist on this machine.

    Args:
        device: a device or its name (``cpu``, ``cuda``, ``cuda:N``, ...).
        label: how errors name the request (e.g. ``--device cuda:1`` on the command line);
            ``device '<name>'`` by default.

    Raises:
        ValueError: (one line) the name is not a device, CUDA is asked for on a machine without
            it, or a CUDA index is beyond the devices present.
    """
    hint = "; use device='cpu'" if label is None else ""  # a command line names its own flag
    label = f"device {str(device)!r}" if label is None else label
    try:
        resolved = torch.device(device)
    except RuntimeError:  # torch's message for a bad string spans several lines
        raise ValueError(f"unknown device {device!r}; use cpu, cuda or cuda:N") from None
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                f"{label} asked for, but no CUDA device is available "
                f"(torch.cuda.is_available() is False){hint}"
            )
        count = torch.cuda.device_count()
        if (resolved.index or 0) >= count:
            raise ValueError(f"{label} asked for, but only {count} CUDA device(s) are present")
    return resolved
