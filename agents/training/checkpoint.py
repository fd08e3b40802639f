"""Checkpoints: safetensors for tensors, JSON for everything else, replaced atomically.

A checkpoint is a folder that holds one complete checkpoint per saved step and a pointer to the
current one::

    CKPT/
      seqmatch-checkpoint       marker: this folder is a seqmatch checkpoint (JSON: the format)
      seqmatch-manifest.json    the step and temporary folders seqmatch made here (agents.outputs)
      seqmatch.lock             the lock a training run holds (agents.outputs)
      latest                    pointer: the name of the current step folder, e.g. step-000000120
      step-000000120/           the current checkpoint
        model.safetensors       the model payload (a policy's weights; another model kind writes
                                its own files through the ``write_model`` hook)
        optimizer.safetensors   the optimizer's state tensors (AdamW moments, step counts)
        rng.safetensors         torch's RNG states (CPU, CUDA when used, the caller's generators)
        checkpoint.json         format, step, config, vocabulary, task, optimizer hyperparameters,
                                numpy RNG state, replay buffer, last evaluation, and ``files``:
                                every file of the step folder (checked on loading)

A save records the names of its new step folder and temporary folder in the manifest, writes
the step folder under the hidden temporary name (``.tmp-*``) inside ``CKPT``, renames it to
``step-N``, then replaces ``latest`` (a temporary file, fsync, ``os.replace``), and only then
removes the older step folders and the temporary folders left by an interrupted save: those the
manifest lists, never a folder that only has such a name. A kill at any point leaves ``latest``
naming a complete step folder (or no ``latest`` at all before the first save completes); what it
leaks is removed by the next save. Loading follows ``latest`` (never to a step folder that links
outside the checkpoint); a step folder may also be given directly. Nothing is ever unpickled.

Saving into a folder that exists and is not a seqmatch checkpoint (no marker) is refused, so a
user's folder is never touched.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shutil
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, load_model, save_file, save_model

from agents.outputs import (
    MANIFEST,
    MARKERS,
    POINTER,
    STEP_PREFIX,
    TMP_PREFIX,
    Inputs,
    OutputError,
    check_folder,
    claimed,
    forget,
    has_content,
    nearest_existing,
    record,
    remove_listed,
    resolved,
)

FORMAT = 2
MARKER = MARKERS["checkpoint"]
"""The marker file's name: a folder holding it is a seqmatch checkpoint."""
METADATA = "checkpoint.json"
TRAINING_FILES = ("optimizer.safetensors", "rng.safetensors")

ModelWriter = Callable[[Path], Sequence[str]]
"""Writes a model's payload into a folder; returns the names of the files it wrote."""


class CheckpointError(ValueError):
    """A checkpoint that is missing, incomplete, corrupt or does not fit what it is loaded into."""


# -- file-system steps (each one a point where a save may be interrupted) ---------------------
def _write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to a new file and flush it to the disk."""
    with open(path, "wb") as file:
        file.write(data)
        file.flush()
        os.fsync(file.fileno())


def _fsync_file(path: Path) -> None:
    """Flush a written file's contents to the disk."""
    with open(path, "rb") as file:
        os.fsync(file.fileno())


def _fsync_dir(path: Path) -> None:
    """Make a rename inside ``path`` durable (no-op where folders cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# -- what a checkpoint folder is --------------------------------------------------------------
def is_checkpoint(path: str | Path) -> bool:
    """Whether ``path`` is a seqmatch checkpoint folder (it holds the marker file)."""
    return (Path(path) / MARKER).is_file()


def check_save_target(
    path: str | Path,
    *,
    resume: bool = False,
    overwrite: bool = False,
    inputs: Inputs = (),
    probe: bool = True,
) -> None:
    """Refuse, before any work, a ``--save`` folder that a run must not write into.

    Like ``git clone``'s target: ``path`` must not exist (its nearest existing parent must be a
    writable folder), be an empty folder, or be a seqmatch checkpoint: one that holds a complete
    checkpoint is continued with ``resume`` or replaced with ``overwrite``; one whose first save
    never finished (no pointer) holds nothing to keep and is started afresh. It must not be one of
    the run's ``inputs``, nor be locked by another process (``probe``: look at the lock; off
    where this process holds it). Raises FileExistsError, NotADirectoryError, PermissionError,
    CheckpointError or OutputError in one line.
    """
    path = Path(path)
    if resume and overwrite:
        raise ValueError("--resume and --overwrite exclude each other")
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"--save {path}: a file is there (a checkpoint is a folder)")
    if not path.exists():
        if resume:
            raise CheckpointError(f"{path}: no such checkpoint")
        parent = nearest_existing(path)
        if not parent.is_dir():
            raise NotADirectoryError(f"--save {path}: {parent} is not a folder")
    check_folder(path, "--save", "checkpoint", inputs, probe=probe)
    if not path.is_dir():
        return
    if is_checkpoint(path):
        complete = (path / POINTER).is_file()
        if resume and not complete:
            raise CheckpointError(
                f"--save {path}: holds no complete checkpoint yet (its first save did not "
                "finish); run without --resume to start it afresh"
            )
        if complete and not (resume or overwrite):
            raise FileExistsError(
                f"--save {path}: a checkpoint is there; pass --resume to continue it "
                "or --overwrite to replace it"
            )
    elif has_content(path):
        raise FileExistsError(
            f"--save {path}: the folder exists and is not a seqmatch checkpoint "
            "(refusing to write into it)"
        )


@contextlib.contextmanager
def holding(path: str | Path | None, *, resume: bool, overwrite: bool) -> Iterator[None]:
    """Hold the lock of the ``--save`` folder ``path`` for the block (nothing where None).

    The folder is made if it is missing and checked again once the lock is held; a folder made
    here is removed again if the block fails before anything is saved
    (:func:`agents.outputs.claimed`).
    """
    if path is None:
        yield
        return
    with claimed(path, "--save"):
        check_save_target(path, resume=resume, overwrite=overwrite, probe=False)
        yield


def resolve_checkpoint(path: str | Path) -> Path:
    """The step folder that ``path`` means: the one ``latest`` names, or ``path`` itself."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint")
    if not path.is_dir():
        raise CheckpointError(f"{path}: a checkpoint is a folder, this is a file")
    if not is_checkpoint(path):
        if (path / METADATA).is_file():  # a step folder given directly
            return path
        raise CheckpointError(f"{path}: not a seqmatch checkpoint (no {MARKER} file)")
    try:
        name = (path / POINTER).read_text().strip()
    except FileNotFoundError:
        raise CheckpointError(
            f"{path}: holds no complete checkpoint yet (its first save did not finish)"
        ) from None
    except (OSError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path}/{POINTER} is unreadable ({err})") from None
    if not name.startswith(STEP_PREFIX) or "/" in name or not (path / name).is_dir():
        raise CheckpointError(f"{path}/{POINTER} is corrupt (names {name[:60]!r})")
    if resolved(path) not in resolved(path / name).parents:  # a link to elsewhere: not ours
        raise CheckpointError(
            f"{path}/{name} links outside the checkpoint (to {resolved(path / name)}); "
            "refusing to read it"
        )
    return path / name


def mark_checkpoint(path: str | Path) -> None:
    """Make ``path`` (missing or an empty folder) a checkpoint folder with no step saved yet."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    # Its presence is what counts: a kill while writing it leaves a checkpoint folder without
    # a pointer, which loads as "no complete checkpoint yet".
    _write_bytes(path / MARKER, (json.dumps({"format": FORMAT}) + "\n").encode())


# -- saving -----------------------------------------------------------------------------------
def _flatten_optimizer(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split ``optimizer.state_dict()`` into named tensors and a JSON-able rest."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, values in state["state"].items():
        for name, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{index}.{name}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(index), {})[name] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], rest: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    for index, values in rest["scalars"].items():
        state.setdefault(int(index), {}).update(values)
    return {"state": state, "param_groups": rest["param_groups"]}


def module_writer(model: torch.nn.Module) -> ModelWriter:
    """The model payload writer of a policy (:func:`save_model_payload`).

    For our transformer and a pretrained LM alike; it returns the files written, relative to
    the folder.
    """

    def write(folder: Path) -> list[str]:
        save_model_payload(folder, model)  # the first files of the fresh step folder
        return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())

    return write


def tensors_writer(tensors_by_file: dict[str, dict[str, torch.Tensor]]) -> ModelWriter:
    """A model payload given as plain tensors per file name (e.g. LoRA adapters)."""

    def write(folder: Path) -> list[str]:
        for name, tensors in tensors_by_file.items():
            save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()},
                      str(folder / name))  # fmt: skip
        return list(tensors_by_file)

    return write


def _step_name(folder: Path, step: int) -> str:
    """``step-N``, with a suffix when a folder of that step exists already (saved twice)."""
    name = f"{STEP_PREFIX}{step:09d}"
    suffix = 1
    while (folder / name).exists():
        suffix += 1
        name = f"{STEP_PREFIX}{step:09d}.{suffix}"
    return name


def _prune(path: Path, keep: str) -> None:
    """Remove every step folder but ``keep``, and what interrupted saves left.

    Only the entries the manifest lists: never a folder that merely has such a name.
    """
    remove_listed(path, keep=[keep])


def _adopt_current(path: Path) -> list[str]:
    """The step folder ``latest`` names, in a checkpoint saved before the manifest existed.

    Listed at the next save, so that pruning removes it as its own; other folders named like
    step folders there are never listed, and so never removed.
    """
    if (path / MANIFEST).is_file() or not (path / POINTER).is_file():
        return []
    try:
        return [resolve_checkpoint(path).name]
    except CheckpointError:
        return []


def save_checkpoint(
    path: str | Path,
    model: torch.nn.Module | ModelWriter,
    optimizer: torch.optim.Optimizer | None,
    metadata: dict[str, Any],
    rng_states: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Save a new current step folder in the checkpoint folder ``path``; return the step folder.

    Args:
        path: the checkpoint folder; created if missing, refused if it exists and is not one.
        model: a torch module (its weights go to ``model.safetensors``) or a :data:`ModelWriter`
            that writes any other model payload into the step folder.
        optimizer: its state goes to ``optimizer.safetensors`` (empty when ``None``).
        metadata: JSON-able; needs ``step`` (an int >= 0) to name the step folder.
        rng_states: the caller's own ``torch.Generator`` states, saved beside torch's global ones.

    A failure (a full disk, an interrupt) leaves the previous step folder current.
    """
    path = Path(path)
    step = metadata.get("step")
    if not isinstance(step, int) or step < 0:
        raise ValueError(f"metadata['step'] must be an int >= 0, got {step!r}")
    if path.exists() and not is_checkpoint(path) and (not path.is_dir() or has_content(path)):
        raise FileExistsError(f"{path} exists and is not a seqmatch checkpoint")
    if not is_checkpoint(path):
        mark_checkpoint(path)
    write_model = module_writer(model) if isinstance(model, torch.nn.Module) else model
    step_name = _step_name(path, step)
    tmp = path / f"{TMP_PREFIX}{os.getpid()}-{os.urandom(4).hex()}"
    # Listed before they exist: a kill never leaves a folder of ours that pruning would not know.
    record(path, *_adopt_current(path), tmp.name, step_name, f"{TMP_PREFIX}{POINTER}")
    os.mkdir(tmp)
    try:
        files = list(write_model(tmp))
        opt_tensors, opt_rest = (
            _flatten_optimizer(optimizer.state_dict()) if optimizer else ({}, {})
        )
        save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
        rng = {"cpu": torch.get_rng_state(), **(rng_states or {})}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            rng["cuda"] = torch.cuda.get_rng_state()
        save_file(rng, str(tmp / "rng.safetensors"))
        files += [*TRAINING_FILES, METADATA]
        document = {"format": FORMAT, **metadata, "optimizer": opt_rest, "files": files}
        _write_bytes(tmp / METADATA, (json.dumps(document, indent=1) + "\n").encode())
        for name in files[:-1]:  # the tensor files (safetensors does not flush them)
            _fsync_file(tmp / name)
        _fsync_dir(tmp)
        os.rename(tmp, path / step_name)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        with contextlib.suppress(OSError, OutputError):  # the disk may be full: best effort
            forget(path, tmp.name, step_name, f"{TMP_PREFIX}{POINTER}")
        raise
    _fsync_dir(path)
    _write_pointer(path, step_name)
    _fsync_dir(path)
    _prune(path, keep=step_name)
    return path / step_name


def _write_pointer(path: Path, name: str) -> None:
    tmp = path / f"{TMP_PREFIX}{POINTER}"
    _write_bytes(tmp, (name + "\n").encode())
    os.replace(tmp, path / POINTER)


# -- loading ----------------------------------------------------------------------------------
def _one_line(err: BaseException, limit: int = 300) -> str:
    """An exception's message on one line (torch's load errors list every tensor, a line each)."""
    text = " ".join(str(err).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The JSON part of a checkpoint's current step, after checking that its files are there."""
    folder = resolve_checkpoint(path)
    try:
        document = json.loads((folder / METADATA).read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{folder}: not a complete checkpoint (missing {METADATA})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{folder}/{METADATA} is corrupt ({err})") from None
    if not isinstance(document, dict):
        raise CheckpointError(f"{folder}/{METADATA} is corrupt (not a JSON object)")
    if document.get("format") != FORMAT:
        raise CheckpointError(f"{folder}: unknown checkpoint format {document.get('format')!r}")
    files = document.get("files")
    if not isinstance(files, list) or not all(isinstance(f, str) for f in files):
        raise CheckpointError(f"{folder}/{METADATA} is corrupt (no list of files)")
    missing = [name for name in files if not (folder / name).is_file()]
    if missing:
        raise CheckpointError(f"{folder}: not a complete checkpoint (missing {', '.join(missing)})")
    outside = [name for name in files if resolved(folder) not in resolved(folder / name).parents]
    if outside:
        raise CheckpointError(f"{folder}/{outside[0]} links outside the checkpoint; refusing it")
    step = document.get("step")
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise CheckpointError(f"{folder}/{METADATA} is corrupt (step {step!r})")
    return document


def load_weights(path: str | Path, model: torch.nn.Module) -> None:
    """Load ``model.safetensors`` into ``model``.

    Strict: every tensor must match and be finite; for a LoRA policy, every trainable tensor
    (the frozen base is not in the file).
    """
    file = resolve_checkpoint(path) / "model.safetensors"
    if getattr(model, "lora", None) is not None:
        try:
            tensors = load_file(str(file))
        except (SafetensorError, OSError) as err:
            raise CheckpointError(f"{file} is corrupt ({_one_line(err)})") from None
        expected = set(model.trainable_state())  # type: ignore[operator]
        if set(tensors) != expected:
            raise CheckpointError(
                f"{file} does not fit the adapters: missing {sorted(expected - set(tensors))[:3]}"
                f", unexpected {sorted(set(tensors) - expected)[:3]}"
            )
        _refuse_non_finite(file, tensors.items())
        model.load_state_dict(tensors, strict=False)
        return
    try:
        missing, unexpected = load_model(model, str(file), strict=False)
    except (SafetensorError, OSError, RuntimeError) as err:
        raise CheckpointError(
            f"{file} is corrupt or does not fit the model ({_one_line(err)})"
        ) from None
    if missing or unexpected:
        raise CheckpointError(
            f"{file} does not fit the model: missing {sorted(missing)[:3]}, "
            f"unexpected {sorted(unexpected)[:3]}"
        )
    _refuse_non_finite(file, model.named_parameters())


def _refuse_non_finite(file: Path, tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
    """CheckpointError naming the first tensors of ``file`` that hold NaN or infinity."""
    bad = [name for name, t in tensors if not torch.isfinite(t).all()]
    if bad:
        raise CheckpointError(f"{file} holds non-finite weights ({', '.join(bad[:3])})")


def load_training_state(
    path: str | Path, optimizer: torch.optim.Optimizer, metadata: dict[str, Any]
) -> dict[str, torch.Tensor]:
    """Restore the optimizer and torch's RNG states; return every saved RNG state by name.

    The optimizer file must hold, for every parameter, the same state tensors with the
    parameter's shape (an empty or mismatched file is refused, not silently reset).
    """
    folder = resolve_checkpoint(path)
    try:
        tensors = load_file(str(folder / "optimizer.safetensors"))
        rng = load_file(str(folder / "rng.safetensors"))
    except (SafetensorError, OSError) as err:
        raise CheckpointError(
            f"{folder}: corrupt optimizer or RNG state ({_one_line(err)})"
        ) from None
    if "cpu" not in rng:
        raise CheckpointError(f"{folder}/rng.safetensors is incomplete (no CPU state)")
    params = [p for group in optimizer.param_groups for p in group["params"]]
    if int(metadata.get("step", 0)) > 0:
        for index, param in enumerate(params):
            moments = [tensors.get(f"{index}.{n}") for n in ("exp_avg", "exp_avg_sq")]
            if any(m is None or m.shape != param.shape for m in moments):
                raise CheckpointError(
                    f"{folder}/optimizer.safetensors does not fit the model "
                    f"(parameter {index} of {len(params)}: missing or mismatched moments)"
                )
    if any(not math.isfinite(float(t.float().abs().max())) for t in tensors.values() if t.numel()):
        raise CheckpointError(f"{folder}/optimizer.safetensors holds non-finite values")
    device = params[0].device
    tensors = {k: v if v.ndim == 0 and "step" in k else v.to(device) for k, v in tensors.items()}
    state = _unflatten_optimizer(tensors, metadata["optimizer"])  # KeyError: the caller's
    try:
        optimizer.load_state_dict(state)
    except (ValueError, KeyError, TypeError) as err:
        raise CheckpointError(
            f"{folder}: the optimizer state does not fit ({_one_line(err)})"
        ) from None
    torch.set_rng_state(rng["cpu"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
    return rng


# --------------------------------------------------------------------------------------------
# The model part of a checkpoint, one pair of functions for every kind of policy


def save_model_payload(folder: str | Path, policy: torch.nn.Module) -> None:
    """Write the policy's files into a checkpoint folder.

    Our transformer: ``model.safetensors`` (every weight). A pretrained LM
    (:class:`agents.models.hf.HFPolicy`): ``model.safetensors`` (every weight, or with LoRA the
    adapters and the ``<bkspc>`` rows) and ``hf/`` (the model's config.json and the tokenizer's
    files); :func:`model_metadata` says which.
    """
    folder = Path(folder)
    if hasattr(policy, "trainable_state"):  # an HFPolicy
        from agents.models.hf import save_payload

        save_payload(policy, folder)  # type: ignore[arg-type]
    else:
        save_model(policy, str(folder / "model.safetensors"))


def model_metadata(policy: torch.nn.Module) -> dict[str, Any]:
    """The ``model`` entry of ``checkpoint.json``: what rebuilds the policy around its files."""
    if hasattr(policy, "trainable_state"):
        from agents.models.hf import payload_metadata

        return payload_metadata(policy)  # type: ignore[arg-type]
    return dataclasses.asdict(policy.config)  # type: ignore[call-overload]


def load_policy(path: str | Path, device: str = "cpu") -> tuple[Any, dict[str, Any]]:
    """The policy of a checkpoint (for evaluation, generation, export) and its metadata.

    Reads only the checkpoint (and, for LoRA adapters, their base model): never a task's data.
    """
    from agents.config import resolve_device
    from agents.models.policy import TransformerConfig, TransformerPolicy
    from agents.training.memory import check_memory, policy_bytes
    from seqenv.vocab import vocab_from_json

    path = Path(path)
    metadata = read_metadata(path)
    torch_device = resolve_device(device)
    try:
        vocab = vocab_from_json(metadata["vocab"])
        model = dict(metadata["model"])
        int(metadata["max_length"]), int(metadata["max_steps"])
        metadata["task"]["name"], dict(metadata["task"]["kwargs"])
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise CheckpointError(
            f"{path}: checkpoint.json is incomplete or corrupt ({type(err).__name__}: {err})"
        ) from None
    try:
        if model.get("kind") == "hf":
            from agents.models.hf import payload_policy

            try:
                policy: Any = payload_policy(resolve_checkpoint(path), model)
            except ValueError as err:
                raise CheckpointError(str(err)) from None
            if policy.special != vocab.special:
                raise CheckpointError(
                    f"{path}: the model's special ids differ from the vocabulary's"
                )
            load_weights(path, policy)
        else:
            # A tampered shape must not reach the allocator: the weights' size comes first.
            check_memory(
                policy_bytes(model, vocab.special.num_actions, 1, 1),
                torch.device("cpu"),
                f"{path}: the checkpoint's model",
            )
            policy = TransformerPolicy(vocab.special, TransformerConfig(**model))
            load_weights(path, policy)
    except (KeyError, TypeError) as err:
        raise CheckpointError(f"{path}: checkpoint.json is incomplete or corrupt ({err})") from None
    except OSError as err:
        raise CheckpointError(f"{path}: cannot read the model ({_one_line(err)})") from None
    policy.to(torch_device).eval()
    return policy, metadata
