"""Training objectives: ``(policy, batch) -> LossOutput(loss, metrics)``; MLE, BC, SequenceMatch.

Every objective reads the logits of one forward pass per batch (docs/method.md §6) and the
per-step indices of :class:`agents.collate.TrajectoryBatch`. For SequenceMatch (docs/method.md
§2-§3) the logits l are the soft Q-function divided by a temperature alpha::

    Q(s, a) = alpha l(a | s)      V(s) = alpha logsumexp_a' l(a' | s)      pi = softmax(l)
    r = Q(s, a) - gamma V(s') = alpha (l(a | s) - gamma logsumexp l(. | s'))

with V(s') = 0 after ``<eos>`` and read from the logits of s' everywhere else (a truncated
trajectory's last state is bootstrapped). The objective maximised is::

    J = E_data[sum_t gamma^t phi(r_t)] - c E_model[sum_t gamma^t r_t^2]        (chi2_mixture only)
        - E_src[sum_t gamma^t (V(s_t) - gamma V(s_{t+1}))]

and the loss is -J. Gradients flow through Q and both V terms; there is no target network.
:class:`StepValues` holds Q and V in logit units (alpha = 1); :meth:`SequenceMatchLoss.from_values`
applies alpha.

**Temperature and the one knob kappa.** For the quadratic divergences (``chi2_mixture``,
``chi2``, ``linear``) J at temperature alpha and chi^2 coefficient c is alpha times J at
temperature 1 and coefficient c alpha, as a function of the logits: J_{alpha,c}(l) = alpha
J_{1,c alpha}(l), exactly (``chi2``'s fixed 1/4 scales the same way: kappa = alpha / 4). So
only kappa = c alpha moves the fixed point (:attr:`SequenceMatchLoss.kappa`); alpha alone rescales
the loss. On the enumerable dyck grammar, solved exactly (docs/method.md §3): kappa = 0.25
(alpha = 1) is biased toward never ending and runaway backspacing; kappa = 0.025 leaves a small
bias; kappa <= 0.0025 (the default, alpha = 0.01 and c = 1/4) lands on the target. For the other
divergences phi is not quadratic and alpha and c do not collapse into one number.

**Divergence estimate.** At the saddle point J = d - alpha H(pi) (IQ-Learn), so -J is mostly
alpha times the policy's entropy. The ``divergence`` metric is d_hat = J + alpha H_hat, with
H_hat the entropy of pi over the allowed actions at the states of the model batch, discounted
and normalised like the model term: sum_t gamma^t H(pi(.|s_t)) / (B_model L) (on the data batch
when the objective reads no model batch). -J itself is ``neg_objective``.

Choices where docs/method.md is silent:

- **Allowed actions.** ``<bkspc>`` in a state with nothing generated is masked out of the policy,
  as in generation (``SequenceMDP.action_mask``): V and log pi are taken over the allowed actions
  only, through :func:`agents.interface.mask_logits`. A step whose action is not allowed (a no-op
  backspace, which :class:`~seqenv.trajectory.Trajectory` never holds) is left out of every term.
  ``allow_backspace=False`` (the no-backspace ablation) masks ``<bkspc>`` everywhere.
- **Normaliser.** Each expectation is a sum over steps divided by (number of sequences in its
  sample) x L, with one fixed L (``normaliser_length``) for every term and every objective, so
  that the sanity identity of docs/method.md §3 holds and (1 - eta) L_BC + eta L_SM mixes like with
  like. ``normaliser_length=None`` takes L = the padded step count of the batches read in the
  call (convenient in tests; pass the step budget in training for a batch-independent scale).
- **The ``mix`` value source** pools data and model sequences: the value term is the sum over
  both batches divided by (B_data + B_model) x L. Every sequence weighs the same, it is one
  estimate of E_src under the mixture B_data : B_model of two trajectory distributions that share
  the start distribution, and with B_data = B_model (the trainer's default) it equals the average
  of the data-only and model-only estimates.
- **Domains of phi.** ``reverse_kl`` (x > 0), ``js`` (x > -log 2) and ``hellinger`` (x > -1) are
  undefined below a bound, and ``kl`` grows like exp(-x). Each is used as is where its slope
  phi'(x) is at most ``max_slope`` and continued below that point by its tangent line: the result
  is still concave, increasing and C^1, defined for every r, and its gradient is bounded by
  ``max_slope``, so a sample outside the domain still pushes r back into it. ``chi2``,
  ``chi2_mixture`` and ``tv`` are used exactly.
- ``chi2`` is Pearson chi^2 with its fixed 1/4 (the table of docs/method.md §3) on r in Q units;
  ``c`` only sets the coefficient of ``chi2_mixture``. ``linear`` (phi(x) = x) is the identity
  of docs/method.md §3, for tests and diagnostics: SequenceMatch then equals alpha times the
  discounted log-likelihood.
- **Mixture.** :class:`Mixture` is (1 - eta) L_BC + eta L_SM / alpha: dividing by alpha keeps
  eta's meaning at every temperature (L_SM / alpha = -J_{1,kappa} for the quadratic divergences).

Metrics are detached scalar tensors (no host sync here; the trainer syncs at log intervals).

Shapes: B sequences, T input rows, S steps, A actions.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, get_args

import torch

from agents.collate import TrajectoryBatch
from agents.models.interface import mask_logits
from seqenv.rules import allowed_actions
from seqenv.vocab import SpecialIds

Divergence = Literal["chi2_mixture", "chi2", "kl", "reverse_kl", "js", "hellinger", "tv", "linear"]
DIVERGENCES: tuple[str, ...] = get_args(Divergence)
"""Known divergences; ``linear`` (phi(x) = x, SequenceMatch = discounted MLE) is for tests."""

ValueSource = Literal["mix", "data", "model"]
VALUE_SOURCES: tuple[str, ...] = get_args(ValueSource)
"""Trajectories the value term is estimated on: data and model together, or either alone."""


class BatchPolicy(Protocol):
    """What an objective needs of a policy: its special ids and the logits of a re-feed batch."""

    special: SpecialIds

    def forward_batch(self, batch: TrajectoryBatch) -> torch.Tensor:
        """Logits (B, T, A) of a re-feed batch."""
        ...


@dataclass(frozen=True)
class LossOutput:
    """What an objective returns.

    Attributes:
        loss: () float, the scalar to minimise.
        metrics: name -> () detached tensor, keys without namespace (the trainer adds one).
        parts: name -> () tensor with its graph, the weighted parts of ``loss`` that
            :func:`gradient_shares` compares: ``bc`` and ``sm`` (their sum is ``loss``) and
            ``kappa``, the chi^2 penalties inside ``sm``. Empty for MLE and BC.
    """

    loss: torch.Tensor
    metrics: dict[str, torch.Tensor]
    parts: dict[str, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.loss.ndim != 0:
            raise ValueError(f"loss must be a scalar tensor, got shape {tuple(self.loss.shape)}")


@dataclass(frozen=True)
class ObjectiveBatch:
    """The batches of one update.

    Attributes:
        data: demonstrations (possibly noise-augmented).
        model: rollouts of the model (from the replay buffer); needed by SequenceMatch when a
            term reads model samples (``chi2_mixture`` with c > 0, value source ``mix`` or
            ``model``), ignored otherwise.
        data_targets: see below.
    """

    data: TrajectoryBatch
    model: TrajectoryBatch | None = None
    data_targets: torch.Tensor | None = None
    """(B, S, A) float: an expert's action distribution at each step of ``data`` (soft labels,
    read by :class:`OracleCrossEntropyLoss`); zero rows after a sequence's last step."""

    def to(self, device: torch.device | str) -> ObjectiveBatch:
        """The same batches on ``device``."""
        return ObjectiveBatch(
            data=self.data.to(device),
            model=self.model.to(device) if self.model is not None else None,
            data_targets=(self.data_targets.to(device) if self.data_targets is not None else None),
        )


# --------------------------------------------------------------------------------------------
# Per-step quantities of one batch


@dataclass(frozen=True)
class StepValues:
    """Q, V and the step bookkeeping of one batch, read from one forward pass.

    Attributes:
        q: (B, S) float, Q(s_t, a_t), the raw logit of the action taken.
        v: (B, S) float, V(s_t) over the allowed actions.
        v_next: (B, S) float, V(s_{t+1}); 0 where ``terminal``.
        valid: (B, S) bool, real steps whose action is allowed.
        discount_exponent: (B, S) int64, t.
        backspace: (B, S) bool, real steps whose action is ``<bkspc>``.
        undone: (B, S) bool, see :class:`~agents.collate.TrajectoryBatch`.
        step_mask: (B, S) bool, real steps.
        entropy: (B, S) float, detached, H(pi(.|s_t)) over the allowed actions.
    """

    q: torch.Tensor
    v: torch.Tensor
    v_next: torch.Tensor
    valid: torch.Tensor
    discount_exponent: torch.Tensor
    backspace: torch.Tensor
    undone: torch.Tensor
    step_mask: torch.Tensor
    entropy: torch.Tensor

    @property
    def num_sequences(self) -> int:
        """B, the number of sequences."""
        return self.q.shape[0]

    @property
    def num_steps(self) -> int:
        """S, the padded step count."""
        return self.q.shape[1]

    @property
    def log_prob(self) -> torch.Tensor:
        """(B, S) log pi(a_t | s_t) = Q(s_t, a_t) - V(s_t)."""
        return self.q - self.v

    def discount(self, gamma: float) -> torch.Tensor:
        """(B, S) gamma^t on valid steps, 0 elsewhere."""
        weight = torch.pow(gamma, self.discount_exponent.to(self.q.dtype))
        return weight * self.valid

    def reward(self, gamma: float) -> torch.Tensor:
        """(B, S) r_t = Q(s_t, a_t) - gamma V(s_{t+1}); 0 off the valid steps."""
        return torch.where(self.valid, self.q - gamma * self.v_next, 0.0)


def masked_logits(
    policy: BatchPolicy, batch: TrajectoryBatch, allow_backspace: bool = True
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The policy's one pass over ``batch``: (logits, allowed, masked logits), each (B, T, A).

    The logits in float32 at least; ``allowed`` the actions of each row's state
    (:mod:`seqenv.rules`); the masked logits ``-inf`` elsewhere.
    """
    logits = policy.forward_batch(batch)  # (B, T, A)
    if logits.dtype not in (torch.float32, torch.float64):
        logits = logits.float()  # bf16/fp16 under autocast: the sums below need float32
    # A row's state has something generated iff its position is past the prompt's last one,
    # which is the position of s_0 (state_rows[:, 0] is the last prompt row).
    prompt_end = batch.position_ids.gather(1, batch.state_rows[:, :1])  # (B, 1)
    has_generated = batch.position_ids > prompt_end  # (B, T)
    allowed = allowed_actions(has_generated, policy.special, allow_backspace)  # (B, T, A)
    return logits, allowed, mask_logits(logits, allowed)


def step_values(
    policy: BatchPolicy, batch: TrajectoryBatch, allow_backspace: bool = True
) -> StepValues:
    """Run the policy on ``batch`` once and read Q, V(s_t) and V(s_{t+1}) at every step."""
    logits, allowed, masked = masked_logits(policy, batch, allow_backspace)  # each (B, T, A)
    B = logits.shape[0]
    backspace_id = policy.special.backspace_id
    v_rows = masked.logsumexp(dim=-1)  # (B, T)
    with torch.no_grad():  # the entropy is a metric (the divergence estimate): no graph
        log_pi = masked.detach().log_softmax(dim=-1)  # (B, T, A)
        # where(): 0 * -inf is nan at the masked actions, which contribute nothing.
        entropy_rows = -torch.where(allowed, log_pi.exp() * log_pi, 0.0).sum(dim=-1)  # (B, T)

    rows = torch.arange(B, device=logits.device)[:, None]  # (B, 1)
    q = logits[rows, batch.state_rows, batch.labels]  # (B, S): Q of the action learned at s_t
    v = v_rows.gather(1, batch.state_rows)  # (B, S)
    v_next = torch.where(batch.terminal, 0.0, v_rows.gather(1, batch.next_rows))  # (B, S)
    backspace = batch.step_mask & (batch.labels == backspace_id)
    action_allowed = allowed[rows, batch.state_rows, batch.labels]  # (B, S): a_t allowed in s_t
    return StepValues(
        q=q,
        v=v,
        v_next=v_next,
        valid=batch.step_mask & action_allowed,
        discount_exponent=batch.discount_exponent,
        backspace=backspace,
        undone=batch.undone,
        step_mask=batch.step_mask,
        entropy=entropy_rows.gather(1, batch.state_rows),
    )


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``x`` over ``mask`` (0 for an empty mask), detached."""
    x = x.detach()
    return torch.where(mask, x, 0.0).sum() / mask.sum().clamp(min=1)


def _backspace_rate(batch: TrajectoryBatch, backspace_id: int) -> torch.Tensor:
    """Fraction of the real steps of ``batch`` that are backspaces."""
    backspace = batch.step_mask & (batch.actions == backspace_id)
    return (backspace.sum() / batch.step_mask.sum().clamp(min=1)).float()


def _check_normaliser(normaliser_length: int | None) -> None:
    if normaliser_length is not None and normaliser_length < 1:
        raise ValueError(f"normaliser_length must be >= 1 or None, got {normaliser_length}")


# --------------------------------------------------------------------------------------------
# phi of each divergence (docs/method.md §3): phi(x) = -f*(-x)


def _tangent_below(
    x: torch.Tensor, x0: float, f: Callable[[torch.Tensor], torch.Tensor], f0: float, slope: float
) -> torch.Tensor:
    """``f(x)`` for x >= x0, its tangent line ``f0 + slope (x - x0)`` below (finite gradients)."""
    inside = f(x.clamp(min=x0))  # the clamp keeps f's own branch finite where it is not used
    return torch.where(x >= x0, inside, f0 + slope * (x - x0))


def phi(
    divergence: str, x: torch.Tensor, *, c: float = 0.25, max_slope: float = 1e3
) -> torch.Tensor:
    """The phi of ``divergence`` at ``x``, elementwise, on the data samples.

    For ``chi2_mixture`` this is the data part, x - c x^2 (the model part, -c r^2, is separate).
    ``kl``, ``reverse_kl``, ``js`` and ``hellinger`` are continued by their tangent line below the
    point where their slope reaches ``max_slope`` (see the module docstring).

    Raises:
        ValueError: for an unknown divergence.
    """
    M = max_slope
    if divergence == "chi2_mixture":
        return x - c * x.square()
    if divergence == "chi2":
        return x - 0.25 * x.square()
    if divergence == "linear":
        return x
    if divergence == "tv":
        return x.clamp(-0.5, 0.5)
    if divergence == "kl":
        # phi = -exp(-(x+1)), phi' = exp(-(x+1)) = M at x0 = -1 - log M.
        return _tangent_below(x, -1.0 - math.log(M), lambda y: -torch.exp(-(y + 1.0)), -M, M)
    if divergence == "reverse_kl":
        # phi = 1 + log x (x > 0), phi' = 1/x = M at x0 = 1/M.
        return _tangent_below(x, 1.0 / M, lambda y: 1.0 + torch.log(y), 1.0 - math.log(M), M)
    if divergence == "js":
        # phi = log(2 - e^-x) (x > -log 2), phi' = e^-x / (2 - e^-x) = M where e^-x = 2M/(1+M).
        x0 = math.log((1.0 + M) / (2.0 * M))
        return _tangent_below(
            x, x0, lambda y: torch.log(2.0 - torch.exp(-y)), math.log(2.0 / (1.0 + M)), M
        )
    if divergence == "hellinger":
        # phi = x / (1 + x) (x > -1), phi' = 1/(1+x)^2 = M at x0 = M^-1/2 - 1.
        x0 = M**-0.5 - 1.0
        return _tangent_below(x, x0, lambda y: y / (1.0 + y), 1.0 - math.sqrt(M), M)
    raise ValueError(f"unknown divergence {divergence!r}; known: {', '.join(DIVERGENCES)}")


# --------------------------------------------------------------------------------------------
# Objectives


class Loss:
    """Shared plumbing: one forward pass per batch read, then :meth:`from_values`."""

    allow_backspace: bool

    @property
    def needs_model(self) -> bool:
        """Whether a term of the objective reads the model batch."""
        return False

    def from_values(self, data: StepValues, model: StepValues | None) -> LossOutput:
        """The loss from the step values of the data batch (and the model batch, if read)."""
        raise NotImplementedError

    def __call__(self, policy: BatchPolicy, batch: ObjectiveBatch) -> LossOutput:
        """The loss of ``policy`` on ``batch``: one forward pass per batch read."""
        return _run(self, [self], policy, batch)


def _run(
    objective: Loss, parts: list[Loss], policy: BatchPolicy, batch: ObjectiveBatch
) -> LossOutput:
    """Forward the batches that ``parts`` read, once each, and evaluate ``objective`` on them."""
    if len({part.allow_backspace for part in parts}) != 1:
        raise ValueError("the parts of an objective must agree on allow_backspace")
    needs_model = any(part.needs_model for part in parts)
    if needs_model and batch.model is None:
        raise ValueError(
            "this objective reads model samples (chi2_mixture with c > 0, or value source "
            "'mix' or 'model') but the batch has no model trajectories"
        )
    data = step_values(policy, batch.data, objective.allow_backspace)
    model = None
    if needs_model and batch.model is not None:
        model = step_values(policy, batch.model, objective.allow_backspace)
    out = objective.from_values(data, model)
    backspace_id = policy.special.backspace_id
    out.metrics["backspace_rate_data"] = _backspace_rate(batch.data, backspace_id)
    if batch.model is not None:
        out.metrics["backspace_rate_model"] = _backspace_rate(batch.model, backspace_id)
    return out


def _cross_entropy(
    data: StepValues, targets: torch.Tensor, normaliser_length: int | None, level_penalty: float
) -> LossOutput:
    """-sum of log pi over ``targets`` / (B L), plus the level penalty; the mean NLL as a metric.

    The penalty is ``level_penalty`` sum V(s_t)^2 / (B L) over the same steps, V = logsumexp
    of the logits over the allowed actions (the logits' common level, which pi ignores).
    """
    L = normaliser_length or data.num_steps
    log_prob = torch.where(targets, data.log_prob, 0.0)
    loss = -log_prob.sum() / (data.num_sequences * L)
    metrics = {
        "nll": -_masked_mean(data.log_prob, targets),
        "num_targets": targets.sum().float(),
        "level": _masked_mean(data.v, targets),
    }
    if level_penalty:
        level = torch.where(targets, data.v, 0.0)
        loss = loss + level_penalty * level.square().sum() / (data.num_sequences * L)
    metrics["loss"] = loss.detach()
    return LossOutput(loss, metrics)


def _check_level_penalty(level_penalty: float) -> None:
    if not (math.isfinite(level_penalty) and level_penalty >= 0):
        raise ValueError(f"level_penalty must be finite and >= 0, got {level_penalty}")


@dataclass(frozen=True)
class MLELoss(Loss):
    """Teacher-forced cross entropy on the data batch: -sum_t log pi(a_t | s_t) / (B L).

    Args:
        normaliser_length: L (see the module docstring); None: the batch's padded step count.
        allow_backspace: False masks ``<bkspc>`` out of the policy everywhere.
        level_penalty: weight of sum_t V(s_t)^2 / (B L), V the logsumexp of the logits over the
            allowed actions (a z-loss). pi ignores the logits' common level, so this leaves the
            policy's optimum where it was and only pins the level; SequenceMatch reads it
            (docs/method.md §3, "The logits' level"), which is why its warm start sets it.

    Metrics: ``loss``, ``nll`` (mean over target steps), ``num_targets``, ``level`` (mean V over
    them), ``backspace_rate_data``.
    """

    normaliser_length: int | None = None
    allow_backspace: bool = True
    level_penalty: float = 0.0

    def __post_init__(self) -> None:
        _check_normaliser(self.normaliser_length)
        _check_level_penalty(self.level_penalty)

    def from_values(self, data: StepValues, model: StepValues | None) -> LossOutput:
        """The loss on the data batch's step values; ``model`` is not read."""
        return _cross_entropy(data, data.valid, self.normaliser_length, self.level_penalty)


@dataclass(frozen=True)
class BCLoss(Loss):
    """Behaviour cloning on noise-augmented demonstrations (docs/method.md §4-§5).

    Args:
        noise_targets: the noise tokens (appended tokens a later backspace deletes) are targets,
            as in the paper; False leaves them out (the backspaces that delete them still are).
        normaliser_length: L (see the module docstring); None: the batch's padded step count.
        allow_backspace: False masks ``<bkspc>`` out of the policy everywhere.
        level_penalty: as :class:`MLELoss`.

    Metrics: as :class:`MLELoss`.
    """

    noise_targets: bool = True
    normaliser_length: int | None = None
    allow_backspace: bool = True
    level_penalty: float = 0.0

    def __post_init__(self) -> None:
        _check_normaliser(self.normaliser_length)
        _check_level_penalty(self.level_penalty)

    @classmethod
    def from_settings(
        cls, settings: Any, *, normaliser_length: int | None = None, allow_backspace: bool = True
    ) -> BCLoss:
        """BC as a run's settings describe it (the one place it is built from them).

        ``settings``: a :class:`~agents.config.TrainConfig`, or any object with
        ``noise_targets`` and ``level_penalty`` (a z-loss: TrainConfig.level_penalty says why).
        """
        return cls(
            noise_targets=settings.noise_targets,
            level_penalty=settings.level_penalty,
            normaliser_length=normaliser_length,
            allow_backspace=allow_backspace,
        )

    def from_values(self, data: StepValues, model: StepValues | None) -> LossOutput:
        """The loss on the data batch's step values; ``model`` is not read."""
        targets = data.valid if self.noise_targets else data.valid & ~data.undone
        return _cross_entropy(data, targets, self.normaliser_length, self.level_penalty)


@dataclass(frozen=True)
class SequenceMatchLoss(Loss):
    """SequenceMatch (docs/method.md §3): loss = -J, J the occupancy-divergence saddle objective.

    Args:
        divergence: one of :data:`DIVERGENCES`; ``chi2_mixture`` is the paper's recommendation.
        c: chi^2 coefficient of ``chi2_mixture`` (x - c x^2 on data, -c r^2 on model samples,
            r in Q units).
        alpha: soft-Q temperature: Q = alpha * logits (docs/method.md §2). [choice] 0.01, our
            reading of the paper's alpha (IQ-Learn's code also calls its chi^2 weight "alpha");
            the exact analysis of docs/method.md §3 supports it: with c = 1/4 it gives
            kappa = c alpha = 0.0025, which lands on the target, where alpha = 1 (kappa = 0.25)
            is biased toward never ending and runaway backspacing. Not the sampling temperature
            of rollouts.
        gamma: discount; 0.998 in the paper.
        value_source: trajectories of the value term, one of :data:`VALUE_SOURCES`.
        normaliser_length: L (see the module docstring); None: the padded step count of the
            batches read in the call.
        max_slope: slope at which ``kl``, ``reverse_kl``, ``js`` and ``hellinger`` switch to
            their tangent line (their domain handling, see the module docstring).
        allow_backspace: False masks ``<bkspc>`` out of the policy everywhere.

    Metrics (J's units, alpha included): ``loss`` (-J); ``divergence`` (d_hat = J + alpha
    H_hat, the divergence estimate, see the module docstring); ``neg_objective`` (-J);
    ``entropy_term`` (H_hat); ``entropy`` (mean H(pi) per step of the batch H_hat reads);
    ``data_term``, ``model_term``, ``value_term`` (the three terms of J, as above);
    ``r_data``, ``r_model`` (mean r per step; ``r_model`` when the model batch is read);
    ``value`` (mean V(s_t) over the value source's steps); ``nll`` (mean -log pi over the data
    steps, in nats); ``backspace_rate_data``, ``backspace_rate_model``.

    Loss parts: ``sm`` (the loss) and, for the quadratic divergences, ``kappa``: the chi^2
    penalties c E_data[sum gamma^t r^2] + c E_model[sum gamma^t r^2] (1/4 and data only for
    ``chi2``, 0 for ``linear``).
    """

    divergence: str = "chi2_mixture"
    c: float = 0.25
    alpha: float = 0.01
    gamma: float = 0.998
    value_source: str = "mix"
    normaliser_length: int | None = None
    max_slope: float = 1e3
    allow_backspace: bool = True

    def __post_init__(self) -> None:
        if self.divergence not in DIVERGENCES:
            raise ValueError(
                f"unknown divergence {self.divergence!r}; known: {', '.join(DIVERGENCES)}"
            )
        if self.value_source not in VALUE_SOURCES:
            raise ValueError(
                f"unknown value source {self.value_source!r}; known: {', '.join(VALUE_SOURCES)}"
            )
        if not 0.0 < self.gamma <= 1.0:
            raise ValueError(f"gamma must be in (0, 1], got {self.gamma}")
        if self.c < 0:
            raise ValueError(f"c must be >= 0, got {self.c}")
        if not (math.isfinite(self.alpha) and self.alpha > 0.0):
            raise ValueError(f"alpha must be finite and > 0, got {self.alpha}")
        if not self.max_slope >= 1.0:
            raise ValueError(f"max_slope must be >= 1, got {self.max_slope}")
        _check_normaliser(self.normaliser_length)

    @classmethod
    def from_settings(
        cls,
        settings: Any,
        *,
        normaliser_length: int | None = None,
        allow_backspace: bool = True,
        value_source: str | None = None,
    ) -> SequenceMatchLoss:
        """The loss a run's settings describe (the one place it is built from them).

        ``settings``: a :class:`~agents.config.TrainConfig`, or any object with
        ``divergence``, ``c``, ``alpha``, ``gamma`` and ``value_source``; ``value_source`` given
        here replaces the settings' (every agent's divergence probe reads data and model samples
        together).
        """
        return cls(
            divergence=settings.divergence,
            c=settings.c,
            alpha=settings.alpha,
            gamma=settings.gamma,
            value_source=value_source or settings.value_source,
            normaliser_length=normaliser_length,
            allow_backspace=allow_backspace,
        )

    @property
    def has_model_term(self) -> bool:
        """Whether the loss has a term on model samples (``chi2_mixture`` with c != 0)."""
        return self.divergence == "chi2_mixture" and self.c != 0

    @property
    def needs_model(self) -> bool:
        """Whether the loss reads the model batch: a model term, or values estimated on it."""
        return self.has_model_term or self.value_source != "data"

    @property
    def chi2_coefficient(self) -> float | None:
        """The coefficient of the r^2 terms in Q units.

        c, 1/4 for ``chi2``, 0 for ``linear``; None for the divergences whose phi is not quadratic.
        """
        return {"chi2_mixture": self.c, "chi2": 0.25, "linear": 0.0}.get(self.divergence)

    @property
    def kappa(self) -> float | None:
        """The one knob of the quadratic divergences: kappa = chi^2 coefficient x alpha.

        J_{alpha,c}(l) = alpha J_{1,kappa}(l). None for the other divergences.
        """
        coefficient = self.chi2_coefficient
        return None if coefficient is None else coefficient * self.alpha

    def from_values(self, data: StepValues, model: StepValues | None) -> LossOutput:
        """The loss from the data (and, if :attr:`needs_model`, the model) step values.

        Raises:
            ValueError: the configuration needs ``model`` and it is None.
        """
        if self.needs_model and model is None:
            raise ValueError("SequenceMatch with this configuration needs model step values")
        alpha, gamma = self.alpha, self.gamma
        L = self.normaliser_length or max(
            data.num_steps, model.num_steps if model is not None else 0
        )
        zero = torch.zeros((), device=data.q.device)

        # E_data[sum_t gamma^t phi(r_t)], r in Q units: alpha (l(a|s) - gamma logsumexp l(.|s')).
        r_data = alpha * data.reward(gamma)
        weight_data = data.discount(gamma)
        phi_data = phi(self.divergence, r_data, c=self.c, max_slope=self.max_slope)
        data_term = (weight_data * phi_data).sum() / (data.num_sequences * L)

        # c E_model[sum_t gamma^t r_t^2]
        r_model = alpha * model.reward(gamma) if model is not None else None
        model_term = zero
        if self.has_model_term:
            assert model is not None and r_model is not None
            weighted = model.discount(gamma) * r_model.square()
            model_term = self.c * weighted.sum() / (model.num_sequences * L)

        # E_src[sum_t gamma^t (V(s_t) - gamma V(s_{t+1}))], V in Q units.
        by_source: dict[str, list[StepValues | None]] = {
            "data": [data],
            "model": [model],
            "mix": [data, model],
        }
        sources = [values for values in by_source[self.value_source] if values is not None]
        value_sum = zero
        v_sum = zero  # for the mean-V metric
        v_count = zero
        for values in sources:
            telescoped = torch.where(values.valid, values.v - gamma * values.v_next, 0.0)
            value_sum = value_sum + (values.discount(gamma) * telescoped).sum()
            v_sum = v_sum + torch.where(values.valid, values.v.detach(), 0.0).sum()
            v_count = v_count + values.valid.sum()
        num_sequences = sum(values.num_sequences for values in sources)
        value_term = alpha * value_sum / (num_sequences * L)

        J = data_term - model_term - value_term
        loss = -J
        parts = {"sm": loss}
        coefficient = self.chi2_coefficient
        if coefficient is not None:
            # The -c r^2 parts of J (inside phi on data, the model term), as a loss.
            squares = (weight_data * r_data.square()).sum() / (data.num_sequences * L)
            parts["kappa"] = coefficient * squares + model_term

        # H_hat on the model's states (data's if none is read), normalised like the model term.
        states = model if model is not None else data
        entropy_term = (states.discount(gamma) * states.entropy).sum() / (states.num_sequences * L)
        metrics = {
            "loss": loss.detach(),
            "divergence": (J.detach() + alpha * entropy_term),
            "neg_objective": loss.detach(),
            "entropy_term": entropy_term,
            "entropy": _masked_mean(states.entropy, states.valid),
            "data_term": data_term.detach(),
            "model_term": model_term.detach(),
            "value_term": value_term.detach(),
            "r_data": _masked_mean(r_data, data.valid),
            "value": alpha * v_sum / v_count.clamp(min=1),
            "nll": -_masked_mean(data.log_prob, data.valid),
        }
        if model is not None and r_model is not None:
            metrics["r_model"] = _masked_mean(r_model, model.valid)
        return LossOutput(loss, metrics, parts)


@dataclass(frozen=True)
class Mixture(Loss):
    """The training schedule's combination (docs/method.md §4): (1 - eta) L_BC + eta L_SM / alpha.

    Dividing L_SM by the soft-Q temperature alpha keeps eta's meaning at every alpha: L_SM is
    alpha times smaller at temperature alpha (for the quadratic divergences L_SM / alpha is the
    alpha = 1 loss at kappa = c alpha). Both parts read the same forward passes (one per batch).
    Give both the same ``normaliser_length`` so that eta weighs like with like.

    Args:
        bc: the behaviour-cloning part (:class:`BCLoss` or :class:`MLELoss`).
        sm: the SequenceMatch part.
        eta: weight of ``sm``, in [0, 1].

    Metrics: ``loss``, the metrics of each part prefixed ``bc/`` and ``sm/`` (``sm/`` in J's
    units, before the division by alpha), and the backspace rates. Loss parts (for
    :func:`gradient_shares`): ``bc`` = (1 - eta) L_BC, ``sm`` = eta L_SM / alpha and ``kappa``,
    the chi^2 penalties of ``sm`` with the same weight eta / alpha.
    """

    bc: BCLoss | MLELoss
    sm: SequenceMatchLoss
    eta: float
    allow_backspace: bool = field(init=False)

    def __post_init__(self) -> None:
        if not 0.0 <= self.eta <= 1.0:
            raise ValueError(f"eta must be in [0, 1], got {self.eta}")
        if self.bc.allow_backspace != self.sm.allow_backspace:
            raise ValueError("bc and sm must agree on allow_backspace")
        object.__setattr__(self, "allow_backspace", self.sm.allow_backspace)

    @property
    def needs_model(self) -> bool:
        """Whether either part reads the model batch."""
        return self.bc.needs_model or self.sm.needs_model

    def from_values(self, data: StepValues, model: StepValues | None) -> LossOutput:
        """(1 - eta) L_BC + eta L_SM / alpha; both parts' metrics, prefixed ``bc/`` and ``sm/``."""
        bc = self.bc.from_values(data, model)
        sm = self.sm.from_values(data, model)
        sm_weight = self.eta / self.sm.alpha
        parts = {"bc": (1.0 - self.eta) * bc.loss, "sm": sm_weight * sm.loss}
        if "kappa" in sm.parts:
            parts["kappa"] = sm_weight * sm.parts["kappa"]
        loss = parts["bc"] + parts["sm"]
        metrics = {"loss": loss.detach()}
        metrics.update({f"bc/{key}": value for key, value in bc.metrics.items()})
        metrics.update({f"sm/{key}": value for key, value in sm.metrics.items()})
        return LossOutput(loss, metrics, parts)

    def __call__(self, policy: BatchPolicy, batch: ObjectiveBatch) -> LossOutput:
        """The loss of ``policy`` on ``batch``, one forward pass per batch for both parts."""
        return _run(self, [self.bc, self.sm], policy, batch)


@dataclass(frozen=True)
class OracleCrossEntropyLoss(Loss):
    """Cross entropy against an expert's whole action distribution at every step (soft labels).

    loss = -sum_t sum_a p*(a | s_t) log pi(a | s_t) / (B L), over the steps of the data batch,
    with p* the batch's ``data_targets`` (the task's oracle at each state, DAgger's labels).
    Mass the expert puts on an action the state does not allow is an error.

    Args:
        normaliser_length: L (see the module docstring); None: the batch's padded step count.
        allow_backspace: False masks ``<bkspc>`` out of the policy everywhere.

    Metrics: ``loss``, ``nll`` (mean cross entropy per step), ``expert_backspace`` (the
    expert's mean probability of ``<bkspc>`` over the steps), ``num_targets``.
    """

    normaliser_length: int | None = None
    allow_backspace: bool = True

    def __post_init__(self) -> None:
        _check_normaliser(self.normaliser_length)

    def __call__(self, policy: BatchPolicy, batch: ObjectiveBatch) -> LossOutput:
        """The loss of ``policy`` on ``batch.data`` against ``batch.data_targets``."""
        targets = batch.data_targets
        if targets is None:
            raise ValueError("OracleCrossEntropyLoss needs the batch's data_targets")
        data = batch.data
        _, allowed, masked = masked_logits(policy, data, self.allow_backspace)
        B = masked.shape[0]
        rows = torch.arange(B, device=masked.device)[:, None]  # (B, 1)
        log_pi = masked[rows, data.state_rows].log_softmax(dim=-1)  # (B, S, A)
        expected = targets.to(log_pi.dtype)  # (B, S, A)
        if bool((expected > 0).logical_and(~allowed[rows, data.state_rows]).any()):
            raise ValueError("the expert's targets put mass on an action the state does not allow")
        # where(): 0 * -inf is nan at the masked actions, where the expert puts no mass.
        per_step = -torch.where(expected > 0, expected * log_pi, 0.0).sum(dim=-1)  # (B, S)
        per_step = torch.where(data.step_mask, per_step, 0.0)
        L = self.normaliser_length or per_step.shape[1]
        loss = per_step.sum() / (B * L)
        backspace = expected[..., policy.special.backspace_id]  # (B, S)
        metrics = {
            "loss": loss.detach(),
            "nll": _masked_mean(per_step, data.step_mask),
            "expert_backspace": _masked_mean(backspace, data.step_mask),
            "num_targets": data.step_mask.sum().float(),
            "backspace_rate_data": _backspace_rate(data, policy.special.backspace_id),
        }
        return LossOutput(loss, metrics)


def gradient_shares(
    parts: dict[str, torch.Tensor], parameters: Iterable[torch.Tensor]
) -> dict[str, torch.Tensor]:
    """The shares of the gradient norm that come from SequenceMatch and from its chi^2 terms.

    With g_X the gradient of the loss part X (see :attr:`LossOutput.parts`)::

        grad_share_sm    = |g_sm| / (|g_bc| + |g_sm|)
        grad_share_kappa = |g_kappa| / (|g_bc + g_sm - g_kappa| + |g_kappa|)

    each the share of one part against the rest of the loss, in [0, 1] (0 when both norms are
    0). A missing ``bc`` counts as 0; ``grad_share_kappa`` only when ``kappa`` is a part. The
    graph of the parts is kept (``retain_graph``) for the update's own backward pass; each
    part costs one extra backward pass, so call this at log intervals only.

    Raises:
        ValueError: when ``parts`` has no ``sm``.
    """
    if "sm" not in parts:
        raise ValueError("gradient_shares needs the loss part 'sm'")
    params = [p for p in parameters if p.requires_grad]

    def grads(loss: torch.Tensor | None) -> list[torch.Tensor]:
        if loss is None or not loss.requires_grad:
            return [torch.zeros_like(p) for p in params]
        found = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
        return [torch.zeros_like(p) if g is None else g for p, g in zip(params, found, strict=True)]

    def norm(gs: list[torch.Tensor]) -> torch.Tensor:
        return torch.linalg.vector_norm(torch.stack([g.detach().float().norm() for g in gs]))

    tiny = torch.finfo(torch.float32).tiny
    g_bc, g_sm = grads(parts.get("bc")), grads(parts["sm"])
    bc_norm, sm_norm = norm(g_bc), norm(g_sm)
    shares = {"grad_share_sm": sm_norm / (bc_norm + sm_norm).clamp(min=tiny)}
    if "kappa" in parts:
        g_kappa = grads(parts["kappa"])
        rest = [b + s - k for b, s, k in zip(g_bc, g_sm, g_kappa, strict=True)]
        kappa_norm = norm(g_kappa)
        shares["grad_share_kappa"] = kappa_norm / (norm(rest) + kappa_norm).clamp(min=tiny)
    return shares


Objective = Callable[[BatchPolicy, ObjectiveBatch], LossOutput]
"""An algorithm's loss: any ``(policy, batch) -> LossOutput`` (every :class:`Loss` is one)."""
