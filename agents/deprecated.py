"""Old names of renamed settings, still read for one release (then this module goes).

The disturbance was ``noise`` and ``noise_type`` in TrainConfig, the command line, the comparison
configs and their results; it is ``disturbance`` and ``disturbance_type`` everywhere now, as in
the environment. A command line or a config file with an old name still works, with a one-line
warning on stderr; a record written before the rename (a checkpoint, a comparison's run files and
results.json) is read silently, since there is nothing for its user to change.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

RENAMED_SETTINGS: dict[str, str] = {"noise": "disturbance", "noise_type": "disturbance_type"}
"""Old name -> new name, of TrainConfig fields and so of config keys and flags."""

OLD_NAMES: dict[str, str] = {new: old for old, new in RENAMED_SETTINGS.items()}
"""New name -> old name: where a run file of a sweep over a renamed setting was written."""

RENAMED_FLAGS: dict[str, str] = {
    f"--{old.replace('_', '-')}": f"--{new.replace('_', '-')}"
    for old, new in RENAMED_SETTINGS.items()
}


def warn_renamed(old: str, new: str, where: str) -> None:
    """The one-line deprecation warning for an old name, on stderr."""
    print(f"warning: {where}: {old} is deprecated, use {new}", file=sys.stderr)


def renamed_settings(settings: dict[str, Any], where: str | None = None) -> dict[str, Any]:
    """``settings`` with each old name of :data:`RENAMED_SETTINGS` replaced by its new one.

    Args:
        settings: TrainConfig fields by name (a config's ``train`` block, a stored config).
        where: what the settings come from, for a warning per old name; None: a record written
            before the rename, read without one.

    Raises:
        ValueError: if an old name and its new one are both given, with different values.
    """
    out = dict(settings)
    for old, new in RENAMED_SETTINGS.items():
        if old not in out:
            continue
        value = out.pop(old)
        if new in out and out[new] != value:
            raise ValueError(
                f"{where or 'settings'}: {old}={value!r} contradicts {new}={out[new]!r}"
            )
        if where is not None:
            warn_renamed(old, new, where)
        out.setdefault(new, value)
    return out


def renamed_config(config: dict[str, Any], where: str | None = None) -> dict[str, Any]:
    """A comparison config with the old names replaced in ``train`` and every ``agents`` block."""
    out = dict(config)
    if isinstance(out.get("train"), dict):
        out["train"] = renamed_settings(out["train"], where and f"{where} train")
    if isinstance(out.get("library_defaults"), dict):
        out["library_defaults"] = renamed_settings(out["library_defaults"])
    if isinstance(out.get("agents"), dict):
        out["agents"] = {
            name: renamed_settings(block, where and f"{where} agents.{name}")
            if isinstance(block, dict)
            else block
            for name, block in out["agents"].items()
        }
    if isinstance(out.get("quick"), dict):
        out["quick"] = renamed_config(out["quick"], where and f"{where} quick")
    sweep = out.get("sweep")
    if isinstance(sweep, dict) and sweep.get("param") in RENAMED_SETTINGS:
        if where is not None:
            warn_renamed(sweep["param"], RENAMED_SETTINGS[sweep["param"]], f"{where} sweep.param")
        out["sweep"] = {**sweep, "param": RENAMED_SETTINGS[sweep["param"]]}
    return out


def renamed_flags(args: Sequence[str], command: str) -> list[str]:
    """A command line with each old flag (``--noise 0.2``, ``--noise-type=random``) renamed."""
    out: list[str] = []
    for arg in args:
        if arg == "--":
            out += args[len(out) :]
            break
        flag, sep, value = arg.partition("=")
        new = RENAMED_FLAGS.get(flag.replace("_", "-"))
        if new is not None:
            warn_renamed(flag, new, f"seqmatch {command}")
            arg = f"{new}{sep}{value}"
        out.append(arg)
    return out
