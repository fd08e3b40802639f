"""Training objectives: ``(policy, batch) -> LossOutput(loss, metrics)``; MLE, BC, SequenceMatch.

Every objective reads the logits of one forward pass per batch (METHOD.md §6) and the per-step
indices of :class:`agents.collate.TrajectoryBatch`. For SequenceMatch (METHOD.md §2-§3) the logits
are the soft Q-function::

    Q(s, a) = logits(a | s)      V(s) = logsumexp_a' logits(a' | s)      r = Q(s, a) - gamma V(s')

with V(s') = 0 after ``<eos>`` and read from the logits of s' everywhere else (a truncated
trajectory's last state is bootstrapped). The objective maximised is::

    J = E_data[sum_t gamma^t phi(r_t)] - c E_model[sum_t gamma^t r_t^2]        (chi2_mixture only)
        - E_src[sum_t gamma^t (V(s_t) - gamma V(s_{t+1}))]

and the loss is -J. Gradients flow through Q and both V terms; there is no target network.

Choices where METHOD.md is silent:

- **Allowed actions.** ``<bkspc>`` in a state with nothing generated is masked out of the policy,
  as in generation (``SequenceMDP.action_mask``): V and log pi are taken over the allowed actions
  only, through :func:`agents.interface.mask_logits`. A step whose action is not allowed (a no-op
  backspace, which :class:`~seqenv.trajectory.Trajectory` never holds) is left out of every term.
  ``allow_backspace=False`` (the no-backspace ablation) masks ``<bkspc>`` everywhere.
- **Normaliser.** Each expectation is a sum over steps divided by (number of sequences in its
  sample) x L, with one fixed L (``normaliser_length``) for every term and every objective, so
  that the sanity identity of METHOD.md §3 holds and (1 - eta) L_BC + eta L_SM mixes like with
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
- ``chi2`` is Pearson chi^2 with its fixed 1/4 (the table of METHOD.md §3); ``c`` only sets the
  coefficient of ``chi2_mixture``. ``linear`` (phi(x) = x) is the identity of METHOD.md §3, for
  tests and diagnostics: SequenceMatch then equals the discounted log-likelihood.

Metrics are detached scalar tensors (no host sync here; the trainer syncs at log intervals).

Shapes: B sequences, T input rows, S steps, A actions.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from agents.collate import TrajectoryBatch
from agents.models.interface import mask_logits
from seqenv.rules import allowed_actions
from seqenv.vocab import SpecialIds

DIVERGENCES = ("chi2_mixture", "chi2", "kl", "reverse_kl", "js", "hellinger", "tv", "linear")
"""Known divergences; ``linear`` (phi(x) = x, SequenceMatch = discounted MLE) is for tests."""

VALUE_SOURCES = ("mix", "data", "model")
"""Trajectories the value term is estimated on: data and model together, or either alone."""


class BatchPolicy(Protocol):
    """What an objective needs of a policy: its special ids and the logits of a re-feed batch."""

    special: SpecialIds

    def forward_batch(self, batch: TrajectoryBatch) -> torch.Tensor: ...


@dataclass(frozen=True)
class LossOutput:
    """What an objective returns.

    Attributes:
        loss: () float, the scalar to minimise.
        metrics: name -> () detached tensor, keys without namespace (the trainer adds one).
    """

    loss: torch.Tensor
    metrics: dict[str, torch.Tensor]

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
    """

    data: TrajectoryBatch
    model: TrajectoryBatch | None = None


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
    """

    q: torch.Tensor
    v: torch.Tensor
    v_next: torch.Tensor
    valid: torch.Tensor
    discount_exponent: torch.Tensor
    backspace: torch.Tensor
    undone: torch.Tensor
    step_mask: torch.Tensor

    @property
    def num_sequences(self) -> int:
        return self.q.shape[0]

    @property
    def num_steps(self) -> int:
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


def step_values(
    policy: BatchPolicy, batch: TrajectoryBatch, allow_backspace: bool = True
) -> StepValues:
    """Run the policy on ``batch`` once and read Q, V(s_t) and V(s_{t+1}) at every step."""
    logits = policy.forward_batch(batch)  # (B, T, A)
    if logits.dtype not in (torch.float32, torch.float64):
        logits = logits.float()  # bf16/fp16 under autocast: the sums below need float32
    B = logits.shape[0]  # logits: (B, T, A)
    backspace_id = policy.special.backspace_id
    # A row's state has something generated iff its position is past the prompt's last one,
    # which is the position of s_0 (state_rows[:, 0] is the last prompt row).
    prompt_end = batch.position_ids.gather(1, batch.state_rows[:, :1])  # (B, 1)
    has_generated = batch.position_ids > prompt_end  # (B, T)
    allowed = allowed_actions(has_generated, policy.special, allow_backspace)  # (B, T, A)
    v_rows = mask_logits(logits, allowed).logsumexp(dim=-1)  # (B, T)

    rows = torch.arange(B, device=logits.device)[:, None]  # (B, 1)
    q = logits[rows, batch.state_rows, batch.actions]  # (B, S)
    v = v_rows.gather(1, batch.state_rows)  # (B, S)
    v_next = torch.where(batch.terminal, 0.0, v_rows.gather(1, batch.next_rows))  # (B, S)
    backspace = batch.step_mask & (batch.actions == backspace_id)
    action_allowed = allowed[rows, batch.state_rows, batch.actions]  # (B, S): a_t allowed in s_t
    return StepValues(
        q=q,
        v=v,
        v_next=v_next,
        valid=batch.step_mask & action_allowed,
        discount_exponent=batch.discount_exponent,
        backspace=backspace,
        undone=batch.undone,
        step_mask=batch.step_mask,
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
# phi of each divergence (METHOD.md §3): phi(x) = -f*(-x)


def _tangent_below(
    x: torch.Tensor, x0: float, f: Callable[[torch.Tensor], torch.Tensor], f0: float, slope: float
) -> torch.Tensor:
    """``f(x)`` for x >= x0, its tangent line ``f0 + slope (x - x0)`` below (finite gradients)."""
    inside = f(x.clamp(min=x0))  # the clamp keeps f's own branch finite where it is not used
    return torch.where(x >= x0, inside, f0 + slope * (x - x0))


def phi(
    divergence: str, x: torch.Tensor, *, c: float = 0.25, max_slope: float = 1e3
) -> torch.Tensor:
    """phi(x) of ``divergence``, elementwise, on the data samples.

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


class _Objective:
    """Shared plumbing: one forward pass per batch read, then :meth:`from_values`."""

    allow_backspace: bool

    @property
    def needs_model(self) -> bool:
        """Whether a term of the objective reads the model batch."""
        return False

    def from_values(self, data: StepValues, model: StepValues | None) -> LossOutput:
        raise NotImplementedError

    def __call__(self, policy: BatchPolicy, batch: ObjectiveBatch) -> LossOutput:
        return _run(self, [self], policy, batch)


def _run(
    objective: _Objective, parts: list[_Objective], policy: BatchPolicy, batch: ObjectiveBatch
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
    data: StepValues, targets: torch.Tensor, normaliser_length: int | None
) -> LossOutput:
    """-sum of log pi over ``targets`` / (B L), with the per-step mean NLL as a metric."""
    L = normaliser_length or data.num_steps
    log_prob = torch.where(targets, data.log_prob, 0.0)
    loss = -log_prob.sum() / (data.num_sequences * L)
    metrics = {
        "loss": loss.detach(),
        "nll": -_masked_mean(data.log_prob, targets),
        "num_targets": targets.sum().float(),
    }
    return LossOutput(loss, metrics)


@dataclass(frozen=True)
class MLE(_Objective):
    """Teacher-forced cross entropy on the data batch: -sum_t log pi(a_t | s_t) / (B L).

    Args:
        normaliser_length: L (see the module docstring); None: the batch's padded step count.
        allow_backspace: False masks ``<bkspc>`` out of the policy everywhere.

    Metrics: ``loss``, ``nll`` (mean over target steps), ``num_targets``, ``backspace_rate_data``.
    """

    normaliser_length: int | None = None
    allow_backspace: bool = True

    def __post_init__(self) -> None:
        _check_normaliser(self.normaliser_length)

    def from_values(self, data: StepValues, model: StepValues | None) -> LossOutput:
        return _cross_entropy(data, data.valid, self.normaliser_length)


@dataclass(frozen=True)
class BC(_Objective):
    """Behaviour cloning on noise-augmented demonstrations (METHOD.md §4-§5).

    Args:
        noise_targets: the noise tokens (appended tokens a later backspace deletes) are targets,
            as in the paper; False leaves them out (the backspaces that delete them still are).
        normaliser_length: L (see the module docstring); None: the batch's padded step count.
        allow_backspace: False masks ``<bkspc>`` out of the policy everywhere.

    Metrics: as :class:`MLE`.
    """

    noise_targets: bool = True
    normaliser_length: int | None = None
    allow_backspace: bool = True

    def __post_init__(self) -> None:
        _check_normaliser(self.normaliser_length)

    def from_values(self, data: StepValues, model: StepValues | None) -> LossOutput:
        targets = data.valid if self.noise_targets else data.valid & ~data.undone
        return _cross_entropy(data, targets, self.normaliser_length)


@dataclass(frozen=True)
class SequenceMatch(_Objective):
    """SequenceMatch (METHOD.md §3): loss = -J, J the occupancy-divergence saddle objective.

    Args:
        divergence: one of :data:`DIVERGENCES`; ``chi2_mixture`` is the paper's recommendation.
        c: chi^2 coefficient of ``chi2_mixture`` (x - c x^2 on data, -c r^2 on model samples).
        gamma: discount; 0.998 in the paper.
        value_source: trajectories of the value term, one of :data:`VALUE_SOURCES`.
        normaliser_length: L (see the module docstring); None: the padded step count of the
            batches read in the call.
        max_slope: slope at which ``kl``, ``reverse_kl``, ``js`` and ``hellinger`` switch to
            their tangent line (their domain handling, see the module docstring).
        allow_backspace: False masks ``<bkspc>`` out of the policy everywhere.

    Metrics: ``loss``; ``divergence`` (-J, the estimate of the divergence); ``data_term``,
    ``model_term``, ``value_term`` (the three terms of J, as above); ``r_data``, ``r_model``
    (mean r per step; ``r_model`` when the model batch is read); ``value`` (mean V(s_t) over the
    value source's steps); ``nll`` (mean -log pi over the data steps); ``backspace_rate_data``,
    ``backspace_rate_model``.
    """

    divergence: str = "chi2_mixture"
    c: float = 0.25
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
        if not self.max_slope >= 1.0:
            raise ValueError(f"max_slope must be >= 1, got {self.max_slope}")
        _check_normaliser(self.normaliser_length)

    @property
    def has_model_term(self) -> bool:
        return self.divergence == "chi2_mixture" and self.c != 0

    @property
    def needs_model(self) -> bool:
        return self.has_model_term or self.value_source != "data"

    def from_values(self, data: StepValues, model: StepValues | None) -> LossOutput:
        if self.needs_model and model is None:
            raise ValueError("SequenceMatch with this configuration needs model step values")
        gamma = self.gamma
        L = self.normaliser_length or max(
            data.num_steps, model.num_steps if model is not None else 0
        )

        # E_data[sum_t gamma^t phi(r_t)]
        r_data = data.reward(gamma)
        weight_data = data.discount(gamma)
        phi_data = phi(self.divergence, r_data, c=self.c, max_slope=self.max_slope)
        data_term = (weight_data * phi_data).sum() / (data.num_sequences * L)

        # c E_model[sum_t gamma^t r_t^2]
        r_model = model.reward(gamma) if model is not None else None
        model_term = torch.zeros((), device=r_data.device)
        if self.has_model_term:
            assert model is not None and r_model is not None
            weighted = model.discount(gamma) * r_model.square()
            model_term = self.c * weighted.sum() / (model.num_sequences * L)

        # E_src[sum_t gamma^t (V(s_t) - gamma V(s_{t+1}))]
        by_source: dict[str, list[StepValues | None]] = {
            "data": [data],
            "model": [model],
            "mix": [data, model],
        }
        sources = [values for values in by_source[self.value_source] if values is not None]
        value_sum = torch.zeros((), device=r_data.device)
        v_sum = torch.zeros((), device=r_data.device)  # for the mean-V metric
        v_count = torch.zeros((), device=r_data.device)
        for values in sources:
            telescoped = torch.where(values.valid, values.v - gamma * values.v_next, 0.0)
            value_sum = value_sum + (values.discount(gamma) * telescoped).sum()
            v_sum = v_sum + torch.where(values.valid, values.v.detach(), 0.0).sum()
            v_count = v_count + values.valid.sum()
        num_sequences = sum(values.num_sequences for values in sources)
        value_term = value_sum / (num_sequences * L)

        J = data_term - model_term - value_term
        loss = -J
        metrics = {
            "loss": loss.detach(),
            "divergence": loss.detach(),
            "data_term": data_term.detach(),
            "model_term": model_term.detach(),
            "value_term": value_term.detach(),
            "r_data": _masked_mean(r_data, data.valid),
            "value": v_sum / v_count.clamp(min=1),
            "nll": -_masked_mean(data.log_prob, data.valid),
        }
        if model is not None and r_model is not None:
            metrics["r_model"] = _masked_mean(r_model, model.valid)
        return LossOutput(loss, metrics)


@dataclass(frozen=True)
class Mixture(_Objective):
    """The training schedule's combination (METHOD.md §4): (1 - eta) L_BC + eta L_SM.

    Both parts read the same forward passes (one per batch). Give both the same
    ``normaliser_length`` so that eta weighs like with like.

    Args:
        bc: the behaviour-cloning part (:class:`BC` or :class:`MLE`).
        sm: the SequenceMatch part.
        eta: weight of ``sm``, in [0, 1].

    Metrics: ``loss``, the metrics of each part prefixed ``bc/`` and ``sm/``, and the backspace
    rates.
    """

    bc: BC | MLE
    sm: SequenceMatch
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
        return self.bc.needs_model or self.sm.needs_model

    def from_values(self, data: StepValues, model: StepValues | None) -> LossOutput:
        bc = self.bc.from_values(data, model)
        sm = self.sm.from_values(data, model)
        loss = (1.0 - self.eta) * bc.loss + self.eta * sm.loss
        metrics = {"loss": loss.detach()}
        metrics.update({f"bc/{key}": value for key, value in bc.metrics.items()})
        metrics.update({f"sm/{key}": value for key, value in sm.metrics.items()})
        return LossOutput(loss, metrics)

    def __call__(self, policy: BatchPolicy, batch: ObjectiveBatch) -> LossOutput:
        return _run(self, [self.bc, self.sm], policy, batch)


Objective = MLE | BC | SequenceMatch | Mixture

OBJECTIVES: dict[str, type[MLE] | type[BC] | type[SequenceMatch]] = {
    "mle": MLE,
    "bc": BC,
    "sequencematch": SequenceMatch,
}


def make_objective(name: str, **kwargs: Any) -> MLE | BC | SequenceMatch:
    """Build the objective ``name`` (``mle``, ``bc``, ``sequencematch``) from plain arguments.

    Raises:
        ValueError: for an unknown name, an argument the objective does not take, or a bad
            value (an unknown divergence or value source, ...).
    """
    if name not in OBJECTIVES:
        raise ValueError(f"unknown objective {name!r}; known: {', '.join(OBJECTIVES)}")
    cls = OBJECTIVES[name]
    accepted = [f.name for f in dataclasses.fields(cls) if f.init]
    unexpected = sorted(set(kwargs) - set(accepted))
    if unexpected:
        raise ValueError(
            f"objective {name!r} takes no argument {', '.join(map(repr, unexpected))}; "
            f"it takes: {', '.join(accepted)}"
        )
    return cls(**kwargs)
