"""The interface every learning algorithm implements, and the registry that names them.

An :class:`Algorithm` says what the trainer cannot know by itself:

- **what data it learns from** (:attr:`Algorithm.learns_from`): the clean demonstrations, or
  the demonstrations of the disturbed environment (each disturbance repaired by a backspace),
  labelled with the intended or the executed actions (the ``labels`` setting);
- **whether it needs rollouts**, and how it refreshes them (:meth:`Algorithm.model_batch`);
- **the loss of one batch** (:meth:`Algorithm.loss`), a ``(policy, ObjectiveBatch) ->
  LossOutput`` callable of :mod:`agents.objectives`;
- **its settings** (:attr:`Algorithm.settings`: the fields of
  :class:`~agents.config.TrainConfig` it reads, beyond those every run has; a user's
  algorithm declares its own as a dataclass, :attr:`Algorithm.Settings`, given on the command
  line as ``--agent-args JSON``);
- **its labels** for reports (:attr:`Algorithm.label`, :attr:`Algorithm.short_label`).

Everything else (data, model, optimiser, checkpoints, TensorBoard, evaluation) is the trainer's
(:mod:`agents.training.trainer`), which looks the algorithm up here by ``config.agent`` and names
none. ``ALGORITHMS`` maps a name to an :class:`AlgorithmSpec`: a class and the settings the name
fixes, so an ablation (``bc_executed``: BC on executed actions) is a named preset of a class,
not a code path. A name ``"module:Class"`` loads a user's :class:`Algorithm` subclass, as
``--task module:Class`` loads a task; compare's worker processes resolve it themselves, so
such a module must be importable there (a :func:`register_algorithm` call made only in a user's
script does not reach them).
"""

from __future__ import annotations

import dataclasses
import importlib
import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Literal, Protocol, cast

from agents.collate import collate
from agents.generate import ActionHook, generate
from agents.objectives import ObjectiveBatch
from seqenv.trajectory import LabelKind

if TYPE_CHECKING:
    import numpy as np
    import torch

    from agents.config import TrainConfig
    from agents.models.interface import PolicyModel
    from agents.objectives import Objective
    from seqenv.disturbance import Disturbance, NoiseFn
    from seqenv.tasks import Task
    from seqenv.trajectory import Trajectory
    from seqenv.vocab import SpecialIds

    class TrainablePolicy(PolicyModel, Protocol):
        """The network a run trains: a policy model that is also a torch module."""

        def train(self, mode: bool = True) -> Any:
            """Training mode (dropout on)."""

        def eval(self) -> Any:
            """Evaluation mode."""


DataKind = Literal["clean", "disturbed"]
"""What an algorithm learns from: clean demonstrations, or those of the disturbed environment."""


class Run(Protocol):
    """What an algorithm reads of its run (the trainer, :mod:`agents.training.trainer`)."""

    config: TrainConfig
    task: Task
    special: SpecialIds

    @property
    def policy(self) -> TrainablePolicy:
        """The network being trained."""

    demonstrations: list[Trajectory]
    """The training demonstrations, clean (their prompts are the training prompts)."""
    data_rng: np.random.Generator
    """The run's stream of data order and noise, shared by every rank (checkpointed)."""
    rollout_generator: torch.Generator
    """The run's stream of rollout draws (checkpointed)."""
    disturbance: Disturbance | None
    noise_fn: NoiseFn | None
    max_length: int
    max_steps: int
    rank: int
    world_size: int
    step: int
    """The update in progress (0-based), while one runs."""


class Algorithm:
    """One way of learning from demonstrations; built by the trainer, one per run.

    Subclasses set the class attributes and implement :meth:`loss`; an algorithm with rollouts
    also implements :meth:`model_batch` (and :meth:`state` / :meth:`load_state` for what a
    checkpoint must keep of them).

    Args:
        trainer: the run (:class:`Run`): its ``config``, ``policy``, ``demonstrations``, random
            streams (``data_rng``, ``rollout_generator``), ``disturbance`` and sizes.
    """

    label: ClassVar[str] = ""
    """Its name in reports (a table row, a plot legend)."""
    short_label: ClassVar[str] = ""
    """A short form, for the report's difference columns."""
    learns_from: ClassVar[DataKind] = "disturbed"
    """clean: the demonstrations as the task gives them; disturbed: those of the disturbed
    environment (with a disturbance p > 0 and the backspace allowed), labelled by ``labels``."""
    settings: ClassVar[tuple[str, ...]] = ()
    """The TrainConfig fields it reads beyond those of every run (shown in reports and help)."""
    Settings: ClassVar[type | None] = None
    """A user's algorithm: a dataclass of its own settings (defaults and docstrings), filled from
    ``--agent-args``; the instance gets them as ``self.extra``."""
    trains: ClassVar[bool] = True
    """False: a baseline evaluated as built, never updated (the untuned pretrained model)."""
    needs_rollouts: ClassVar[bool] = False
    """Whether some updates read the policy's own rollouts (:meth:`model_batch`)."""
    own_loop: ClassVar[bool] = False
    """True: it trains with a loop of its own (PPO's), never through the trainer; a comparison
    calls its ``train_own_loop(config, task, seed, out, device) -> (policy, curves)``."""
    loop_settings: ClassVar[dict[str, Any]] = {}
    """An own-loop algorithm's settings and their defaults, which a comparison config's
    ``agents.<name>`` block overrides."""

    def __init__(self, trainer: Run) -> None:
        self.trainer = trainer
        self.config: TrainConfig = trainer.config
        self.extra = parse_agent_args(type(self), self.config.agent_args)

    # -- what a subclass may say about a run, before it is built ------------------------------
    @classmethod
    def uses_disturbance(cls, config: TrainConfig) -> bool:
        """Whether a run of ``config`` learns (and rolls out) in the disturbed environment."""
        return cls.learns_from == "disturbed" and config.backspace and config.disturbance > 0

    @classmethod
    def warm_start_steps(cls, config: TrainConfig) -> int:
        """Updates before the algorithm's own term starts (0: none); compare pauses there."""
        return 0

    @classmethod
    def model_rows(cls, config: TrainConfig) -> int:
        """Rollout sequences in one update's batch, for the memory estimate (0: none)."""
        return 0

    @classmethod
    def unavailable(cls, task: str, pretrained: bool) -> str | None:
        """Why a comparison on ``task`` (with a pretrained model or not) cannot run it.

        The end of a sentence that starts with the agent's name; None where it can.
        """
        return None

    @classmethod
    def validate(cls, config: TrainConfig) -> None:
        """Raise ValueError (one line) for settings this algorithm cannot run with."""
        if cls.own_loop:
            raise ValueError(
                f"agent {config.agent!r} trains with a loop of its own: use it in seqmatch compare"
            )
        parse_agent_args(cls, config.agent_args)

    # -- one update ---------------------------------------------------------------------------
    def loss(self, step: int) -> Objective:
        """The loss of update ``step`` (0-based): a ``(policy, ObjectiveBatch) -> LossOutput``."""
        raise NotImplementedError

    def model_batch(self, step: int) -> list[Trajectory] | None:
        """This rank's rollouts for update ``step``, refreshed as the algorithm does.

        None: the update reads demonstrations only. Called after the data batch is drawn.
        """
        return None

    # -- rollouts, for an algorithm that has them -------------------------------------------
    def training_prompts(self, count: int) -> list[list[int]]:
        """The prompts of ``count`` random training demonstrations (the run's data stream)."""
        trainer = self.trainer
        index = trainer.data_rng.integers(0, len(trainer.demonstrations), size=count)
        return [trainer.demonstrations[int(i)].prompt.tolist() for i in index]

    def sample_episodes(
        self, prompts: list[list[int]], max_steps: int, action_hook: ActionHook | None = None
    ) -> list[Trajectory]:
        """Episodes of the current policy from ``prompts``, drawn from the run's rollout stream.

        KV-cache generation at the rollout temperature, in the run's disturbance; ``action_hook``
        may replace the policy's actions before they run (DAgger's expert).
        """
        trainer = self.trainer
        trainer.policy.eval()
        out = generate(
            trainer.policy,
            prompts,
            max_length=trainer.max_length,
            max_steps=max_steps,
            temperature=self.config.temperature,
            generator=trainer.rollout_generator,
            allow_backspace=self.config.backspace,
            disturbance=trainer.disturbance,
            noise_fn=trainer.noise_fn,
            action_hook=action_hook,
        )
        trainer.policy.train()
        return out.trajectories

    def batch(self, data: list[Trajectory], model: list[Trajectory] | None) -> ObjectiveBatch:
        """One micro-batch as the loss reads it: the trajectories collated with their labels.

        Its ``data`` batch holds the states an expert labelled (the trainer counts them); its
        ``model`` batch the rollouts no expert labelled.
        """
        labels = cast(LabelKind, self.config.labels)
        return ObjectiveBatch(
            data=collate(data, labels=labels),
            model=collate(model, labels=labels) if model is not None else None,
        )

    def metrics(self) -> dict[str, float]:
        """What to log of the algorithm after each update (``train/<key>``)."""
        return {}

    # -- checkpoints --------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        """What a checkpoint keeps of the algorithm (JSON), beside the trainer's state."""
        return {}

    def load_state(self, metadata: dict[str, Any]) -> None:
        """Restore :meth:`state` from a checkpoint's metadata (ValueError if it is corrupt)."""


@dataclass(frozen=True)
class AlgorithmSpec:
    """A registered name: an algorithm class and the TrainConfig settings the name fixes."""

    name: str
    cls: type[Algorithm]
    overrides: dict[str, Any] = field(default_factory=dict)
    label: str = ""
    short_label: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "label", self.label or self.cls.label or self.name)
        object.__setattr__(
            self, "short_label", self.short_label or self.cls.short_label or self.label
        )

    def configure(self, config: TrainConfig) -> TrainConfig:
        """``config`` with the settings this name fixes (and the name as its agent)."""
        return dataclasses.replace(config, agent=self.name, **self.overrides)


ALGORITHMS: dict[str, AlgorithmSpec] = {}
"""Every registered name, in registration order (the order of compare's agent list)."""


def register_algorithm(
    name: str,
    cls: type[Algorithm],
    *,
    overrides: dict[str, Any] | None = None,
    label: str = "",
    short_label: str = "",
) -> AlgorithmSpec:
    """Register ``cls`` under ``name``, with the settings the name fixes (a preset).

    Raises:
        ValueError: for an empty name, one holding a colon (reserved for ``module:Class``), a
            name already taken, or a class that is not an :class:`Algorithm`.
    """
    if not name or ":" in name:
        raise ValueError(f"an algorithm name must be non-empty and hold no ':', got {name!r}")
    if name in ALGORITHMS:
        raise ValueError(f"algorithm {name!r} is already registered")
    if not (isinstance(cls, type) and issubclass(cls, Algorithm)):
        raise ValueError(f"algorithm {name!r}: {cls!r} is not an Algorithm subclass")
    spec = AlgorithmSpec(name, cls, dict(overrides or {}), label, short_label)
    ALGORITHMS[name] = spec
    return spec


def resolve_algorithm(name: str) -> AlgorithmSpec:
    """The spec of a registered name, or of ``"module:Class"`` (imported here).

    Raises:
        ValueError: for an unknown name, a module that does not import, or an attribute that is
            not an :class:`Algorithm` subclass.
    """
    if ":" not in name:
        if name not in ALGORITHMS:
            raise ValueError(
                f"unknown agent {name!r}; known agents: {', '.join(ALGORITHMS)} (or module:Class)"
            )
        return ALGORITHMS[name]
    module_name, _, attribute = name.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(f"agent {name!r}: cannot import module {module_name!r} ({err})") from None
    cls = getattr(module, attribute, None)
    if not (isinstance(cls, type) and issubclass(cls, Algorithm)):
        raise ValueError(f"agent {name!r}: {module_name}.{attribute} is not an Algorithm subclass")
    return AlgorithmSpec(name, cls)


def describe_algorithms() -> str:
    """One line per registered name: the name, its label, and the settings a preset fixes."""
    lines = []
    for name, spec in ALGORITHMS.items():
        notes = [f"{k}={v}" for k, v in spec.overrides.items()]
        if spec.cls.own_loop or not spec.cls.trains:
            notes.append("seqmatch compare only")
        lines.append(f"  {name:<24} {spec.label}" + (f" ({', '.join(notes)})" if notes else ""))
    return "\n".join(lines)


def parse_agent_args(cls: type[Algorithm], agent_args: str) -> Any:
    """``--agent-args`` JSON as an instance of ``cls.Settings`` (None without Settings).

    Raises:
        ValueError: for JSON that is not an object, arguments given to an algorithm without
            settings, or a name its settings do not have.
    """
    try:
        values = json.loads(agent_args or "{}")
    except json.JSONDecodeError as err:
        raise ValueError(f"--agent-args is not valid JSON ({err.msg})") from None
    if not isinstance(values, dict):
        raise ValueError("--agent-args must be a JSON object")
    if cls.Settings is None:
        if values:
            raise ValueError(f"--agent-args: {cls.__name__} takes no settings of its own")
        return None
    known = [f.name for f in dataclasses.fields(cls.Settings)]
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ValueError(
            f"--agent-args: {cls.__name__} has no setting {', '.join(map(repr, unknown))}; "
            f"it has: {', '.join(known) or 'none'}"
        )
    return cls.Settings(**values)
