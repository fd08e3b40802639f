"""A free-table SequenceMatch with exact expectations: the reference for the sampled trainer.

One logit vector per enumerated text state (no network, no sampling). The χ²-mixture objective
of docs/method.md §3, at temperature α and coefficient c, with every expectation taken exactly in
the disturbed MDP (:mod:`agents.evaluation.exact`)::

    J = Σ_{s,a} ρ_T(s, a) E_{s'}[φ(r)] - c Σ_{s,a} ρ_π(s, a) E_{s'}[r²] - (1 - γ) V(s_0)
    r = α (ℓ[s, a] - γ LSE ℓ[s']),     V(s) = α LSE ℓ[s]     (LSE over the allowed actions)

- ρ_T is the target (the expert marginalised over its mode, in the disturbed MDP), ρ_π the
  policy's own occupancy in the same MDP, both on the live pairs, normalised as in
  :mod:`agents.evaluation.occupancy` (so J is (1 - γ) times the per-episode discounted sums
  of the sampled estimator).
- s' is the state actually reached: E_{s'} runs over the disturbed transition K(b|s, a), and the
  r² terms use E[r²] (what sampled training estimates), not (E r)².
- V(s') = 0 where the episode ends: after ``<eos>``, and after an append that fills the buffer,
  which this formulation treats as entering an absorbing state (the sampled trainer bootstraps a
  truncated state instead; the expert's episodes are never truncated on the grammars used here).
- ρ_π is detached, as sampled training treats its samples: the solver finds the fixed point where
  the gradient with ρ_π held at the current policy vanishes.
- The value term: with nothing truncated, the telescoped sum of every source (data, model,
  mixture) equals V(s_0) per episode, so its expectation and gradient are those of
  (1 - γ) V(s_0), the form used here.

For χ² the objective only depends on κ = c α: J_{α,c} = α J_{1,cα}.
The divergence estimate of docs/method.md §3 is ``J + α H`` with
``H = -Σ ρ_π(s, a) log π(a|s)`` under the same normalisation.

Shapes: N text states, A actions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from agents.evaluation.occupancy import (
    DisturbanceKernel,
    Occupancy,
    StateSpace,
    policy_chain,
    visits,
)
from agents.objectives import phi
from seqenv.rules import allowed_actions


@dataclass(frozen=True)
class TabularResult:
    """The fixed point found by :func:`solve_tabular`.

    Attributes:
        logits: (N, A) float64, the table (``-inf`` on masked actions).
        probs: (N, A) float64, the policy, softmax of the logits.
        occupancy: (N, A) float64, ρ_π on the live pairs, in the disturbed MDP.
        objective: J at the fixed point.
        entropy: H = -Σ ρ_π log π.
        divergence_estimate: J + α H.
        grad_norm: max |∂J/∂ℓ| at the last check, ρ_π detached at the current policy.
        steps: optimiser steps taken.
    """

    logits: np.ndarray
    probs: np.ndarray
    occupancy: np.ndarray
    objective: float
    entropy: float
    divergence_estimate: float
    grad_norm: float
    steps: int


def space_allowed_actions(space: StateSpace) -> np.ndarray:
    """(N, A) bool: the allowed actions of every state of ``space`` (:mod:`seqenv.rules`)."""
    has_generated = torch.tensor([len(g) > 0 for g in space.generated])
    return allowed_actions(has_generated, space.special).numpy()


class TabularObjective:
    """J of the module docs as a function of a table of logits, the MDP's tensors precomputed.

    Args:
        kernel: the disturbed MDP (its space holds the states).
        target: the target occupancy in that MDP (e.g. the marginalised expert's).
        alpha: the soft-Q temperature.
        c: the χ² coefficient.
    """

    def __init__(
        self, kernel: DisturbanceKernel, target: Occupancy, *, alpha: float, c: float
    ) -> None:
        self.kernel = kernel
        self.space = kernel.space
        self.gamma = target.gamma
        self.alpha = alpha
        self.c = c
        self.allowed_np = space_allowed_actions(self.space)
        self.allowed = torch.from_numpy(self.allowed_np)
        self.next_state = torch.from_numpy(self.space.next_state)  # (N, A); -1 where it ends
        self.K = torch.from_numpy(kernel.dense())  # (N, A, A) P(executed b | intended a)
        self.target = torch.from_numpy(target.rho)

    def policy(self, logits: torch.Tensor) -> np.ndarray:
        """(N, A) the softmax policy of a table, masked actions at probability 0."""
        masked = logits.detach().masked_fill(~self.allowed, float("-inf"))
        return torch.softmax(masked, dim=-1).numpy()

    def occupancy(self, probs: np.ndarray) -> np.ndarray:
        """(N, A) ρ_π on the live pairs of the disturbed MDP."""
        chain = policy_chain(self.space, probs, self.kernel)
        return (1.0 - self.gamma) * visits(chain, self.gamma)[:, None] * probs

    def __call__(self, logits: torch.Tensor, model_occupancy: np.ndarray) -> torch.Tensor:
        """J at ``logits`` (N, A), with ρ_π = ``model_occupancy`` held fixed.

        Masked actions may hold any value: they are left out.
        """
        alpha, c, gamma = self.alpha, self.c, self.gamma
        lse = logits.masked_fill(~self.allowed, float("-inf")).logsumexp(dim=-1)  # (N,)
        nxt = self.next_state
        v_next = torch.where(nxt >= 0, lse[nxt.clamp(min=0)], 0.0)  # (N, A executed)
        safe = torch.where(self.allowed, logits, 0.0)  # no -inf in r (its weight is 0 there)
        r = alpha * (safe[:, :, None] - gamma * v_next[:, None, :])  # (N, A intended, A executed)
        model = torch.from_numpy(model_occupancy)
        data_term = (self.target * (self.K * phi("chi2_mixture", r, c=c)).sum(-1)).sum()
        model_term = c * (model * (self.K * r.square()).sum(-1)).sum()
        value_term = (1.0 - gamma) * alpha * lse[0]
        return data_term - model_term - value_term


def solve_tabular(
    kernel: DisturbanceKernel,
    target: Occupancy,
    *,
    alpha: float = 1.0,
    c: float = 0.25,
    lr: float = 0.05,
    max_steps: int = 5_000,
    grad_tol: float = 1e-8,
    init: np.ndarray | None = None,
) -> TabularResult:
    """Adam towards the fixed point of J with ρ_π detached, ρ_π recomputed at every step.

    Args:
        kernel: the disturbed MDP (its space holds the states).
        target: the target occupancy in that MDP (e.g. the marginalised expert's).
        alpha: the soft-Q temperature.
        c: the χ² coefficient.
        lr: Adam's step size, halved whenever the gradient stops shrinking for 50 steps.
        max_steps: the most optimiser steps.
        grad_tol: stop when max |∂J/∂ℓ| (ρ_π detached at the current policy) is below this.
        init: (N, A) starting logits; zeros by default (the uniform policy).
    """
    objective = TabularObjective(kernel, target, alpha=alpha, c=c)
    start = np.zeros(objective.allowed_np.shape) if init is None else init
    logits = torch.tensor(np.where(objective.allowed_np, start, 0.0), requires_grad=True)
    optimiser = torch.optim.Adam([logits], lr=lr)
    best, since_best = math.inf, 0
    grad_norm = math.inf
    steps = 0
    while steps < max_steps:
        steps += 1
        model = objective.occupancy(objective.policy(logits))
        optimiser.zero_grad()
        (-objective(logits, model)).backward()
        assert logits.grad is not None
        grad_norm = float(logits.grad.abs().max())
        if grad_norm < grad_tol:
            break
        # At a fixed step size Adam circles the fixed point: halve it when progress stalls.
        if grad_norm < 0.99 * best:
            best, since_best = grad_norm, 0
        else:
            since_best += 1
            if since_best > 50:
                for group in optimiser.param_groups:
                    group["lr"] *= 0.5
                since_best = 0
        optimiser.step()
    with torch.no_grad():
        probs = objective.policy(logits)
        model = objective.occupancy(probs)
        value = float(objective(logits.detach(), model))
        final = logits.detach().masked_fill(~objective.allowed, float("-inf")).numpy()
    log_probs = np.log(np.where(probs > 0, probs, 1.0))
    entropy = float(-(model * log_probs).sum())
    return TabularResult(
        logits=final,
        probs=probs,
        occupancy=model,
        objective=value,
        entropy=entropy,
        divergence_estimate=value + alpha * entropy,
        grad_norm=grad_norm,
        steps=steps,
    )


__all__ = ["TabularObjective", "TabularResult", "solve_tabular", "space_allowed_actions"]
