"""Names made into file and folder names: run keys, TensorBoard runs, checkpoints' folders."""

from __future__ import annotations

import re


def safe_name(name: str) -> str:
    """``name`` as a file or folder name: path characters (``:``, ``/``, ...) become ``-``.

    Run keys and TensorBoard run names are made from agent and task names, which may be
    ``module:Class``; leading dots are dropped, so no name climbs out of its folder.
    """
    cleaned = re.sub(r"[^A-Za-z0-9_.=+-]+", "-", name).strip("-.")
    return cleaned or "agent"
