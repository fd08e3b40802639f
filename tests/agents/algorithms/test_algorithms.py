"""The algorithm registry: one file per algorithm, presets, a user's algorithm by module:Class,
and a trainer that names no agent."""

from __future__ import annotations

import ast
import json
from pathlib import Path
from typing import Any

import pytest
import torch

from agents.algorithms import (
    ALGORITHMS,
    Algorithm,
    register_algorithm,
    resolve_algorithm,
)
from agents.cli import main
from agents.config import TrainConfig
from agents.experiments.compare import run_compare
from agents.experiments.compare_config import CompareConfig
from agents.outputs import safe_name
from agents.training.trainer import Trainer

USER = "tests.agents.label_smoothing:LabelSmoothingBC"
TINY: dict[str, Any] = {
    "task": "dyck", "steps": 6, "batch_size": 8, "layers": 1, "width": 16, "heads": 2,
    "num_demonstrations": 64, "eval_interval": 0, "eval_episodes": 4, "lr_warmup": 1,
    "logdir": None, "progress": False, "device": "cpu",
}  # fmt: skip
TRAINING = Path(__file__).resolve().parents[3] / "agents" / "training"


def test_registry_names_presets_and_labels() -> None:
    assert list(ALGORITHMS) == [
        "mle", "bc", "bc_executed", "sequencematch", "sequencematch_eta0",
        "sequencematch_no_bkspc", "ppo", "untuned", "dagger", "dagger_demos",
    ]  # fmt: skip
    assert ALGORITHMS["bc_executed"].cls is ALGORITHMS["bc"].cls
    assert ALGORITHMS["bc_executed"].overrides == {"labels": "executed"}
    assert ALGORITHMS["sequencematch_eta0"].overrides == {"eta": 0.0}
    assert ALGORITHMS["mle"].overrides == {"backspace": False}
    assert ALGORITHMS["bc"].short_label == "BC" and ALGORITHMS["untuned"].short_label == "untuned"
    configured = ALGORITHMS["bc_executed"].configure(TrainConfig(agent="bc"))
    assert configured.agent == "bc_executed" and configured.labels == "executed"


def test_register_and_resolve_refuse_bad_names() -> None:
    with pytest.raises(ValueError, match="already registered"):
        register_algorithm("bc", Algorithm)
    with pytest.raises(ValueError, match="no ':'"):
        register_algorithm("a:b", Algorithm)
    with pytest.raises(ValueError, match="not an Algorithm subclass"):
        register_algorithm("thing", dict)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown agent 'gail'; known agents: mle, bc"):
        resolve_algorithm("gail")
    with pytest.raises(ValueError, match="cannot import module 'no_such_module'"):
        resolve_algorithm("no_such_module:X")
    with pytest.raises(ValueError, match="is not an Algorithm subclass"):
        resolve_algorithm("tests.agents.label_smoothing:Smoothing")
    assert resolve_algorithm(USER).label == "BC with label smoothing"


def test_names_become_safe_file_names() -> None:
    assert safe_name(USER) == "tests.agents.label_smoothing-LabelSmoothingBC"
    assert safe_name("../../escape") == "escape" and "/" not in safe_name("a/b:c")
    config = TrainConfig(agent=USER, task="x.y:Task")
    assert "/" not in config.run_name and ":" not in config.run_name


def _compares_an_agent_name(node: ast.AST, names: set[str], constants: set[str]) -> bool:
    """Whether ``node`` compares something with an agent name (a literal or a constant holding
    one), or reads ``.agent`` / ``agent`` in a comparison at all."""
    if not isinstance(node, ast.Compare):
        return False
    for operand in [node.left, *node.comparators]:
        for sub in ast.walk(operand):
            if isinstance(sub, ast.Constant) and sub.value in names:
                return True
            if isinstance(sub, ast.Name) and (sub.id in constants or sub.id == "agent"):
                return True
            if isinstance(sub, ast.Attribute) and sub.attr == "agent":
                return True
    return False


def test_the_trainer_names_no_agent() -> None:
    names = set(ALGORITHMS)
    for path in sorted(TRAINING.glob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        # Module-level constants that hold an agent name, or a collection of them.
        constants = {
            target.id
            for node in ast.walk(tree)
            if isinstance(node, ast.Assign | ast.AnnAssign) and node.value is not None
            for target in (node.targets if isinstance(node, ast.Assign) else [node.target])
            if isinstance(target, ast.Name)
            and any(isinstance(c, ast.Constant) and c.value in names for c in ast.walk(node.value))
            and not (isinstance(node, ast.AnnAssign) and target.id == "agent")  # the default
        }
        for node in ast.walk(tree):
            where = f"{path.name}:{getattr(node, 'lineno', '?')}"
            assert not _compares_an_agent_name(node, names, constants), where
            if isinstance(node, ast.Dict):  # a table keyed by agent
                keys = [k.value for k in node.keys if isinstance(k, ast.Constant)]
                assert not names & set(keys), where
            assert not isinstance(node, ast.Match), where


def test_the_ast_check_finds_an_agent_comparison() -> None:
    """The check above is not vacuous: it flags the forms it looks for."""
    names = set(ALGORITHMS)
    for source in (
        'x = config.agent == "mle"',
        'x = "bc" in (name,)',
        'MLE_NAME = "mle"\nx = name == MLE_NAME',
        "x = agent != other",
    ):
        tree = ast.parse(source)
        constants = {"MLE_NAME"} if "MLE_NAME" in source else set()
        assert any(_compares_an_agent_name(n, names, constants) for n in ast.walk(tree)), source


def test_user_algorithm_trains_with_its_settings() -> None:
    torch.set_num_threads(1)
    plain = Trainer(TrainConfig(agent="bc", **TINY))
    plain.train()
    smooth = Trainer(TrainConfig(agent=USER, agent_args='{"smoothing": 0.5}', **TINY))
    assert smooth.algorithm.extra.smoothing == 0.5
    metrics = smooth.train()
    assert "eval/invalid_rate" in metrics and smooth.disturbance is not None  # disturbed data
    moved = [not torch.equal(a, b) for a, b in zip(
        plain.policy.parameters(), smooth.policy.parameters(), strict=True
    )]  # fmt: skip
    assert any(moved)  # the smoothing term changes the updates
    with pytest.raises(ValueError, match="has no setting 'eps'; it has: smoothing"):
        Trainer(TrainConfig(agent=USER, agent_args='{"eps": 1}', **TINY))
    with pytest.raises(ValueError, match="--agent-args: BC takes no settings of its own"):
        Trainer(TrainConfig(agent="bc", agent_args='{"eps": 1}', **TINY))


def test_user_algorithm_through_train_eval_and_compare(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--agent module:Class`` in train; an entry of compare's --agents, run by spawned workers."""
    save, metrics = tmp_path / "ck", tmp_path / "m.json"
    args = ["train", "--agent", USER, "--agent-args", '{"smoothing": 0.2}', "--task", "dyck"]
    args += ["--steps", "4", "--batch-size", "8", "--layers", "1", "--width", "16", "--heads", "2"]
    args += ["--num-demonstrations", "64", "--eval-episodes", "4", "--eval-interval", "0"]
    args += ["--logdir", str(tmp_path / "runs"), "--save", str(save), "--no-progress"]
    assert main(args) == 0
    assert main(["eval", "--checkpoint", str(save), "--episodes", "8", "--json", str(metrics)]) == 0
    assert "task/invalid_rate" in json.loads(metrics.read_text())["metrics"]
    logs = [p.name for p in (tmp_path / "runs").iterdir()]
    assert logs == ["tests.agents.label_smoothing-LabelSmoothingBC-dyck-s0"]

    out = tmp_path / "cmp"
    results = run_compare(
        CompareConfig(
            quick=True,
            task="dyck",
            agents=f"bc,{USER}",
            seeds=1,
            jobs=2,
            out=str(out),
            progress=False,
        )
    )
    assert results["config"]["agent_list"] == ["bc", USER]
    assert (out / "runs" / "tests.agents.label_smoothing-LabelSmoothingBC-s0.json").is_file()
    assert "| BC with label smoothing |" in (out / "report.md").read_text()
