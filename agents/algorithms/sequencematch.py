"""SequenceMatch (docs/method.md §3-§4): BC warm start, then BC mixed with occupancy matching.

One update, after the ``sm_warmup`` updates of the warm start:

1. **rollouts**: every ``k_sample`` updates, ``rollouts`` fresh trajectories of the current
   policy (KV-cache generation, in the training disturbance) go into a FIFO replay buffer;
2. **model batch**: this update's rollouts are drawn from the buffer; with
   ``model_batch_buckets`` k > 1, k batches are drawn at once, sorted by length and served one
   per update in a random order (less padding; each rollout is still drawn uniformly);
3. **loss**: ``(1 - eta) * BC + eta * SequenceMatch / alpha`` (:class:`agents.objectives.Mixture`),
   the BC part and the warm start with the level penalty (docs/method.md §3, "The logits'
   level"). Every loss is built by :meth:`SequenceMatch.losses`, which the benchmarks time too.

Rollouts are capped at ``ceil(rollout_length_factor x`` the ``rollout_length_quantile`` of the
demonstrations' step counts``)`` (:func:`rollout_step_cap`): a longer one is truncated and its
last state bootstrapped.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np

from agents.algorithms.base import Algorithm, Run
from agents.buffer import ReplayBuffer
from agents.objectives import BCLoss, Mixture, Objective, SequenceMatchLoss

if TYPE_CHECKING:
    from agents.config import TrainConfig
    from seqenv.trajectory import Trajectory


class SequenceMatch(Algorithm):
    """SequenceMatch: a chi^2-mixture occupancy divergence, the logits as a soft Q-function."""

    label = "SequenceMatch"
    short_label = "SequenceMatch"
    needs_rollouts = True
    settings = (
        "disturbance", "disturbance_type", "labels", "noise_targets", "divergence", "c", "alpha",
        "gamma", "eta", "level_penalty", "value_source", "sm_warmup", "k_sample", "rollouts",
        "buffer_size", "temperature", "model_batch_size", "model_batch_buckets",
        "rollout_length_factor", "rollout_length_quantile",
    )  # fmt: skip

    def __init__(self, trainer: Run) -> None:
        super().__init__(trainer)
        config = self.config
        self.warm_objective, self.mixture = self.losses(config, trainer.max_steps, config.backspace)
        self.buffer = ReplayBuffer(config.buffer_size)
        self.model_batch_size = config.resolved_model_batch_size
        self._model_pool: list[list[int]] = []  # bucketed model batches to serve (buffer positions)
        self.rollout_max_steps = rollout_step_cap(
            trainer.demonstrations,
            trainer.max_steps,
            config.rollout_length_factor,
            config.rollout_length_quantile,
        )

    @staticmethod
    def losses(
        config: TrainConfig, normaliser_length: int, allow_backspace: bool
    ) -> tuple[BCLoss, Mixture]:
        """The warm start's loss and the mixture after it, from a run's settings.

        One normaliser for every term (docs/method.md §3), so that eta weighs like with like.
        """
        warm = BCLoss.from_settings(  # its level penalty pins the logits' level, which chi^2 reads
            config, normaliser_length=normaliser_length, allow_backspace=allow_backspace
        )
        sm = SequenceMatchLoss.from_settings(
            config, normaliser_length=normaliser_length, allow_backspace=allow_backspace
        )
        return warm, Mixture(warm, sm, config.eta)

    # -- what a run of it needs ---------------------------------------------------------------
    @classmethod
    def warm_start_steps(cls, config: TrainConfig) -> int:
        """The BC warm start, ``sm_warmup`` updates."""
        return config.sm_warmup

    @classmethod
    def model_rows(cls, config: TrainConfig) -> int:
        """The model batch of an update after the warm start."""
        return config.resolved_model_batch_size

    @classmethod
    def validate(cls, config: TrainConfig) -> None:
        """Its losses check their own settings: building them fails before any file exists."""
        super().validate(config)
        cls.losses(config, 1, config.backspace)

    # -- one update ---------------------------------------------------------------------------
    def in_warm_start(self, step: int) -> bool:
        """Whether update ``step`` uses the warm start's loss."""
        return step < self.config.sm_warmup

    def loss(self, step: int) -> Objective:
        """The warm start's BC, then the mixture."""
        return self.warm_objective if self.in_warm_start(step) else self.mixture

    def model_batch(self, step: int) -> list[Trajectory] | None:
        """After the warm start: refresh the buffer every ``k_sample`` updates, draw a batch."""
        if self.in_warm_start(step):
            return None
        if (step - self.config.sm_warmup) % self.config.k_sample == 0:
            self.refresh_buffer()
        return self.draw_model_batch()

    def refresh_buffer(self) -> None:
        """Add ``rollouts`` trajectories from the prompts of random demonstrations."""
        prompts = self.training_prompts(self.config.rollouts)
        self.buffer.add(self.sample_episodes(prompts, self.rollout_max_steps))
        self._model_pool.clear()  # batches drawn before the refresh would miss the new rollouts

    def draw_model_batch(self) -> list[Trajectory]:
        """This rank's slice of the global model batch, drawn from the replay buffer.

        Every rank holds the same buffer (same weights, same seeded rollouts): draw the global
        batch and keep this rank's slice, as for the data. With ``model_batch_buckets`` k > 1,
        k global batches are drawn at once, sorted by length and served one per update in a
        random order (a pool emptied at each refresh of the buffer).
        """
        trainer, rng = self.trainer, self.trainer.data_rng
        total = self.model_batch_size * trainer.world_size
        mine = slice(
            trainer.rank * self.model_batch_size, (trainer.rank + 1) * self.model_batch_size
        )
        k = self.config.model_batch_buckets
        if k == 1:
            return self.buffer.sample(total, rng)[mine]
        if not self._model_pool:
            drawn = self.buffer.sample_indices(k * total, rng)
            items = self.buffer.items(drawn)
            length = {i: t.num_steps + len(t.prompt) for i, t in zip(drawn, items, strict=True)}
            drawn.sort(key=length.__getitem__)  # stable: ties keep draw order
            batches = [drawn[i * total : (i + 1) * total] for i in range(k)]
            self._model_pool = [batches[int(i)] for i in rng.permutation(k)]
        return self.buffer.items(self._model_pool.pop())[mine]

    # -- checkpoints --------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        """The replay buffer, and the length-bucketed model batches still to serve."""
        return {"buffer": self.buffer.to_json(), "model_pool": self._model_pool}

    def load_state(self, metadata: dict[str, Any]) -> None:
        """Restore the buffer and the pool; ValueError if the pool does not index the buffer."""
        self.buffer.load_json(metadata["buffer"], self.trainer.special)
        pool = metadata.get("model_pool", [])
        if not (
            isinstance(pool, list)
            and all(isinstance(b, list) for b in pool)
            and all(type(i) is int and 0 <= i < len(self.buffer) for b in pool for i in b)
        ):
            raise ValueError("model_pool does not index the saved replay buffer")
        self._model_pool = pool


def rollout_step_cap(
    demonstrations: list[Trajectory], max_steps: int, factor: float | None, quantile: float
) -> int:
    """The rollouts' step budget.

    ``ceil(factor * quantile of the demonstrations' step counts)``, at least 1 and at most
    ``max_steps``; ``max_steps`` when ``factor`` is None.
    """
    if factor is None or not demonstrations:
        return max_steps
    steps = np.array([t.num_steps for t in demonstrations])
    cap = math.ceil(factor * float(np.quantile(steps, quantile)))
    return max(1, min(max_steps, cap))
