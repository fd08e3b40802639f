"""Exact evaluation against SequenceMatch's target in the disturbed MDP (docs/method.md §5).

On a grammar small enough to enumerate (:mod:`agents.evaluation.occupancy`), everything a
sampled evaluation estimates is computed exactly: occupancy measures, divergences, the
distribution of the final texts, and how often a policy backspaces.

**The expert in the disturbed MDP.** It intends its grammar's next action; when the environment
replaces the token by noise, it intends ``<bkspc>`` (never disturbed), then the same token again
(which can be disturbed again). It knows when a disturbance happened, which random noise does
not always make visible in the text, so it is Markov only in an augmented state: the text and
its mode, one of *fresh* (draw from the grammar), *disturbed, meaning a* (backspace, then retry
a) and *retry a*. :func:`expert_chain` enumerates the augmented states it reaches.

**The learner's target** is the expert marginalised over its mode: its state-action occupancy in
the disturbed MDP, on the text states and the intended actions. The Markov policy
``π̄(a|s) = ρ_E(s, a) / Σ_a' ρ_E(s, a')`` (:func:`marginal_policy`) has exactly that occupancy
in the disturbed MDP; as the occupancy, it depends on γ (the mix of modes at a text does).

**The floor.** π̄ run in the clean MDP (p = 0) still backspaces where noise had produced a text
that looks valid, so it is not the clean grammar; the divergence of π̄ (clean) to the clean
grammar is the floor below which a policy that matches the target cannot go on clean metrics.

Definitions used by :func:`exact_report`:

- occupancies are discounted and normalised as in :mod:`agents.evaluation.occupancy`: live pairs
  plus absorbing end pairs sum to 1 (``…/chi2_mixture`` etc.), or the live pairs alone
  renormalised to 1 (``…/live_chi2_mixture`` etc.). At γ = 0.998 about 99% of the measure sits on
  absorbing pairs and the whole-measure divergences mostly compare how episodes end; γ = 0.9 (or
  the live versions) is the headline.
- output metrics are undiscounted: the probability of each way an episode ends (``<eos>`` after a
  text, or an append that fills the buffer), i.e. the distribution of the final text after its
  backspaces. There is no step budget (as in the occupancies); the sampled environments cut
  episodes at ``2 * max_length`` steps, which a policy that rarely loops almost never reaches.
- ``backspace_rate`` is undiscounted per step, E[#<bkspc>] / E[#steps] per episode with every
  step counted (``<eos>`` too), the limit of the sampled evaluation's pooled rate; with random
  noise, no truncation and mean length E[L], the expert's is p E[L] / ((1 + p) E[L] + 1 - p),
  a fraction p / (1 + p) of its non-``<eos>`` steps. ``backspace_rate_discounted`` is
  Σ ρ(s, <bkspc>) / Σ ρ over the live pairs.

Shapes: N text states, M chain states, A = num_actions.
"""

from __future__ import annotations

import numpy as np

from agents.evaluation.occupancy import (
    Chain,
    DisturbanceKernel,
    GrammarTask,
    NoiseProbs,
    Occupancy,
    PolicyProbs,
    StateSpace,
    chain_occupancy,
    data_policy_probs,
    disturbance_kernel,
    divergences,
    policy_chain,
    scipy_sparse,
    visits,
)

_ENDING_TOLERANCE = 1e-8  # how far the ending probabilities of an episode may be from summing to 1

DIVERGENCE_NAMES = ("chi2_mixture", "kl", "js", "tv")


def expert_chain(task: GrammarTask, space: StateSpace, kernel: DisturbanceKernel) -> Chain:
    """The expert's augmented chain in the disturbed MDP (see the module docs).

    Chain state 0 is the empty generation, fresh. Only the augmented states the expert reaches
    are built (a breadth-first search), so the chain stays as small as the grammar.

    Raises:
        ValueError: if the expert's start state has no grammar action.
    """
    sp, _ = scipy_sparse()
    special = space.special
    A = special.num_actions
    bkspc = special.backspace_id
    parent = space.next_state[:, bkspc]
    fresh, disturbed, retry = 0, 1, 2
    index: dict[tuple[int, int, int], int] = {}
    keys: list[tuple[int, int, int]] = []

    def visit(key: tuple[int, int, int]) -> int:
        if key not in index:
            index[key] = len(keys)
            keys.append(key)
        return index[key]

    visit((0, fresh, -1))
    probs_rows: list[np.ndarray] = []
    rows: list[int] = []
    cols: list[int] = []
    values: list[float] = []
    x = 0
    while x < len(keys):  # keys grows as new augmented states are reached
        state, mode, pending = keys[x]
        if mode == fresh:
            intended = np.asarray(task.next_token_probs(space.generated[state]), dtype=np.float64)
        else:
            intended = np.zeros(A)
            intended[bkspc if mode == disturbed else pending] = 1.0
        probs_rows.append(intended)
        for a in np.flatnonzero(intended):
            if mode == disturbed:  # the backspace runs as intended, then the token is retried
                rows.append(x)
                cols.append(visit((int(parent[state]), retry, pending)))
                values.append(1.0)
                continue
            executed = kernel.row(state, int(a))
            for b in np.flatnonzero(executed):
                nxt = int(space.next_state[state, b])
                if nxt < 0:
                    continue  # <eos> or a buffer-filling append: the episode ends
                key = (nxt, fresh, -1) if b == a else (nxt, disturbed, int(a))
                rows.append(x)
                cols.append(visit(key))
                values.append(float(intended[a] * executed[b]))
        x += 1
    M = len(keys)
    if not probs_rows[0].any():
        raise ValueError("the grammar has no action in the start state")
    P = sp.csr_matrix((values, (rows, cols)), shape=(M, M))  # duplicates are summed
    text = np.array([k[0] for k in keys], dtype=np.int64)
    return Chain(text, np.array(probs_rows), P)


def marginal_policy(occupancy: Occupancy) -> np.ndarray:
    """(N, A) π̄(a|s) = ρ(s, a) / Σ_a' ρ(s, a'); a row of zeros where ρ has no mass."""
    mass = occupancy.rho.sum(axis=1, keepdims=True)
    return np.divide(occupancy.rho, mass, out=np.zeros_like(occupancy.rho), where=mass > 0)


def ending_probs(space: StateSpace, chain: Chain) -> np.ndarray:
    """(N, A) the probability that an episode ends with the pair (s, a), undiscounted.

    Ending pairs are ``<eos>`` (the final text is s) and an append that fills the buffer (the
    final text is s followed by a, truncated); every other entry is 0. The final texts of
    different ending pairs differ, so this is the final-text distribution.

    Raises:
        ValueError: if the episodes do not end with probability 1.
    """
    counts = visits(chain, 1.0)
    ends = np.zeros(space.next_state.shape)
    np.add.at(ends, chain.text, counts[:, None] * chain.probs)
    ends = np.where(space.ending, ends, 0.0)
    if abs(ends.sum() - 1.0) > _ENDING_TOLERANCE:
        raise ValueError(f"episodes end with probability {ends.sum():.9f}, not 1")
    return ends


def valid_endings(task: GrammarTask, space: StateSpace) -> np.ndarray:
    """(N, A) bool: the ending pairs whose final text is a complete sentence of the grammar.

    ``<eos>`` after a text the grammar can end; a truncated episode is never valid.
    """
    grammar = data_policy_probs(task, space)
    valid = np.zeros(space.next_state.shape, dtype=bool)
    valid[:, space.special.eos_id] = grammar[:, space.special.eos_id] > 0
    return valid


def _run_stats(
    space: StateSpace, chain: Chain, occupancy: Occupancy, valid: np.ndarray
) -> tuple[dict[str, float], np.ndarray]:
    """Output and backspace statistics of one chain, and its ending probabilities."""
    bkspc = space.special.backspace_id
    ends = ending_probs(space, chain)
    counts = visits(chain, 1.0)
    steps = float(counts.sum())  # every visit of a chain state takes one action
    backspaces = float((counts * chain.probs[:, bkspc]).sum())
    live = occupancy.rho.sum()
    stats = {
        "invalid": float(ends[~valid].sum()),
        "backspace_rate": backspaces / steps,
        "backspace_rate_discounted": float(occupancy.rho[:, bkspc].sum() / live),
        "mean_steps": steps,
        "live_mass": float(live),
    }
    return stats, ends


def _compare(prefix: str, ours: Occupancy, reference: Occupancy) -> dict[str, float]:
    whole = divergences(reference.vector(absorbing=True), ours.vector(absorbing=True))
    live = divergences(reference.vector(absorbing=False), ours.vector(absorbing=False))
    out = {f"{prefix}/{name}": whole[name] for name in DIVERGENCE_NAMES}
    out.update({f"{prefix}/live_{name}": live[name] for name in DIVERGENCE_NAMES})
    return out


def exact_report(
    task: GrammarTask,
    space: StateSpace,
    policy: PolicyProbs | np.ndarray,
    gamma: float,
    p: float,
    noise_probs: NoiseProbs | None = None,
) -> dict[str, float]:
    """Exact metrics of a policy against the disturbed expert (its target) and the clean grammar.

    Four runs, each a key prefix (definitions in the module docs):

    - ``disturbed``: the policy in the disturbed MDP, against the target (the expert
      marginalised over its mode, in the disturbed MDP).
    - ``clean``: the policy in the clean MDP (p = 0), against the clean grammar.
    - ``floor``: the marginalised expert π̄ in the clean MDP, against the clean grammar: the
      ``clean`` divergences of a policy that matches its target exactly.
    - ``expert``: the (non-Markov) expert in the disturbed MDP; statistics only.

    Args:
        task: the grammar (e.g. a small :class:`seqenv.tasks.dyck.DyckTask`).
        space: the enumerated states (:func:`agents.evaluation.occupancy.enumerate_states`).
        policy: (N, A) intended-action probabilities on ``space``, or a :data:`PolicyProbs`
            (e.g. :func:`agents.evaluation.occupancy.policy_probs_from_model`).
        gamma: the discount of the occupancies, in (0, 1); 0.9 for the headline.
        p: the disturbance probability.
        noise_probs: the noise distribution; None for ``random`` noise.

    Returns:
        Flat ``{run}/{metric}`` floats. Divergences (``disturbed``, ``clean``, ``floor``):
        ``chi2_mixture``, ``kl``, ``js``, ``tv`` on the whole measure (reference first, as
        in :func:`agents.evaluation.occupancy.divergences`), the same with ``live_`` on the
        live pairs renormalised. Every run: ``output_tv`` (TV of its final-text distribution
        to the clean grammar's), ``invalid``, ``backspace_rate``, ``backspace_rate_discounted``,
        ``mean_steps`` (per episode, undiscounted), ``live_mass``. Also ``num_states``,
        ``gamma`` and ``p``.
    """
    if callable(policy):
        probs = np.asarray(policy(space.states()), dtype=np.float64)
    else:
        probs = np.asarray(policy, dtype=np.float64)
    clean_kernel = disturbance_kernel(space, 0.0)
    kernel = disturbance_kernel(space, p, noise_probs)
    valid = valid_endings(task, space)

    grammar_chain = policy_chain(space, data_policy_probs(task, space))
    grammar = chain_occupancy(space, grammar_chain, gamma)
    grammar_ends = ending_probs(space, grammar_chain)

    experts = expert_chain(task, space, kernel)
    target = chain_occupancy(space, experts, gamma)
    marginal = marginal_policy(target)

    runs = {
        "disturbed": (policy_chain(space, probs, kernel), target),
        "clean": (policy_chain(space, probs, clean_kernel), grammar),
        "floor": (policy_chain(space, marginal, clean_kernel), grammar),
        "expert": (experts, None),
    }
    report: dict[str, float] = {}
    for name, (chain, reference) in runs.items():
        occupancy = target if chain is experts else chain_occupancy(space, chain, gamma)
        stats, ends = _run_stats(space, chain, occupancy, valid)
        stats["output_tv"] = 0.5 * float(np.abs(ends - grammar_ends).sum())
        report.update({f"{name}/{key}": value for key, value in stats.items()})
        if reference is not None:
            report.update(_compare(name, occupancy, reference))
    report.update(num_states=float(space.num_states), gamma=float(gamma), p=float(p))
    return report


__all__ = [
    "DIVERGENCE_NAMES",
    "ending_probs",
    "exact_report",
    "expert_chain",
    "marginal_policy",
    "valid_endings",
]
