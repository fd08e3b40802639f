"""The re-feed batch of docs/method.md §6: the worked example, the mask on random trajectories."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch
from torch.nn.attention.flex_attention import create_mask

from agents.collate import RefeedMask, collate
from seqenv.trajectory import Trajectory
from seqenv.vocab import CharVocab


def attended(mask: torch.Tensor, row: int) -> list[int]:
    return torch.nonzero(mask[row]).flatten().tolist()


def test_worked_example_of_method_section_6() -> None:
    """Prompt [p0 p1]; actions [x, y, <bkspc>, z, <eos>]: docs/method.md §6's table, row by row."""
    vocab = CharVocab(["p", "q", "x", "y", "z"])  # p0 = "p", p1 = "q"
    s = vocab.special
    p0, p1, x, y, z = vocab.encode("pqxyz")
    trajectory = Trajectory([p0, p1], [x, y, s.backspace_id, z, s.eos_id], True, False, s)
    batch = collate([trajectory])

    assert batch.input_ids[0].tolist() == [p0, p1, x, y, x, z]
    assert batch.position_ids[0].tolist() == [0, 1, 2, 3, 2, 3]
    mask = batch.attention.dense()[0]
    table = [[0], [0, 1], [0, 1, 2], [0, 1, 2, 3], [0, 1, 4], [0, 1, 4, 5]]
    assert [attended(mask, row) for row in range(6)] == table
    # logits of state s_t at row state_rows[t]; labels a_t
    assert batch.state_rows[0].tolist() == [1, 2, 3, 4, 5]
    assert batch.actions[0].tolist() == [x, y, s.backspace_id, z, s.eos_id]
    assert batch.next_rows[0, :4].tolist() == [2, 3, 4, 5]
    assert batch.terminal[0].tolist() == [False, False, False, False, True]
    assert batch.truncated[0].tolist() == [False] * 5
    assert batch.discount_exponent[0].tolist() == [0, 1, 2, 3, 4]
    assert batch.undone[0].tolist() == [False, True, False, False, False]  # y is deleted
    assert batch.step_mask[0].all()
    assert batch.row_mask[0].all()
    assert batch.has_backspace


def test_each_state_row_attends_exactly_to_its_state(
    vocab: CharVocab,
    random_trajectory: Callable[..., Trajectory],
    states_of: Callable[[Trajectory], list[list[int]]],
) -> None:
    rng = np.random.default_rng(0)
    trajectories = [random_trajectory(rng, vocab.special) for _ in range(40)]
    batch = collate(trajectories)
    mask = batch.attention.dense()
    assert batch.has_backspace
    for b, trajectory in enumerate(trajectories):
        states = states_of(trajectory)
        for t in range(trajectory.num_steps):
            for row, state in ((batch.state_rows[b, t], states[t]), (batch.next_rows[b, t], None)):
                if state is None:
                    if batch.terminal[b, t]:
                        continue
                    state = states[t + 1]
                rows = attended(mask[b], int(row))
                positions = batch.position_ids[b, rows].tolist()
                assert positions == list(range(len(state))), (b, t)
                assert batch.input_ids[b, rows].tolist() == state, (b, t)
                assert rows[-1] == int(row)  # the state's last token sits in its own row
        N = trajectory.num_steps
        assert batch.truncated[b, : N - 1].sum() == 0
        assert bool(batch.truncated[b, N - 1]) == trajectory.truncated
        assert bool(batch.terminal[b, N - 1]) == trajectory.terminated
        assert not batch.step_mask[b, N:].any()
        rows_used = int(batch.row_mask[b].sum())
        assert rows_used == len(trajectory.prompt) + N - int(trajectory.terminated)


def test_mask_mod_gives_the_dense_mask(
    vocab: CharVocab, random_trajectory: Callable[..., Trajectory]
) -> None:
    rng = np.random.default_rng(1)
    batch = collate([random_trajectory(rng, vocab.special) for _ in range(5)])
    refeed = batch.attention
    B, T = batch.input_ids.shape
    flex_mask = create_mask(refeed.mask_mod(), B, 1, T, T, device="cpu")  # (B, 1, T, T)
    assert torch.equal(flex_mask[:, 0], refeed.dense())


def test_no_backspace_is_plain_causal_with_right_padding(vocab: CharVocab) -> None:
    s = vocab.special
    trajectories = [
        Trajectory([0, 1], [2, 3, s.eos_id], True, False, s),
        Trajectory([4], [5, 0, 1, 2], False, True, s),
    ]
    batch = collate(trajectories)
    assert not batch.has_backspace
    T = batch.input_ids.shape[1]
    assert (batch.alive_until == T).all()
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    assert torch.equal(batch.attention.dense(), causal.expand(2, T, T))
    assert batch.input_ids[0].tolist() == [0, 1, 2, 3, s.pad_id]
    assert batch.row_mask.tolist() == [[True] * 4 + [False], [True] * 5]
    assert batch.truncated[1].tolist() == [False, False, False, True]
    assert batch.next_rows[1].tolist() == [1, 2, 3, 4]  # the last next state is bootstrapped
    assert batch.step_mask[0].tolist() == [True, True, True, False]


def test_pad_to_multiple_and_to_device(vocab: CharVocab) -> None:
    s = vocab.special
    batch = collate([Trajectory([0], [1, s.backspace_id, 2], False, True, s)], pad_to_multiple=8)
    assert batch.input_ids.shape == (1, 8)
    assert batch.alive_until[0].tolist() == [2, 2, 8, 8, 8, 8, 8, 8]
    moved = batch.to("cpu")
    assert torch.equal(moved.input_ids, batch.input_ids) and moved.has_backspace


def test_errors(vocab: CharVocab) -> None:
    with pytest.raises(ValueError, match="at least one"):
        collate([])
    other = CharVocab("xy")
    mixed = [
        Trajectory([0], [1], False, True, vocab.special),
        Trajectory([0], [1], False, True, other.special),
    ]
    with pytest.raises(ValueError, match="different vocabularies"):
        collate(mixed)
    with pytest.raises(ValueError, match="int64"):
        RefeedMask(torch.zeros(2, 3))


def test_intended_and_executed_labels_through_collate() -> None:
    """A disturbed step: the layout follows what ran, the labels what the learner is taught.

    Prompt [p]; the agent intends x, the environment runs y instead; the expert deletes it
    (<bkspc>), intends x again (it runs), then <eos>.
    """
    vocab = CharVocab(["p", "x", "y"])
    s = vocab.special
    p, x, y = vocab.encode("pxy")
    executed = [y, s.backspace_id, x, s.eos_id]
    intended = [x, s.backspace_id, x, s.eos_id]
    trajectory = Trajectory([p], executed, True, False, s, intended=intended)
    by_intent = collate([trajectory])  # the default
    by_execution = collate([trajectory], labels="executed")
    for batch in (by_intent, by_execution):
        assert batch.actions[0].tolist() == executed  # the rows are those of what ran
        assert batch.input_ids[0].tolist() == [p, y, p, x]  # y fed, then p re-fed after <bkspc>
    assert by_intent.labels[0].tolist() == intended
    assert by_execution.labels[0].tolist() == executed
    with pytest.raises(ValueError, match="labels must be"):
        collate([trajectory], labels="chosen")  # type: ignore[arg-type]
    # Undisturbed trajectories: both labellings are the actions.
    clean = Trajectory([p], [x, s.eos_id], True, False, s)
    assert (
        collate([clean]).labels[0].tolist()
        == collate([clean], labels="executed").labels[0].tolist()
        == [x, s.eos_id]
    )
