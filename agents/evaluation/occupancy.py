"""Exact occupancy measures of the backspace MDP, on a configuration small enough to enumerate.

For a source whose next-action distribution is known (the dyck grammar), the data's occupancy
measure is exact, and so is a model's once every state it can reach is enumerated. The exact
divergence between the two is then a metric free of sampling noise: the quantity SequenceMatch
minimises (docs/method.md §1, §3), measured rather than estimated.

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
  live states (ρ0 is the empty generation), ``ρ(s, a) = d(s) π(a|s)``, which is docs/method.md's
  ``(1 - γ) π(a|s) Σ_t γ^t P(s_t = s)``. Its total is ``1 - E[γ^T]`` for an episode of ``T``
  steps: the mass that the live states lose when the episode ends. That lost mass is the
  occupancy of the absorbing states. Each absorbing state is entered by exactly one live pair
  (s, a) (transitions are deterministic and the strings differ), and staying for ever after a
  step of weight ``ρ(s, a)`` adds ``γ/(1 - γ) ρ(s, a)``; so :attr:`Occupancy.absorbing` holds
  it on the ending pair. Live and absorbing parts together sum to exactly 1 (up to the linear
  solver's rounding): a probability distribution, on which divergences are well defined.

:func:`exact_divergences` compares the data's measure and a model's on the union of both parts
(``absorbing=True``), or on the live parts alone, each normalised to sum 1 (``absorbing=False``).

**Disturbance** (docs/method.md §5; :class:`DisturbanceKernel`). With probability p the environment
replaces an ordinary token action, before it runs, by a noise token that differs from it
(``random``: uniform over the other ordinary tokens; or any per-state noise distribution, e.g. the
task's ``ground_truth`` mistake). ``<eos>``, ``<bkspc>`` and an append that fills the buffer are
never disturbed. The policy's actions are its *intended* ones: ρ(s, a) is over intended actions,
and the transitions are the clean MDP's run on the *executed* action distribution
``Σ_a π(a|s) K(b | s, a)``. A noise token lands on the same length as the intended append, so the
ending pairs, and the absorbing states, are the same as without disturbance.

The solver works on a :class:`Chain`, a Markov chain over states that each map to a text state:
for a Markov policy the chain is the text states themselves; for an expert that remembers its
disturbances (:mod:`agents.evaluation.exact`), several chain states share one text, and the
occupancy is summed over them (marginalised onto the text).

Shapes: N live states, A = num_actions.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch

from agents.models.interface import PolicyModel, mask_logits
from seqenv.disturbance import check_disturbance
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
    def vocab(self) -> Vocab:
        """The task's vocabulary."""
        ...

    def next_token_probs(self, prefix_ids: Sequence[int]) -> np.ndarray:
        """(A,) float64, the expert's next-action distribution after the generated prefix.

        Raises:
            ValueError: a prefix the expert cannot produce.
        """
        ...

    def sample(self, rng: np.random.Generator, split: Split = "train") -> Example:
        """Draw one example (its prompt starts the episodes)."""
        ...


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
        """N, the number of live states."""
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
        """The measure as one probability vector.

        Live pairs then absorbing states, or the live pairs alone normalised to sum 1.
        """
        if absorbing:
            return np.concatenate([self.rho.ravel(), self.absorbing[self.space.ending]])
        total = self.rho.sum()
        return self.rho.ravel() / total if total > 0 else self.rho.ravel()


NoiseProbs = Callable[[tuple[int, ...], int], np.ndarray]
"""``noise_probs(generated, intended) -> (A,)``: where a disturbed ``intended`` token goes after
``generated``; a distribution over the ordinary tokens with zero on ``intended``."""


@dataclass(frozen=True)
class DisturbanceKernel:
    """The environment's disturbance on a :class:`StateSpace`: K(b | s, a), executed given intended.

    Build it with :func:`disturbance_kernel`.

    Attributes:
        space: the states.
        p: the probability that a disturbable action is replaced, in [0, 1].
        disturbable: (N, A) bool, the pairs that can be disturbed: an ordinary token whose append
            does not fill the buffer.
        noise: (N, A, A) float64, the noise token's distribution for each disturbable pair; None
            for ``random`` noise (uniform over the other ordinary tokens), kept implicit because
            it is the same in every state.
    """

    space: StateSpace
    p: float
    disturbable: np.ndarray
    noise: np.ndarray | None = None

    def __post_init__(self) -> None:
        check_disturbance(self.p, "random" if self.noise is None else "ground_truth")

    @property
    def tokens(self) -> np.ndarray:
        """(A,) bool, the ordinary tokens."""
        special = self.space.special
        return np.array([special.is_token(a) for a in range(special.num_actions)])

    def row(self, state: int, action: int) -> np.ndarray:
        """(A,) the executed action's distribution when ``action`` is intended in ``state``."""
        A = self.space.special.num_actions
        out = np.zeros(A)
        out[action] = 1.0
        if self.p == 0.0 or not self.disturbable[state, action]:
            return out
        out[action] = 1.0 - self.p
        if self.noise is None:
            others = self.tokens.copy()
            others[action] = False
            out[others] += self.p / others.sum()
        else:
            out += self.p * self.noise[state, action]
        return out

    def dense(self) -> np.ndarray:
        """(N, A, A) K[s, a, b] = P(executed b | intended a in s); identity where undisturbed."""
        N, A = self.space.next_state.shape
        K = np.broadcast_to(np.eye(A), (N, A, A)).copy()
        if self.p == 0.0:
            return K
        s, a = np.nonzero(self.disturbable)
        if self.noise is None:
            tokens = self.tokens
            noise = np.where(tokens, 1.0, 0.0)[None, :] * np.ones((len(s), 1))
            noise[np.arange(len(s)), a] = 0.0
            noise /= tokens.sum() - 1
        else:
            noise = self.noise[s, a]
        K[s, a] = (1.0 - self.p) * K[s, a] + self.p * noise
        return K

    def executed_probs(self, probs: np.ndarray) -> np.ndarray:
        """(N, A) the executed action distribution ``Σ_a π(a|s) K(b|s, a)`` of ``probs``."""
        if self.p == 0.0:
            return probs
        moved = np.where(self.disturbable, probs, 0.0)  # (N, A) intended mass that can be replaced
        out = probs - self.p * moved
        if self.noise is None:
            # Uniform over the other tokens: token b receives the replaced mass of every a != b.
            tokens = self.tokens
            total = moved.sum(axis=1, keepdims=True)  # (N, 1)
            out = out + self.p * np.where(tokens, total - moved, 0.0) / (tokens.sum() - 1)
        else:
            out = out + self.p * np.einsum("sa,sab->sb", moved, self.noise)
        return out


def random_noise_probs(special: SpecialIds) -> NoiseProbs:
    """``random`` noise as a :data:`NoiseProbs`: uniform over the other ordinary tokens."""
    tokens = np.array([special.is_token(a) for a in range(special.num_actions)], dtype=np.float64)

    def noise_probs(generated: tuple[int, ...], intended: int) -> np.ndarray:
        out = tokens.copy()
        out[intended] = 0.0
        return out / out.sum()

    return noise_probs


def disturbance_kernel(
    space: StateSpace, p: float, noise_probs: NoiseProbs | None = None
) -> DisturbanceKernel:
    """The disturbance of probability ``p`` on ``space``.

    Args:
        space: the states.
        p: probability that a disturbable token action is replaced.
        noise_probs: the noise distribution of each (state, intended token); None for ``random``
            noise (stored implicitly, so large spaces cost nothing extra).

    Raises:
        ValueError: if ``p`` is outside [0, 1], the vocabulary has a single ordinary token (no
            other token to be replaced by), or a noise row is not a distribution over the other
            tokens.
    """
    special = space.special
    tokens = np.array([special.is_token(a) for a in range(special.num_actions)])
    if p > 0.0 and tokens.sum() < 2:
        raise ValueError("a disturbance needs at least two ordinary tokens")
    disturbable = tokens[None, :] & (space.next_state >= 0)
    noise = None
    if noise_probs is not None and p > 0.0:
        noise = np.zeros((*space.next_state.shape, special.num_actions))
        for s, a in zip(*np.nonzero(disturbable), strict=True):
            row = np.asarray(noise_probs(space.generated[s], int(a)), dtype=np.float64)
            if (
                row.shape != (special.num_actions,)
                or (row < 0).any()
                or abs(row.sum() - 1.0) > _ROW_TOLERANCE
                or row[~tokens].any()
                or row[a] > 0
            ):
                raise ValueError(
                    f"noise for token {a} after {space.generated[s]} is not a distribution over "
                    "the other ordinary tokens"
                )
            noise[s, a] = row
    return DisturbanceKernel(space, float(p), disturbable, noise)


@dataclass(frozen=True)
class Chain:
    """A Markov chain over policy states, each mapped to a text state of a :class:`StateSpace`.

    Attributes:
        text: (M,) int64, the text state (index into the space) of each chain state; chain state
            0 is the start.
        probs: (M, A) float64, the intended-action distribution of each chain state.
        transitions: (M, M) scipy sparse, P[x, y] = probability of the step from x to y, over
            the steps that stay live (rows sum to 1 minus the probability of ending).
    """

    text: np.ndarray
    probs: np.ndarray
    transitions: Any  # a scipy.sparse matrix; scipy is imported lazily


def scipy_sparse() -> tuple[Any, Any]:
    """scipy.sparse and spsolve, imported on first use (scipy is an optional dependency)."""
    try:
        import scipy.sparse as sp
        from scipy.sparse.linalg import spsolve
    except ImportError as err:
        raise ImportError("exact occupancy measures need scipy: pip install scipy") from err
    return sp, spsolve


def _check_probs(space: StateSpace, probs: np.ndarray) -> np.ndarray:
    N, A = space.next_state.shape
    probs = np.asarray(probs, dtype=np.float64)
    if probs.shape != (N, A):
        raise ValueError(f"policy probabilities have shape {probs.shape}, expected {(N, A)}")
    if not np.isfinite(probs).all() or (probs < 0).any():
        raise ValueError("policy probabilities must be finite and non-negative")
    totals = probs.sum(axis=1)
    bad = (totals != 0.0) & (np.abs(totals - 1.0) > _ROW_TOLERANCE)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(f"policy probabilities of state {i} sum to {totals[i]}, not 1")
    return probs


def policy_chain(
    space: StateSpace, probs: np.ndarray, kernel: DisturbanceKernel | None = None
) -> Chain:
    """The chain of a Markov policy over the text states, in the clean or disturbed MDP.

    Args:
        space: the states.
        probs: (N, A) the policy's intended-action probabilities; a row of zeros marks a state
            the policy never reaches.
        kernel: the disturbance; None for the clean MDP.
    """
    sp, _ = scipy_sparse()
    probs = _check_probs(space, probs)
    N = space.num_states
    executed = probs if kernel is None else kernel.executed_probs(probs)
    # P[s, s'] = Σ_b executed(b|s) [next(s, b) = s'] over the transitions that stay live.
    flow = (space.next_state >= 0) & (executed > 0)
    rows = np.broadcast_to(np.arange(N)[:, None], executed.shape)[flow]
    P = sp.csr_matrix((executed[flow], (rows, space.next_state[flow])), shape=(N, N))
    return Chain(np.arange(N), probs, P)


def visits(chain: Chain, gamma: float) -> np.ndarray:
    """(M,) Σ_t γ^t P(x_t = x) from chain state 0: a sparse LU solve of (I - γ Pᵀ) v = e_0.

    ``gamma = 1`` gives the expected number of visits per episode; it needs every episode to end
    with probability 1.

    Raises:
        ValueError: if the solution is not finite (a policy that can loop for ever at γ = 1).
    """
    sp, spsolve = scipy_sparse()
    M = len(chain.text)
    system = (sp.identity(M, format="csc") - gamma * chain.transitions.T).tocsc()
    start = np.zeros(M)
    start[0] = 1.0
    with np.errstate(all="ignore"):
        v = np.atleast_1d(spsolve(system, start))
    if not np.isfinite(v).all():
        raise ValueError(f"the visit counts at gamma={gamma} diverge: some episodes never end")
    return np.maximum(v, 0.0)  # clip the solver's rounding below zero


def chain_occupancy(space: StateSpace, chain: Chain, gamma: float) -> Occupancy:
    """The occupancy measure of ``chain`` marginalised onto the text states of ``space``.

    ``ρ(s, a) = (1 - γ) Σ_{x: text(x) = s} v(x) π_x(a)``, with ``v`` the discounted visits.

    Raises:
        ValueError: for γ outside (0, 1), and for mass reaching a chain state without actions.
    """
    if not 0.0 < gamma < 1.0:
        raise ValueError(f"gamma must be in (0, 1), got {gamma}")
    d = (1.0 - gamma) * visits(chain, gamma)
    unreached = chain.probs.sum(axis=1) == 0.0
    if (d[unreached] > 1e-12).any():
        x = int(np.flatnonzero(unreached & (d > 1e-12))[0])
        s = int(chain.text[x])
        raise ValueError(
            f"state {s} ({space.generated[s]}) gets mass {d[x]:.3g} but the policy has no "
            "action there"
        )
    rho = np.zeros(space.next_state.shape)
    np.add.at(rho, chain.text, d[:, None] * chain.probs)
    # An ending pair's executed action is the intended one (see the module docs): the absorbing
    # state it enters holds γ/(1 - γ) of the pair's occupancy.
    absorbing = np.where(space.ending, rho * gamma / (1.0 - gamma), 0.0)
    return Occupancy(space, float(gamma), rho, absorbing)


def occupancy_measure(
    space: StateSpace,
    probs: np.ndarray,
    gamma: float,
    kernel: DisturbanceKernel | None = None,
) -> Occupancy:
    """Solve ``d = (1 - γ) ρ0 + γ P_πᵀ d`` exactly (a sparse LU solve) and return ρ = d π.

    Args:
        space: the states.
        probs: (N, A) the policy's (intended) action probabilities in each state. A row of
            zeros marks a state the policy never reaches (an invalid prefix for a grammar); it
            is checked to get no mass.
        gamma: the discount, in (0, 1).
        kernel: the environment's disturbance (:func:`disturbance_kernel`); None: none.

    Raises:
        ValueError: for probabilities of the wrong shape, negative, or with rows that sum
            neither to 1 nor to 0, and for mass reaching a state whose row is zero.
    """
    if not 0.0 < gamma < 1.0:
        raise ValueError(f"gamma must be in (0, 1), got {gamma}")
    return chain_occupancy(space, policy_chain(space, probs, kernel), gamma)


def data_policy_probs(task: GrammarTask, space: StateSpace) -> np.ndarray:
    """(N, A) the grammar's next-action distribution in each state.

    Zero rows where the generated prefix has probability zero (the data never gets there).
    Never backspaces.
    """
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
    allow_backspace: bool = True,
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
        allow_backspace: False masks ``<bkspc>`` everywhere, as the no-backspace ablation
            trains and samples its policy (the softmax renormalises over the other actions).
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
            allowed = allowed_actions(lengths > prompt_length, special, allow_backspace)  # (B, A)
            out[begin : begin + len(chunk)] = (
                mask_logits(last, allowed).softmax(dim=-1).cpu().numpy()
            )
        return out

    return policy_probs


def divergences(p: np.ndarray, q: np.ndarray) -> dict[str, float]:
    """Divergences between two probability vectors over the same outcomes.

    Returns:
        ``chi2_mixture``: D_χ²(p ‖ (p+q)/2) = Σ (p - q)² / (2 (p + q)), the SequenceMatch
        default (docs/method.md §3), in [0, 1]; ``kl``: KL(p ‖ q) = Σ p log(p/q), natural log,
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
    "Chain",
    "DisturbanceKernel",
    "GrammarTask",
    "NoiseProbs",
    "Occupancy",
    "PolicyProbs",
    "StateSpace",
    "chain_occupancy",
    "count_states",
    "data_policy_probs",
    "disturbance_kernel",
    "divergences",
    "enumerate_states",
    "exact_divergences",
    "occupancy_measure",
    "policy_chain",
    "policy_probs_from_model",
    "random_noise_probs",
    "visits",
]
