"""Checkpoints: safetensors for tensors, JSON for everything else, written atomically.

A checkpoint is a folder::

    model.safetensors       the policy's weights
    optimizer.safetensors   the optimizer's state tensors (AdamW moments, step counts)
    rng.safetensors         torch's RNG states (CPU, and CUDA when used)
    checkpoint.json         format, step, config, vocabulary, task, optimizer hyperparameters,
                            numpy RNG state, replay buffer, last evaluation

Nothing is ever unpickled: safetensors holds plain tensors and JSON holds the rest. The folder is
written under a temporary name and renamed into place, so a crash never leaves a half-written
checkpoint where a resume would find it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, load_model, save_file, save_model

FORMAT = 1
FILES = ("model.safetensors", "optimizer.safetensors", "rng.safetensors", "checkpoint.json")


class CheckpointError(ValueError):
    """A checkpoint that is missing, incomplete, corrupt or does not fit what it is loaded into."""


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


def save_checkpoint(
    path: str | Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None,
    metadata: dict[str, Any],
    rng_states: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write a checkpoint folder at ``path`` atomically (replacing an older one).

    ``rng_states`` are the states of the caller's own ``torch.Generator``s, saved beside torch's
    global ones.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        save_model_payload(tmp, model)
        opt_tensors, opt_rest = (
            _flatten_optimizer(optimizer.state_dict()) if optimizer else ({}, {})
        )
        save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
        rng = {"cpu": torch.get_rng_state(), **(rng_states or {})}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            rng["cuda"] = torch.cuda.get_rng_state()
        save_file(rng, str(tmp / "rng.safetensors"))
        document = {"format": FORMAT, **metadata, "optimizer": opt_rest}
        (tmp / "checkpoint.json").write_text(json.dumps(document, indent=1) + "\n")
        old = None
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
            os.replace(path, old / path.name)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def _one_line(err: BaseException, limit: int = 300) -> str:
    """An exception's message on one line (torch's load errors list every tensor, a line each)."""
    text = " ".join(str(err).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The JSON part of a checkpoint, after checking that the folder is complete."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint")
    if not path.is_dir():
        raise CheckpointError(f"{path}: a checkpoint is a folder, this is a file")
    missing = [name for name in FILES if not (path / name).is_file()]
    if missing:
        raise CheckpointError(f"{path}: not a complete checkpoint (missing {', '.join(missing)})")
    try:
        document = json.loads((path / "checkpoint.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path}/checkpoint.json is corrupt ({err})") from None
    if not isinstance(document, dict):
        raise CheckpointError(f"{path}/checkpoint.json is corrupt (not a JSON object)")
    if document.get("format") != FORMAT:
        raise CheckpointError(f"{path}: unknown checkpoint format {document.get('format')!r}")
    return document


def load_weights(path: str | Path, model: torch.nn.Module) -> None:
    """Load ``model.safetensors`` into ``model`` (strict: every tensor must match; for a LoRA
    policy, every trainable tensor: the frozen base is not in the file)."""
    file = Path(path) / "model.safetensors"
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


def load_training_state(
    path: str | Path, optimizer: torch.optim.Optimizer, metadata: dict[str, Any]
) -> dict[str, torch.Tensor]:
    """Restore the optimizer and torch's RNG states; return every saved RNG state by name."""
    path = Path(path)
    try:
        tensors = load_file(str(path / "optimizer.safetensors"))
        rng = load_file(str(path / "rng.safetensors"))
    except (SafetensorError, OSError) as err:
        raise CheckpointError(
            f"{path}: corrupt optimizer or RNG state ({_one_line(err)})"
        ) from None
    device = next(iter(optimizer.param_groups[0]["params"])).device
    tensors = {k: v if v.ndim == 0 and "step" in k else v.to(device) for k, v in tensors.items()}
    optimizer.load_state_dict(_unflatten_optimizer(tensors, metadata["optimizer"]))
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
    from agents.models.policy import TransformerConfig, TransformerPolicy
    from agents.training.config import resolve_device
    from seqenv.vocab import vocab_from_json

    path = Path(path)
    metadata = read_metadata(path)
    try:
        vocab = vocab_from_json(metadata["vocab"])
        model = metadata["model"]
        if model.get("kind") == "hf":
            from agents.models.hf import load_payload

            policy: Any = load_payload(path, model)
            if policy.special != vocab.special:
                raise CheckpointError(
                    f"{path}: the model's special ids differ from the vocabulary's"
                )
        else:
            policy = TransformerPolicy(vocab.special, TransformerConfig(**model))
            load_weights(path, policy)
    except (KeyError, TypeError) as err:
        raise CheckpointError(f"{path}: checkpoint.json is incomplete or corrupt ({err})") from None
    except OSError as err:
        raise CheckpointError(f"{path}: cannot read the model ({_one_line(err)})") from None
    policy.to(resolve_device(device)).eval()
    return policy, metadata
