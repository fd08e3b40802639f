"""SequenceMatch is discounted BC plus a kappa-weighted TD regulariser (docs/method.md §3).

The proposition of docs/method.md §3, checked on the objective's own code with the tiny
transformer, whose logits depend on the state alone (``TableLogits`` would give every sequence
its own V(s_0)). Notation: logits l, V~(s) = logsumexp of l over the actions allowed in s,
V~ = 0 after ``<eos>``, r~_i = l(a_i|s_i) - gamma V~(s_{i+1}), kappa = c alpha, E_X the sum over
the sequences of batch X divided by (B_X L), w the value source's weight on the model batch
(data 0, model 1, mix B_model / (B_data + B_model)). For any batches::

    J / alpha = E_data[sum_i gamma^i log pi(a_i|s_i)]
                - kappa (E_data[sum_i gamma^i r~_i^2] + E_model[sum_i gamma^i r~_i^2])
                + w (E_data[B] - E_model[B]),          B = V~(s_0) - gamma^N V~(s_N)

with a_i the label learned (the intended action) and V~(s_N) = 0 for a terminated sequence. The
reference side is built here from one plain causal pass per state (``per_state_logits``), not
from the re-feed batch the objective reads.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
import torch

from agents.collate import collate
from agents.generate import generate
from agents.models.policy import TransformerPolicy
from agents.objectives import BCLoss, Mixture, ObjectiveBatch, SequenceMatchLoss, phi
from seqenv.disturbance import Disturbance
from seqenv.tasks.dyck import DyckTask
from seqenv.trajectory import Trajectory, disturbed_demonstrations
from seqenv.vocab import CharVocab
from tests.agents.conftest import per_state_logits, visited_states

L = 32
"""The shared normaliser length, passed explicitly (a step budget longer than any sequence)."""


def assert_exact(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Equal to float64 precision: the two sides agree to about 2e-16 in float64, far inside
    these bounds (measured; in float32 they agree to about 6e-8)."""
    torch.testing.assert_close(actual, expected, rtol=1e-11, atol=1e-12)


# --------------------------------------------------------------------------------------------
# The reference side, per trajectory


@dataclass(frozen=True)
class Terms:
    """The per-step quantities of one trajectory, in logit units (alpha = 1).

    Attributes:
        discount: (N,) gamma^i.
        log_prob: (N,) log pi(a_i | s_i), a_i the intended action.
        residual: (N,) r~_i = l(a_i | s_i) - gamma V~(s_{i+1}), V~ = 0 after <eos>.
        value: (N,) V~(s_i).
        start: () V~(s_0).
        end: () gamma^N V~(s_N) for a truncated trajectory, 0 for a terminated one.
    """

    discount: torch.Tensor
    log_prob: torch.Tensor
    residual: torch.Tensor
    value: torch.Tensor
    start: torch.Tensor
    end: torch.Tensor

    @property
    def log_likelihood(self) -> torch.Tensor:
        """sum_i gamma^i log pi(a_i | s_i)."""
        return (self.discount * self.log_prob).sum()

    @property
    def squares(self) -> torch.Tensor:
        """sum_i gamma^i r~_i^2."""
        return (self.discount * self.residual.square()).sum()

    @property
    def boundary(self) -> torch.Tensor:
        """V~(s_0) - gamma^N V~(s_N), the sum of gamma^i (V~(s_i) - gamma V~(s_{i+1}))."""
        return self.start - self.end


def terms_of(policy: TransformerPolicy, trajectory: Trajectory, gamma: float) -> Terms:
    """The :class:`Terms` of ``trajectory``, from one plain causal pass per visited state."""
    special = trajectory.special
    states = visited_states(trajectory)  # s_0 .. s_N
    logits = per_state_logits(policy, states, special.pad_id)  # (N + 1, A)
    prompt_length = len(trajectory.prompt)
    allowed = torch.ones_like(logits, dtype=torch.bool)  # <bkspc> only once something is generated
    for i, state in enumerate(states):
        allowed[i, special.backspace_id] = len(state) > prompt_length
    values = torch.where(allowed, logits, -torch.inf).logsumexp(dim=-1)  # (N + 1,)
    N = trajectory.num_steps
    steps = torch.arange(N)
    labels = torch.from_numpy(trajectory.labels("intended").copy())
    q = logits[steps, labels]  # (N,)
    terminal = torch.from_numpy(trajectory.actions == special.eos_id)
    next_values = torch.where(terminal, 0.0, values[1:])
    end = gamma**N * values[N] if trajectory.truncated else values.new_zeros(())
    return Terms(
        discount=gamma ** steps.to(logits.dtype),
        log_prob=q - values[:N],
        residual=q - gamma * next_values,
        value=values[:N],
        start=values[0],
        end=end,
    )


def expectation(terms: Sequence[Terms], of: Callable[[Terms], torch.Tensor]) -> torch.Tensor:
    """E_X[of]: the sum over the batch's sequences divided by (B_X L)."""
    return torch.stack([of(t) for t in terms]).sum() / (len(terms) * L)


def model_weight(value_source: str, num_data: int, num_model: int) -> float:
    """w: the weight of the model batch in the value term's estimate."""
    return {"data": 0.0, "model": 1.0, "mix": num_model / (num_data + num_model)}[value_source]


@dataclass(frozen=True)
class Identity:
    """The right-hand side of the proposition, term by term (J / alpha = the sum of the three).

    Attributes:
        log_likelihood: E_data[sum gamma^i log pi].
        td: -kappa (E_data[sum gamma^i r~^2] + E_model[sum gamma^i r~^2]) (model half only when
            the objective has a model term).
        boundary: w (E_data[V~(s_0) - gamma^N V~(s_N)] - E_model[same]).
    """

    log_likelihood: torch.Tensor
    td: torch.Tensor
    boundary: torch.Tensor

    @property
    def total(self) -> torch.Tensor:
        return self.log_likelihood + self.td + self.boundary


def identity(
    objective: SequenceMatchLoss, data: Sequence[Terms], model: Sequence[Terms] | None
) -> Identity:
    """The proposition's right-hand side for ``objective`` (chi2_mixture, chi2 or linear)."""
    kappa = objective.kappa
    assert kappa is not None
    td = kappa * expectation(data, lambda t: t.squares)
    if objective.has_model_term:
        assert model is not None
        td = td + kappa * expectation(model, lambda t: t.squares)
    boundary = torch.zeros((), dtype=td.dtype)
    if objective.value_source != "data":
        assert model is not None
        w = model_weight(objective.value_source, len(data), len(model))
        data_b, model_b = (expectation(x, lambda t: t.boundary) for x in (data, model))
        boundary = w * (data_b - model_b)
    return Identity(expectation(data, lambda t: t.log_likelihood), -td, boundary)


# --------------------------------------------------------------------------------------------
# Trajectories


def random_trajectories(
    random_trajectory: Callable[..., Trajectory], vocab: CharVocab, num: int, seed: int
) -> list[Trajectory]:
    """Random episodes with backspaces, terminated and truncated, some with disturbed labels."""
    rng = np.random.default_rng(seed)
    out = [disturb(random_trajectory(rng, vocab, max_steps=12), rng) for _ in range(num)]
    assert any(t.truncated for t in out) and any(t.terminated for t in out)
    assert any(t.num_backspaces for t in out) and any(t.num_disturbances for t in out)
    return out


def disturb(trajectory: Trajectory, rng: np.random.Generator, p: float = 0.3) -> Trajectory:
    """The same executed actions, with intended tokens that differ at some token steps (the
    labels a learner trains on where a disturbance replaced the chosen token)."""
    special = trajectory.special
    tokens = [a for a in range(special.num_actions) if special.is_token(a)]
    intended = trajectory.actions.copy()
    for i, action in enumerate(trajectory.actions.tolist()):
        if special.is_token(action) and rng.random() < p:
            intended[i] = rng.choice([t for t in tokens if t != action])
    return Trajectory(
        trajectory.prompt,
        trajectory.actions,
        trajectory.terminated,
        trajectory.truncated,
        special,
        intended,
    )


def completed(trajectory: Trajectory, prompt: Sequence[int] | None = None) -> Trajectory:
    """The trajectory ended by ``<eos>`` (appended if it was truncated), optionally re-prompted
    (its actions never reach into the prompt, so any prompt gives a valid episode)."""
    special = trajectory.special
    actions, intended = trajectory.actions.tolist(), trajectory.intended_actions.tolist()
    if trajectory.truncated:
        actions, intended = [*actions, special.eos_id], [*intended, special.eos_id]
    prompt = trajectory.prompt.tolist() if prompt is None else list(prompt)
    return Trajectory(np.array(prompt), np.array(actions), True, False, special, np.array(intended))


def j_over_alpha(
    objective: SequenceMatchLoss, policy: TransformerPolicy, batch: ObjectiveBatch
) -> torch.Tensor:
    """J / alpha = -L_SM / alpha, from the objective's own code."""
    return -objective(policy, batch).loss / objective.alpha


# --------------------------------------------------------------------------------------------
# Value source data: any trajectories, truncated ones included


@pytest.mark.parametrize("c", [0.0, 0.25])
@pytest.mark.parametrize("alpha", [1.0, 0.01])
@pytest.mark.parametrize("gamma", [0.9, 0.998])
def test_value_source_data_gives_discounted_bc_minus_kappa_squares(
    vocab: CharVocab,
    random_trajectory: Callable[..., Trajectory],
    tiny_policy: Callable[..., TransformerPolicy],
    c: float,
    alpha: float,
    gamma: float,
) -> None:
    """Data and model batches of random episodes (prompts differ, some truncated on both sides,
    backspaces, disturbed labels): J / alpha is the discounted log-likelihood minus kappa times
    the two squared-residual sums, each normalised by its own batch; at c = 0 the first alone."""
    data = random_trajectories(random_trajectory, vocab, 6, seed=0)
    model = random_trajectories(random_trajectory, vocab, 9, seed=1)
    policy = tiny_policy(vocab).double()
    objective = SequenceMatchLoss(
        c=c, alpha=alpha, gamma=gamma, value_source="data", normaliser_length=L
    )
    with torch.no_grad():
        got = j_over_alpha(objective, policy, ObjectiveBatch(collate(data), collate(model)))
        data_terms = [terms_of(policy, t, gamma) for t in data]
        model_terms = [terms_of(policy, t, gamma) for t in model]
    expected = identity(objective, data_terms, model_terms)
    assert float(expected.boundary) == 0.0
    assert_exact(got, expected.total)
    if c == 0.0:
        assert_exact(got, expected.log_likelihood)
    else:  # the constant is kappa = c alpha, with no other factor, on both halves
        assert objective.kappa == pytest.approx(c * alpha)
        kappa_free = expected.log_likelihood
        squares = expectation(data_terms, lambda t: t.squares) + expectation(
            model_terms, lambda t: t.squares
        )
        assert_exact(got - kappa_free, -c * alpha * squares)
        assert float(squares) > 0.1  # the residual terms are not negligible here


# --------------------------------------------------------------------------------------------
# Value sources model and mix: complete rollouts that share the data's prompts


def shared_prompt_batches(
    vocab: CharVocab, random_trajectory: Callable[..., Trajectory], seed: int
) -> tuple[list[Trajectory], list[Trajectory]]:
    """Six complete data episodes, and twelve complete model episodes on the same six prompts
    (each twice): the two batches' prompts have the same empirical distribution."""
    data = [completed(t) for t in random_trajectories(random_trajectory, vocab, 6, seed)]
    others = random_trajectories(random_trajectory, vocab, 12, seed + 100)
    prompts = [t.prompt.tolist() for t in data] * 2
    model = [completed(t, p) for t, p in zip(others, prompts, strict=True)]
    order = np.random.default_rng(seed).permutation(len(model))
    return data, [model[i] for i in order]


@pytest.mark.parametrize("value_source", ["model", "mix"])
@pytest.mark.parametrize("c", [0.0, 0.25])
def test_model_and_mix_value_sources_with_shared_prompts_and_complete_episodes(
    vocab: CharVocab,
    random_trajectory: Callable[..., Trajectory],
    tiny_policy: Callable[..., TransformerPolicy],
    value_source: str,
    c: float,
) -> None:
    """Complete episodes on both sides, same prompts: the boundary terms cancel exactly, and J /
    alpha is the same as with the value term on data (the model's rollouts enter only through
    kappa)."""
    data, model = shared_prompt_batches(vocab, random_trajectory, seed=2)
    policy = tiny_policy(vocab).double()
    batch = ObjectiveBatch(collate(data), collate(model))
    common: dict[str, Any] = {"c": c, "alpha": 0.01, "gamma": 0.998, "normaliser_length": L}
    objective = SequenceMatchLoss(value_source=value_source, **common)
    with torch.no_grad():
        got = j_over_alpha(objective, policy, batch)
        on_data = j_over_alpha(SequenceMatchLoss(value_source="data", **common), policy, batch)
        value_terms = {
            source: SequenceMatchLoss(value_source=source, **common)(policy, batch).metrics[
                "value_term"
            ]
            for source in ("data", "model")
        }
        data_terms = [terms_of(policy, t, 0.998) for t in data]
        model_terms = [terms_of(policy, t, 0.998) for t in model]
    expected = identity(objective, data_terms, model_terms)
    assert abs(float(expected.boundary)) < 1e-14
    assert_exact(got, expected.log_likelihood + expected.td)
    assert_exact(got, on_data)
    # What cancels is not small: on complete episodes every source's value term telescopes to
    # alpha E[V~(s_0)] (E_data[V~(s_0)] = 0.065 here, against J / alpha = -0.53).
    start = expectation(data_terms, lambda t: t.start)
    for value_term in value_terms.values():
        assert_exact(value_term, 0.01 * start)
    assert float(start) > 0.05 * abs(float(got))


def test_the_gradients_agree_too(
    vocab: CharVocab,
    random_trajectory: Callable[..., Trajectory],
    tiny_policy: Callable[..., TransformerPolicy],
) -> None:
    """The identity holds as a function of the parameters: the default objective's gradient
    (chi2_mixture, value source mix, kappa = 0.0025) is that of discounted BC minus kappa times
    the squared residuals, on complete episodes with shared prompts."""
    data, model = shared_prompt_batches(vocab, random_trajectory, seed=3)
    policy = tiny_policy(vocab).double()
    objective = SequenceMatchLoss(normaliser_length=L)
    assert objective.value_source == "mix" and objective.kappa == pytest.approx(0.0025)
    got = j_over_alpha(objective, policy, ObjectiveBatch(collate(data), collate(model)))
    gamma = objective.gamma
    expected = identity(
        objective,
        [terms_of(policy, t, gamma) for t in data],
        [terms_of(policy, t, gamma) for t in model],
    )
    params = [p for p in policy.parameters() if p.requires_grad]
    grads = torch.autograd.grad(got, params)
    want = torch.autograd.grad(expected.log_likelihood + expected.td, params)
    for g, w in zip(grads, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-12)


# --------------------------------------------------------------------------------------------
# The general case: the boundary terms, when prompts differ or episodes are truncated


@pytest.mark.parametrize("value_source", ["data", "model", "mix"])
def test_boundary_terms_in_general(
    vocab: CharVocab,
    random_trajectory: Callable[..., Trajectory],
    tiny_policy: Callable[..., TransformerPolicy],
    value_source: str,
) -> None:
    """Differing prompts and truncated episodes on both sides: J / alpha picks up
    w (E_data[V~(s_0) - gamma^N V~(s_N)] - E_model[same]), exactly. With the same episodes
    completed, what is left is the prompts' mismatch w (E_data[V~(s_0)] - E_model[V~(s_0)])."""
    data = random_trajectories(random_trajectory, vocab, 6, seed=4)
    model = random_trajectories(random_trajectory, vocab, 9, seed=5)
    policy = tiny_policy(vocab).double()
    objective = SequenceMatchLoss(gamma=0.9, value_source=value_source, normaliser_length=L)
    w = model_weight(value_source, len(data), len(model))
    for complete in (False, True):
        if complete:
            data, model = [completed(t) for t in data], [completed(t) for t in model]
        with torch.no_grad():
            got = j_over_alpha(objective, policy, ObjectiveBatch(collate(data), collate(model)))
            data_terms = [terms_of(policy, t, 0.9) for t in data]
            model_terms = [terms_of(policy, t, 0.9) for t in model]
        expected = identity(objective, data_terms, model_terms)
        assert_exact(got, expected.total)
        if complete:
            mismatch = expectation(data_terms, lambda t: t.start) - expectation(
                model_terms, lambda t: t.start
            )
            assert_exact(expected.boundary, w * mismatch)
        if value_source != "data":  # small but far above float64's precision: V~(s_0) of an
            # untrained network varies little with the prompt (1e-4 here; 6e-3 with truncation)
            assert abs(float(expected.boundary)) > (1e-5 if complete else 1e-3)


# --------------------------------------------------------------------------------------------
# Dyck: one shared prompt, real rollouts of the policy, truncated ones measured


def dyck_batches(
    policy_factory: Callable[..., TransformerPolicy],
) -> tuple[TransformerPolicy, list[Trajectory], list[Trajectory]]:
    """Disturbed dyck demonstrations and disturbed rollouts of a tiny policy, all from ``^``."""
    task = DyckTask(max_brackets=8)
    max_length = task.default_max_length
    clean = task.demonstrations("train", 8, max_length=max_length, seed=0)
    data = disturbed_demonstrations(
        clean, Disturbance(0.2), max_length, rng=np.random.default_rng(0)
    )
    policy = policy_factory(task.vocab).double()
    rollouts = generate(
        policy,
        [[task.start_id]] * 16,
        max_length=max_length,
        max_steps=12,
        generator=torch.Generator().manual_seed(0),
        disturbance=Disturbance(0.2),
    ).trajectories
    assert all(t.terminated for t in data) and any(t.num_disturbances for t in data)
    assert any(t.truncated for t in rollouts) and any(t.terminated for t in rollouts)
    return policy, data, rollouts


@pytest.mark.parametrize("value_source", ["data", "model", "mix"])
def test_dyck_rollouts_complete_and_truncated(
    tiny_policy: Callable[..., TransformerPolicy], value_source: str
) -> None:
    """At the defaults (kappa = 0.0025, gamma = 0.998). With the complete rollouts only, J /
    alpha is discounted BC minus kappa times the squares, for every value source. With the
    truncated ones added, the model and mix sources gain exactly w E_model[gamma^N V~(s_N)]
    (truncated rollouts only), a positive term that grows with the logits' level where the
    rollouts stop; in value and gradient.

    Measured here: 3 of the 16 rollouts are truncated, with V~(s_N) = 2.02 to 2.08 (the untrained
    level); the term is 0.0117 (model) and 0.0078 (mix, w = 2/3) in J / alpha, against -0.0045
    for both kappa terms together and -0.67 for the log-likelihood: larger than the whole
    on-policy kappa term."""
    policy, data, rollouts = dyck_batches(tiny_policy)
    objective = SequenceMatchLoss(value_source=value_source, normaliser_length=L)
    gamma = objective.gamma
    data_terms = [terms_of(policy, t, gamma) for t in data]

    complete = [t for t in rollouts if t.terminated]
    got = j_over_alpha(objective, policy, ObjectiveBatch(collate(data), collate(complete)))
    expected = identity(objective, data_terms, [terms_of(policy, t, gamma) for t in complete])
    assert abs(float(expected.boundary.detach())) < 1e-14
    assert_exact(got, expected.log_likelihood + expected.td)

    everything = j_over_alpha(objective, policy, ObjectiveBatch(collate(data), collate(rollouts)))
    model_terms = [terms_of(policy, t, gamma) for t in rollouts]
    expected = identity(objective, data_terms, model_terms)
    w = model_weight(value_source, len(data), len(rollouts))
    truncation = w * expectation(model_terms, lambda t: t.end)
    assert_exact(expected.boundary, truncation)
    assert_exact(everything, expected.total)
    if value_source == "data":
        assert float(truncation.detach()) == 0.0
    else:
        assert float(truncation.detach()) > 0.0
    params = [p for p in policy.parameters() if p.requires_grad]
    for g, want in zip(
        torch.autograd.grad(everything, params),
        torch.autograd.grad(expected.total, params),
        strict=True,
    ):
        torch.testing.assert_close(g, want, rtol=1e-9, atol=1e-12)


# --------------------------------------------------------------------------------------------
# The training mixture, and the other divergences


def test_mixture_is_bc_plus_level_penalty_plus_td(
    vocab: CharVocab,
    random_trajectory: Callable[..., Trajectory],
    tiny_policy: Callable[..., TransformerPolicy],
) -> None:
    """The trainer's mixture (1 - eta) L_BC + eta L_SM / alpha, with BC's level penalty lambda,
    on complete episodes with shared prompts: the cross-entropy with step weights
    (1 - eta) + eta gamma^i, plus (1 - eta) lambda E_data[sum V~(s_i)^2], plus eta kappa times
    the squared residuals."""
    data, model = shared_prompt_batches(vocab, random_trajectory, seed=6)
    policy = tiny_policy(vocab).double()
    eta, level_penalty = 0.3, 0.01
    sm = SequenceMatchLoss(normaliser_length=L)  # the defaults: mix, kappa = 0.0025, gamma = 0.998
    mixture = Mixture(BCLoss(normaliser_length=L, level_penalty=level_penalty), sm, eta=eta)
    with torch.no_grad():
        got = mixture(policy, ObjectiveBatch(collate(data), collate(model))).loss
        data_terms = [terms_of(policy, t, sm.gamma) for t in data]
        model_terms = [terms_of(policy, t, sm.gamma) for t in model]
    assert sm.kappa is not None
    nll = -expectation(data_terms, lambda t: ((1 - eta + eta * t.discount) * t.log_prob).sum())
    level = level_penalty * expectation(data_terms, lambda t: t.value.square().sum())
    squares = expectation(data_terms, lambda t: t.squares) + expectation(
        model_terms, lambda t: t.squares
    )
    expected = nll + (1 - eta) * level + eta * sm.kappa * squares
    assert_exact(got, expected)


@pytest.mark.parametrize("divergence", ["chi2", "linear", "kl", "js"])
def test_every_divergence_is_discounted_bc_plus_a_per_step_penalty(
    vocab: CharVocab,
    random_trajectory: Callable[..., Trajectory],
    tiny_policy: Callable[..., TransformerPolicy],
    divergence: str,
) -> None:
    """Value source data: J / alpha = E_data[sum gamma^i log pi]
    + E_data[sum gamma^i (phi(alpha r~_i) - alpha r~_i)] / alpha; for chi2 the added term is
    -(alpha / 4) E_data[sum gamma^i r~_i^2] (kappa = alpha / 4, on the data only)."""
    data = random_trajectories(random_trajectory, vocab, 6, seed=7)
    policy = tiny_policy(vocab).double()
    alpha, gamma = 0.1, 0.95
    objective = SequenceMatchLoss(
        divergence=divergence, alpha=alpha, gamma=gamma, value_source="data", normaliser_length=L
    )
    with torch.no_grad():
        got = j_over_alpha(objective, policy, ObjectiveBatch(collate(data)))
        terms = [terms_of(policy, t, gamma) for t in data]

    def penalty(t: Terms) -> torch.Tensor:
        r = alpha * t.residual
        return (t.discount * (phi(divergence, r) - r)).sum() / alpha

    log_likelihood = expectation(terms, lambda t: t.log_likelihood)
    assert_exact(got, log_likelihood + expectation(terms, penalty))
    if divergence in ("chi2", "linear"):
        assert_exact(got, identity(objective, terms, None).total)
