"""Exact occupancy measures of the backspace MDP, on a configuration small enough to enumerate.

For a source whose next-action distribution is known (the dyck grammar), the data's occupancy
measure is exact, and so is a model's once every state it can reach is enumerated. The exact
divergence between the two is then a metric free of sampling noise: the quantity SequenceMatch
minimises (METHOD.md §1, §3), measured rather than estimated.

The formulation (discounted and budget-free):

- **States** are the live states of :class:`seqenv.mdp.SequenceMDP`: the prompt followed by
  ``g`` generated ordinary tokens, for every token string with ``len(prompt) + g < max_length``.
  A model with full support (a softmax) reaches all of them, so all of them are enumerated:
  ``sum_g n**g`` states for ``n`` ordinary tokens.
- **Actions** are all ``num_actions`` ids. Transitions are the MDP's: a token appends itself;
  ``<bkspc>`` deletes the last generated token (a no-op self-loop with nothing generated, where
  a policy should give it probability 0); ``<eos>`` terminates.
- **Episode end.** ``<eos>``, and an append that fills the buffer (``max_length`` tokens, where
  the MDP truncates), lead to an *absorbing* state, which then repeats for ever. There is no
  step budget: the discount alone keeps the measure finite, and a policy may loop through
  backspaces as long as it likes.
- **Occupancy.** With ``d = (1 - γ) ρ0 + γ P_πᵀ d`` the discounted state distribution over the
  live states (ρ0 is the empty generation), ``ρ(s, a) = d(s) π(a|s)``, which is METHOD.md's
  ``(1 - γ) π(a|s) Σ_t γ^t P(s_t = s)``. Its total is ``1 - E[γ^T]`` for an episode of ``T``
  steps: the mass that the live states lose when the episode ends. That lost mass is the
  occupancy of the absorbing states. Each absorbing state is entered by exactly one live pair
  (s, a) (transitions are deterministic and the strings differ), and staying for ever after a
  step of weight ``ρ(s, a)`` adds ``γ/(1 - γ) ρ(s, a)``; so :attr:`Occupancy.absorbing` holds
  it on the ending pair. Live and absorbing parts together sum to exactly 1 (up to the linear
  solver's rounding): a probability distribution, on which divergences are well defined.

:func:`exact_divergences` compares the data's measure and a model's on the union of both parts
(``absorbing=True``), or on the live parts alone, each normalised to sum 1 (``absorbing=False``).

Shapes: N live states, A = num_actions.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from agents.models.interface import PolicyModel, mask_logits
from seqenv.rules import allowed_actions
from seqenv.tasks.base import Example, Split
from seqenv.vocab import SpecialIds, Vocab

PolicyProbs = Callable[[list[list[int]]], np.ndarray]
"""``policy_probs(states) -> (len(states), A)``: each state (prompt + generated ids) to its action
distribution; rows sum to 1 and masked actions have probability 0."""

MAX_STATES = 500_000
"""Refuse larger enumerations: the model's forward pass over every state dominates the cost."""

_ROW_TOLERANCE = 1e-6  # how far a row of policy probabilities may be from summing to 1


class GrammarTask(Protocol):
    """A task whose expert is a known next-action distribution (e.g. the dyck task)."""

    @property
    def vocab(self) -> Vocab: ...

    def next_token_probs(self, prefix_ids: Sequence[int]) -> np.ndarray: ...

    def sample(self, rng: np.random.Generator, split: Split = "train") -> Example: ...


@dataclass(frozen=True)
class StateSpace:
    """Every live state of the backspace MDP from one prompt, and the transitions between them.

    States come level by level (generated length 0, 1, ...), each level in lexicographic order
    of the token ids, so the empty generation (the start state) is index 0.

    Attributes:
        special: the vocabulary's special ids.
        prompt: the prompt's ids.
        max_length: the MDP's buffer size, prompt included.
        generated: the generated ids of each state, N tuples.
        next_state: (N, A) int64, the state an action leads to; -1 where the action ends the
            episode (``<eos>``, or an append that fills the buffer).
    """

    special: SpecialIds
    prompt: tuple[int, ...]
    max_length: int
    generated: list[tuple[int, ...]]
    next_state: np.ndarray

    @property
    def num_states(self) -> int:
        return len(self.generated)

    @property
    def ending(self) -> np.ndarray:
        """(N, A) bool: the pairs (s, a) that end the episode (and enter an absorbing state)."""
        return self.next_state < 0

    def states(self) -> list[list[int]]:
        """Every state as prompt + generated ids, the input of a :data:`PolicyProbs`."""
        prompt = list(self.prompt)
        return [prompt + list(g) for g in self.generated]


def count_states(num_tokens: int, max_generated: int) -> int:
    """Strings of 0..max_generated tokens over ``num_tokens`` tokens."""
    return sum(num_tokens**g for g in range(max_generated + 1))


def enumerate_states(
    special: SpecialIds, prompt: Sequence[int], max_length: int, max_states: int = MAX_STATES
) -> StateSpace:
    """Every live state reachable from ``prompt`` (with full support) and its transitions.

    Raises:
        ValueError: if the prompt leaves no room to generate, or the space has more than
            ``max_states`` states.
    """
    prompt = tuple(int(t) for t in prompt)
    if not prompt or len(prompt) >= max_length:
        raise ValueError(
            f"a prompt of {len(prompt)} tokens needs 1 <= len(prompt) < max_length={max_length}"
        )
    tokens = [i for i in range(special.num_actions) if special.is_token(i)]
    n = len(tokens)
    max_generated = max_length - len(prompt) - 1  # live: len(prompt) + g < max_length
    num_states = count_states(n, max_generated)
    if num_states > max_states:
        raise ValueError(
            f"{num_states} states ({n} tokens, up to {max_generated} generated) exceed "
            f"max_states={max_states}: use a smaller max_length or vocabulary"
        )
    # offsets[g]: index of the first state with g generated tokens. A state's local index j in
    # its level is its token string read as a number in base n, so its child by the k-th token
    # is offsets[g + 1] + j * n + k and its parent offsets[g - 1] + j // n.
    offsets = np.cumsum([0] + [n**g for g in range(max_generated + 1)])
    generated: list[tuple[int, ...]] = [()]
    for g in range(1, max_generated + 1):
        start = int(offsets[g - 1])
        generated.extend((*generated[start + j], t) for j in range(n ** (g - 1)) for t in tokens)
    A = special.num_actions
    next_state = np.full((num_states, A), -1, dtype=np.int64)
    for g in range(max_generated + 1):
        local = np.arange(n**g, dtype=np.int64)
        rows = offsets[g] + local
        if g < max_generated:
            for k, token in enumerate(tokens):
                next_state[rows, token] = offsets[g + 1] + local * n + k
        next_state[rows, special.backspace_id] = offsets[g - 1] + local // n if g else rows
    return StateSpace(special, prompt, max_length, generated, next_state)


@dataclass(frozen=True)
class Occupancy:
    """A policy's discounted occupancy measure on a :class:`StateSpace` (see the module docs).

    Attributes:
        space: the states and transitions.
        gamma: the discount.
        rho: (N, A) float64, ρ(s, a) on the live states; sums to 1 - E[γ^T].
        absorbing: (N, A) float64, the occupancy of the absorbing state entered by each ending
            pair, ``γ/(1 - γ) ρ(s, a)``; zero on the other pairs. ``rho + absorbing`` sums to 1.
    """

    space: StateSpace
    gamma: float
    rho: np.ndarray
    absorbing: np.ndarray

    @property
    def live_mass(self) -> float:
        """Σ ρ over the live states, 1 - E[γ^T]."""
        return float(self.rho.sum())

    def vector(self, absorbing: bool = True) -> np.ndarray:
        """The measure as one probability vector: live pairs then absorbing states, or the live
        pairs alone normalised to sum 1."""
        if absorbing:
            return np.concatenate([self.rho.ravel(), self.absorbing[self.space.ending]])
        total = self.rho.sum()
        return self.rho.ravel() / total if total > 0 else self.rho.ravel()


def occupancy_measure(space: StateSpace, probs: np.ndarray, gamma: float) -> Occupancy:
    """Solve ``d = (1 - γ) ρ0 + γ P_πᵀ d`` exactly (a sparse LU solve) and return ρ = d π.

    Args:
        space: the states.
        probs: (N, A) the policy's action probabilities in each state. A row of zeros marks a
            state the policy never reaches (an invalid prefix for a grammar); it is checked to
            get no mass.
        gamma: the discount, in (0, 1).

    Raises:
        ValueError: for probabilities of the wrong shape, negative, or with rows that sum
            neither to 1 nor to 0, and for mass reaching a state whose row is zero.
    """
    try:
        import scipy.sparse as sp
        from scipy.sparse.linalg import spsolve
    except ImportError as err:
        raise ImportError("exact occupancy measures need scipy: pip install scipy") from err

    if not 0.0 < gamma < 1.0:
        raise ValueError(f"gamma must be in (0, 1), got {gamma}")
    N, A = space.next_state.shape
    probs = np.asarray(probs, dtype=np.float64)
    if probs.shape != (N, A):
        raise ValueError(f"policy probabilities have shape {probs.shape}, expected {(N, A)}")
    if not np.isfinite(probs).all() or (probs < 0).any():
        raise ValueError("policy probabilities must be finite and non-negative")
    totals = probs.sum(axis=1)
    unreached = totals == 0.0
    bad = ~unreached & (np.abs(totals - 1.0) > _ROW_TOLERANCE)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(f"policy probabilities of state {i} sum to {totals[i]}, not 1")

    # P_π[s, s'] = Σ_a π(a|s) [next(s, a) = s'] over the transitions that stay live.
    flow = (space.next_state >= 0) & (probs > 0)
    rows = np.broadcast_to(np.arange(N)[:, None], (N, A))[flow]
    P = sp.csr_matrix((probs[flow], (rows, space.next_state[flow])), shape=(N, N))
    system = (sp.identity(N, format="csc") - gamma * P.T).tocsc()
    start = np.zeros(N)
    start[0] = 1.0 - gamma
    d = np.maximum(spsolve(system, start), 0.0)  # clip the solver's rounding below zero
    if (d[unreached] > 1e-12).any():
        i = int(np.flatnonzero(unreached & (d > 1e-12))[0])
        raise ValueError(
            f"state {i} ({space.generated[i]}) gets mass {d[i]:.3g} but the policy has no "
            "action there"
        )
    rho = d[:, None] * probs
    absorbing = np.where(space.ending, rho * gamma / (1.0 - gamma), 0.0)
    return Occupancy(space, float(gamma), rho, absorbing)


def data_policy_probs(task: GrammarTask, space: StateSpace) -> np.ndarray:
    """(N, A) the grammar's next-action distribution in each state; zero rows where the
    generated prefix has probability zero (the data never gets there). Never backspaces."""
    probs = np.zeros(space.next_state.shape)
    for i, generated in enumerate(space.generated):
        try:
            probs[i] = task.next_token_probs(generated)
        except ValueError:  # a prefix the grammar cannot produce
            continue
    return probs


def policy_probs_from_model(
    model: PolicyModel,
    special: SpecialIds,
    device: torch.device | str,
    *,
    prompt_length: int = 1,
    batch_size: int = 1024,
) -> PolicyProbs:
    """A :data:`PolicyProbs` that runs states through ``model``'s plain causal forward pass.

    States are batched and right-padded with ``pad_id``; the logits of a state are read at its
    last position, masked with the MDP's action mask (backspace needs a generated token, i.e.
    ``len(state) > prompt_length``) by :func:`agents.interface.mask_logits`, then a softmax in
    float64. Put the model in eval mode first (dropout would make the probabilities random).

    Args:
        model: the policy network.
        special: the special ids of its vocabulary.
        device: where the model's weights are.
        prompt_length: the length of the prompt every state starts with (1 for dyck's ``^``).
        batch_size: states per forward pass.
    """
    device = torch.device(device)

    @torch.no_grad()
    def policy_probs(states: list[list[int]]) -> np.ndarray:
        out = np.empty((len(states), special.num_actions))
        for begin in range(0, len(states), batch_size):
            chunk = states[begin : begin + batch_size]
            lengths = torch.tensor([len(s) for s in chunk], device=device)
            T = int(lengths.max())
            ids = torch.full((len(chunk), T), special.pad_id, dtype=torch.int64)
            for b, state in enumerate(chunk):
                ids[b, : len(state)] = torch.as_tensor(state, dtype=torch.int64)
            positions = torch.arange(T, device=device).expand(len(chunk), T)  # (B, T)
            logits = model(ids.to(device), positions, None)  # (B, T, A)
            last = logits[torch.arange(len(chunk), device=device), lengths - 1].double()  # (B, A)
            allowed = allowed_actions(lengths > prompt_length, special)  # (B, A)
            out[begin : begin + len(chunk)] = (
                mask_logits(last, allowed).softmax(dim=-1).cpu().numpy()
            )
        return out

    return policy_probs


def divergences(p: np.ndarray, q: np.ndarray) -> dict[str, float]:
    """Divergences between two probability vectors over the same outcomes.

    Returns:
        ``chi2_mixture``: D_χ²(p ‖ (p+q)/2) = Σ (p - q)² / (2 (p + q)), the SequenceMatch
        default (METHOD.md §3), in [0, 1]; ``kl``: KL(p ‖ q) = Σ p log(p/q), natural log,
        ``inf`` where q = 0 < p; ``js``: Jensen-Shannon, natural log, in [0, log 2];
        ``tv``: total variation ½ Σ |p - q|, in [0, 1].
    """
    p = np.asarray(p, dtype=np.float64).ravel()
    q = np.asarray(q, dtype=np.float64).ravel()
    if p.shape != q.shape:
        raise ValueError(f"p and q differ in shape: {p.shape} vs {q.shape}")
    total = p + q
    support = total > 0
    chi2 = float(np.sum((p - q)[support] ** 2 / (2.0 * total[support])))
    on_p = p > 0
    kl = math.inf if (q[on_p] == 0).any() else float(np.sum(p[on_p] * np.log(p[on_p] / q[on_p])))
    m = total / 2.0

    def kl_to_m(x: np.ndarray) -> float:
        on = x > 0
        return float(np.sum(x[on] * np.log(x[on] / m[on])))

    # Rounding can leave a divergence of identical measures a hair below zero.
    kl = max(kl, 0.0)
    js = max(0.5 * (kl_to_m(p) + kl_to_m(q)), 0.0)
    tv = 0.5 * float(np.abs(p - q).sum())
    return {"chi2_mixture": chi2, "kl": kl, "js": js, "tv": tv}


def exact_divergences(
    task: GrammarTask,
    policy_probs: PolicyProbs,
    gamma: float,
    max_length: int,
    *,
    prompt: Sequence[int] | None = None,
    absorbing: bool = True,
    max_states: int = MAX_STATES,
) -> dict[str, float]:
    """Exact divergences between the data's occupancy measure and a model's.

    The data policy is the grammar's ``next_token_probs`` (it never backspaces); the model's
    is ``policy_probs`` (see :func:`policy_probs_from_model`). Both are solved exactly on every
    live state of the MDP with buffer ``max_length`` (see the module docs for the formulation).

    Args:
        task: the grammar (e.g. a small :class:`seqenv.tasks.dyck.DyckTask`).
        policy_probs: the model's action distribution of each state.
        gamma: the discount, in (0, 1).
        max_length: the MDP's buffer size, prompt included; with a grammar longer than it
            allows, the data's episodes are truncated there too.
        prompt: the prompt of every episode; by default the task's (``^`` for dyck).
        absorbing: compare live and absorbing states together (each measure sums to 1), or
            the live pairs alone, each normalised to sum 1.
        max_states: refuse larger state spaces.

    Returns:
        ``chi2_mixture``, ``kl``, ``js``, ``tv`` of ρ_data against ρ_model (:func:`divergences`),
        and ``data_live_mass``, ``model_live_mass`` (1 - E[γ^T] of each policy) and
        ``num_states``.
    """
    if prompt is None:
        prompt = task.sample(np.random.default_rng(0)).prompt
    space = enumerate_states(task.vocab.special, prompt, max_length, max_states)
    data = occupancy_measure(space, data_policy_probs(task, space), gamma)
    model_probs = np.asarray(policy_probs(space.states()), dtype=np.float64)
    model = occupancy_measure(space, model_probs, gamma)
    result = divergences(data.vector(absorbing), model.vector(absorbing))
    result.update(
        data_live_mass=data.live_mass,
        model_live_mass=model.live_mass,
        num_states=float(space.num_states),
    )
    return result


__all__ = [
    "MAX_STATES",
    "GrammarTask",
    "Occupancy",
    "PolicyProbs",
    "StateSpace",
    "count_states",
    "data_policy_probs",
    "divergences",
    "enumerate_states",
    "exact_divergences",
    "occupancy_measure",
    "policy_probs_from_model",
]
