"""Bad input at the command line: exactly one line on stderr, a non-zero exit, no traceback (unless
``--debug``), and no partial files: the ``--json`` file, the ``--save`` folder and the TensorBoard
run are not created when a command fails early, and no temporary folder is left behind.

Each case runs ``agents.cli.main`` in this process (fast); a few run the installed command in a
subprocess too, where start-up warnings would show; ``-m slow`` runs every case that way.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from agents.cli import COMMANDS, main
from agents.outputs import LOCK, FolderLock, lock_folder
from agents.training.checkpoint import CheckpointError, resolve_checkpoint
from tests.integration.conftest import TINY, run_cli, snapshot, tiny_checkpoint


@pytest.fixture(scope="module")
def good_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Dyck checkpoint of a tiny MLE policy after 2 updates."""
    return tiny_checkpoint(tmp_path_factory.mktemp("good"))


def _truncate(file: str, size: int) -> Callable[[Path], None]:
    def corrupt(checkpoint: Path) -> None:
        step = resolve_checkpoint(checkpoint)
        data = (step / file).read_bytes()
        (step / file).write_bytes(data[:size])

    return corrupt


def _write(file: str, text: str) -> Callable[[Path], None]:
    def corrupt(checkpoint: Path) -> None:
        (resolve_checkpoint(checkpoint) / file).write_text(text)

    return corrupt


def _drop_key(key: str) -> Callable[[Path], None]:
    def corrupt(checkpoint: Path) -> None:
        file = resolve_checkpoint(checkpoint) / "checkpoint.json"
        document = json.loads(file.read_text())
        del document[key]
        file.write_text(json.dumps(document))

    return corrupt


def _delete(file: str) -> Callable[[Path], None]:
    def corrupt(checkpoint: Path) -> None:
        (resolve_checkpoint(checkpoint) / file).unlink()

    return corrupt


def _set(key: str, value: object, inner: str | None = None) -> Callable[[Path], None]:
    def corrupt(checkpoint: Path) -> None:
        file = resolve_checkpoint(checkpoint) / "checkpoint.json"
        document = json.loads(file.read_text())
        if inner is None:
            document[key] = value
        else:
            document[key][inner] = value
        file.write_text(json.dumps(document))

    return corrupt


def _empty_optimizer(checkpoint: Path) -> None:
    save_file({}, str(resolve_checkpoint(checkpoint) / "optimizer.safetensors"))


def _nan_weights(checkpoint: Path) -> None:
    file = resolve_checkpoint(checkpoint) / "model.safetensors"
    tensors = load_file(str(file))
    save_file({k: torch.full_like(v, float("nan")) for k, v in tensors.items()}, str(file))


def _users_folder(root: Path) -> None:
    (root / "mine").mkdir()
    (root / "mine" / "thesis.tex").write_text("precious")


def _a_file(root: Path) -> None:
    (root / "afile").write_text("precious")


def _an_out_folder(root: Path) -> None:
    (root / "out").mkdir()


def _malformed_data(root: Path) -> None:
    (root / "bad.jsonl").write_text('{"prompt": "^", "completion": "()"}\nnot json at all\n')


def _fifo(root: Path) -> None:
    os.mkfifo(root / "fifo")


def _prompts(root: Path) -> None:
    (root / "prompts.jsonl").write_text('{"prompt": "^"}\n')


def _dangling_link(root: Path) -> None:
    (root / "dangling.json").symlink_to("nowhere/eval.json")


def _users_export(root: Path) -> None:
    (root / "expuser").mkdir()
    (root / "expuser" / "config.json").write_text('{"mine": true}')
    (root / "expuser" / "notes.txt").write_text("precious")


def _users_comparison(root: Path) -> None:
    (root / "cmpuser").mkdir()
    (root / "cmpuser" / "report.md").write_text("# my report")
    (root / "cmpuser" / "metrics.png").write_bytes(b"my plot")


def _empty_model(root: Path) -> None:
    (root / "model").mkdir()


def _tiny_model(root: Path) -> Path:
    from tests.agents.models.test_pretrained import save_tiny_model

    return save_tiny_model(root / "model", "gpt2")


def _model_without_tokenizer(root: Path) -> None:
    for file in _tiny_model(root).glob("tokenizer*"):
        file.unlink()


def _model_with_truncated_weights(root: Path) -> None:
    weights = _tiny_model(root) / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:5000])


def _model_with_a_mistyped_config(root: Path) -> None:
    config = _tiny_model(root) / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "n_embd": "thirty-two"}))


def _first_save_never_finished(checkpoint: Path) -> None:
    """What a run killed (SIGTERM) before its first save leaves: the marker, no pointer."""
    for entry in checkpoint.iterdir():
        if entry.name != "seqmatch-checkpoint":
            shutil.rmtree(entry) if entry.is_dir() else entry.unlink()


def _step_links_outside(checkpoint: Path) -> None:
    step = resolve_checkpoint(checkpoint)
    elsewhere = checkpoint.parent / "elsewhere"
    step.rename(elsewhere)
    step.symlink_to(elsewhere)


_HELD: list[FolderLock] = []
"""Locks a case holds while its command runs (another process's, as far as the command sees)."""


def _held_by_another_process(root: Path) -> None:
    _HELD.append(lock_folder(root / "ckpt", "--save"))


@pytest.fixture(autouse=True)
def _release_held_locks() -> Iterator[None]:
    yield
    while _HELD:
        _HELD.pop().release()


@dataclass(frozen=True)
class Case:
    args: list[str]
    """The command line; CKPT is replaced by the checkpoint folder the case prepares."""
    message: str
    """A part of the one line on stderr."""
    corrupt: Callable[[Path], None] | None = None
    """Applied to a copy of a good checkpoint (CKPT); None: CKPT is the good one, copied."""
    prepare: Callable[[Path], None] | None = None
    """Applied to the working folder before the command runs."""
    code: int = 1


EVAL = ["eval", "--checkpoint", "CKPT", "--episodes", "2", "--device", "cpu"]
GENERATE = ["generate", "--checkpoint", "CKPT", "--prompt", "^", "--device", "cpu"]
TRAIN = ["train", *TINY, "--steps", "2", "--save", "new-ckpt", "--logdir", "runs"]
MODEL = [*TRAIN, "--task", "arithmetic", "--model", "model"]

CASES = {
    "missing_checkpoint": Case(
        ["eval", "--checkpoint", "no-such-folder", "--json", "out/eval.json"],
        "no-such-folder: no such checkpoint",
    ),
    "checkpoint_is_a_file": Case(
        ["eval", "--checkpoint", "CKPT/seqmatch-checkpoint", "--json", "out/eval.json"],
        "a checkpoint is a folder",
    ),
    "incomplete_checkpoint": Case(
        [*EVAL, "--json", "out/eval.json"], "missing optimizer.safetensors",
        _delete("optimizer.safetensors"),
    ),
    "truncated_weights": Case(
        [*EVAL, "--json", "out/eval.json"], "model.safetensors is corrupt",
        _truncate("model.safetensors", 100),
    ),
    "truncated_weights_generate": Case(
        GENERATE, "model.safetensors is corrupt", _truncate("model.safetensors", 100),
    ),
    "garbage_checkpoint_json": Case(
        [*EVAL, "--json", "out/eval.json"], "checkpoint.json is corrupt",
        _write("checkpoint.json", "garbage{"),
    ),
    "checkpoint_json_not_an_object": Case(
        [*EVAL, "--json", "out/eval.json"], "checkpoint.json is corrupt",
        _write("checkpoint.json", "[1, 2]"),
    ),
    "checkpoint_json_without_vocab": Case(
        GENERATE, "checkpoint.json is incomplete or corrupt", _drop_key("vocab"),
    ),
    "resume_from_incomplete_json": Case(
        ["train", "--agent", "mle", *TINY, "--steps", "4", "--eval-episodes", "2",
         "--save", "CKPT", "--resume", "--logdir", "runs"],
        "checkpoint.json is incomplete or corrupt", _drop_key("optimizer"),
    ),
    "resume_from_truncated_optimizer": Case(
        ["train", "--agent", "mle", *TINY, "--steps", "4", "--eval-episodes", "2",
         "--save", "CKPT", "--resume", "--logdir", "runs"],
        "corrupt optimizer or RNG state", _truncate("optimizer.safetensors", 50),
    ),
    "resume_without_checkpoint": Case(
        [*TRAIN, "--resume", "--json", "out/train.json"], "new-ckpt: no such checkpoint",
    ),
    "vocabulary_does_not_match": Case(
        [*EVAL, "--task", "arithmetic", "--json", "out/eval.json"],
        "vocabulary does not match task 'arithmetic'",
    ),
    "unknown_agent": Case(
        [*TRAIN, "--agent", "ppo2", "--json", "out/train.json"],
        "unknown agent 'ppo2'; known agents: mle, bc, bc_executed, sequencematch",
    ),
    "agent_that_does_not_import": Case(
        [*TRAIN, "--agent", "no_such_module:Algo", "--json", "out/train.json"],
        "agent 'no_such_module:Algo': cannot import module 'no_such_module'",
    ),
    "agent_trained_elsewhere": Case(
        [*TRAIN, "--agent", "ppo", "--json", "out/train.json"],
        "agent 'ppo' trains with a loop of its own: use it in seqmatch compare",
    ),
    "unknown_divergence": Case(
        [*TRAIN, "--divergence", "wasserstein", "--json", "out/train.json"],
        "invalid choice 'wasserstein' for argument '--divergence'",
        code=2,
    ),
    "unknown_task": Case([*TRAIN, "--task", "chess"], "unknown task 'chess'"),
    "negative_steps": Case(
        [*TRAIN, "--steps", "-5", "--json", "out/train.json"], "--steps must be >= 1, got -5",
    ),
    "zero_temperature": Case([*TRAIN, "--temperature", "0"], "--temperature must be > 0"),
    "unknown_device": Case([*TRAIN, "--device", "tpu9"], "unknown device 'tpu9'"),
    "bad_task_args": Case([*TRAIN, "--task-args", "{not json"], "--task-args is not valid JSON"),
    "malformed_data_file": Case(
        [*EVAL, "--data", "bad.jsonl", "--json", "out/eval.json"],
        "bad.jsonl:2: not valid JSON", prepare=_malformed_data,
    ),
    "missing_data_file": Case(
        [*EVAL, "--data", "nowhere.jsonl", "--json", "out/eval.json"],
        "nowhere.jsonl: no such file",
    ),
    "zero_episodes": Case([*EVAL, "--episodes", "0"], "--episodes must be in [1,"),
    "zero_samples": Case([*GENERATE, "--num", "0"], "--num must be in [1,"),
    "prompt_outside_the_vocabulary": Case(
        [*GENERATE[:-4], "--prompt", "hello"], "not in the vocabulary",
    ),
    # The command line does not parse (tyro): exit 2, as argparse does, in one line too.
    "not_an_integer": Case([*TRAIN, "--steps", "ten"], "Error parsing --steps", code=2),
    "unknown_option": Case([*TRAIN, "--stepz", "3"], "Unrecognized options: --stepz", code=2),
    "missing_required_option": Case(["eval", "--episodes", "2"], "--checkpoint", code=2),
    "unknown_command": Case(["fit", "--steps", "2"], "unknown command 'fit'", code=2),
    # Output paths: a user's data is never moved, overwritten or deleted.
    "save_into_a_users_folder": Case(
        [*TRAIN[:-4], "--save", "mine", "--logdir", "runs", "--json", "out/train.json"],
        "not a seqmatch checkpoint", prepare=_users_folder,
    ),
    "save_onto_a_file": Case(
        [*TRAIN[:-4], "--save", "afile", "--logdir", "runs"], "a file is there", prepare=_a_file,
    ),
    "save_into_the_current_folder": Case(
        [*TRAIN[:-4], "--save", ".", "--logdir", "runs"], "not a seqmatch checkpoint",
    ),
    "save_under_a_file": Case(
        [*TRAIN[:-4], "--save", "afile/ck", "--logdir", "runs"], "afile is not a folder",
        prepare=_a_file,
    ),
    "save_onto_a_checkpoint_without_resume": Case(
        [*TRAIN[:-4], "--save", "CKPT", "--logdir", "runs"], "pass --resume to continue it",
    ),
    "resume_and_overwrite": Case(
        [*TRAIN[:-4], "--save", "CKPT", "--resume", "--overwrite"], "exclude each other",
    ),
    "json_under_a_file": Case(
        [*TRAIN, "--json", "afile/train.json"], "afile is a file", prepare=_a_file,
    ),
    "json_is_a_folder": Case(
        [*TRAIN, "--json", "out"], "--json out: a folder is there", prepare=_an_out_folder,
    ),
    "eval_json_under_a_file": Case(
        [*EVAL, "--json", "afile/eval.json"], "afile is a file", prepare=_a_file,
    ),
    "logdir_under_a_file": Case([*TRAIN[:-2], "--logdir", "afile"], "afile is a file",
                                prepare=_a_file),
    "compare_out_is_a_file": Case(
        ["compare", "--out", "afile"], "a file is there", prepare=_a_file,
    ),
    "compare_negative_threads": Case(
        ["compare", "--out", "cmp", "--threads", "-1"], "--threads must be >= 0",
    ),
    # Numbers: out of range or not finite is refused, never silently replaced by a default.
    "negative_grad_clip": Case([*TRAIN, "--grad-clip", "-1"], "--grad-clip must be > 0"),
    "nan_grad_clip": Case([*TRAIN, "--grad-clip", "nan"], "--grad-clip must be finite"),
    "infinite_lr": Case([*TRAIN, "--lr", "inf"], "--lr must be finite"),
    "nan_c": Case([*TRAIN, "--c", "nan"], "--c must be finite"),
    "nan_dropout": Case([*TRAIN, "--dropout", "nan"], "--dropout must be finite"),
    "zero_max_length": Case([*TRAIN, "--max-length", "0"], "--max-length must be >= 1"),
    "zero_max_steps": Case([*TRAIN, "--max-steps", "0"], "--max-steps must be >= 1"),
    "nan_generate_temperature": Case(
        [*GENERATE, "--temperature", "nan"], "--temperature must be finite",
    ),
    # Devices and memory: refused before anything is allocated.
    "device_xla": Case([*TRAIN[:-4], "--device", "xla"], "--device xla: not supported here"),
    "huge_width": Case([*TRAIN, "--width", "1000000"], "need about"),
    "huge_batch": Case([*TRAIN, "--batch-size", "1000000000000"], "need about"),
    "huge_eval": Case([*EVAL, "--episodes", "1000000000000"], "--episodes must be <= 1000000"),
    "huge_generate": Case([*GENERATE, "--num", "1000000000000"], "--num must be <= 1000000"),
    "generate_many_with_a_tampered_width": Case(
        GENERATE, "need about", _set("model", 10_000_000, inner="width"),
    ),
    # Checkpoints that are wrong in their content.
    "resume_from_a_negative_step": Case(
        ["train", "--agent", "mle", *TINY, "--steps", "4", "--eval-episodes", "2",
         "--save", "CKPT", "--resume", "--logdir", "runs"],
        "corrupt (step -100)", _set("step", -100),
    ),
    "resume_from_an_empty_optimizer": Case(
        ["train", "--agent", "mle", *TINY, "--steps", "4", "--eval-episodes", "2",
         "--save", "CKPT", "--resume", "--logdir", "runs"],
        "optimizer.safetensors does not fit the model", _empty_optimizer,
    ),
    "vocab_is_a_list": Case(GENERATE, "incomplete or corrupt", _set("vocab", [1, 2])),
    "vocab_is_a_list_eval": Case(EVAL, "incomplete or corrupt", _set("vocab", [1, 2])),
    "generate_from_nan_weights": Case(GENERATE, "non-finite weights", _nan_weights),
    # Every output path by one rule (agents.outputs): no input, nothing of seqmatch's own, no
    # folder of anyone else, one writer per folder.
    "json_is_the_pointer": Case([*EVAL, "--json", "CKPT/latest"], "the pointer of the seqmatch"),
    "json_is_the_lock_file": Case(
        [*EVAL, "--json", "CKPT/seqmatch.lock"], "the lock file of the seqmatch checkpoint",
    ),
    "json_in_a_step_folder": Case(
        [*EVAL, "--json", "CKPT/step-000000002/checkpoint.json"], "inside a step folder",
    ),
    "json_is_the_data": Case(
        [*EVAL, "--data", "prompts.jsonl", "--json", "prompts.jsonl"],
        "is this run's input (--data prompts.jsonl)", prepare=_prompts,
    ),
    "output_is_the_data": Case(
        [*EVAL, "--data", "prompts.jsonl", "--output", "prompts.jsonl"],
        "is this run's input (--data prompts.jsonl)", prepare=_prompts,
    ),
    "json_and_output_are_one_file": Case(
        [*EVAL, "--data", "prompts.jsonl", "--output", "o.jsonl", "--json", "./o.jsonl"],
        "--json and --output name the same file", prepare=_prompts,
    ),
    "json_is_a_dangling_link": Case(
        [*EVAL, "--json", "dangling.json"], "a symlink to nothing", prepare=_dangling_link,
    ),
    "json_into_a_fifo_nobody_reads": Case(
        [*EVAL, "--json", "fifo"], "no process reads that named pipe", prepare=_fifo,
    ),
    "export_into_a_users_folder": Case(
        ["export", "--checkpoint", "CKPT", "--out", "expuser"], "is not a seqmatch export",
        prepare=_users_export,
    ),
    "export_into_the_checkpoint": Case(
        ["export", "--checkpoint", "CKPT", "--out", "CKPT"], "a seqmatch checkpoint is there",
    ),
    "export_onto_a_file": Case(
        ["export", "--checkpoint", "CKPT", "--out", "afile"], "a file is there", prepare=_a_file,
    ),
    "export_a_policy_checkpoint": Case(
        ["export", "--checkpoint", "CKPT", "--out", "exported"],
        "not a pretrained-LM checkpoint",
    ),
    "compare_into_a_users_folder": Case(
        ["compare", "--out", "cmpuser"], "is not a seqmatch comparison",
        prepare=_users_comparison,
    ),
    "compare_into_a_checkpoint": Case(
        ["compare", "--out", "CKPT"], "a seqmatch checkpoint is there",
    ),
    "save_inside_a_step_folder": Case(
        [*TRAIN[:-4], "--save", "CKPT/step-000000002/new", "--logdir", "runs"],
        "inside a step folder",
    ),
    "save_held_by_another_process": Case(
        [*TRAIN[:-4], "--save", "CKPT", "--resume", "--logdir", "runs"], "is in use by process",
        prepare=_held_by_another_process,
    ),
    "resume_a_folder_whose_first_save_did_not_finish": Case(
        [*TRAIN[:-4], "--save", "CKPT", "--resume", "--logdir", "runs"],
        "run without --resume to start it afresh", _first_save_never_finished,
    ),
    "eval_a_step_folder_that_links_outside": Case(
        EVAL, "links outside the checkpoint", _step_links_outside,
    ),
    "name_climbs_out_of_logdir": Case([*TRAIN, "--name", "../../escape"], "must be a plain name"),
    "name_is_absolute": Case([*TRAIN, "--name", "/abs"], "must be a plain name"),
    "logdir_run_is_the_pointer": Case(
        [*TRAIN[:-2], "--logdir", "CKPT", "--name", "latest"], "a file is there",
    ),
    # Sizes: every one that scales memory is checked against the memory free.
    "huge_num_demonstrations": Case(
        [*TRAIN, "--num-demonstrations", "1000000000"], "demonstrations need about",
    ),
    "huge_model_batch_buckets": Case(
        [*TRAIN, "--model-batch-buckets", "1000000000000"], "model batches need about",
    ),
    "compare_huge_seeds": Case(["compare", "--out", "cmp", "--seeds", "1000000000"],
                               "--seeds must be in [1, 10000]"),
    # Settings that belong to another one.
    "lora_r_without_model": Case([*TRAIN, "--lora-r", "-1"], "--lora-r applies to --model only"),
    # Pretrained model folders: the file at fault named, in one line.
    "model_folder_is_empty": Case(
        MODEL, "model: no config.json",
        prepare=_empty_model,
    ),
    "model_folder_without_tokenizer": Case(
        MODEL, "model: no tokenizer",
        prepare=_model_without_tokenizer,
    ),
    "model_weights_truncated": Case(
        MODEL,
        "model/model.safetensors cannot be loaded", prepare=_model_with_truncated_weights,
    ),
    "model_config_mistyped": Case(
        MODEL,
        "model/config.json cannot be loaded", prepare=_model_with_a_mistyped_config,
    ),
}  # fmt: skip
if Path("/dev/full").exists():
    CASES["json_onto_a_full_device"] = Case([*EVAL, "--json", "/dev/full"], "the device is full")
if not torch.cuda.is_available():
    CASES["device_cuda_without_cuda"] = Case(
        [*TRAIN[:-4], "--device", "cuda"], "no CUDA device is available"
    )


def _setup(case: Case, root: Path, good: Path) -> list[str]:
    """Prepare ``root`` for ``case``; return its command line."""
    checkpoint = root / "ckpt"
    shutil.copytree(good, checkpoint)
    if case.corrupt is not None:
        case.corrupt(checkpoint)
    if case.prepare is not None:
        case.prepare(root)
    return [arg.replace("CKPT", str(checkpoint)) for arg in case.args]


def _files(folder: Path) -> dict[str, bytes]:
    """Every file's bytes, but the lock file's (it names whoever last held the lock)."""
    return {
        str(p.relative_to(folder)): p.read_bytes()
        for p in folder.rglob("*")
        if p.is_file() and p.name != LOCK
    }


def _check_one_line(stderr: str, case: Case, name: str) -> None:
    lines = stderr.splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got:\n{stderr}"
    prefix = f"seqmatch {name}: error: " if name in COMMANDS else "seqmatch: error: "
    assert lines[0].startswith(prefix), lines[0]
    assert case.message in lines[0], lines[0]
    assert "Traceback" not in stderr


@pytest.mark.parametrize("case_id", list(CASES))
def test_bad_input_gives_one_line(
    case_id: str,
    tmp_path: Path,
    good_checkpoint: Path,
    monkeypatch: pytest.MonkeyPatch,
    capfd: pytest.CaptureFixture[str],
    one_thread: None,
) -> None:
    case = CASES[case_id]
    args = _setup(case, tmp_path, good_checkpoint)
    monkeypatch.chdir(tmp_path)
    before = snapshot(tmp_path)
    checkpoint_bytes = _files(tmp_path / "ckpt")

    assert main(args) == case.code
    err = capfd.readouterr().err
    _check_one_line(err, case, args[0])
    # No partial files: no --json file, no --save folder, no TensorBoard run, no temporary
    # folders; the checkpoint read is untouched.
    assert snapshot(tmp_path) == before
    assert _files(tmp_path / "ckpt") == checkpoint_bytes


def test_debug_shows_the_traceback(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, one_thread: None
) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        main(["eval", "--checkpoint", "no-such-folder", "--debug"])
    with pytest.raises(ValueError, match="--steps must be >= 1"):
        main(["train", "--debug", "--steps", "-5", "--save", "new", "--json", "out.json"])
    assert snapshot(tmp_path) == set()


def test_installed_command_gives_one_line(tmp_path: Path) -> None:
    """The real process: one stderr line (no start-up warnings, no progress bar), exit 1."""
    result = run_cli("train", *TRAIN[1:], "--agent", "ppo2", "--json", "out.json", cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        "seqmatch train: error: unknown agent 'ppo2'; known agents: mle, bc, bc_executed, "
        "sequencematch, sequencematch_eta0, sequencematch_no_bkspc, ppo, untuned, dagger, "
        "dagger_demos (or module:Class)"
    ]
    assert result.stdout == ""
    assert snapshot(tmp_path) == set()


def test_installed_command_with_debug_shows_the_traceback(tmp_path: Path) -> None:
    result = run_cli("eval", "--checkpoint", "no-such-folder", "--debug", cwd=tmp_path)
    assert result.returncode != 0
    assert "Traceback (most recent call last)" in result.stderr
    assert "CheckpointError: no-such-folder: no such checkpoint" in result.stderr
    assert snapshot(tmp_path) == set()


@pytest.mark.slow
@pytest.mark.parametrize("case_id", list(CASES))
def test_bad_input_in_a_subprocess(case_id: str, tmp_path: Path, good_checkpoint: Path) -> None:
    case = CASES[case_id]
    args = _setup(case, tmp_path, good_checkpoint)
    before = snapshot(tmp_path)
    result = run_cli(*args, cwd=tmp_path)
    assert result.returncode == case.code
    _check_one_line(result.stderr, case, args[0])
    assert snapshot(tmp_path) == before


def test_ctrl_c_before_the_first_update_is_one_line_and_leaves_nothing(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capfd: pytest.CaptureFixture[str],
    one_thread: None,
) -> None:
    """Ctrl-C while the run is set up, or during its first update: exit 130, one line, and no
    --save folder, TensorBoard run or --json file."""
    import agents.training.trainer as trainer_module

    monkeypatch.chdir(tmp_path)
    args = [*TRAIN, "--json", "out/train.json"]

    def interrupted(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    for target in ("build_policy", "Trainer.train_step"):
        with monkeypatch.context() as patch:
            owner, _, name = target.rpartition(".")
            patch.setattr(getattr(trainer_module, owner) if owner else trainer_module, name,
                          interrupted)  # fmt: skip
            assert main(args) == 130
        assert capfd.readouterr().err.splitlines() == ["seqmatch train: interrupted"]
        assert snapshot(tmp_path) == set()


def test_ctrl_c_while_the_command_loads_is_one_line(tmp_path: Path) -> None:
    """The first second or two go into importing torch: Ctrl-C there is one line too."""
    import contextlib
    import signal
    import subprocess
    import sys
    import time

    from tests.integration.conftest import cli_env

    process = subprocess.Popen(
        [sys.executable, "-m", "agents.cli", *TRAIN],
        cwd=tmp_path,
        env=cli_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # as in a terminal
    )
    # Signalled once numpy's library is mapped: past the interpreter's own start-up (where
    # Python prints its traceback before any seqmatch code runs) and into the imports that take
    # the time, however slow a loaded machine makes the start.
    maps, deadline = Path(f"/proc/{process.pid}/maps"), time.monotonic() + 60
    if not maps.exists():
        pytest.skip("needs /proc to see what the process has loaded")
    while process.poll() is None and time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            if "_multiarray_umath" in maps.read_text():
                break
        time.sleep(0.005)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130, err
    assert err.splitlines() in (["seqmatch: interrupted"], ["seqmatch train: interrupted"])
    assert snapshot(tmp_path) == set()
