"""`seqmatch compare` end to end with a tiny budget: the table, results.json, report, plots."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pytest

from agents.algorithms import ALGORITHMS
from agents.cli import main
from agents.experiments import summary
from agents.experiments.compare_config import (
    DEFAULT_CONFIG,
    CompareConfig,
    library_defaults,
    load_config,
    train_config,
)
from agents.experiments.storage import runs_config


def test_compare_quick_writes_every_output(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "cmp"
    code = main(
        [
            "compare",
            "--quick",
            "--agents",
            "mle,sequencematch,ppo",
            "--out",
            str(out),
            "--no-progress",
            "--threads",
            "1",
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "| agent | accuracy ↑ | recovery ↑" in printed and "SequenceMatch" in printed
    results = json.loads((out / "results.json").read_text())
    assert results["task"] == "arithmetic"
    assert {(r["agent"], r["seed"]) for r in results["runs"]} == {
        (a, s) for a in ("mle", "sequencematch", "ppo") for s in (0, 1)
    }
    for agent in ("mle", "sequencematch", "ppo"):
        stats = results["agents"][agent]
        for metric in ("accuracy", "recovery", "backspace_rate"):
            assert set(stats[metric]) == {"mean", "ci95", "n", "method"}
            assert stats[metric]["n"] == 2
            lo, hi = stats[metric]["ci95"]
            assert 0.0 <= lo <= stats[metric]["mean"] <= hi <= 1.0
    report = (out / "report.md").read_text()
    assert "seqmatch compare" in report and "## SequenceMatch against MLE" in report
    assert "bootstrap over seeds" in report and "SequenceMatch − MLE" in report
    assert results["complete"] and "sequencematch - mle" in results["differences"]
    assert {p.name for p in (out / "runs").glob("*.json")} == {
        f"{a}-s{s}.json" for a in ("mle", "sequencematch", "ppo") for s in (0, 1)
    }
    for name in ("curves_score.png", "curves_divergence.png", "metrics.png"):
        assert (out / name).stat().st_size > 1000
    assert any((out / "runs").iterdir())  # TensorBoard runs
    curves = [r["curves"] for r in results["runs"] if r["agent"] == "sequencematch"]
    assert any("losses/sm/divergence" in row for rows in curves for row in rows)


def test_configs_load_and_bad_options_fail_clearly() -> None:
    for name in ("arithmetic_cpu", "arithmetic_gpu", "dyck_cpu", "dyck_small_cpu", "text_cpu"):
        config = load_config(CompareConfig(config=name))
        assert config["seeds"] >= 3 and config["agent_list"]
    assert "ppo" not in load_config(CompareConfig(config="text_cpu"))["agent_list"]
    with pytest.raises(ValueError, match="no config 'nope'"):
        load_config(CompareConfig(config="nope"))
    with pytest.raises(ValueError, match="unknown agent 'gail'; known agents: mle, bc"):
        load_config(CompareConfig(agents="mle,gail"))
    with pytest.raises(ValueError, match="is for task 'dyck'"):
        load_config(CompareConfig(config="dyck_cpu", task="arithmetic"))


def test_default_agents_and_all() -> None:
    default = load_config(CompareConfig())
    assert default["agent_list"] == ["mle", "bc", "sequencematch", "dagger"]
    everything = load_config(CompareConfig(agents="all"))["agent_list"]
    assert everything == [
        "mle",
        "bc",
        "bc_executed",
        "sequencematch",
        "sequencematch_eta0",
        "sequencematch_no_bkspc",
        "ppo",
        "dagger",
        "dagger_demos",
    ]
    # The eta-0 ablation is SequenceMatch's run with the SequenceMatch term weighted 0.
    ablation = train_config(default, "sequencematch_eta0", 0, Path("out"), "cpu", False)
    full = train_config(default, "sequencematch", 0, Path("out"), "cpu", False)
    assert ablation.agent == "sequencematch_eta0" and ablation.eta == 0.0 and full.eta > 0.0
    assert {k: v for k, v in asdict(ablation).items() if k not in ("eta", "name", "agent")} == {
        k: v for k, v in asdict(full).items() if k not in ("eta", "name", "agent")
    }
    # A config without default_agents runs every agent that applies to its task.
    assert "sequencematch_no_bkspc" in load_config(CompareConfig(config="dyck_cpu"))["agent_list"]
    with pytest.raises(ValueError, match="needs a pretrained model"):
        load_config(CompareConfig(agents="mle,untuned"))


def test_convergence_reads_each_agents_last_quarter() -> None:
    config = {"task": "arithmetic", "train": {"eval_episodes": 100}}

    def run(agent: str, values: list[float]) -> dict[str, Any]:
        steps = range(100, 100 * len(values) + 1, 100)
        curves = [{"step": s, "eval/accuracy": v} for s, v in zip(steps, values, strict=True)]
        return {"agent": agent, "curves": curves}

    runs = [
        run("mle", [0.2, 0.5, 0.9, 0.92]),  # the last quarter moved 0.02: flat
        run("mle", [0.2, 0.5, 0.88, 0.9]),
        run("bc", [0.1, 0.2, 0.3, 0.7]),  # still climbing
        {"agent": "ppo", "curves": []},  # no eval curve: left out
    ]
    flat = summary.convergence(runs, config)
    assert set(flat) == {"mle", "bc"}
    assert flat["mle"]["flat"] and flat["mle"]["change"] == pytest.approx(0.02)
    assert (flat["mle"]["flat_seeds"], flat["mle"]["seeds"]) == (2, 2)
    assert not flat["bc"]["flat"] and flat["bc"]["change"] == pytest.approx(0.4)
    assert summary.convergence(runs, {"task": "text"}) == {}  # MAUVE's noise is not binomial


def test_the_default_config_repeats_no_library_default() -> None:
    defaults = library_defaults()
    for block in (DEFAULT_CONFIG["train"], DEFAULT_CONFIG["quick"]["train"]):
        assert not {k for k, v in block.items() if k in defaults and v == defaults[k]}
    for block in (DEFAULT_CONFIG["agents"], DEFAULT_CONFIG["quick"]["agents"]):
        for agent, settings in block.items():
            own = ALGORITHMS[agent].cls.loop_settings
            assert not {k for k, v in settings.items() if k in own and v == own[k]}, agent


def test_a_stated_default_is_the_same_run_as_its_absence() -> None:
    config = load_config(CompareConfig())
    p = library_defaults()["disturbance"]
    stated = {**config, "train": {**config["train"], "disturbance": p}}
    assert "disturbance" not in config["train"] and runs_config(stated) == runs_config(config)
    changed = {**config, "train": {**config["train"], "disturbance": 0.3}}
    assert runs_config(changed) != runs_config(config)
    ppo = {**config, "agents": {"ppo": {**config["agents"]["ppo"], "n_steps": 256}}}
    assert runs_config(ppo) == runs_config(config)  # PPO's own default
