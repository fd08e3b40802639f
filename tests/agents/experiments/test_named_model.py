"""A comparison names its pretrained model by file and content, not by one machine's path."""

from __future__ import annotations

import hashlib
from pathlib import Path

from agents.experiments.compare import model_identity, named_model


def test_a_model_file_is_named_by_its_name_and_sha256(tmp_path: Path) -> None:
    model = tmp_path / "deep" / "SmolLM2.gguf"
    model.parent.mkdir()
    model.write_bytes(b"weights" * 1000)
    config = {"task": "text", "train": {"model": str(model), "steps": 2}}
    command = f"seqmatch compare --model {model} --seeds 3"
    shown, line = named_model(config, command)
    expected = {"file": "SmolLM2.gguf", "sha256": hashlib.sha256(b"weights" * 1000).hexdigest()}
    assert shown["train"] == {"model": expected, "steps": 2}
    assert line == "seqmatch compare --model SmolLM2.gguf --seeds 3"
    assert str(tmp_path) not in repr(shown) + line
    assert config["train"]["model"] == str(model)  # the run's own config is left alone


def test_a_model_folder_hashes_its_files_and_no_model_changes_nothing(tmp_path: Path) -> None:
    folder = tmp_path / "hf-model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(b"\0" * 64)
    first = model_identity(str(folder))
    assert first["file"] == "hf-model" and len(first["sha256"]) == 64
    (folder / "config.json").write_text('{"changed": 1}')
    assert model_identity(str(folder))["sha256"] != first["sha256"]
    config = {"task": "dyck", "train": {"steps": 2}}
    assert named_model(config, "seqmatch compare") == (config, "seqmatch compare")
