"""End to end on the CPU: `seqmatch train` (SequenceMatch on Dyck, rollouts included) writes
TensorBoard scalars in every namespace, a loss that goes down and a checkpoint that `seqmatch
eval` and `seqmatch generate` load. The training run happens once per module (~10 s).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from agents.cli import main
from tests.integration.conftest import TINY, check_ok, cli_env, free_port, run_cli

STEPS = 150
SM_WARMUP = 50  # SequenceMatch (with rollouts) runs for the last 100 updates
LOG_INTERVAL = 5
RUN = "sm-dyck"


@dataclass(frozen=True)
class TrainedRun:
    root: Path
    logdir: Path
    checkpoint: Path
    json: Path


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> TrainedRun:
    root = tmp_path_factory.mktemp("train-cli")
    result = run_cli(
        "train", "--agent", "sequencematch", *TINY,
        "--steps", str(STEPS), "--sm-warmup", str(SM_WARMUP),
        "--k-sample", "7", "--rollouts", "16", "--buffer-size", "64",
        "--lr-warmup", "10",
        "--eval-interval", "50", "--eval-episodes", "16", "--log-interval", str(LOG_INTERVAL),
        "--logdir", "runs", "--name", RUN, "--save", "ckpt", "--json", "out/train.json",
        cwd=root,
    )  # fmt: skip
    check_ok(result)
    return TrainedRun(root, root / "runs", root / "ckpt", root / "out" / "train.json")


def _scalars(run_dir: Path) -> EventAccumulator:
    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    events.Reload()
    return events


def test_train_writes_scalars_in_every_namespace(trained: TrainedRun) -> None:
    run_dir = trained.logdir / RUN
    assert len(list(run_dir.glob("events.out.tfevents.*"))) == 1
    tags = set(_scalars(run_dir).Tags()["scalars"])
    expected = {
        # warm start (the BC objective) and SequenceMatch (the Mixture: bc/ and sm/ parts)
        "losses/loss", "losses/nll", "losses/bc/nll", "losses/sm/divergence",
        "losses/sm/data_term", "losses/sm/model_term", "losses/sm/value_term",
        "losses/sm/r_data", "losses/sm/r_model", "losses/backspace_rate_model",
        "train/lr", "train/grad_norm", "train/sequencematch_active", "train/updates_per_s",
        "eval/invalid_rate", "eval/backspace_rate", "eval/termination_rate", "eval/length",
        "eval/divergence", "eval/disturbed/invalid_rate", "train/grad_share_sm",
        "rollout/backspace_rate", "rollout/terminated",
    }  # fmt: skip
    assert expected <= tags, f"missing: {sorted(expected - tags)}"
    assert {tag.split("/")[0] for tag in tags} == {"losses", "train", "eval", "rollout"}


def test_sequencematch_phase_runs_with_rollouts(trained: TrainedRun) -> None:
    events = _scalars(trained.logdir / RUN)
    active = {e.step: e.value for e in events.Scalars("train/sequencematch_active")}
    # Logged every LOG_INTERVAL updates: the mean of the flag over the updates since the last log.
    assert all(v == 0.0 for step, v in active.items() if step <= SM_WARMUP)
    assert all(v == 1.0 for step, v in active.items() if step > SM_WARMUP)
    rollout_steps = [e.step for e in events.Scalars("rollout/terminated")]
    assert rollout_steps == list(range(SM_WARMUP + LOG_INTERVAL, STEPS + 1, LOG_INTERVAL))
    divergence = [e.value for e in events.Scalars("losses/sm/divergence")]
    assert all(np.isfinite(divergence))
    assert [e.step for e in events.Scalars("eval/invalid_rate")] == [50, 100, 150]


def test_loss_goes_down(trained: TrainedRun) -> None:
    """The behaviour-cloning NLL on the (noise-augmented) data, the one term that both phases
    optimise: ``losses/nll`` in the warm start, ``losses/bc/nll`` (the BC part of the Mixture)
    after it. Means of the first and last 4 logged points (20 updates each)."""
    events = _scalars(trained.logdir / RUN)
    curve = {e.step: e.value for e in events.Scalars("losses/nll")}
    sm_curve = {e.step: e.value for e in events.Scalars("losses/bc/nll")}
    assert not set(curve) & set(sm_curve)
    curve.update(sm_curve)
    steps = sorted(curve)
    assert steps == list(range(LOG_INTERVAL, STEPS + 1, LOG_INTERVAL))
    early = float(np.mean([curve[s] for s in steps[:4]]))
    late = float(np.mean([curve[s] for s in steps[-4:]]))
    # Measured: ~1.83 -> ~1.45 nats; the margin is several times the step-to-step noise.
    assert late < early - 0.15, f"NLL went from {early:.3f} to {late:.3f}"
    assert all(np.isfinite(list(curve.values())))


def test_train_json_and_checkpoint(trained: TrainedRun) -> None:
    document = json.loads(trained.json.read_text())
    assert document["step"] == STEPS
    assert {"eval/invalid_rate", "eval/backspace_rate"} <= set(document["metrics"])
    assert document["config"]["agent"] == "sequencematch"
    step = f"step-{STEPS:09d}"
    assert sorted(p.name for p in trained.checkpoint.iterdir()) == sorted(
        ["seqmatch-checkpoint", "latest", step, "seqmatch-manifest.json", "seqmatch.lock"]
    )
    assert json.loads((trained.checkpoint / "seqmatch-manifest.json").read_text())["written"] == [
        step
    ]
    files = sorted(p.name for p in (trained.checkpoint / step).iterdir())
    assert files == sorted(
        ["model.safetensors", "optimizer.safetensors", "rng.safetensors", "checkpoint.json"]
    )
    assert json.loads((trained.checkpoint / step / "checkpoint.json").read_text())["step"] == STEPS
    # Atomic writes leave no temporary files or folders behind.
    assert not [p for p in trained.root.rglob(".*") if "tmp" in p.name or "old" in p.name]


def test_eval_loads_the_checkpoint(trained: TrainedRun) -> None:
    result = run_cli(
        "eval", "--checkpoint", str(trained.checkpoint), "--episodes", "16",
        "--device", "cpu", "--json", "out/eval.json", cwd=trained.root,
    )  # fmt: skip
    check_ok(result)
    metrics = json.loads((trained.root / "out" / "eval.json").read_text())["metrics"]
    assert 0.0 <= metrics["task/invalid_rate"] <= 1.0
    assert 0.0 <= metrics["task/backspace_rate"] <= 1.0
    assert "task/invalid_rate:" in result.stdout


def test_generate_loads_the_checkpoint(
    trained: TrainedRun, capsys: pytest.CaptureFixture[str], one_thread: None
) -> None:
    args = ["generate", "--checkpoint", str(trained.checkpoint), "--prompt", "^", "--num", "3"]
    assert main([*args, "--trace", "--seed", "1", "--device", "cpu"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 6  # a text and its action trace per sample
    texts, traces = lines[0::2], lines[1::2]
    assert all(set(text) <= set("()[]") for text in texts)
    assert all(trace.startswith("  actions: ") for trace in traces)
    # Seeded: the same command gives the same samples.
    assert main([*args, "--trace", "--seed", "1", "--device", "cpu"]) == 0
    assert capsys.readouterr().out.splitlines() == lines


@pytest.mark.parametrize("command", ["train", "eval", "generate"])
def test_help(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([command, "--help"]) == 0
    assert f"usage: seqmatch {command}" in capsys.readouterr().out


def test_help_of_the_installed_command(tmp_path: Path) -> None:
    script = Path(sys.executable).parent / "seqmatch"
    command = [str(script)] if script.exists() else [sys.executable, "-m", "agents.cli"]
    result = subprocess.run(
        [*command, "train", "--help"], cwd=tmp_path, env=cli_env(), capture_output=True,
        text=True, timeout=280, check=False,
    )  # fmt: skip
    check_ok(result)
    assert "usage: seqmatch train" in result.stdout
    assert not result.stderr


def _get_json(url: str) -> object:
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.loads(response.read())


@pytest.mark.slow
def test_tensorboard_serves_the_run(trained: TrainedRun) -> None:
    """A TensorBoard server on 127.0.0.1 reads the run's scalars over its HTTP API."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        [sys.executable, "-m", "tensorboard.main", "--logdir", str(trained.logdir),
         "--host", "127.0.0.1", "--port", str(port), "--reload_interval", "1"],
        env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        tags: dict = {}
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            if server.poll() is not None:
                stderr = server.stderr.read() if server.stderr else ""
                pytest.fail(f"tensorboard exited {server.returncode}: {stderr[-2000:]}")
            try:
                found = _get_json(f"{base}/data/plugin/scalars/tags")
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                found = {}
            if isinstance(found, dict) and "losses/sm/divergence" in found.get(RUN, {}):
                tags = found[RUN]
                break
            time.sleep(0.5)
        assert tags, "tensorboard did not serve the run's scalars within 90 s"
        assert {"losses/bc/nll", "train/lr", "eval/invalid_rate", "rollout/backspace_rate"} <= set(
            tags
        )
        points = _get_json(f"{base}/data/plugin/scalars/scalars?run={RUN}&tag=eval/invalid_rate")
        assert isinstance(points, list)
        assert [step for _, step, _ in points] == [50, 100, 150]  # [wall_time, step, value]
    finally:
        server.terminate()
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(timeout=15)
