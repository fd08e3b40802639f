"""DAgger: the task's oracle labels the states the learner itself visits.

Ross, Gordon and Bagnell (2011), with the task's expert as the oracle
(:meth:`seqenv.tasks.Task.expert_policy`): it can label any state, the learner's own wrong
brackets included, with the backspace it needs. After ``dagger_warmup`` updates of BC, every
update:

1. **roll out**: at the start of each round of ``dagger_round`` updates, ``dagger_rollouts`` x
   ``dagger_round`` episodes of the current policy on training prompts (the
   demonstrations' prompts: the same questions BC has, never fresh ones), in the training
   disturbance (``--disturbance 0``: the clean environment). At each step, with probability
   beta_i = ``dagger_beta`` x ``dagger_beta_decay``^i, the oracle's action (drawn from its
   distribution) is taken instead of the learner's: the generation's action hook;
2. **aggregate**: the episodes go into a bounded FIFO buffer (``dagger_buffer_size``);
3. **label**: every visited state gets the oracle's whole distribution (soft labels), computed
   when a batch is built (the oracle is exact and cheap; the buffer keeps trajectories only);
4. **train**: on one batch of ``batch_size`` episodes, a ``dagger_demo_share`` of them
   demonstrations relabelled by the oracle, the rest drawn from the buffer; the loss is the
   cross entropy against the oracle's distribution
   (:class:`agents.objectives.OracleCrossEntropyLoss`).

Relabelling matters with random noise: the demonstrator deletes noise that happens to be valid
(``[`` in place of ``(``), where the oracle continues; both on the same text would teach two
answers to one state, so every state DAgger trains on carries the oracle's label.

Every trajectory an update reads was labelled by the oracle, so the number of labelled states it
consumes is counted (the trainer's ``num_labelled_states``: the steps of every data batch it
reads) for the fair comparison with BC: the control ``dagger_demos`` is this run with
``dagger_demo_share = 1`` (relabelled demonstrations only, as many episodes per update, no
rollouts).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch

from agents.algorithms.base import Algorithm, DataKind, Run
from agents.buffer import ReplayBuffer
from agents.collate import collate
from agents.objectives import BCLoss, Objective, ObjectiveBatch, OracleCrossEntropyLoss
from seqenv.expert import require_oracle, trajectory_expert_probs
from seqenv.mdp import SequenceMDP
from seqenv.tasks import Task, oracle_task_names, task_has_oracle

if TYPE_CHECKING:
    from agents.config import TrainConfig
    from seqenv.trajectory import Trajectory


class DAgger(Algorithm):
    """On-policy imitation with the task's oracle: it labels the learner's own states."""

    label = "DAgger (oracle labels on its own states)"
    short_label = "DAgger"
    learns_from: ClassVar[DataKind] = "disturbed"
    needs_rollouts = True
    settings = (
        "disturbance", "disturbance_type", "level_penalty", "dagger_warmup", "dagger_beta",
        "dagger_beta_decay", "dagger_rollouts", "dagger_round", "dagger_buffer_size",
        "dagger_demo_share", "temperature",
    )  # fmt: skip

    def __init__(self, trainer: Run) -> None:
        super().__init__(trainer)
        require_oracle(trainer.task)  # e.g. arithmetic on a pretrained model's tokenizer
        config = self.config
        L = trainer.max_steps
        self.warm_objective = BCLoss.from_settings(config, normaliser_length=L)  # the bc agent's
        self.objective = OracleCrossEntropyLoss(normaliser_length=L)
        self.buffer = ReplayBuffer(config.dagger_buffer_size)
        # The expert's draws in the rollouts: a stream of their own, kept in checkpoints.
        self.expert_rng = np.random.default_rng([config.seed, 5])
        self.expert_steps = 0  # rollout steps the oracle's action replaced (of all steps)
        self.rollout_steps = 0

    # -- what a run of it needs ---------------------------------------------------------------
    @classmethod
    def warm_start_steps(cls, config: TrainConfig) -> int:
        """The BC warm start, ``dagger_warmup`` updates."""
        return config.dagger_warmup

    @classmethod
    def unavailable(cls, task: str, pretrained: bool) -> str | None:
        """Only on a task with an oracle, on its own vocabulary."""
        if pretrained:
            return "needs the task's oracle, which a pretrained model's tokenizer does not have"
        if not task_has_oracle(task):
            return (
                f"needs a task with an expert oracle; task {task!r} has none (tasks with one: "
                f"{', '.join(oracle_task_names())})"
            )
        return None

    @classmethod
    def validate(cls, config: TrainConfig) -> None:
        """A task with an oracle, and the backspace (the oracle's repair) allowed."""
        super().validate(config)
        reason = cls.unavailable(config.task, config.model is not None)
        if reason is not None:
            raise ValueError(f"agent {config.agent!r} {reason}")
        if not config.backspace:
            raise ValueError(f"agent {config.agent!r} needs the backspace: the oracle's repair")

    # -- one update ---------------------------------------------------------------------------
    def in_warm_start(self, step: int) -> bool:
        """Whether update ``step`` is BC on the demonstrations."""
        return step < self.config.dagger_warmup

    def beta(self, step: int) -> float:
        """beta_i of update ``step``: the chance a rollout step takes the oracle's action."""
        rounds = max(0, step - self.config.dagger_warmup)
        return float(self.config.dagger_beta * self.config.dagger_beta_decay**rounds)

    def loss(self, step: int) -> Objective:
        """BC during the warm start; then the cross entropy against the oracle."""
        return self.warm_objective if self.in_warm_start(step) else self.objective

    def demos_per_part(self, micro: int) -> int:
        """How many of a micro-batch's ``micro`` episodes are relabelled demonstrations."""
        return round(self.config.dagger_demo_share * micro)

    def model_batch(self, step: int) -> list[Trajectory] | None:
        """After the warm start: a round's rollouts into the buffer at its start, then a draw.

        As many buffer episodes as the batch leaves to them (none with a share of 1: no
        rollouts then). Every rank draws the global batch and keeps its slice, as for the data.
        """
        if self.in_warm_start(step):
            return None
        config, trainer = self.config, self.trainer
        micro = config.batch_size // config.grad_accum
        per_rank = config.grad_accum * (micro - self.demos_per_part(micro))
        if per_rank == 0:
            return None
        if (step - config.dagger_warmup) % config.dagger_round == 0:  # a round starts
            self.buffer.add(self.rollouts(step, config.dagger_rollouts * config.dagger_round))
        total = per_rank * trainer.world_size
        drawn = self.buffer.sample(total, trainer.data_rng)
        return drawn[trainer.rank * per_rank : (trainer.rank + 1) * per_rank]

    def rollouts(self, step: int, count: int) -> list[Trajectory]:
        """``count`` episodes from training prompts, the oracle mixed in at beta of ``step``."""
        beta = self.beta(step)
        episodes = self.sample_episodes(
            self.training_prompts(count),
            self.trainer.max_steps,
            (lambda mdp, actions: self.mix_in_expert(mdp, actions, beta)) if beta > 0 else None,
        )
        self.rollout_steps += sum(t.num_steps for t in episodes)
        return episodes

    def mix_in_expert(self, mdp: SequenceMDP, actions: torch.Tensor, beta: float) -> torch.Tensor:
        """``actions``, each live row's replaced with probability ``beta`` by the oracle's.

        The oracle's action is a draw from its distribution at that row's state.
        """
        live = (~mdp.done).cpu().numpy()
        take = live & (self.expert_rng.random(len(live)) < beta)
        rows = np.flatnonzero(take)
        if len(rows) == 0:
            return actions
        self.expert_steps += len(rows)
        task: Task = self.trainer.task
        probs = task.expert_policies(
            [mdp.state(int(b))[: int(mdp.prompt_length[b])] for b in rows],
            [mdp.generated(int(b)) for b in rows],
        )
        assert probs is not None  # the task has an oracle (checked when built)
        replaced = actions.clone()
        for row, p in zip(rows, probs, strict=True):
            replaced[int(row)] = int(self.expert_rng.choice(len(p), p=p / p.sum()))
        return replaced

    def batch(self, data: list[Trajectory], model: list[Trajectory] | None) -> ObjectiveBatch:
        """The warm start's BC batch; then relabelled demonstrations and buffer episodes.

        Each episode carries the oracle's distribution at every state it visited as its targets.
        """
        if self.in_warm_start(self.trainer.step):
            return super().batch(data, model)
        episodes = data[: self.demos_per_part(len(data))] + (model or [])
        batch = collate(episodes, labels="executed")  # the states as they ran; labels unread
        S, A = batch.step_mask.shape[1], self.trainer.special.num_actions
        targets = np.zeros((len(episodes), S, A), dtype=np.float32)  # (B, S, A)
        for b, episode in enumerate(episodes):
            probs = trajectory_expert_probs(self.trainer.task, episode)  # (N, A)
            targets[b, : len(probs)] = probs
        return ObjectiveBatch(data=batch, data_targets=torch.from_numpy(targets))

    def metrics(self) -> dict[str, float]:
        """beta_i of the update just made, the buffer's fill, the oracle's share of rollout steps.

        Called after the update, when the trainer's step has moved on.
        """
        return {
            "dagger_beta": self.beta(self.trainer.step - 1),
            "dagger_buffer": float(len(self.buffer)),
            "dagger_expert_share": self.expert_steps / max(1, self.rollout_steps),
        }

    # -- checkpoints --------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        """The aggregated buffer and the expert's random stream."""
        return {
            "buffer": self.buffer.to_json(),
            "dagger": {
                "expert_rng": self.expert_rng.bit_generator.state,
                "expert_steps": self.expert_steps,
                "rollout_steps": self.rollout_steps,
            },
        }

    def load_state(self, metadata: dict[str, Any]) -> None:
        """Restore the buffer and the expert's stream."""
        self.buffer.load_json(metadata["buffer"], self.trainer.special)
        saved = metadata["dagger"]
        self.expert_rng.bit_generator.state = saved["expert_rng"]
        self.expert_steps = int(saved["expert_steps"])
        self.rollout_steps = int(saved["rollout_steps"])
