"""Device names to ``torch.device``, with one clear error where the device does not exist here.

Also the memory free on a device, for the estimates checked before allocating.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

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


def available_memory(device: torch.device) -> int | None:
    """Bytes free for tensors on ``device``, or None when unknown."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    if device.type == "cpu":
        try:
            for line in Path("/proc/meminfo").read_text().splitlines():
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
        except OSError:
            pass
        with contextlib.suppress(ValueError, OSError, AttributeError):
            return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return None


def memory_shortfall(num_bytes: int, device: torch.device, what: str, fix: str) -> str | None:
    """The one-line message where ``num_bytes`` exceed what ``device`` has free, else None.

    ``what`` names the request (plural: "... need about"); ``fix`` says what to change.
    """
    free = available_memory(device)
    if free is None or num_bytes <= free:
        return None
    return (
        f"{what} need about {num_bytes / 2**30:.3g} GiB, {device.type} has "
        f"{free / 2**30:.3g} GiB free: {fix}"
    )
