"""The batched backspace MDP against a list-based reference, on hand cases and random sequences."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from seqenv.mdp import InvalidActionError, PromptTooLongError, SequenceMDP
from seqenv.vocab import CharVocab

VOCAB = CharVocab("ab")  # a=0 b=1 <eos>=2 <bkspc>=3 pad=4
S = VOCAB.special
A, B, EOS, BK, PAD = 0, 1, S.eos_id, S.backspace_id, S.pad_id


def test_hand_case_two_tokens_one_backspace() -> None:
    mdp = SequenceMDP(S, max_length=5)
    mdp.reset([[A]])
    assert mdp.action_mask().tolist() == [[True, True, True, False]]
    r = mdp.step(torch.tensor([BK]))  # nothing generated: a no-op that costs a step
    assert r.noop_backspace.item() and mdp.state(0) == [A] and mdp.num_steps.item() == 1
    mdp.step(torch.tensor([B]))
    mdp.step(torch.tensor([A]))
    assert mdp.tokens.tolist() == [[A, B, A, PAD, PAD]]
    r = mdp.step(torch.tensor([BK]))
    assert r.deleted.item() and mdp.tokens.tolist() == [[A, B, PAD, PAD, PAD]]
    r = mdp.step(torch.tensor([EOS]))
    assert r.terminated.item() and not r.truncated.item() and mdp.generated(0) == [B]
    r = mdp.step(torch.tensor([A]))  # a done row ignores actions
    assert not r.appended.item() and mdp.generated(0) == [B] and mdp.num_steps.item() == 5


def test_errors_name_the_cause() -> None:
    mdp = SequenceMDP(S, max_length=3)
    with pytest.raises(PromptTooLongError, match="max_length is 3"):
        mdp.reset([[A, B, A]])
    with pytest.raises(PromptTooLongError, match="at least one token"):
        mdp.reset([[]])
    with pytest.raises(InvalidActionError, match="not an ordinary token"):
        mdp.reset([[EOS]])
    mdp.reset([[A]])
    with pytest.raises(InvalidActionError, match="action 7 is outside"):
        mdp.step(torch.tensor([7]))


class Reference:
    """The MDP of docs/method.md §1 written with plain lists, one sequence."""

    def __init__(self, prompt: list[int], max_length: int, max_steps: int) -> None:
        self.prompt, self.generated = list(prompt), []
        self.max_length, self.max_steps = max_length, max_steps
        self.steps, self.terminated, self.truncated = 0, False, False

    def step(self, action: int) -> None:
        if self.terminated or self.truncated:
            return
        self.steps += 1
        if action == EOS:
            self.terminated = True
            return
        if action == BK:
            if self.generated:
                self.generated.pop()
        else:
            self.generated.append(action)
        full = len(self.prompt) + len(self.generated) >= self.max_length
        self.truncated = self.steps >= self.max_steps or full


@settings(max_examples=200, deadline=None)
@given(
    prompts=st.lists(
        st.lists(st.sampled_from([A, B]), min_size=1, max_size=3), min_size=1, max_size=4
    ),
    actions=st.lists(st.lists(st.integers(-2, 6), min_size=4, max_size=4), max_size=25),
    max_length=st.integers(4, 9),
    max_steps=st.integers(1, 30),
)
def test_random_action_sequences_hold_every_invariant(
    prompts: list[list[int]], actions: list[list[int]], max_length: int, max_steps: int
) -> None:
    batch = len(prompts)
    mdp = SequenceMDP(S, max_length=max_length, max_steps=max_steps, batch_size=batch)
    mdp.reset(prompts)
    refs = [Reference(p, max_length, max_steps) for p in prompts]
    for row in actions:
        step = row[:batch]
        if any(not 0 <= a < S.num_actions for a in step):
            before = mdp.tokens.clone()
            with pytest.raises(InvalidActionError):
                mdp.step(torch.tensor(step))
            assert torch.equal(before, mdp.tokens), "an invalid action changed the state"
            continue
        mdp.step(torch.tensor(step))
        for i, ref in enumerate(refs):
            ref.step(step[i])
            assert mdp.state(i)[: len(prompts[i])] == prompts[i], "the prompt was deleted"
            assert mdp.generated(i) == ref.generated
            assert bool(mdp.terminated[i]) == ref.terminated
            assert bool(mdp.truncated[i]) == ref.truncated
            assert not (ref.terminated and ref.truncated)
            assert int(mdp.num_steps[i]) == ref.steps <= max_steps
            assert int(mdp.length[i]) <= max_length
            mask = mdp.action_mask()[i]
            assert bool(mask[BK]) == bool(ref.generated)
            assert mask[[A, B, EOS]].all()
            pad_tail = mdp.tokens[i, int(mdp.length[i]) :]
            assert (pad_tail == PAD).all()
