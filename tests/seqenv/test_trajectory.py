"""Trajectory: validation, construction from text, replay through the MDP, noise, loading files."""

from __future__ import annotations

import dataclasses
import json
import os
import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from seqenv.trajectory import (
    DemonstrationError,
    NoiseFn,
    Trajectory,
    augment,
    from_completion,
    from_text,
    load_demonstrations,
    random_noise,
    replay,
)
from seqenv.vocab import CharVocab, SpecialIds

# Toy vocabulary: a=0 b=1 c=2, <eos>=3, <bkspc>=4, pad=5.
VOCAB = CharVocab("abc")
SPECIAL = VOCAB.special
A, B, C = 0, 1, 2
EOS, BK = SPECIAL.eos_id, SPECIAL.backspace_id


def traj(prompt: list[int], actions: list[int], terminated: bool = True) -> Trajectory:
    return Trajectory(prompt, actions, terminated, not terminated, SPECIAL)


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def constant_noise(token: int) -> NoiseFn:
    return lambda rng, prompt, generated, true_next: token


# ------------------------------------------------------------------------------------------------
# The Trajectory type


def test_trajectory_holds_frozen_int64_arrays() -> None:
    t = traj([A], [B, C, BK, A, EOS])
    assert t.prompt.dtype == np.int64 and t.actions.dtype == np.int64
    assert (t.num_steps, t.num_backspaces) == (5, 1)
    assert t.generated() == [B, A]
    with pytest.raises(ValueError, match="read-only"):
        t.actions[0] = C
    with pytest.raises(dataclasses.FrozenInstanceError):
        t.terminated = False  # type: ignore[misc]


def test_trajectory_json_round_trip_and_equality() -> None:
    t = traj([A, B], [C, BK, A], terminated=False)
    data = json.loads(json.dumps(t.to_json()))
    assert Trajectory.from_json(data, SPECIAL) == t
    assert t != traj([A, B], [C, BK, B], terminated=False)
    # Same ids, another vocabulary (in "abcd", 4 is <eos> and 5 <bkspc>).
    assert t != Trajectory([A, B], [C, 5, A], False, True, CharVocab("abcd").special)
    with pytest.raises(TypeError):
        hash(t)


def test_intended_actions_round_trip_and_labels() -> None:
    # Intended a, executed b (a disturbance), then the backspace and a again.
    t = Trajectory([A], [B, BK, A, EOS], True, False, SPECIAL, intended=[A, BK, A, EOS])
    assert t.intended is not None and t.intended.dtype == np.int64
    assert t.labels("intended").tolist() == [A, BK, A, EOS] == t.intended_actions.tolist()
    assert t.labels("executed").tolist() == [B, BK, A, EOS] == t.labels().tolist()
    assert t.disturbed.tolist() == [True, False, False, False] and t.num_disturbances == 1
    data = json.loads(json.dumps(t.to_json()))
    assert data["intended"] == [A, BK, A, EOS]
    assert Trajectory.from_json(data, SPECIAL) == t
    plain = traj([A], [B, BK, A, EOS])
    assert "intended" not in plain.to_json() and plain.intended is None
    assert Trajectory.from_json(plain.to_json(), SPECIAL).intended is None
    assert t != plain and plain.labels("intended") is plain.actions
    # None means intended == executed: the two spellings are equal.
    same = Trajectory([A], [B, BK, A, EOS], True, False, SPECIAL, intended=[B, BK, A, EOS])
    assert same == plain and same.num_disturbances == 0
    with pytest.raises(ValueError, match="read-only"):
        t.intended[0] = C  # type: ignore[index]
    with pytest.raises(ValueError, match="label kind must be"):
        t.labels("noise")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("actions", "intended", "match"),
    [
        ([A, EOS], [A], "intended holds 1 actions, actions 2"),
        ([A, EOS], [A, BK], "step 1: intended 4 but executed 3"),
        ([A, BK, EOS], [A, B, EOS], "step 1: intended 1 but executed 4"),
        ([A, EOS], [[A, EOS]], "intended must be 1-D"),
    ],
)
def test_intended_validation(actions: list, intended: list, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        Trajectory([A], actions, True, False, SPECIAL, intended=intended)


@pytest.mark.parametrize(
    ("prompt", "actions", "terminated", "truncated", "match"),
    [
        ([], [A, EOS], True, False, "prompt of at least one token"),
        ([EOS], [A, EOS], True, False, "prompt holds id 3"),
        ([BK], [A, EOS], True, False, "prompt holds id 4"),
        ([[A]], [A, EOS], True, False, "prompt must be 1-D"),
        ([A], [], True, False, "at least one action"),
        ([A], [A, 6], False, True, r"action 6 is outside the action space \[0, 5\)"),
        ([A], [-1, EOS], True, False, "action -1 is outside"),
        ([A], [A, EOS], True, True, "exactly one of terminated and truncated"),
        ([A], [A], False, False, "exactly one of terminated and truncated"),
        ([A], [A, EOS, B], True, False, "exactly one <eos>, as its last action"),
        ([A], [EOS, EOS], True, False, "exactly one <eos>, as its last action"),
        ([A], [A], True, False, "exactly one <eos>, as its last action"),
        ([A], [A, EOS], False, True, "a truncated trajectory holds no <eos>"),
        ([A], [BK, A, EOS], True, False, "would delete the prompt"),
        ([A], [B, BK, BK, EOS], True, False, "would delete the prompt"),
    ],
)
def test_trajectory_validation(
    prompt: list, actions: list, terminated: bool, truncated: bool, match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        Trajectory(prompt, actions, terminated, truncated, SPECIAL)


def test_from_completion() -> None:
    t = from_completion([A], [B, C], SPECIAL, max_length=4)
    assert t == traj([A], [B, C, EOS])
    # The buffer keeps a free slot for <eos>: prompt + completion must stay below max_length.
    with pytest.raises(DemonstrationError, match=r"do not fit in max_length=3"):
        from_completion([A], [B, C], SPECIAL, max_length=3)


def test_from_text() -> None:
    # Shorter than max_length: a complete demonstration ended by <eos>.
    assert from_text([A, B, C], SPECIAL, prompt_tokens=1, max_length=4) == traj([A], [B, C, EOS])
    # As long as max_length or longer: the episode the MDP truncates at max_length.
    long = from_text([A, B, C, A, B], SPECIAL, prompt_tokens=2, max_length=4)
    assert long == traj([A, B], [C, A], terminated=False)
    assert replay([long], max_length=4, max_steps=8) == [[C, A]]
    with pytest.raises(DemonstrationError, match="no continuation after 2 prompt tokens"):
        from_text([A, B], SPECIAL, prompt_tokens=2, max_length=4)
    for prompt_tokens in (0, 4, 6):
        with pytest.raises(DemonstrationError, match=f"prompt_tokens={prompt_tokens} must be"):
            from_text([A, B, C, A, B, C, A, B], SPECIAL, prompt_tokens, max_length=4)


# ------------------------------------------------------------------------------------------------
# Replay


def test_replay_applies_backspaces() -> None:
    batch = [
        traj([A], [B, C, BK, A, EOS]),
        traj([C, C], [A, BK, EOS]),
        traj([B], [A, A, A], terminated=False),
    ]
    assert replay(batch) == [[B, A], [], [A, A, A]]
    assert replay([]) == []


def test_replay_rejects_mixed_vocabularies() -> None:
    other = Trajectory([A], [A, 3], False, True, CharVocab("abcd").special)
    with pytest.raises(ValueError, match="different vocabularies"):
        replay([traj([A], [B, EOS]), other])


def test_replay_checks_episodes_of_the_mdp() -> None:
    # Truncated at max_length: prompt 1 + 3 tokens fills a buffer of 4.
    full = traj([A], [B, C, A], terminated=False)
    assert replay([full], max_length=4, max_steps=8) == [[B, C, A]]
    # Truncated by the step budget (backspaces count).
    budget = traj([A], [B, BK, B, BK], terminated=False)
    assert replay([budget], max_length=10, max_steps=4) == [[]]
    # A terminated episode may use the whole budget: <eos> at the last step still terminates.
    assert replay([traj([A], [B, BK, EOS])], max_length=4, max_steps=3) == [[]]

    with pytest.raises(DemonstrationError, match="the MDP ended it at step 3"):
        replay([traj([A], [B, C, A, EOS])], max_length=4, max_steps=8)  # no room for <eos>
    with pytest.raises(DemonstrationError, match="the MDP ended it at step 2"):
        replay([traj([A], [B, BK, EOS])], max_length=10, max_steps=2)
    with pytest.raises(DemonstrationError, match="ends at step 2 but the MDP does not"):
        replay([traj([A], [B, C], terminated=False)], max_length=10, max_steps=20)
    with pytest.raises(DemonstrationError, match=r"trajectory 1 .*\(truncated\).*at step 3"):
        # The MDP truncates it at max_length, as claimed, but one step earlier.
        replay([full, traj([A], [B, C, A, B], terminated=False)], max_length=4, max_steps=8)
    # Without both limits, no check: the actions are simply applied.
    assert replay([traj([A], [B, C], terminated=False)]) == [[B, C]]


# ------------------------------------------------------------------------------------------------
# Noise augmentation


def test_augment_with_p0_is_identity() -> None:
    t = traj([A], [B, C, BK, A, EOS])
    rng = np.random.default_rng(0)
    assert augment(t, random_noise(SPECIAL), p=0.0, rng=rng) == t


def test_augment_with_p1_inserts_before_every_action() -> None:
    t = traj([A], [B, C, BK, EOS])
    once = augment(t, constant_noise(A), p=1.0, rng=np.random.default_rng(0))
    expected = [A, BK, B, A, BK, C, A, BK, BK, A, BK, EOS]
    assert once.actions.tolist() == expected
    assert once.terminated and once.prompt.tolist() == [A]
    twice = augment(t, constant_noise(C), p=1.0, k=2, rng=np.random.default_rng(0))
    assert twice.actions.tolist()[:5] == [C, C, BK, BK, B]
    assert twice.num_steps == 5 * t.num_steps
    assert replay([once, twice, t]) == [[B], [B], [B]]


def test_augment_passes_context_to_the_noise_function() -> None:
    seen: list[tuple[list[int], list[int], int]] = []

    def noise(
        rng: np.random.Generator, prompt: Sequence[int], generated: Sequence[int], true_next: int
    ) -> int:
        seen.append((list(prompt), list(generated), true_next))
        return C

    augment(traj([A], [B, A, EOS]), noise, p=1.0, k=2, rng=np.random.default_rng(0))
    assert seen == [
        ([A], [], B),
        ([A], [C], B),  # the second noise token sees the first
        ([A], [B], A),
        ([A], [B, C], A),
        ([A], [B, A], EOS),
        ([A], [B, A, C], EOS),
    ]


def test_augment_respects_max_length() -> None:
    # Prompt 2 + 3 tokens fill max_length=5: noise fits only while a token slot stays free.
    t = from_text([A, B, C, C, C], SPECIAL, prompt_tokens=2, max_length=5)
    assert t.truncated
    out = augment(t, random_noise(SPECIAL), p=1.0, rng=np.random.default_rng(0), max_length=5)
    assert out.num_backspaces == 2  # not before the last token: the noise would truncate
    assert out.actions[-1] == C and out.actions[-2] == C
    assert replay([out], max_length=5, max_steps=10) == [[C, C, C]]
    k2 = augment(t, random_noise(SPECIAL), p=1.0, k=2, rng=np.random.default_rng(0), max_length=5)
    assert k2.num_backspaces == 2  # only before the first token
    assert replay([k2], max_length=5, max_steps=10) == [[C, C, C]]


def test_augment_respects_max_steps() -> None:
    t = traj([A], [B, C, EOS])
    out = augment(t, constant_noise(A), p=1.0, rng=np.random.default_rng(0), max_steps=5)
    assert out.actions.tolist() == [A, BK, B, C, EOS]
    assert replay([out], max_length=10, max_steps=5) == [[B, C]]


def test_augment_is_reproducible_and_random_noise_draws_tokens() -> None:
    t = traj([A], [B] * 30 + [EOS])
    noise = random_noise(SPECIAL)
    first = augment(t, noise, p=0.5, rng=np.random.default_rng(7))
    assert first == augment(t, noise, p=0.5, rng=np.random.default_rng(7))
    assert 0 < first.num_backspaces < 31
    drawn = {int(a) for a in first.actions} - {B, EOS, BK}
    assert drawn <= {A, C} and drawn  # ordinary tokens only


def test_augment_rejects_bad_arguments() -> None:
    t = traj([A], [B, EOS])
    rng = np.random.default_rng(0)
    for p in (-0.1, 1.5):
        with pytest.raises(ValueError, match=r"noise level p must be in \[0, 1\]"):
            augment(t, random_noise(SPECIAL), p=p, rng=rng)
    with pytest.raises(ValueError, match="k must be >= 1"):
        augment(t, random_noise(SPECIAL), p=0.5, k=0, rng=rng)
    with pytest.raises(ValueError, match="noise function returned 4, not an ordinary token"):
        augment(t, constant_noise(BK), p=1.0, rng=rng)


@st.composite
def episodes(draw: st.DrawFn) -> tuple[Trajectory, int, int]:
    """A random episode with backspaces, and a (max_length, max_steps) of an MDP it belongs to."""
    prompt = draw(st.lists(st.sampled_from([A, B, C]), min_size=1, max_size=3))
    actions: list[int] = []
    size = peak = 0
    for _ in range(draw(st.integers(1, 25))):
        if size and draw(st.booleans()):
            actions.append(BK)
            size -= 1
        else:
            actions.append(draw(st.sampled_from([A, B, C])))
            size += 1
            peak = max(peak, size)
    roomy_length = len(prompt) + peak + 1 + draw(st.integers(0, 3))
    if draw(st.booleans()):  # terminated, within any budget that covers it
        actions.append(EOS)
        max_steps = len(actions) + draw(st.integers(0, 5))
        return traj(prompt, actions, terminated=True), roomy_length, max_steps
    # Truncated by the step budget: the budget is its length, the buffer never fills.
    return traj(prompt, actions, terminated=False), roomy_length, len(actions)


@settings(max_examples=150, deadline=None)
@given(
    episode=episodes(),
    p=st.floats(0.0, 1.0),
    k=st.integers(1, 3),
    seed=st.integers(0, 2**32 - 1),
)
def test_augmented_episode_replays_to_the_same_text(
    episode: tuple[Trajectory, int, int], p: float, k: int, seed: int
) -> None:
    t, max_length, max_steps = episode
    assert replay([t], max_length, max_steps) == [t.generated()]  # the strategy's own claim
    rng = np.random.default_rng(seed)
    free = augment(t, random_noise(SPECIAL), p, k, rng)
    assert replay([free]) == replay([t])
    bounded = augment(t, random_noise(SPECIAL), p, k, rng, max_length, max_steps)
    assert replay([bounded], max_length, max_steps) == replay([t])
    assert bounded.terminated == t.terminated
    # Every insertion is k noise tokens and k backspaces.
    inserted = bounded.num_backspaces - t.num_backspaces
    assert inserted % k == 0 and bounded.num_steps == t.num_steps + 2 * inserted


# ------------------------------------------------------------------------------------------------
# Loading demonstrations


def test_load_jsonl(tmp_path: Path) -> None:
    path = write_lines(
        tmp_path / "demos.jsonl",
        [
            json.dumps({"prompt": "ab", "completion": "c"}),
            "",  # blank lines are skipped
            json.dumps({"text": "abcab"}),
        ],
    )
    demos = load_demonstrations(path, VOCAB, max_length=4, prompt_tokens=2)
    assert demos == [traj([A, B], [C, EOS]), traj([A, B], [C, A], terminated=False)]
    # A .json file is read as JSON lines too.
    json_path = write_lines(
        tmp_path / "demos.json", [json.dumps({"prompt": "a", "completion": ""})]
    )
    assert load_demonstrations(json_path, VOCAB, max_length=4) == [traj([A], [EOS])]


def test_load_plain_text(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "demos.txt", ["abc", "", "cab"])
    demos = load_demonstrations(path, VOCAB, max_length=8, prompt_tokens=1)
    assert demos == [traj([A], [B, C, EOS]), traj([C], [A, B, EOS])]
    with pytest.raises(DemonstrationError, match=r"demos\.txt:1: .*needs prompt_tokens"):
        load_demonstrations(path, VOCAB, max_length=8)


def test_load_from_a_pipe_reads_its_first_line_for_the_format(tmp_path: Path) -> None:
    """`--data <(...)` names a pipe without a suffix: JSONL is told by its first line."""
    for lines, expected in [
        ([json.dumps({"prompt": "ab", "completion": "c"})], [traj([A, B], [C, EOS])]),
        (["", "abc"], [traj([A], [B, C, EOS])]),  # plain text, the first line blank
    ]:
        fifo = tmp_path / "pipe"
        os.mkfifo(fifo)
        text = "\n".join(lines) + "\n"
        writer = threading.Thread(target=fifo.write_text, args=(text,))
        writer.start()
        assert load_demonstrations(fifo, VOCAB, max_length=8, prompt_tokens=1) == expected
        writer.join(10.0)
        fifo.unlink()


def test_load_hf_dataset_folder(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    folder = tmp_path / "dataset"
    datasets.Dataset.from_dict({"prompt": ["a", "bc"], "completion": ["bb", "a"]}).save_to_disk(
        folder
    )
    demos = load_demonstrations(folder, VOCAB, max_length=8)
    assert demos == [traj([A], [B, B, EOS]), traj([B, C], [A, EOS])]

    splits = tmp_path / "splits"
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": ["abca"]})}).save_to_disk(
        splits
    )
    assert load_demonstrations(splits, VOCAB, max_length=8, prompt_tokens=2) == [
        traj([A, B], [C, A, EOS])
    ]
    no_train = tmp_path / "no_train"
    datasets.DatasetDict({"test": datasets.Dataset.from_dict({"text": ["ab"]})}).save_to_disk(
        no_train
    )
    with pytest.raises(DemonstrationError, match="without a 'train' split"):
        load_demonstrations(no_train, VOCAB, max_length=8, prompt_tokens=1)
    bad_row = tmp_path / "bad_row"
    datasets.Dataset.from_dict({"prompt": ["a", "a"], "completion": ["b", "z"]}).save_to_disk(
        bad_row
    )
    with pytest.raises(DemonstrationError, match=r"bad_row\[1\]: character 'z'"):
        load_demonstrations(bad_row, VOCAB, max_length=8)
    not_a_dataset = tmp_path / "empty_folder"
    not_a_dataset.mkdir()
    with pytest.raises(DemonstrationError, match="not a saved Hugging Face dataset"):
        load_demonstrations(not_a_dataset, VOCAB, max_length=8)


GOOD = json.dumps({"prompt": "a", "completion": "b"})


@pytest.mark.parametrize(
    ("second_line", "match"),
    [
        (json.dumps({"prompt": "a"}), r"expected `prompt` and `completion` fields, or `text`"),
        (json.dumps({"answer": "b"}), r"or `text`; got \['answer'\]"),
        ('{"prompt": "a", "completion": ', "not valid JSON"),
        (json.dumps(["a", "b"]), "expected a JSON object, got list"),
        (json.dumps({"prompt": "a", "completion": 3}), "must be strings"),
        (json.dumps({"text": None}), "`text` must be a string"),
        (
            json.dumps({"prompt": "a", "completion": "bxd"}),
            "character 'x' is not in the vocabulary",
        ),
        (json.dumps({"prompt": "a", "completion": "bbbbbbbb"}), "do not fit in max_length=8"),
        (json.dumps({"prompt": "", "completion": "b"}), "prompt of at least one token"),
    ],
)
def test_bad_jsonl_line_names_file_and_line(tmp_path: Path, second_line: str, match: str) -> None:
    path = write_lines(tmp_path / "demos.jsonl", [GOOD, second_line])
    with pytest.raises(DemonstrationError, match=rf"demos\.jsonl:2: .*{match}"):
        load_demonstrations(path, VOCAB, max_length=8)


def test_non_utf8_file_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "demos.jsonl"
    path.write_bytes((GOOD + "\n" + GOOD + "\n").encode() + b'{"prompt": "caf\xe9"}\n')
    with pytest.raises(DemonstrationError, match=r"demos\.jsonl:3: not UTF-8 text"):
        load_demonstrations(path, VOCAB, max_length=8)


def test_missing_or_empty_files(tmp_path: Path) -> None:
    with pytest.raises(DemonstrationError, match=r"nowhere\.jsonl: no such file or folder"):
        load_demonstrations(tmp_path / "nowhere.jsonl", VOCAB, max_length=8)
    empty = write_lines(tmp_path / "empty.jsonl", ["", "  "])
    with pytest.raises(DemonstrationError, match=r"empty\.jsonl: no demonstrations found"):
        load_demonstrations(empty, VOCAB, max_length=8)


def test_format_can_be_forced(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "demos.data", [GOOD])
    assert load_demonstrations(path, VOCAB, max_length=8, fmt="jsonl") == [traj([A], [B, EOS])]
    # Read as plain text, the same line holds characters outside the vocabulary.
    with pytest.raises(DemonstrationError, match=r"demos\.data:1: character '\{'"):
        load_demonstrations(path, VOCAB, max_length=8, prompt_tokens=1)


def test_special_ids_of_loaded_trajectories(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "demos.jsonl", [GOOD])
    (demo,) = load_demonstrations(path, VOCAB, max_length=8)
    assert demo.special == SpecialIds(num_actions=5, eos_id=3, backspace_id=4, pad_id=5)


def test_jsonl_lines_end_at_newline_only(tmp_path: Path) -> None:
    """U+2028, U+2029 and U+0085 inside a JSON string do not end its line (str.splitlines would)."""
    vocab = CharVocab("ab\u2028\u2029\x85")
    path = tmp_path / "demos.jsonl"
    record = json.dumps({"prompt": "a\u2028b", "completion": "\x85\u2029b"}, ensure_ascii=False)
    path.write_text(record + "\r\n" + GOOD + "\n", encoding="utf-8")
    demos = load_demonstrations(path, vocab, max_length=16)
    assert [vocab.decode(d.prompt) for d in demos] == ["a\u2028b", "a"]
    assert demos[0].generated() == vocab.encode("\x85\u2029b")


def test_deeply_nested_json_is_a_one_line_error(tmp_path: Path) -> None:
    for deep in ("[" * 100_000 + "]" * 100_000, '{"a":' * 100_000 + "1" + "}" * 100_000):
        path = write_lines(tmp_path / "deep.jsonl", [GOOD, deep])
        with pytest.raises(DemonstrationError, match=r"deep\.jsonl:2: JSON nested deeper than 64"):
            load_demonstrations(path, VOCAB, max_length=8)
    # Brackets inside strings do not count.
    vocab = CharVocab("ab[{")
    path = write_lines(
        tmp_path / "brackets.jsonl", [json.dumps({"prompt": "[{" * 50, "completion": "a"})]
    )
    (demo,) = load_demonstrations(path, vocab, max_length=128)
    assert vocab.decode(demo.prompt) == "[{" * 50


def test_overlong_line_is_a_one_line_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from seqenv import trajectory

    assert trajectory.MAX_LINE_BYTES == 16 * 2**20
    monkeypatch.setattr(trajectory, "MAX_LINE_BYTES", 64)
    long_line = json.dumps({"prompt": "a", "completion": "b" * 100})
    path = write_lines(tmp_path / "long.jsonl", [GOOD, long_line])
    with pytest.raises(DemonstrationError, match=r"long\.jsonl:2: line longer than 64 bytes"):
        load_demonstrations(path, VOCAB, max_length=8)
