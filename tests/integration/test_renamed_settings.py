"""The disturbance's old names (``noise``, ``noise_type``) still work for one release.

The command line and config files take them with a one-line warning; a checkpoint and a
comparison folder written before the rename (built here by writing the old key names where the
code of that time wrote them) load, resume and report, without one.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from agents.cli import main
from agents.config import TrainConfig, saved_settings
from agents.deprecated import renamed_config, renamed_flags, renamed_settings
from agents.experiments import compare_config, single_run, storage
from agents.experiments.compare import run_compare
from agents.experiments.compare_config import CompareConfig, load_config
from agents.training.checkpoint import read_metadata, resolve_checkpoint
from seqenv.disturbance import DISTURBANCE_KINDS, Disturbance, resolve_disturbance
from seqenv.env import SequenceGenEnv
from tests.integration.conftest import TINY
from tests.integration.test_compare_resume import FakeRunOne

OLD = {"disturbance": "noise", "disturbance_type": "noise_type"}


def _old_names(settings: dict[str, Any]) -> dict[str, Any]:
    """``settings`` as the code before the rename wrote them."""
    return {OLD.get(k, k): v for k, v in settings.items()}


def test_old_flags_are_renamed_with_one_warning_each(capsys: pytest.CaptureFixture[str]) -> None:
    args = ["--noise", "0.2", "--noise-type=ground_truth", "--seed", "1", "--", "--noise"]
    assert renamed_flags(args, "train") == [
        "--disturbance", "0.2", "--disturbance-type=ground_truth", "--seed", "1", "--", "--noise",
    ]  # fmt: skip
    err = capsys.readouterr().err.splitlines()
    assert err == [
        "warning: seqmatch train: --noise is deprecated, use --disturbance",
        "warning: seqmatch train: --noise-type is deprecated, use --disturbance-type",
    ]
    assert main(["show", "--noise", "0.5", "--noise-type", "ground_truth"]) == 0
    old = capsys.readouterr()
    assert main(["show", "--disturbance", "0.5", "--disturbance-type", "ground_truth"]) == 0
    new = capsys.readouterr()
    assert old.out == new.out  # the same disturbed episode
    assert new.err == "" and len(old.err.splitlines()) == 2
    assert main(["show", "--disturbance", "1.5"]) == 1
    assert "disturbance must be in [0, 1], got 1.5" in capsys.readouterr().err


def test_old_config_keys_are_read_with_a_warning(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    new = load_config(CompareConfig(config="dyck_small_cpu"))
    assert capsys.readouterr().err == ""
    shipped = json.loads((compare_config.configs_dir() / "dyck_small_cpu.json").read_text())
    old = {
        **shipped,
        "train": _old_names(shipped["train"]),
        "agents": {name: _old_names(block) for name, block in shipped["agents"].items()},
    }
    path = tmp_path / "dyck_small_cpu.json"
    path.write_text(json.dumps(old))
    assert "noise" in old["train"] and "noise" in old["agents"]["dagger"]
    assert load_config(CompareConfig(config=str(path))) == new
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 4 and all(e.startswith("warning: config 'dyck_small_cpu'") for e in err)
    assert "train: noise is deprecated, use disturbance" in err[0]
    with pytest.raises(ValueError, match=r"noise=0\.2 contradicts disturbance=0\.1"):
        renamed_settings({"noise": 0.2, "disturbance": 0.1}, "config")
    assert renamed_settings({"noise": 0.1, "disturbance": 0.1}) == {"disturbance": 0.1}


def test_a_checkpoint_from_before_the_rename_resumes_and_reports(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], one_thread: None
) -> None:
    run = ["--agent", "bc", *TINY, "--lr-schedule-steps", "4", "--logdir", str(tmp_path / "runs")]
    run += ["--name", "run", "--save", str(tmp_path / "run")]
    assert main(["train", *run, "--disturbance", "0.2", "--steps", "2"]) == 0
    meta_path = resolve_checkpoint(tmp_path / "run") / "checkpoint.json"
    metadata = json.loads(meta_path.read_text())
    metadata["config"] = _old_names(metadata["config"])  # as written before the rename
    assert "noise" in metadata["config"] and "disturbance" not in metadata["config"]
    meta_path.write_text(json.dumps(metadata))
    assert saved_settings(metadata["config"])["disturbance"] == 0.2
    capsys.readouterr()
    assert main(["train", *run, "--steps", "3", "--resume"]) == 1  # today's default differs
    assert "disturbance (checkpoint 0.2, now 0.1)" in capsys.readouterr().err
    assert main(["train", *run, "--noise", "0.2", "--steps", "4", "--resume"]) == 0
    assert read_metadata(tmp_path / "run")["step"] == 4
    capsys.readouterr()
    metrics = tmp_path / "eval.json"
    assert main(["eval", "--checkpoint", str(tmp_path / "run"), "--json", str(metrics)]) == 0
    assert json.loads(metrics.read_text())


def test_a_comparison_from_before_the_rename_resumes_and_reports(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "cmp"
    options = CompareConfig(out=str(out), quick=True, agents="mle,bc", seeds=2, progress=False)
    first = FakeRunOne(fail_at=3)
    monkeypatch.setattr(single_run, "run_one", first)
    with pytest.raises(KeyboardInterrupt):
        run_compare(options)
    # Rewrite what it wrote as the code before the rename wrote it: old keys in every config.
    for path in [*(out / "runs").glob("*.json"), out / "results.json"]:
        record = json.loads(path.read_text())
        config = record["config"]
        config["train"] = {**config["train"], "noise": 0.1}  # a stated default, by its old name
        config["library_defaults"] = _old_names(config["library_defaults"])
        config["agents"] = {k: _old_names(v) for k, v in config.get("agents", {}).items()}
        assert "noise" in config["library_defaults"]
        path.write_text(json.dumps(record))
    assert storage.runs_config(config) == storage.runs_config(renamed_config(config))
    resumed = FakeRunOne()
    monkeypatch.setattr(single_run, "run_one", resumed)
    results = run_compare(CompareConfig(**{**vars(options), "resume": True}))
    assert resumed.calls == [("bc", 1)]  # the three old runs are kept, not retrained
    assert results["complete"] and len(results["runs"]) == 4
    assert "BC" in (out / "report.md").read_text()


def test_one_validation_wherever_a_disturbance_is_given() -> None:
    for make in (
        lambda: Disturbance(1.5),
        lambda: resolve_disturbance(1.5),
        lambda: SequenceGenEnv(task="dyck", disturbance=1.5),
        lambda: TrainConfig(disturbance=1.5).validate(),
    ):
        with pytest.raises(ValueError, match=r"^disturbance must be in \[0, 1\], got 1\.5$"):
            make()
    kinds = ", ".join(DISTURBANCE_KINDS)
    for make in (
        lambda: Disturbance(0.1, "gaussian"),  # type: ignore[arg-type]
        lambda: SequenceGenEnv(task="dyck", disturbance=0.1, disturbance_type="gaussian"),
        lambda: TrainConfig(disturbance_type="gaussian").validate(),  # type: ignore[arg-type]
    ):
        with pytest.raises(ValueError, match=f"^disturbance_type must be one of {kinds}, got"):
            make()


def test_a_sweep_over_the_old_name_resumes_from_its_run_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    fake = FakeRunOne()
    monkeypatch.setattr(single_run, "run_one", fake)
    config = {**compare_config.DEFAULT_CONFIG, "name": "with-sweep"}
    config["sweep"] = {"param": "noise", "values": [0.05, 0.2], "agents": ["bc"]}
    path = tmp_path / "sweep.json"
    path.write_text(json.dumps(config))
    out = tmp_path / "cmp"
    options = CompareConfig(
        out=str(out), quick=True, agents="mle", seeds=1, progress=False, config=str(path)
    )
    run_compare(options)
    assert "sweep.param: noise is deprecated, use disturbance" in capsys.readouterr().err
    runs = out / "sweep" / "runs"
    for new in runs.glob("*.json"):  # as the code before the rename named them
        new.rename(new.with_name(new.name.replace("-disturbance=", "-noise=")))
    assert sorted(p.name for p in runs.glob("*.json")) == [
        "bc-s0-noise=0.05.json",
        "bc-s0-noise=0.2.json",
    ]
    calls = len(fake.calls)
    results = run_compare(options)
    assert len(fake.calls) == calls  # nothing retrained
    assert set(results["sweep"]["by_value"]["bc"]) == {"0.05", "0.2"}
