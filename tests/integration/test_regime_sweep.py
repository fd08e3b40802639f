"""The regime scan and the sensitivity sweep: their grids, the convergence check, and that both
keep each finished run on disk and resume from it; run_one is replaced by a counting fake."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from agents.evaluation import stats
from agents.experiments import regime, sweep


class CountingRunOne:
    """A row shaped like run_one's; MLE's invalid rate falls with the demonstrations."""

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []

    def __call__(
        self, config: dict, task: Any, agent: str, seed: int, out: Path, *args: Any, **kw: Any
    ) -> dict[str, Any]:
        self.calls.append({"agent": agent, "seed": seed, "config": config, **kw})
        demos = config["train"]["num_demonstrations"]
        level = min(1.0, 30.0 / demos)
        episodes = [1.0 if i < level * 20 else 0.0 for i in range(20)]
        # Still falling at the end for the fewest demonstrations: not converged.
        late = 0.2 if demos <= 100 else 0.0
        return {
            "agent": agent,
            "seed": seed,
            "metrics": {"invalid_rate": sum(episodes) / 20, "disturbed/invalid_rate": level},
            "episode_values": {"invalid_rate": episodes},
            "curves": [
                {"step": 200, "eval/invalid_rate": level + 0.3},
                {"step": 600, "eval/invalid_rate": level + late},
                {"step": 800, "eval/invalid_rate": level + 0.01},
                {"step": 1000, "eval/invalid_rate": level},
            ],
            "train_seconds": 2.0,
            "eval_seconds": 1.0,
            **kw,
        }


def test_last_quarter_change_reads_the_eval_curve_at_three_quarters() -> None:
    curves = [{"step": s, "eval/accuracy": s / 1000} for s in (200, 400, 600, 800, 1000)]
    assert stats.last_quarter_change(curves, "eval/accuracy") == pytest.approx(1.0 - 0.6)
    assert stats.last_quarter_change(curves[-1:], "eval/accuracy") is None
    assert stats.last_quarter_change(curves, "eval/invalid_rate") is None
    # The tolerance grows with the eval curve's binomial noise: none at a rate of 0 or 1.
    flat = [{"step": 1, "eval/accuracy": 1.0}, {"step": 2, "eval/accuracy": 1.0}]
    assert stats.flat_tolerance(flat, "eval/accuracy", 100) == pytest.approx(stats.FLAT_CHANGE)
    half = [{"step": 1, "eval/accuracy": 0.5}, {"step": 2, "eval/accuracy": 0.5}]
    noisy = stats.flat_tolerance(half, "eval/accuracy", 100)
    assert noisy == pytest.approx(stats.FLAT_CHANGE + 2 * (2 * 0.25 / 100) ** 0.5)
    assert stats.flat_tolerance(half, "eval/accuracy", 10_000) < noisy
    # Each point counts with its own noise: 0.9 then 1.0 is not judged as if both were near 1.
    rising = [{"step": 1, "eval/accuracy": 0.9}, {"step": 2, "eval/accuracy": 1.0}]
    tolerance = stats.flat_tolerance(rising, "eval/accuracy", 100)
    assert tolerance == pytest.approx(stats.FLAT_CHANGE + 2 * (0.09 / 100) ** 0.5)
    # Both from one read of the curve, as the convergence checks use them.
    assert stats.last_quarter_move(rising, "eval/accuracy", 100) == pytest.approx((0.1, tolerance))
    assert stats.last_quarter_move(curves[-1:], "eval/accuracy", 100) is None


def test_regime_scan_reports_each_point_and_resumes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = CountingRunOne()
    monkeypatch.setattr(regime, "run_one", fake)
    names = [p["name"] for p in regime.points("dyck")]
    assert len(names) == len(set(names)) == 16
    subset = ",".join(n for n in names if n.startswith("depth4-20-1x32"))
    out = tmp_path / "scan"
    args = ["--task", "dyck", "--out", str(out), "--points", subset]
    assert regime.main(args) == 0
    assert len(fake.calls) == 4 * 2  # 4 demonstration counts, 2 seeds each
    assert {c["seed"] for c in fake.calls} == {100, 101}  # the scan's seeds, not a comparison's
    assert {c["config"]["train"]["width"] for c in fake.calls} == {32}
    results = json.loads((out / "results.json").read_text())
    by_demos = {p["point"]["num_demonstrations"]: p for p in results["points"]}
    assert by_demos[100]["converged"] is False and by_demos[10000]["converged"] is True
    assert by_demos[300]["metrics"]["invalid_rate"]["mean"] == pytest.approx(0.1)
    report = (out / "report.md").read_text()
    assert "| depth4-20 | 1x32 | 300 |" in report and (out / "scan.png").is_file()
    # Every finished run is on disk: a second call trains nothing.
    assert regime.main(args) == 0
    assert len(fake.calls) == 8
    with pytest.raises(SystemExit):
        regime.main(["--task", "dyck", "--out", str(out), "--points", "nosuch"])
    with pytest.raises(SystemExit):  # the stored runs were trained for another number of updates
        regime.main([*args, "--steps", "7"])
    assert len(fake.calls) == 8


def test_sweep_sets_kappa_through_c_trains_the_base_once_and_resumes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = CountingRunOne()
    monkeypatch.setattr(sweep, "run_one", fake)
    monkeypatch.setattr(sweep, "aggregate", lambda runs, key: {str(r[key]): {"n": 1} for r in runs})
    out = tmp_path / "sweep"
    args = ["--config", "dyck_cpu", "--out", str(out), "--seeds", "1", "--params", "kappa,eta"]
    assert sweep.main(args) == 0
    overrides = [
        {k: v for k, v in c.items() if k not in ("agent", "seed", "config")} for c in fake.calls
    ]
    # kappa 0.0025 and eta 0.3 are the base (alpha 0.01, c 0.25): one run serves both.
    assert overrides == [
        {},
        {"c": pytest.approx(2.5)},
        {"eta": 0.01},
        {"eta": 0.1},
        {"eta": 0.5},
        {"eta": 1.0},
    ]
    results = json.loads((out / "results.json").read_text())
    assert set(results["params"]["kappa"]["by_value"]) == {"0.0025", "0.025"}
    assert sweep.main(args) == 0
    assert len(fake.calls) == 6
    with pytest.raises(SystemExit):  # the stored runs belong to another config
        sweep.main([*args[:1], "dyck_small_cpu", *args[2:]])
    assert len(fake.calls) == 6


def test_sweep_run_cost_bundles_and_the_base_bundle() -> None:
    config = {"train": {"eta": 0.1, "batch_size": 64}}
    assert sweep._base_value(config, "run_cost") == "mbs8"  # today's defaults at batch 64
    assert sweep._override(config, "run_cost", "off") == {
        "model_batch_size": 64,
        "model_batch_buckets": 1,
        "rollout_length_factor": None,
    }
    off = {"train": {**config["train"], **sweep._override(config, "run_cost", "off")}}
    assert sweep._base_value(off, "run_cost") == "off"
    assert sweep._base_value({"train": sweep.RUN_COST["mbs16"]}, "run_cost") == "mbs16"


@pytest.mark.parametrize("tool", ["regime", "sweep"])
def test_scan_and_sweep_outs_follow_the_output_rule(
    tool: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A user's folder is refused before any run, every byte kept; the folder the tool makes is
    marked and lists what it wrote; a scan from before the marker is recognised and resumed."""
    from agents.experiments.storage import check_out
    from agents.outputs import LOCK, MANIFEST, listed, owner

    fake = CountingRunOne()
    module = regime if tool == "regime" else sweep
    monkeypatch.setattr(module, "run_one", fake)
    if tool == "sweep":
        monkeypatch.setattr(sweep, "aggregate", lambda runs, key: {str(r[key]): {} for r in runs})

    def argv(out: Path) -> list[str]:
        if tool == "regime":
            return ["--task", "dyck", "--out", str(out), "--points", "depth4-20-1x32-n100"]
        return ["--config", "dyck_cpu", "--out", str(out), "--seeds", "1", "--params", "kappa"]

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "report.md").write_text("my notes")
    with pytest.raises(FileExistsError, match="not a seqmatch scan"):
        module.main(argv(mine))
    assert fake.calls == [] and sorted(p.name for p in mine.iterdir()) == ["report.md"]
    assert (mine / "report.md").read_text() == "my notes"

    out = tmp_path / "new" / "scan"
    assert module.main(argv(out)) == 0
    assert owner(out) == "scan" and {"results.json", "report.md", "runs"} <= listed(out)
    with pytest.raises(FileExistsError, match="a seqmatch scan is there"):
        check_out(out)  # a comparison does not write into a scan
    calls = len(fake.calls)

    # Before the marker: the same folder without its marker, manifest and lock is resumed.
    for name in ("seqmatch-scan", MANIFEST, LOCK):
        (out / name).unlink()
    assert module.main(argv(out)) == 0
    assert len(fake.calls) == calls and owner(out) == "scan"

    # A stopped first run of the sweep left no results.json: its run files alone are recognised.
    for name in ("results.json", "report.md", "scan.png", "seqmatch-scan", MANIFEST, LOCK):
        (out / name).unlink(missing_ok=True)
    assert module.main(argv(out)) == 0 and len(fake.calls) == calls
