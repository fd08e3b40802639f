"""Objectives on toys: hand-computed values, the sanity identity of docs/method.md §3, gradients."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator

import numpy as np
import pytest
import torch

from agents.collate import TrajectoryBatch, collate
from agents.config import TrainConfig
from agents.models.policy import TransformerPolicy
from agents.objectives import (
    DIVERGENCES,
    VALUE_SOURCES,
    BCLoss,
    Mixture,
    MLELoss,
    ObjectiveBatch,
    SequenceMatchLoss,
    gradient_shares,
    phi,
)
from seqenv.trajectory import Trajectory, augment, random_noise
from seqenv.vocab import CharVocab, SpecialIds

# --------------------------------------------------------------------------------------------
# Fixtures: a policy whose logits are a free tensor, and a reference log pi written out directly


class TableLogits(torch.nn.Module):
    """A fake policy: the logits of row t of sequence b are a learnable entry ``table[b, t]``."""

    def __init__(self, special: SpecialIds, table: torch.Tensor) -> None:
        super().__init__()
        self.special = special
        self.table = torch.nn.Parameter(table.clone())
        self.calls = 0

    def forward_batch(self, batch: TrajectoryBatch) -> torch.Tensor:
        self.calls += 1
        B, T = batch.input_ids.shape
        return self.table[:B, :T]  # (B, T, A)


def random_table(special: SpecialIds, B: int, T: int, seed: int = 0, scale: float = 2.0):
    g = torch.Generator().manual_seed(seed)
    return scale * torch.randn(B, T, special.num_actions, generator=g)


def reference_steps(
    logits: torch.Tensor, batch: TrajectoryBatch, trajectories: list[Trajectory]
) -> Iterator[tuple[int, int, torch.Tensor, list[int]]]:
    """(sequence, action, logits of its state, allowed actions) per step, walked step by step:
    <bkspc> is allowed only where something is generated."""
    for b, trajectory in enumerate(trajectories):
        s = trajectory.special
        generated = 0
        for t, action in enumerate(trajectory.actions.tolist()):
            allowed = [a for a in range(s.num_actions) if a != s.backspace_id or generated > 0]
            yield b, action, logits[b, int(batch.state_rows[b, t])], allowed
            if action == s.backspace_id:
                generated -= 1
            elif action != s.eos_id:
                generated += 1


def reference_log_probs(
    logits: torch.Tensor, batch: TrajectoryBatch, trajectories: list[Trajectory]
) -> list[list[torch.Tensor]]:
    """log pi(a_t | s_t) per step of each sequence, from :func:`reference_steps`."""
    out: list[list[torch.Tensor]] = [[] for _ in trajectories]
    for b, action, row, allowed in reference_steps(logits, batch, trajectories):
        out[b].append(row[action] - torch.logsumexp(row[allowed], dim=0))
    return out


def random_trajectories(
    random_trajectory: Callable[..., Trajectory], vocab: CharVocab, num: int, seed: int
) -> list[Trajectory]:
    rng = np.random.default_rng(seed)
    return [random_trajectory(rng, vocab, max_steps=12, p_backspace=0.3) for _ in range(num)]


# --------------------------------------------------------------------------------------------
# phi against hand-computed values


@pytest.mark.parametrize(
    ("divergence", "points"),
    [
        ("kl", [(0.0, -math.exp(-1)), (-1.0, -1.0), (1.0, -math.exp(-2))]),
        ("reverse_kl", [(1.0, 1.0), (math.e, 2.0), (math.exp(-1), 0.0)]),
        ("js", [(0.0, 0.0), (math.log(2), math.log(1.5)), (20.0, math.log(2 - math.exp(-20)))]),
        ("hellinger", [(1.0, 0.5), (0.0, 0.0), (-0.5, -1.0), (3.0, 0.75)]),
        ("tv", [(0.3, 0.3), (2.0, 0.5), (-3.0, -0.5), (-0.2, -0.2)]),
        ("chi2", [(2.0, 1.0), (-2.0, -3.0), (0.0, 0.0)]),
        ("chi2_mixture", [(2.0, 1.0), (-2.0, -3.0), (1.0, 0.75)]),
        ("linear", [(-7.0, -7.0), (3.5, 3.5)]),
    ],
)
def test_phi_hand_values(divergence: str, points: list[tuple[float, float]]) -> None:
    x = torch.tensor([p[0] for p in points], dtype=torch.float64)
    expected = torch.tensor([p[1] for p in points], dtype=torch.float64)
    torch.testing.assert_close(phi(divergence, x), expected)


def test_chi2_mixture_uses_c() -> None:
    x = torch.tensor([2.0, -1.0], dtype=torch.float64)
    torch.testing.assert_close(phi("chi2_mixture", x, c=0.5), torch.tensor([0.0, -1.5]).double())
    torch.testing.assert_close(phi("chi2_mixture", x, c=0.0), x)


@pytest.mark.parametrize(
    ("divergence", "x0", "phi_x0"),
    [
        ("reverse_kl", 0.01, 1 - math.log(100)),
        ("hellinger", -0.9, -9.0),
        ("kl", -1 - math.log(100), -100.0),
        ("js", math.log(101 / 200), math.log(2 / 101)),
    ],
)
def test_phi_is_continued_by_its_tangent_outside_the_domain(
    divergence: str, x0: float, phi_x0: float
) -> None:
    """Below the point where phi' = max_slope (here 100): phi(x0) + 100 (x - x0), slope 100."""
    x = torch.tensor([x0, x0 - 1.0, x0 - 1e3, x0 + 1e-9], dtype=torch.float64, requires_grad=True)
    y = phi(divergence, x, max_slope=100.0)
    expected = torch.tensor([phi_x0, phi_x0 - 100.0, phi_x0 - 1e5, phi_x0], dtype=torch.float64)
    torch.testing.assert_close(y.detach(), expected, rtol=1e-6, atol=1e-6)
    (grad,) = torch.autograd.grad(y.sum(), x)
    torch.testing.assert_close(grad, torch.full_like(grad, 100.0), rtol=1e-5, atol=1e-5)


def test_reverse_kl_at_zero_and_below_is_finite() -> None:
    x = torch.tensor([0.0, -5.0, -1e6], requires_grad=True)
    y = phi("reverse_kl", x)  # max_slope 1000: tangent at x0 = 1e-3
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y[0], torch.tensor(-math.log(1e3)))
    (grad,) = torch.autograd.grad(y.sum(), x)
    torch.testing.assert_close(grad, torch.full_like(grad, 1e3))


# --------------------------------------------------------------------------------------------
# The sanity identity of docs/method.md §3


@pytest.mark.parametrize("alpha", [1.0, 0.01])
@pytest.mark.parametrize("gamma", [1.0, 0.9, 0.998])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_linear_sequencematch_is_the_discounted_log_likelihood(
    vocab: CharVocab,
    random_trajectory: Callable[..., Trajectory],
    gamma: float,
    seed: int,
    alpha: float,
) -> None:
    """phi(x) = x, V(terminal) = 0, value term on the same data:
    J = alpha sum_t gamma^t log pi(a_t|s_t) (every term of J carries the temperature alpha).

    The batch mixes terminated and truncated trajectories (V(s_N) bootstrapped for the latter:
    it enters r and the value term with opposite signs), with and without backspaces.
    """
    trajectories = random_trajectories(random_trajectory, vocab, 8, seed)
    assert any(t.truncated for t in trajectories) and any(t.terminated for t in trajectories)
    assert any(t.num_backspaces for t in trajectories)
    batch = collate(trajectories)
    B, T = batch.input_ids.shape
    policy = TableLogits(vocab.special, random_table(vocab.special, B, T, seed))
    L = 16
    objective = SequenceMatchLoss(
        divergence="linear", alpha=alpha, gamma=gamma, value_source="data", normaliser_length=L
    )
    out = objective(policy, ObjectiveBatch(batch))

    log_probs = reference_log_probs(policy.table.detach(), batch, trajectories)
    log_likelihood = sum(gamma**t * lp for steps in log_probs for t, lp in enumerate(steps))
    expected = alpha * log_likelihood / (B * L)
    J = -out.loss
    torch.testing.assert_close(J, expected, rtol=1e-5, atol=1e-5 * alpha)
    torch.testing.assert_close(out.metrics["neg_objective"], -expected, rtol=1e-5, atol=1e-5)
    # The terms themselves are not trivial: r and the value term do not vanish separately.
    assert abs(float(out.metrics["data_term"])) > 1e-3 * alpha
    assert abs(float(out.metrics["value_term"])) > 1e-3 * alpha


def one_step(vocab: CharVocab, action: int, terminated: bool) -> Trajectory:
    return Trajectory([0], [action], terminated, not terminated, vocab.special)


def test_truncated_step_bootstraps_and_terminal_step_does_not() -> None:
    """Vocabulary "ab": a=0, b=1, <eos>=2, <bkspc>=3. Prompt [a]; one step; gamma = 0.5."""
    vocab = CharVocab("ab")
    row0 = [1.0, 2.0, 3.0, 5.0]  # <bkspc> (5.0) is masked: nothing is generated in s_0
    row1 = [0.0, 0.0, 0.0, 0.0]
    v0 = math.log(math.e + math.e**2 + math.e**3)
    gamma = 0.5
    objective = SequenceMatchLoss(divergence="linear", alpha=1.0, gamma=gamma, value_source="data")

    # Truncated after appending b: r = Q(s0, b) - gamma V(s1), V(s1) = log 4 read at row 1.
    batch = collate([one_step(vocab, 1, terminated=False)])
    assert batch.truncated[0, 0] and batch.next_rows[0, 0] == 1
    policy = TableLogits(vocab.special, torch.tensor([[row0, row1]]))
    out = objective(policy, ObjectiveBatch(batch))
    r = 2.0 - gamma * math.log(4)
    torch.testing.assert_close(out.metrics["r_data"], torch.tensor(r))
    torch.testing.assert_close(out.metrics["value_term"], torch.tensor(v0 - gamma * math.log(4)))
    torch.testing.assert_close(-out.loss, torch.tensor(2.0 - v0))  # log pi(b | s0)
    torch.testing.assert_close(out.metrics["value"], torch.tensor(v0))

    # Terminated by <eos>: V(s1) = 0, so r = Q(s0, <eos>) and the value term is V(s0).
    batch = collate([one_step(vocab, vocab.eos_id, terminated=True)])
    policy = TableLogits(vocab.special, torch.tensor([[row0]]))
    out = objective(policy, ObjectiveBatch(batch))
    torch.testing.assert_close(out.metrics["r_data"], torch.tensor(3.0))
    torch.testing.assert_close(out.metrics["value_term"], torch.tensor(v0))
    torch.testing.assert_close(-out.loss, torch.tensor(3.0 - v0))


# --------------------------------------------------------------------------------------------
# chi2_mixture, value sources and the normaliser, by hand


def test_chi2_mixture_terms_by_hand() -> None:
    """Data and model: prompt [a], action <eos>; Q(s0, <eos>) = 3 so r = 3 on both."""
    vocab = CharVocab("ab")
    batch = collate([one_step(vocab, vocab.eos_id, terminated=True)])
    policy = TableLogits(vocab.special, torch.tensor([[[1.0, 2.0, 3.0, 5.0]]]))
    v0 = math.log(math.e + math.e**2 + math.e**3)
    out = SequenceMatchLoss(c=0.25, alpha=1.0, gamma=0.9)(policy, ObjectiveBatch(batch, batch))
    torch.testing.assert_close(out.metrics["data_term"], torch.tensor(3.0 - 0.25 * 9))
    torch.testing.assert_close(out.metrics["model_term"], torch.tensor(0.25 * 9))
    torch.testing.assert_close(out.metrics["value_term"], torch.tensor(v0))
    torch.testing.assert_close(out.loss, torch.tensor(-(0.75 - 2.25 - v0)))
    torch.testing.assert_close(out.metrics["r_model"], torch.tensor(3.0))
    torch.testing.assert_close(out.metrics["r_data"], torch.tensor(3.0))


def test_mix_value_term_pools_both_batches(
    vocab: CharVocab, random_trajectory: Callable[..., Trajectory]
) -> None:
    """mix = (sum over data + sum over model) / ((B_data + B_model) L)."""
    data = collate(random_trajectories(random_trajectory, vocab, 3, seed=5))
    model = collate(random_trajectories(random_trajectory, vocab, 5, seed=6))
    T = max(data.input_ids.shape[1], model.input_ids.shape[1])
    policy = TableLogits(vocab.special, random_table(vocab.special, 5, T, seed=7))
    batch = ObjectiveBatch(data, model)
    terms = {
        source: SequenceMatchLoss(value_source=source, normaliser_length=20)(policy, batch)
        for source in ("data", "model", "mix")
    }
    pooled = (
        3 * terms["data"].metrics["value_term"] + 5 * terms["model"].metrics["value_term"]
    ) / 8
    torch.testing.assert_close(terms["mix"].metrics["value_term"], pooled)
    for source in ("data", "model"):  # the other terms do not depend on the value source
        torch.testing.assert_close(
            terms[source].metrics["data_term"], terms["mix"].metrics["data_term"]
        )


def test_normaliser_scales_every_term_alike(
    vocab: CharVocab, random_trajectory: Callable[..., Trajectory]
) -> None:
    data = collate(random_trajectories(random_trajectory, vocab, 4, seed=8))
    policy = TableLogits(vocab.special, random_table(vocab.special, 4, data.input_ids.shape[1]))
    batch = ObjectiveBatch(data, data)
    short = SequenceMatchLoss(normaliser_length=10)(policy, batch)
    long = SequenceMatchLoss(normaliser_length=40)(policy, batch)
    for key in ("loss", "data_term", "model_term", "value_term"):
        torch.testing.assert_close(short.metrics[key], 4 * long.metrics[key])
    # None: the padded step count of the batches
    default = SequenceMatchLoss()(policy, batch)
    S = data.actions.shape[1]
    torch.testing.assert_close(default.metrics["loss"] * S, short.metrics["loss"] * 10)


# --------------------------------------------------------------------------------------------
# Gradients


def noisy_batches(
    vocab: CharVocab, random_trajectory: Callable[..., Trajectory], seed: int
) -> ObjectiveBatch:
    rng = np.random.default_rng(seed)
    clean = [random_trajectory(rng, vocab, max_steps=10, p_backspace=0.0) for _ in range(4)]
    data = [augment(t, random_noise(vocab.special), p=0.4, rng=rng) for t in clean]
    model = [random_trajectory(rng, vocab, max_steps=12, p_backspace=0.3) for _ in range(3)]
    return ObjectiveBatch(collate(data), collate(model))


@pytest.mark.parametrize("value_source", ["mix", "data", "model"])
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_finite_gradients_for_every_divergence(
    vocab: CharVocab,
    random_trajectory: Callable[..., Trajectory],
    tiny_policy: Callable[..., TransformerPolicy],
    divergence: str,
    value_source: str,
) -> None:
    batch = noisy_batches(vocab, random_trajectory, seed=3)
    assert batch.data.has_backspace and batch.model is not None and batch.model.has_backspace
    policy = tiny_policy(vocab).train()
    objective = SequenceMatchLoss(divergence=divergence, value_source=value_source)
    out = objective(policy, batch)
    out.loss.backward()
    grads = [p.grad for p in policy.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)
    for key, value in out.metrics.items():
        assert value.ndim == 0 and not value.requires_grad, key
        assert torch.isfinite(value), key


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_finite_gradients_with_extreme_logits(
    vocab: CharVocab, random_trajectory: Callable[..., Trajectory], divergence: str
) -> None:
    """Logits of scale 50 put r far outside every phi's domain: values and gradients stay finite."""
    batch = noisy_batches(vocab, random_trajectory, seed=4)
    assert batch.model is not None
    T = max(batch.data.input_ids.shape[1], batch.model.input_ids.shape[1])
    policy = TableLogits(vocab.special, random_table(vocab.special, 4, T, scale=50.0))
    out = SequenceMatchLoss(divergence=divergence)(policy, batch)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert policy.table.grad is not None and torch.isfinite(policy.table.grad).all()


def weighted_nll(
    policy: TransformerPolicy,
    batch: TrajectoryBatch,
    trajectories: list[Trajectory],
    gamma: float,
    L: int,
) -> torch.Tensor:
    logits = policy.forward_batch(batch)
    log_probs = reference_log_probs(logits, batch, trajectories)
    total = sum(gamma**t * lp for steps in log_probs for t, lp in enumerate(steps))
    return -total / (len(trajectories) * L)


def grads_of(policy: torch.nn.Module, loss: torch.Tensor) -> list[torch.Tensor]:
    params = [p for p in policy.parameters() if p.requires_grad]
    return list(torch.autograd.grad(loss, params, allow_unused=False))


@pytest.mark.parametrize("gamma", [1.0, 0.9])
def test_chi2_mixture_with_c0_has_the_gradient_of_the_weighted_nll(
    vocab: CharVocab,
    random_trajectory: Callable[..., Trajectory],
    tiny_policy: Callable[..., TransformerPolicy],
    gamma: float,
) -> None:
    """c = 0, value term on the data: grad of SequenceMatch = grad of the gamma^t-weighted NLL."""
    trajectories = random_trajectories(random_trajectory, vocab, 5, seed=11)
    batch = collate(trajectories)
    policy = tiny_policy(vocab).double()
    L = 16
    sm = SequenceMatchLoss(c=0.0, alpha=1.0, gamma=gamma, value_source="data", normaliser_length=L)
    out = sm(policy, ObjectiveBatch(batch))  # no model batch needed: c = 0, data source
    reference = weighted_nll(policy, batch, trajectories, gamma, L)
    torch.testing.assert_close(out.loss, reference)
    for got, want in zip(grads_of(policy, out.loss), grads_of(policy, reference), strict=True):
        torch.testing.assert_close(got, want)
    if gamma == 1.0:  # then it is MLE, with the same normaliser
        mle = MLELoss(normaliser_length=L)(policy, ObjectiveBatch(batch))
        mle_grads = grads_of(policy, mle.loss)
        sm_grads = grads_of(policy, sm(policy, ObjectiveBatch(batch)).loss)
        for got, want in zip(sm_grads, mle_grads, strict=True):
            torch.testing.assert_close(got, want)


# --------------------------------------------------------------------------------------------
# MLE and BC


def test_bc_without_noise_targets_ignores_noise_tokens() -> None:
    """Prompt [a]; actions [x, <bkspc>, b, <eos>]; all logits 0.

    log pi: s0 and s2 have nothing generated (<bkspc> masked, 4 allowed actions): -log 4;
    s1 and s3 allow all 5 actions: -log 5. Without noise targets x (step 0) is not a target.
    """
    vocab = CharVocab("abx")
    a, b, x = vocab.encode("abx")
    s = vocab.special
    trajectory = Trajectory([a], [x, s.backspace_id, b, s.eos_id], True, False, s)
    batch = collate([trajectory])
    assert batch.undone[0].tolist() == [True, False, False, False]
    policy = TableLogits(s, torch.zeros(1, batch.input_ids.shape[1], s.num_actions))
    l4, l5 = math.log(4), math.log(5)

    out = BCLoss(noise_targets=False)(policy, ObjectiveBatch(batch))
    torch.testing.assert_close(out.loss, torch.tensor((l5 + l4 + l5) / 4))
    torch.testing.assert_close(out.metrics["nll"], torch.tensor((l5 + l4 + l5) / 3))
    torch.testing.assert_close(out.metrics["num_targets"], torch.tensor(3.0))
    torch.testing.assert_close(out.metrics["backspace_rate_data"], torch.tensor(0.25))

    with_noise = BCLoss(noise_targets=True)(policy, ObjectiveBatch(batch))
    torch.testing.assert_close(with_noise.loss, torch.tensor((l4 + l5 + l4 + l5) / 4))
    mle = MLELoss()(policy, ObjectiveBatch(batch))
    torch.testing.assert_close(mle.loss, with_noise.loss)
    torch.testing.assert_close(
        BCLoss(noise_targets=False, normaliser_length=8)(policy, ObjectiveBatch(batch)).loss,
        torch.tensor((l5 + l4 + l5) / 8),
    )


def test_mle_matches_the_reference_log_likelihood(
    vocab: CharVocab, random_trajectory: Callable[..., Trajectory]
) -> None:
    trajectories = random_trajectories(random_trajectory, vocab, 6, seed=21)
    batch = collate(trajectories)
    B, T = batch.input_ids.shape
    policy = TableLogits(vocab.special, random_table(vocab.special, B, T, seed=2))
    out = MLELoss(normaliser_length=30)(policy, ObjectiveBatch(batch))
    log_probs = reference_log_probs(policy.table.detach(), batch, trajectories)
    total = sum(lp for steps in log_probs for lp in steps)
    count = sum(len(steps) for steps in log_probs)
    torch.testing.assert_close(out.loss, -total / (B * 30))
    torch.testing.assert_close(out.metrics["nll"], -total / count)


def test_level_penalty_by_hand(
    vocab: CharVocab, random_trajectory: Callable[..., Trajectory]
) -> None:
    trajectories = random_trajectories(random_trajectory, vocab, 6, seed=22)
    batch = collate(trajectories)
    B, T = batch.input_ids.shape
    policy = TableLogits(vocab.special, random_table(vocab.special, B, T, seed=3))
    plain = BCLoss(normaliser_length=30)(policy, ObjectiveBatch(batch))
    out = BCLoss(normaliser_length=30, level_penalty=0.2)(policy, ObjectiveBatch(batch))
    # V(s_t) by hand: logsumexp over the allowed actions of each step's state row.
    levels = [
        torch.logsumexp(row[allowed], dim=0)
        for _, _, row, allowed in reference_steps(policy.table.detach(), batch, trajectories)
    ]
    squares = [level**2 for level in levels]
    torch.testing.assert_close(out.loss, plain.loss + 0.2 * sum(squares) / (B * 30))
    torch.testing.assert_close(out.metrics["level"], sum(levels) / len(levels))
    torch.testing.assert_close(out.metrics["nll"], plain.metrics["nll"])


def test_level_penalty_pins_the_level_and_keeps_the_policy() -> None:
    """Cross-entropy plus the penalty on one state: pi lands on the data frequencies, LSE on 0."""
    counts = torch.tensor([5.0, 3.0, 2.0], dtype=torch.float64)
    # A level (logsumexp) of about 4, like the one plain BC leaves on dyck_small.
    logits = torch.tensor([4.0, 1.0, -3.0], dtype=torch.float64, requires_grad=True)
    optimiser = torch.optim.LBFGS(
        [logits],
        max_iter=1000,
        tolerance_grad=1e-14,
        tolerance_change=0.0,
        line_search_fn="strong_wolfe",
    )

    def closure() -> torch.Tensor:
        optimiser.zero_grad()
        loss = (
            -(counts * logits.log_softmax(0)).sum() / counts.sum() + 0.01 * logits.logsumexp(0) ** 2
        )
        loss.backward()
        return loss

    optimiser.step(closure)
    torch.testing.assert_close(logits.detach().softmax(0), counts / counts.sum(), atol=1e-6, rtol=0)
    assert abs(float(logits.detach().logsumexp(0))) < 1e-6


def test_allow_backspace_false_masks_it_everywhere() -> None:
    """Prompt [a]; actions [b, <eos>]; s1 = [a b] would allow <bkspc> (logit 5)."""
    vocab = CharVocab("ab")
    s = vocab.special
    batch = collate([Trajectory([0], [1, s.eos_id], True, False, s)])
    policy = TableLogits(s, torch.tensor([[[0.0, 0.0, 0.0, 9.0], [1.0, 2.0, 3.0, 5.0]]]))
    with_bk = MLELoss(normaliser_length=1)(policy, ObjectiveBatch(batch)).loss
    without = MLELoss(normaliser_length=1, allow_backspace=False)(
        policy, ObjectiveBatch(batch)
    ).loss
    lse3 = math.log(math.e + math.e**2 + math.e**3)
    lse4 = math.log(math.e + math.e**2 + math.e**3 + math.e**5)
    torch.testing.assert_close(with_bk, torch.tensor(math.log(3) - 3.0 + lse4))
    torch.testing.assert_close(without, torch.tensor(math.log(3) - 3.0 + lse3))


def test_a_backspace_with_nothing_generated_is_left_out() -> None:
    """A step the policy cannot take (a no-op backspace) is in no term: it would be -inf."""
    vocab = CharVocab("ab")
    s = vocab.special
    batch = collate([Trajectory([0], [1, s.eos_id], True, False, s)])
    actions = batch.actions.clone()
    actions[0, 0] = s.backspace_id
    noop = dataclasses.replace(batch, actions=actions, labels=actions)
    policy = TableLogits(s, torch.zeros(1, 2, s.num_actions))
    out = MLELoss(normaliser_length=1)(policy, ObjectiveBatch(noop))
    torch.testing.assert_close(out.metrics["num_targets"], torch.tensor(1.0))
    torch.testing.assert_close(out.loss, torch.tensor(math.log(4)))  # only <eos> at s1
    sm = SequenceMatchLoss(divergence="reverse_kl", value_source="data")(
        policy, ObjectiveBatch(noop)
    )
    assert torch.isfinite(sm.loss)


# --------------------------------------------------------------------------------------------
# Mixture and construction


def test_mixture_combines_both_parts_with_one_pass_per_batch(
    vocab: CharVocab, random_trajectory: Callable[..., Trajectory]
) -> None:
    batch = noisy_batches(vocab, random_trajectory, seed=9)
    assert batch.model is not None
    T = max(batch.data.input_ids.shape[1], batch.model.input_ids.shape[1])
    policy = TableLogits(vocab.special, random_table(vocab.special, 4, T, seed=3))
    bc, sm = BCLoss(normaliser_length=20), SequenceMatchLoss(normaliser_length=20)
    mixture = Mixture(bc, sm, eta=0.1)
    out = mixture(policy, batch)
    assert policy.calls == 2  # data and model, once each
    expected = 0.9 * bc(policy, batch).loss + 0.1 * sm(policy, batch).loss / sm.alpha
    torch.testing.assert_close(out.loss, expected)
    assert {"loss", "bc/nll", "sm/divergence", "sm/r_data", "sm/r_model", "sm/value"} <= set(
        out.metrics
    )
    assert {"backspace_rate_data", "backspace_rate_model"} <= set(out.metrics)
    with pytest.raises(ValueError, match="eta"):
        Mixture(bc, sm, eta=1.5)


def test_sequencematch_says_when_it_needs_model_samples(
    vocab: CharVocab, random_trajectory: Callable[..., Trajectory]
) -> None:
    batch = collate(random_trajectories(random_trajectory, vocab, 2, seed=1))
    policy = TableLogits(vocab.special, random_table(vocab.special, 2, batch.input_ids.shape[1]))
    with pytest.raises(ValueError, match="model trajectories"):
        SequenceMatchLoss()(policy, ObjectiveBatch(batch))
    with pytest.raises(ValueError, match="model trajectories"):
        SequenceMatchLoss(divergence="kl", value_source="mix")(policy, ObjectiveBatch(batch))
    SequenceMatchLoss(divergence="kl", value_source="data")(policy, ObjectiveBatch(batch))


def test_sequencematch_loss_from_settings() -> None:
    settings = TrainConfig(divergence="js", gamma=0.9, value_source="data", c=0.1, alpha=0.5)
    sm = SequenceMatchLoss.from_settings(settings, normaliser_length=7, allow_backspace=False)
    assert sm == SequenceMatchLoss(
        divergence="js", c=0.1, alpha=0.5, gamma=0.9, value_source="data",
        normaliser_length=7, allow_backspace=False,
    )  # fmt: skip
    assert SequenceMatchLoss.from_settings(settings, value_source="mix").value_source == "mix"
    assert SequenceMatchLoss().divergence == "chi2_mixture" and SequenceMatchLoss().gamma == 0.998
    assert SequenceMatchLoss().alpha == 0.01 and SequenceMatchLoss().c == 0.25
    assert SequenceMatchLoss().kappa == pytest.approx(0.0025)
    assert SequenceMatchLoss(divergence="chi2", alpha=0.1).kappa == pytest.approx(0.025)
    assert SequenceMatchLoss(divergence="kl").kappa is None


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (
            lambda: SequenceMatchLoss(divergence="wasserstein"),
            r"unknown divergence 'wasserstein'; known: chi2_mixture, chi2, kl, reverse_kl, js",
        ),
        (
            lambda: SequenceMatchLoss(value_source="replay"),
            r"unknown value source 'replay'; known: mix, data, model",
        ),
        (lambda: phi("bogus", torch.zeros(1)), r"unknown divergence 'bogus'"),
        (lambda: SequenceMatchLoss(gamma=0.0), r"gamma must be in \(0, 1\]"),
        (lambda: SequenceMatchLoss(c=-1.0), r"c must be >= 0"),
        (lambda: SequenceMatchLoss(alpha=0.0), r"alpha must be finite and > 0, got 0.0"),
        (lambda: SequenceMatchLoss(alpha=-0.1), r"alpha must be finite and > 0"),
        (lambda: SequenceMatchLoss(alpha=math.inf), r"alpha must be finite and > 0, got inf"),
        (lambda: SequenceMatchLoss(alpha=math.nan), r"alpha must be finite and > 0, got nan"),
        (lambda: MLELoss(normaliser_length=0), r"normaliser_length must be >= 1"),
        (lambda: BCLoss(level_penalty=-0.1), r"level_penalty must be finite and >= 0, got -0.1"),
        (
            lambda: MLELoss(level_penalty=math.nan),
            r"level_penalty must be finite and >= 0, got nan",
        ),
    ],
)
def test_bad_names_and_values_raise_clear_errors(call: Callable[[], object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        call()


# --------------------------------------------------------------------------------------------
# The `undone` field of the collated batch


def undone_reference(trajectory: Trajectory) -> list[bool]:
    """An append at step t (length l after it) is undone iff the length later drops below l."""
    s = trajectory.special
    lengths, length = [], 0
    for a in trajectory.actions.tolist():
        length += 1 if s.is_token(a) else -1 if a == s.backspace_id else 0
        lengths.append(length)
    return [
        s.is_token(a) and any(later < lengths[t] for later in lengths[t + 1 :])
        for t, a in enumerate(trajectory.actions.tolist())
    ]


def test_undone_by_hand() -> None:
    vocab = CharVocab("abxyz")
    s = vocab.special
    a, b, x, y, z = vocab.encode("abxyz")
    bk, eos = s.backspace_id, s.eos_id
    cases = [
        ([x, y, bk, bk, b, eos], [True, True, False, False, False, False]),
        ([x, bk, y, z, bk, eos], [True, False, False, True, False, False]),
        ([x, y, bk, z, bk, bk, b, eos], [True, True, False, True, False, False, False, False]),
        ([b, x], [False, False]),  # truncated before the noise token is deleted
    ]
    trajectories = [Trajectory([a], acts, acts[-1] == eos, acts[-1] != eos, s) for acts, _ in cases]
    batch = collate(trajectories)
    for i, (acts, expected) in enumerate(cases):
        assert batch.undone[i, : len(acts)].tolist() == expected
        assert not batch.undone[i, len(acts) :].any()
    assert batch.undone.dtype == torch.bool


def test_undone_on_random_trajectories(
    vocab: CharVocab, random_trajectory: Callable[..., Trajectory]
) -> None:
    trajectories = random_trajectories(random_trajectory, vocab, 32, seed=13)
    batch = collate(trajectories)
    for i, trajectory in enumerate(trajectories):
        assert batch.undone[i, : trajectory.num_steps].tolist() == undone_reference(trajectory)
    moved = batch.to("cpu")
    assert torch.equal(moved.undone, batch.undone)


# --------------------------------------------------------------------------------------------
# The soft-Q temperature alpha (docs/method.md §2-§3)


def alpha_batches(
    vocab: CharVocab, random_trajectory: Callable[..., Trajectory], seed: int
) -> tuple[ObjectiveBatch, TableLogits]:
    """Random data and model trajectories (backspaces, terminated and truncated), random logits."""
    data_trajectories = random_trajectories(random_trajectory, vocab, 8, seed)
    model_trajectories = random_trajectories(random_trajectory, vocab, 7, seed + 100)
    for trajectories in (data_trajectories, model_trajectories):
        assert any(t.truncated for t in trajectories) and any(t.terminated for t in trajectories)
        assert any(t.num_backspaces for t in trajectories)
    batch = ObjectiveBatch(collate(data_trajectories), collate(model_trajectories))
    assert batch.model is not None
    T = max(batch.data.input_ids.shape[1], batch.model.input_ids.shape[1])
    table = random_table(vocab.special, 8, T, seed=seed).double()
    return batch, TableLogits(vocab.special, table)


def objective_and_grad(
    objective: SequenceMatchLoss, policy: TableLogits, batch: ObjectiveBatch
) -> tuple[torch.Tensor, torch.Tensor]:
    J = -objective(policy, batch).loss
    (grad,) = torch.autograd.grad(J, policy.table)
    return J.detach(), grad


@pytest.mark.parametrize("value_source", VALUE_SOURCES)
@pytest.mark.parametrize("alpha", [0.01, 0.3, 2.0])
@pytest.mark.parametrize("seed", [0, 1])
def test_alpha_and_c_collapse_into_kappa_for_chi2_mixture_and_linear(
    vocab: CharVocab,
    random_trajectory: Callable[..., Trajectory],
    value_source: str,
    alpha: float,
    seed: int,
) -> None:
    """J_{alpha,c}(l) = alpha J_{1,c alpha}(l), values and gradients in the logits."""
    batch, policy = alpha_batches(vocab, random_trajectory, seed)
    for divergence in ("chi2_mixture", "linear"):
        common = {"divergence": divergence, "gamma": 0.9, "value_source": value_source}
        hot = SequenceMatchLoss(alpha=alpha, c=0.25, normaliser_length=20, **common)
        cold = SequenceMatchLoss(alpha=1.0, c=0.25 * alpha, normaliser_length=20, **common)
        assert hot.kappa == pytest.approx(cold.kappa)
        J_hot, grad_hot = objective_and_grad(hot, policy, batch)
        J_cold, grad_cold = objective_and_grad(cold, policy, batch)
        torch.testing.assert_close(J_hot, alpha * J_cold, rtol=1e-6, atol=1e-9)
        torch.testing.assert_close(grad_hot, alpha * grad_cold, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("alpha", [0.01, 0.3, 2.0])
@pytest.mark.parametrize("seed", [0, 1])
def test_chi2_fixed_quarter_scales_with_alpha(
    vocab: CharVocab, random_trajectory: Callable[..., Trajectory], alpha: float, seed: int
) -> None:
    """chi2 (phi = x - x^2/4) at alpha is alpha times the alpha = 1 objective with coefficient
    alpha / 4 on the data only: chi2_mixture's data and value terms at c = alpha / 4."""
    batch, policy = alpha_batches(vocab, random_trajectory, seed)
    chi2 = SequenceMatchLoss(divergence="chi2", alpha=alpha, gamma=0.9, normaliser_length=20)
    assert chi2.kappa == pytest.approx(alpha / 4)
    cold = SequenceMatchLoss(c=alpha / 4, alpha=1.0, gamma=0.9, normaliser_length=20)(policy, batch)
    J_cold = cold.metrics["data_term"] - cold.metrics["value_term"]
    torch.testing.assert_close(
        -chi2(policy, batch).loss.detach(), alpha * J_cold, rtol=1e-6, atol=1e-9
    )


def test_alpha_does_not_collapse_for_non_quadratic_phi(
    vocab: CharVocab, random_trajectory: Callable[..., Trajectory]
) -> None:
    """The identity is special to quadratic phi: for kl, J at alpha is not alpha J at 1."""
    batch, policy = alpha_batches(vocab, random_trajectory, 0)
    hot = SequenceMatchLoss(divergence="kl", alpha=0.1, normaliser_length=20)(policy, batch).loss
    cold = SequenceMatchLoss(divergence="kl", alpha=1.0, normaliser_length=20)(policy, batch).loss
    assert abs(float((hot - 0.1 * cold).detach())) > 1e-3


def test_mixture_divides_sequencematch_by_alpha(
    vocab: CharVocab, random_trajectory: Callable[..., Trajectory]
) -> None:
    """(1 - eta) L_BC + eta L_SM / alpha; at alpha = 0.01, c = 1/4 it is the alpha = 1 mixture
    at c = 0.0025 (the same kappa)."""
    batch, policy = alpha_batches(vocab, random_trajectory, 3)
    bc = BCLoss(normaliser_length=20)
    sm = SequenceMatchLoss(alpha=0.01, c=0.25, normaliser_length=20)
    out = Mixture(bc, sm, eta=0.3)(policy, batch)
    L_bc, L_sm = bc(policy, batch).loss, sm(policy, batch).loss
    torch.testing.assert_close(out.loss, 0.7 * L_bc + 0.3 * L_sm / 0.01)
    torch.testing.assert_close(out.parts["bc"] + out.parts["sm"], out.loss)
    torch.testing.assert_close(out.metrics["sm/loss"], L_sm.detach())  # J's units, undivided
    same_kappa = SequenceMatchLoss(alpha=1.0, c=0.0025, normaliser_length=20)
    torch.testing.assert_close(
        out.loss, Mixture(bc, same_kappa, eta=0.3)(policy, batch).loss, rtol=1e-6, atol=1e-9
    )


def test_divergence_estimate_adds_alpha_times_the_entropy_by_hand() -> None:
    """Vocabulary "ab": a=0, b=1, <eos>=2, <bkspc>=3; prompt [a].

    Data: [<eos>] at row 0. Model: [b, <eos>], s_0 at row 0 (<bkspc> masked: entropy over
    logits [1, 2, 3]) and s_1 = [a b] at row 1 (all four actions allowed). gamma = 0.5, L = 2:
    H_hat = (H(s_0) + 0.5 H(s_1)) / (1 x 2), and d_hat = J + alpha H_hat.
    """
    vocab = CharVocab("ab")
    s = vocab.special
    row0, row1 = [1.0, 2.0, 3.0, 5.0], [0.5, -1.0, 2.0, 1.0]

    def entropy(logits: list[float]) -> float:
        z = sum(math.exp(x) for x in logits)
        return -sum(math.exp(x) / z * (x - math.log(z)) for x in logits)

    h_hat = (entropy(row0[:3]) + 0.5 * entropy(row1)) / 2
    data = collate([one_step(vocab, s.eos_id, terminated=True)])
    model = collate([Trajectory([0], [1, s.eos_id], True, False, s)])
    policy = TableLogits(s, torch.tensor([[row0, row1]], dtype=torch.float64))
    alpha = 0.5
    out = SequenceMatchLoss(alpha=alpha, gamma=0.5)(policy, ObjectiveBatch(data, model))
    J = -out.loss.detach()
    torch.testing.assert_close(out.metrics["entropy_term"], torch.tensor(h_hat).double())
    torch.testing.assert_close(out.metrics["divergence"], J + alpha * h_hat)
    torch.testing.assert_close(out.metrics["neg_objective"], -J)
    torch.testing.assert_close(
        out.metrics["entropy"], torch.tensor((entropy(row0[:3]) + entropy(row1)) / 2).double()
    )
    # Without a model batch the entropy is read on the data's states: H(s_0) / (1 x 1).
    alone = SequenceMatchLoss(divergence="linear", alpha=alpha, value_source="data")
    out = alone(policy, ObjectiveBatch(data))
    torch.testing.assert_close(
        out.metrics["entropy_term"], torch.tensor(entropy(row0[:3])).double()
    )
    torch.testing.assert_close(
        out.metrics["divergence"], -out.loss.detach() + alpha * entropy(row0[:3])
    )


# --------------------------------------------------------------------------------------------
# Gradient shares


@pytest.mark.parametrize("eta", [0.0, 0.1, 0.5, 1.0])
def test_gradient_shares(
    vocab: CharVocab,
    random_trajectory: Callable[..., Trajectory],
    tiny_policy: Callable[..., TransformerPolicy],
    eta: float,
) -> None:
    """In [0, 1]; the SequenceMatch share is 1 at eta = 1 and 0 at eta = 0; the graph survives
    for the update's backward pass, and no .grad is written."""
    batch = noisy_batches(vocab, random_trajectory, seed=5)
    policy = tiny_policy(vocab).double().train()
    objective = Mixture(
        BCLoss(normaliser_length=20), SequenceMatchLoss(normaliser_length=20), eta=eta
    )
    out = objective(policy, batch)
    shares = gradient_shares(out.parts, policy.parameters())
    assert set(shares) == {"grad_share_sm", "grad_share_kappa"}
    for value in shares.values():
        assert 0.0 <= float(value) <= 1.0 and not value.requires_grad
    assert all(p.grad is None for p in policy.parameters())
    if eta == 0.0:
        assert float(shares["grad_share_sm"]) == 0.0
        assert float(shares["grad_share_kappa"]) == 0.0
    elif eta == 1.0:
        assert float(shares["grad_share_sm"]) == 1.0
    else:
        assert 0.0 < float(shares["grad_share_sm"]) < 1.0
        assert 0.0 < float(shares["grad_share_kappa"]) < 1.0
    out.loss.backward()  # retain_graph kept the graph
    assert all(p.grad is not None for p in policy.parameters() if p.requires_grad)


def test_gradient_shares_by_hand() -> None:
    """One parameter w; parts bc = w, sm = 3 w, kappa = -w: |g_sm| / (|g_bc| + |g_sm|) = 3/4,
    |g_kappa| / (|g_bc + g_sm - g_kappa| + |g_kappa|) = 1 / (5 + 1)."""
    w = torch.tensor(2.0, requires_grad=True)
    shares = gradient_shares({"bc": w, "sm": 3 * w, "kappa": -w}, [w])
    torch.testing.assert_close(shares["grad_share_sm"], torch.tensor(0.75))
    torch.testing.assert_close(shares["grad_share_kappa"], torch.tensor(1 / 6))
    assert "grad_share_kappa" not in gradient_shares({"sm": w}, [w])
    with pytest.raises(ValueError, match="'sm'"):
        gradient_shares({"bc": w}, [w])
