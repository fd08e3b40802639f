"""Finished runs on disk, one JSON file each: the resume point of a stopped comparison.

A run's file, ``runs/<agent>-s<seed>.json`` (``sweep/runs/...`` for the sweep), is
``{"format": 1, "config": ..., "row": ...}``: ``config`` is what decides the run's result
(:func:`runs_config`) and ``row`` the run's row of results.json. This module also checks the
``--out`` folder a comparison writes into (:mod:`agents.outputs`), and recognises a comparison
written before the folder marker existed.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agents.algorithms import ALGORITHMS
from agents.config import ADDED_SETTINGS
from agents.deprecated import OLD_NAMES, renamed_config
from agents.experiments.report import output_names, strict_json
from agents.outputs import (
    LOCK,
    check_folder,
    claimed,
    has_content,
    listed,
    mark,
    owner,
    record,
    remove_listed,
    safe_name,
    write_json,
)

RUN_FORMAT = 1


NOT_RUN_KEYS = frozenset(
    ("name", "description", "targets", "seeds", "quick", "sweep", "agent_list", "default_agents")
)
"""Config keys that do not change any run's result (a resumed comparison may differ in them)."""


def runs_config(config: dict[str, Any]) -> dict[str, Any]:
    """The part of a comparison's config that decides each run's result.

    As JSON reads it back: what a resumed comparison must share with the runs it keeps. A
    ``train`` setting at the library's default is left out, and so is an own-loop algorithm's
    setting at its default (:attr:`~agents.algorithms.base.Algorithm.loop_settings`): each
    trains as its absence does (a config that states it and one that does not give the same runs).
    """
    kept = json.loads(json.dumps({k: v for k, v in config.items() if k not in NOT_RUN_KEYS}))
    kept = renamed_config(kept)  # a run written before a rename holds the old names
    defaults = kept.get("library_defaults", {})
    if isinstance(kept.get("train"), dict):
        kept["train"] = {
            k: v for k, v in kept["train"].items() if not (k in defaults and v == defaults[k])
        }
    if isinstance(kept.get("agents"), dict):
        kept["agents"] = {
            name: _without_loop_defaults(name, block) for name, block in kept["agents"].items()
        }
    if "library_defaults" in kept:  # a setting added since, at the value it had before: no change
        kept["library_defaults"] = {
            k: v
            for k, v in kept["library_defaults"].items()
            if not (k in ADDED_SETTINGS and v == ADDED_SETTINGS[k])
        }
    return json.loads(json.dumps(kept))


def _without_loop_defaults(agent: str, block: Any) -> Any:
    """A config's ``agents.<agent>`` block less the own-loop settings at their defaults."""
    spec = ALGORITHMS.get(agent)
    if spec is None or not spec.cls.own_loop or not isinstance(block, dict):
        return block
    own = json.loads(json.dumps(spec.cls.loop_settings))
    return {k: v for k, v in block.items() if not (k in own and v == own[k])}


def stored_or_run(
    path: Path,
    config: dict[str, Any],
    train: Callable[[], dict[str, Any]],
    label: str,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The row of the finished run stored at ``path``, or ``train()``'s row, then stored there.

    For the scan and the sweep, whose runs are one file each as a comparison's are. ``label``
    is printed before training; ``extra`` is added to a new row (and so stored with it).

    Raises:
        ValueError: if the stored run belongs to another config (compared as
            :func:`runs_config` does).
    """
    if path.is_file():
        stored = read_run(path)
        if runs_config(stored["config"]) != runs_config(config):
            raise ValueError(f"{path} was run with another config: pass another --out")
        return stored["row"]
    print(label, file=sys.stderr, flush=True)
    row = strict_json({**train(), **(extra or {})})
    write_json_atomic(path, {"format": RUN_FORMAT, "config": config, "row": row})
    return row


def run_key(agent: str, seed: int, overrides: dict[str, Any] | None = None) -> str:
    """The file name (without .json) of one run: ``<agent>-s<seed>[-<param>=<value>]``.

    A value with a path separator or ``..`` in it is sanitised: the name stays in its folder.
    """
    extra = "".join(f"-{k}={v}" for k, v in sorted((overrides or {}).items()))
    return safe_name(f"{agent}-s{seed}{extra}")


def run_path(folder: Path, agent: str, seed: int, overrides: dict[str, Any]) -> Path:
    """The file of one run in ``folder``; that of its key before a rename if only that exists.

    A sweep over a renamed setting (``noise``) wrote ``<agent>-s<seed>-noise=<value>.json``.
    """
    path = folder / f"{run_key(agent, seed, overrides)}.json"
    old = {OLD_NAMES.get(k, k): v for k, v in overrides.items()}
    legacy = folder / f"{run_key(agent, seed, old)}.json"
    return legacy if legacy != path and legacy.is_file() and not path.is_file() else path


def write_json_atomic(path: Path, content: Any) -> None:
    """Write ``content`` as JSON to ``path`` by the output rule (:mod:`agents.outputs`).

    Through a temporary file and a rename: a reader (or a resumed comparison) never sees a
    half-written file.
    """
    write_json(path, content)


def run_files(out: Path) -> list[Path]:
    """The finished-run files of the comparison in ``out`` (main runs and sweep runs)."""
    return sorted([*(out / "runs").glob("*.json"), *(out / "sweep" / "runs").glob("*.json")])


def read_run(path: Path) -> dict[str, Any]:
    """One finished-run file: ``{"format", "config", "row"}``.

    Raises:
        ValueError: for a file that is not such a record.
    """
    try:
        record = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not a finished-run file ({err.msg})") from None
    if not isinstance(record, dict) or record.get("format") != RUN_FORMAT or "row" not in record:
        raise ValueError(f"{path}: not a finished-run file of format {RUN_FORMAT}")
    return record


def prepare_out(out: Path, config: dict[str, Any], resume: bool, overwrite: bool) -> int:
    """Check that ``out`` can take this comparison; return how many finished runs it keeps.

    Run once the folder's lock is held. A folder holding runs of the same config is resumed.
    One holding another config's runs, or a finished comparison without per-run files, is
    refused unless ``overwrite`` (then what the comparison wrote there is removed: what its
    manifest lists). A folder that is not a comparison is refused (:func:`check_out`). The
    folder is marked as a comparison; one from before the marker is marked now, its files listed.

    Raises:
        FileExistsError: for a folder that holds another comparison (and not ``overwrite``), or
            that is no comparison.
        ValueError: for ``resume`` where there is nothing to resume.
    """
    adopted = check_out(out, probe=False)
    wanted = runs_config(config)
    files = run_files(out)
    foreign = [p for p in files if runs_config(read_run(p)["config"]) != wanted]
    legacy = not files and (out / "results.json").exists()
    if (foreign or legacy) and not overwrite:
        what = (
            f"runs of a different config ({foreign[0].relative_to(out)})"
            if foreign
            else "a finished comparison without per-run files"
        )
        raise FileExistsError(
            f"--out {out} holds {what}; pass --overwrite to replace it, or choose another --out"
        )
    if adopted:  # a comparison from before the marker: listed first, then marked
        record(out, *adopted)
    mark(out, "comparison")
    if foreign or legacy:
        remove_listed(out)
        files = []
    if resume and not files:
        raise ValueError(f"--resume: no finished runs in {out}")
    return len(files)


def check_out(
    out: Path, inputs: Sequence[tuple[str, str | None]] = (), probe: bool = True
) -> list[str]:
    """Refuse an ``--out`` that is not a comparison folder; what a pre-marker one wrote.

    New, empty, or marked as a comparison: fine. A folder from before the marker is recognised
    by its content (:func:`_pre_marker_entries`): a comparison's results.json (with its config),
    finished-run files, or only the TensorBoard runs and checkpoints of a first run stopped
    early. Anything else that holds files is a user's folder, refused.

    ``probe``: refuse a folder whose lock another process holds (off under the lock itself).

    Returns:
        The entries (relative paths) the pre-marker comparison wrote; empty otherwise.
    """
    if not _unmarked_with_files(out, "comparison", inputs, probe):
        return []
    entries = _pre_marker_entries(out)
    if entries is None:
        raise _not_seqmatchs(out, "comparison")
    return entries


def _unmarked_with_files(
    out: Path, kind: str, inputs: Sequence[tuple[str, str | None]], probe: bool
) -> bool:
    """Whether ``out`` holds files unmarked, so that its content must say whose it is.

    First checked as the ``--out`` of a ``kind`` folder (:func:`check_folder`).
    """
    check_folder(out, "--out", kind, inputs, probe=probe)
    return out.is_dir() and owner(out) != kind and has_content(out)


def _not_seqmatchs(out: Path, kind: str) -> FileExistsError:
    return FileExistsError(
        f"--out {out}: the folder holds files and is not a seqmatch {kind} (refusing to write "
        "into it); choose a new or empty folder"
    )


@contextlib.contextmanager
def claimed_scan(out: Path, results_keys: frozenset[str]) -> Iterator[None]:
    """Hold the ``--out`` folder of a regime scan or a sweep for the block, marked as a scan.

    Checked before anything is made, and again under the lock: new, empty, marked as a scan, or
    a scan from before the marker (:func:`_pre_marker_scan`, its results.json holding
    ``results_keys``). Anything else that holds files is a user's folder, refused in one line.
    """
    check_scan_out(out, results_keys)  # a user's folder is refused before its lock file is made
    with claimed(out, "--out"):
        check_scan_out(out, results_keys, probe=False)
        mark(out, "scan")
        yield


def check_scan_out(out: Path, results_keys: frozenset[str], probe: bool = True) -> None:
    """Refuse an ``--out`` of a scan or sweep that is not one (see :func:`claimed_scan`)."""
    if _unmarked_with_files(out, "scan", (), probe) and not _pre_marker_scan(out, results_keys):
        raise _not_seqmatchs(out, "scan")


def _pre_marker_scan(out: Path, results_keys: frozenset[str]) -> bool:
    """Whether ``out`` is a scan or sweep written before the marker existed.

    Recognised by content: a results.json that is a JSON object with ``results_keys``, or,
    for one stopped before its first results.json, nothing but finished-run files, TensorBoard
    event files and seqmatch checkpoints.
    """
    try:
        results = json.loads((out / "results.json").read_text())
    except (OSError, ValueError):
        results = None
    if isinstance(results, dict):
        return results_keys <= results.keys()
    for path in out.rglob("*"):
        if path.is_dir() or path == out / LOCK or path.name.startswith("events.out.tfevents"):
            continue
        inside = path.relative_to(out).parents  # the folders between out and the file
        if any(owner(out / folder) == "checkpoint" for folder in inside):
            continue
        try:
            read_run(path)
        except (OSError, ValueError):
            return False
    return True


def _event_files_only(folder: Path) -> bool:
    entries = list(folder.iterdir())
    return bool(entries) and all(p.name.startswith("events.out.tfevents") for p in entries)


def _pre_marker_entries(out: Path) -> list[str] | None:
    """What a comparison written before the marker existed wrote in ``out``; None if none did.

    Recognised by content, never by names alone: results.json with a comparison's config (and
    report.md and the plots it names), finished-run files, TensorBoard run folders that hold
    only event files, and seqmatch checkpoints under ``checkpoints/``.
    """
    entries: list[str] = []
    try:
        results = json.loads((out / "results.json").read_text())
    except (OSError, ValueError):
        results = None
    is_results = isinstance(results, dict) and isinstance(results.get("config"), dict)
    if is_results:
        assert isinstance(results, dict)
        try:
            names = output_names(results)
        except (KeyError, TypeError, AttributeError):
            names = ["results.json", "report.md"]
        entries += [n for n in names if (out / n).is_file()]
    runs = []
    for path in run_files(out):
        try:
            read_run(path)
        except ValueError:
            continue
        runs.append(str(path.relative_to(out)))
    entries += runs
    work = []
    for base in ("runs", "sweep/runs"):
        if (out / base).is_dir():
            work += [
                str(p.relative_to(out))
                for p in (out / base).iterdir()
                if p.is_dir() and _event_files_only(p)
            ]
    for base in ("checkpoints", "sweep/checkpoints"):
        if (out / base).is_dir():
            work += [str(p.relative_to(out)) for p in (out / base).iterdir() if owner(p)]
    entries += work
    if is_results or runs:
        return entries
    # A first run stopped before it finished: only its TensorBoard run and checkpoint.
    known = {"runs", "sweep", "checkpoints", LOCK}
    if work and all(p.name in known for p in out.iterdir()):
        found = {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()} - {LOCK}
        if all(any(f.startswith(w + "/") for w in work) for f in found):
            return entries
    return None


def clear_unfinished(out: Path, logdir: Path) -> None:
    """Remove the TensorBoard folder an interrupted run left behind (event files only).

    The rerun's curves are then not mixed with it. Only a folder the comparison's manifest
    lists (one it wrote) is removed, and only while it holds event files alone.
    """
    ours = str(logdir.relative_to(out)) in listed(out)
    if ours and logdir.is_dir() and _event_files_only(logdir):
        shutil.rmtree(logdir)


@dataclass(frozen=True)
class RunSpec:
    """One (agent, seed) run of the comparison (of the sweep where ``overrides`` is set)."""

    agent: str
    seed: int
    out: Path
    """The folder whose ``runs/`` takes its TensorBoard run and its finished-run file."""
    overrides: tuple[tuple[str, Any], ...] = ()

    @property
    def path(self) -> Path:
        """The run's result file under ``out/runs``."""
        return run_path(self.out / "runs", self.agent, self.seed, dict(self.overrides))

    def describe(self) -> str:
        """The run in words: agent, seed and any overrides."""
        extra = "".join(f" {k}={v}" for k, v in self.overrides)
        return f"{self.agent} seed {self.seed}{extra}"


def spec_entries(out: Path, spec: RunSpec) -> list[str]:
    """What one run writes under ``out``: its run file, TensorBoard run and checkpoint."""
    key = run_key(spec.agent, spec.seed, dict(spec.overrides))
    paths = [spec.path, spec.out / "runs" / key, spec.out / "checkpoints" / key]
    return [str(p.relative_to(out)) for p in paths]
