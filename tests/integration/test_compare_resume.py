"""`seqmatch compare` keeps each finished run on disk, resumes, refuses another config's folder,
and plots curves grouped by agent; run_one is replaced by a counting fake (no training)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from agents import outputs
from agents.cli import main
from agents.experiments import compare_config, single_run, storage
from agents.experiments.compare import run_compare
from agents.experiments.compare_config import CompareConfig
from agents.experiments.storage import RunSpec

AGENTS = "mle,bc,sequencematch"


class FakeRunOne:
    """Stands in for run_one: a row with the shape of a real one; counts its calls and can
    fail on the n-th call (a comparison stopped half way)."""

    def __init__(self, fail_at: int | None = None) -> None:
        self.calls: list[tuple[str, int]] = []
        self.fail_at = fail_at

    def __call__(
        self, config: dict, task: Any, agent: str, seed: int, out: Path, *args: Any, **kw: Any
    ) -> dict[str, Any]:
        if self.fail_at is not None and len(self.calls) == self.fail_at:
            raise KeyboardInterrupt("stopped")
        self.calls.append((agent, seed))
        level = {"mle": 0.3, "bc": 0.5, "sequencematch": 0.8}[agent] + 0.05 * seed
        episodes = [1.0 if i < level * 20 else 0.0 for i in range(20)]
        return {
            "agent": agent,
            "seed": seed,
            "metrics": {
                "accuracy": sum(episodes) / 20,
                "recovery": level / 2,
                "backspace_rate": 0.1,
                "mean_backtrack_length": float("nan"),
            },
            "episode_values": {"accuracy": episodes},
            "curves": [
                {"step": s, "eval/accuracy": level * s / 40, "losses/sm/divergence": 1 - s / 40}
                for s in (10, 20, 30, 40)
            ]
            + [{"step": 20, "eval/recovery": level / 3}],
            "train_seconds": 1.0,
            "eval_seconds": 0.5,
        }


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> FakeRunOne:
    runner = FakeRunOne()
    monkeypatch.setattr(single_run, "run_one", runner)
    return runner


def options(out: Path, **kw: Any) -> CompareConfig:
    settings: dict[str, Any] = {"quick": True, "agents": AGENTS, "seeds": 3, "progress": False}
    return CompareConfig(out=str(out), **{**settings, **kw})


def test_runs_are_written_as_they_finish_and_resume_skips_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "cmp"
    stopping = FakeRunOne(fail_at=4)
    monkeypatch.setattr(single_run, "run_one", stopping)
    with pytest.raises(KeyboardInterrupt):
        run_compare(options(out))
    files = sorted(p.name for p in (out / "runs").glob("*.json"))
    assert files == ["bc-s0.json", "mle-s0.json", "mle-s1.json", "mle-s2.json"]
    assert not list(out.rglob("*.tmp"))  # written through a temporary file, none left
    record = json.loads((out / "runs" / "bc-s0.json").read_text())
    assert record["format"] == 1 and record["row"]["agent"] == "bc"
    assert record["row"]["metrics"]["mean_backtrack_length"] is None  # strict JSON: no NaN
    assert record["config"] == storage.runs_config(compare_config.load_config(options(out)))
    partial = json.loads((out / "results.json").read_text())  # rebuilt after each run
    assert not partial["complete"] and partial["runs_done"] == 4 and partial["runs_total"] == 9
    assert "Partial: 4 of 9 runs finished" in (out / "report.md").read_text()
    assert "[compare] 4/9 done: bc seed 0 (2 s)" in capsys.readouterr().err

    resumed = FakeRunOne()
    monkeypatch.setattr(single_run, "run_one", resumed)
    results = run_compare(options(out, resume=True))
    assert sorted(resumed.calls) == [("bc", 1), ("bc", 2)] + [
        ("sequencematch", s) for s in range(3)
    ]
    assert results["complete"] and len(results["runs"]) == 9
    assert "resuming" in capsys.readouterr().err
    assert (
        json.loads((out / "results.json").read_text())["agents"]["sequencematch"]["accuracy"]["n"]
        == 3
    )

    again = FakeRunOne()  # everything finished: the outputs are rebuilt, nothing retrained
    monkeypatch.setattr(single_run, "run_one", again)
    earlier = json.loads((out / "results.json").read_text())
    earlier["wall_seconds"] = 1000.0  # as if the earlier sessions had taken that long
    (out / "results.json").write_text(json.dumps(earlier))
    rebuilt = run_compare(options(out))
    assert rebuilt["runs_done"] == 9 and again.calls == []
    assert 1000.0 <= rebuilt["wall_seconds"] < 1100.0  # the earlier wall time is kept


def test_more_seeds_reuse_the_finished_ones(tmp_path: Path, fake: FakeRunOne) -> None:
    out = tmp_path / "cmp"
    run_compare(options(out, agents="mle"))
    run_compare(CompareConfig(quick=True, agents="mle", seeds=4, out=str(out), progress=False))
    assert fake.calls == [("mle", 0), ("mle", 1), ("mle", 2), ("mle", 3)]


def test_a_folder_of_another_config_is_refused_unless_overwrite(
    tmp_path: Path, fake: FakeRunOne, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "cmp"
    run_compare(options(out, agents="mle"))
    before = (out / "runs" / "mle-s0.json").read_text()
    capsys.readouterr()
    argv = ["compare", "--agents", "mle", "--seeds", "3", "--out", str(out), "--no-progress"]
    assert main(argv) == 1  # not --quick: another training budget
    err = capsys.readouterr().err.strip()
    assert "runs of a different config (runs/mle-s0.json)" in err and "--overwrite" in err
    assert len(err.splitlines()) == 1
    assert (out / "runs" / "mle-s0.json").read_text() == before  # untouched
    assert len(fake.calls) == 3

    assert main([*argv, "--overwrite"]) == 0
    assert len(fake.calls) == 6
    record = json.loads((out / "runs" / "mle-s0.json").read_text())
    assert record["config"]["train"]["steps"] == compare_config.DEFAULT_CONFIG["train"]["steps"]


def test_runs_from_other_library_defaults_are_not_resumed(
    tmp_path: Path, fake: FakeRunOne, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A default changed in the code (not in the config file) changes the runs: no silent reuse."""
    out = tmp_path / "cmp"
    run_compare(options(out, agents="mle"))
    record = json.loads((out / "runs" / "mle-s0.json").read_text())
    assert record["config"]["library_defaults"]["level_penalty"] == 0.01
    changed = {**compare_config.library_defaults(), "level_penalty": 0.5}
    monkeypatch.setattr(compare_config, "library_defaults", lambda: changed)
    with pytest.raises(FileExistsError, match="runs of a different config"):
        run_compare(options(out, agents="mle"))
    run_compare(options(out, agents="mle", overwrite=True))
    assert len(fake.calls) == 6
    record = json.loads((out / "runs" / "mle-s0.json").read_text())
    assert record["config"]["library_defaults"]["level_penalty"] == 0.5


def test_resume_needs_runs_and_a_legacy_comparison_is_kept(
    tmp_path: Path, fake: FakeRunOne
) -> None:
    with pytest.raises(ValueError, match="no finished runs"):
        run_compare(options(tmp_path / "empty", resume=True))
    assert not (tmp_path / "empty").exists()  # a failed start leaves no folder
    legacy = tmp_path / "old"  # from before per-run files (and before the marker)
    legacy.mkdir()
    text = '{"task": "arithmetic", "config": {"task": "arithmetic"}, "runs": []}'
    (legacy / "results.json").write_text(text)
    with pytest.raises(FileExistsError, match="a finished comparison without per-run files"):
        run_compare(options(legacy))
    assert (legacy / "results.json").read_text() == text and fake.calls == []
    # A results.json that is no comparison's: a user's folder, refused as such.
    users = tmp_path / "users"
    users.mkdir()
    (users / "results.json").write_text('{"task": "arithmetic"}')
    with pytest.raises(FileExistsError, match="is not a seqmatch comparison"):
        run_compare(options(users))
    assert sorted(p.name for p in users.iterdir()) == ["results.json"]


def test_a_comparison_from_before_the_marker_resumes_and_is_marked(
    tmp_path: Path, fake: FakeRunOne
) -> None:
    """Committed benchmark folders and folders of a run of the old code have run files and
    results.json but no marker: recognised from them, resumed, marked; --overwrite then
    removes what the comparison wrote and nothing else."""
    out = tmp_path / "cmp"
    stopped = FakeRunOne(fail_at=2)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(single_run, "run_one", stopped)
        with pytest.raises(KeyboardInterrupt):
            run_compare(options(out, agents="mle"))
    for name in ("seqmatch-comparison", outputs.MANIFEST, outputs.LOCK):
        (out / name).unlink()  # as the old code left it
    (out / "notes.txt").write_text("mine")
    run_compare(options(out, agents="mle"))
    assert fake.calls == [("mle", 2)]  # the two finished runs kept
    assert outputs.owner(out) == "comparison"
    assert {"runs/mle-s0.json", "runs/mle-s1.json", "results.json"} <= outputs.listed(out)
    run_compare(options(out, agents="mle", seeds=2, quick=False, overwrite=True))
    assert (out / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in (out / "runs").glob("*.json")) == ["mle-s0.json", "mle-s1.json"]


def test_a_stopped_runs_tensorboard_folder_is_cleared_before_its_rerun(
    tmp_path: Path, fake: FakeRunOne
) -> None:
    out = tmp_path / "cmp"
    stale = out / "runs" / "mle-s0"  # a run stopped in an earlier session: listed as ours
    stale.mkdir(parents=True)
    (stale / "events.out.tfevents.1.host").write_bytes(b"partial")
    outputs.mark(out, "comparison")
    outputs.record(out, "runs/mle-s0", "runs/mle-s1")
    kept = out / "runs" / "mle-s1"  # listed, but holds a user's file
    kept.mkdir()
    (kept / "notes.txt").write_text("mine")
    unlisted = out / "runs" / "mle-s2"  # event files only, but never written by seqmatch
    unlisted.mkdir()
    (unlisted / "events.out.tfevents.2.host").write_bytes(b"someone else's")
    run_compare(options(out, agents="mle"))
    assert not stale.exists() and (kept / "notes.txt").read_text() == "mine"
    assert (unlisted / "events.out.tfevents.2.host").read_bytes() == b"someone else's"


def test_atomic_write_leaves_the_old_file_on_failure(tmp_path: Path) -> None:
    path = tmp_path / "runs" / "mle-s0.json"
    storage.write_json_atomic(path, {"a": 1})
    with pytest.raises(TypeError):
        storage.write_json_atomic(path, {"a": object()})
    assert json.loads(path.read_text()) == {"a": 1}
    assert [p.name for p in path.parent.iterdir()] == ["mle-s0.json"]


def test_curves_are_grouped_by_agent_and_the_report_shows_differences(
    tmp_path: Path, fake: FakeRunOne
) -> None:
    import matplotlib.pyplot as plt

    out = tmp_path / "cmp"
    calls: list[tuple[str, int]] = []
    real_plot = plt.Axes.plot

    def counting_plot(self: Any, *args: Any, **kw: Any) -> Any:
        calls.append((str(kw.get("label")), len(args[0])))
        return real_plot(self, *args, **kw)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(plt.Axes, "plot", counting_plot)
        results = run_compare(options(out))
    # One line per agent and plot (3 seeds each), not one per seed.
    score = [c for c in calls if c[1] == 4][:3]
    assert [label for label, _ in score] == [
        f"{a} (3 seeds)" for a in ("mle", "bc", "sequencematch")
    ]
    for name in (
        "curves_score.png",
        "curves_divergence.png",
        "curves_eval_recovery.png",
        "metrics.png",
    ):
        assert (out / name).stat().st_size > 1000
    mean, low, high = compare_curve(results, "sequencematch", "eval/accuracy")
    assert low[-1] < mean[-1] < high[-1] and mean[-1] == pytest.approx(0.85)
    report = (out / "report.md").read_text()
    assert "SequenceMatch − MLE" in report and "SequenceMatch − BC" in report
    assert "curves_eval_recovery.png" in report and "PPO: not in this run" in report
    diff = results["differences"]["sequencematch - mle"]["accuracy"]
    assert diff["better"] == "sequencematch" and diff["ci95"][0] > 0


def test_sweep_runs_have_their_own_files_and_resume(tmp_path: Path, fake: FakeRunOne) -> None:
    config = {**compare_config.DEFAULT_CONFIG, "name": "with-sweep"}
    config["sweep"] = {"param": "eta", "values": [0.1, 0.5], "agents": ["sequencematch"]}
    path = tmp_path / "sweep.json"
    path.write_text(json.dumps(config))
    out = tmp_path / "cmp"
    settings = {"config": str(path), "agents": "mle", "seeds": 2}
    results = run_compare(options(out, **settings))
    names = sorted(p.name for p in (out / "sweep" / "runs").glob("*.json"))
    assert names == sorted(f"sequencematch-s{s}-eta={v}.json" for v in (0.1, 0.5) for s in (0, 1))
    assert set(results["sweep"]["by_value"]["sequencematch"]) == {"0.1", "0.5"}
    assert len(fake.calls) == 6
    run_compare(options(out, **settings))
    assert len(fake.calls) == 6


def compare_curve(results: dict, agent: str, key: str) -> tuple[list[float], ...]:
    from agents.experiments.report import grouped_curve

    curve = grouped_curve([r for r in results["runs"] if r["agent"] == agent], key)
    assert curve is not None
    return curve[1:]


def test_run_spec_paths(tmp_path: Path) -> None:
    assert RunSpec("bc", 2, tmp_path).path == tmp_path / "runs" / "bc-s2.json"
    sweep = RunSpec("bc", 0, tmp_path / "sweep", (("eta", 0.5),))
    assert sweep.path == tmp_path / "sweep" / "runs" / "bc-s0-eta=0.5.json"
    assert sweep.describe() == "bc seed 0 eta=0.5"


@pytest.mark.slow
def test_two_jobs_give_the_runs_of_one_job(tmp_path: Path) -> None:
    def rows(jobs: int) -> dict[str, Any]:
        out = tmp_path / f"jobs{jobs}"
        argv = ["compare", "--quick", "--agents", "mle,sequencematch", "--seeds", "1"]
        assert main([*argv, "--out", str(out), "--jobs", str(jobs), "--no-progress"]) == 0
        found = {}
        for path in sorted((out / "runs").glob("*.json")):
            row = json.loads(path.read_text())["row"]
            found[path.name] = {k: v for k, v in row.items() if not k.endswith("_seconds")}
        return found

    one, two = rows(1), rows(2)
    assert set(one) == {"mle-s0.json", "sequencematch-s0.json"}
    assert one == two


def test_targets_are_answered_in_the_report(tmp_path: Path, fake: FakeRunOne) -> None:
    config = {**compare_config.DEFAULT_CONFIG, "name": "with-targets"}
    config["targets"] = [
        {"text": "SM at least MLE + 0.4", "metric": "accuracy", "agent": "sequencematch",
         "other": "mle", "relation": ">=", "offset": 0.4},
        {"text": "SM at most half of BC", "metric": "accuracy", "agent": "sequencematch",
         "other": "bc", "relation": "<=", "scale": 0.5},
        {"text": "needs PPO", "metric": "accuracy", "agent": "sequencematch", "other": "ppo",
         "relation": ">="},
    ]  # fmt: skip
    path = tmp_path / "targets.json"
    path.write_text(json.dumps(config))
    out = tmp_path / "out"
    run_compare(CompareConfig(config=str(path), out=str(out), agents=AGENTS, progress=False))
    results = json.loads((out / "results.json").read_text())
    first, second, third = results["targets"]
    # The fake's accuracies: SM 0.8/0.85/0.9 (mean 0.85) over 3 seeds, MLE 0.35, BC 0.55.
    assert first["met"] is True and first["bound"] == pytest.approx(0.35 + 0.4)
    assert first["diff"] == pytest.approx(0.85 - 0.35 - 0.4)
    assert first["ci95"][0] <= first["diff"] <= first["ci95"][1]
    assert second["met"] is False and second["bound"] == pytest.approx(0.55 / 2)
    assert third["met"] is None
    report = (out / "report.md").read_text()
    assert "## Targets" in report and "SM at least MLE + 0.4: **met**" in report
    assert (
        "SM at most half of BC: **not met**" in report and "needs PPO: **not measured**" in report
    )


def test_a_run_stopped_mid_way_resumes_from_its_last_save(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """With train.save_interval, a run continues from its checkpoint and ends where an
    uninterrupted run does, its learning curve whole."""
    config_file = tmp_path / "saving.json"
    config = {
        **compare_config.DEFAULT_CONFIG,
        "name": "saving",
        "seeds": 1,
        "train": {**compare_config.DEFAULT_CONFIG["train"], "save_interval": 4},
    }
    config_file.write_text(json.dumps(config))
    settings: dict[str, Any] = {
        "config": str(config_file),
        "agents": "mle",
        "quick": True,
        "seeds": 1,
        "progress": False,
    }
    whole = run_compare(CompareConfig(out=str(tmp_path / "whole"), **settings))

    out = tmp_path / "stopped"
    loaded = compare_config.load_config(CompareConfig(out=str(out), **settings))
    first = compare_config.train_config(loaded, "mle", 0, out, "cpu", False)
    single_run.save_and_resume(first, out)
    trainer = single_run.Trainer(first, task=compare_config.comparison_task(loaded))
    step = trainer.train_step

    def killed_after_update_9(logger: Any) -> None:  # the save at update 8 is the last
        if trainer.step == 9:
            raise KeyboardInterrupt
        step(logger)

    trainer.train_step = killed_after_update_9  # type: ignore[method-assign]
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    resumed = run_compare(CompareConfig(out=str(out), **settings))
    assert "mle-s0: resuming from" in capsys.readouterr().err
    (row,) = resumed["runs"]
    assert row["metrics"] == whole["runs"][0]["metrics"]
    assert [r["step"] for r in row["curves"]] == [r["step"] for r in whole["runs"][0]["curves"]]
    assert (out / "checkpoints" / "mle-s0" / "seqmatch-checkpoint").is_file()


def test_sigterm_stops_like_ctrl_c_and_keeps_the_finished_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    runner = FakeRunOne()

    def terminated_on_the_third_run(*args: Any, **kw: Any) -> dict[str, Any]:
        if len(runner.calls) == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return runner(*args, **kw)

    monkeypatch.setattr(single_run, "run_one", terminated_on_the_third_run)
    with pytest.raises(KeyboardInterrupt, match="signal"):
        run_compare(options(tmp_path / "cmp"))
    assert len(list((tmp_path / "cmp" / "runs").glob("*.json"))) == 2
    assert "Partial: 2 of 9" in (tmp_path / "cmp" / "report.md").read_text()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # restored


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc")
def test_a_worker_exits_when_its_parent_is_killed(tmp_path: Path) -> None:
    child = (
        "import sys, time; from agents.experiments.pool import exit_with_parent; "
        "exit_with_parent(int(sys.argv[1])); time.sleep(120)"
    )
    parent = (
        "import os, subprocess, sys, time; "
        f"p = subprocess.Popen([sys.executable, '-c', {child!r}, str(os.getpid())]); "
        "print(p.pid, flush=True); time.sleep(120)"
    )
    proc = subprocess.Popen([sys.executable, "-c", parent], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    worker = int(proc.stdout.readline())
    assert _alive(worker)  # it watches from the moment it has imported compare
    proc.kill()
    proc.wait()
    deadline = time.monotonic() + 20.0
    while _alive(worker) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _alive(worker)


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, exited but not yet reaped, counts as gone)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "State:\tZ" not in status
