"""How a running job talks to whoever runs it: hooks in, an outcome out."""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal, Protocol

Metrics = dict[str, float | int | None]


class Control(enum.Enum):
    """What the runner wants the job to do at a step boundary."""

    CONTINUE = "continue"
    PAUSE = "pause"
    PREEMPT = "preempt"  # the trainer is stopping: checkpoint and hand the job back
    CANCEL = "cancel"


@dataclass(frozen=True)
class StartInfo:
    device: str
    train_size: int
    val_size: int
    resumed_from_epoch: int
    total_epochs: int
    steps_per_epoch: int


class StepInfo:
    """After `step` of `steps_per_epoch` steps of epoch `epoch` (both 1-based).

    `loss` is the step's mean training loss. The loop hands it over unread (a callable):
    on a GPU reading it waits for the step to finish, so a hook reads it at most a few
    times a second (telemetry does, once a second); once read it is kept.
    """

    __slots__ = ("_loss", "epoch", "samples_per_second", "step", "steps_per_epoch")

    def __init__(
        self,
        epoch: int,
        step: int,
        steps_per_epoch: int,
        loss: float | Callable[[], float],
        samples_per_second: float,
    ) -> None:
        self.epoch, self.step, self.steps_per_epoch = epoch, step, steps_per_epoch
        self._loss, self.samples_per_second = loss, samples_per_second

    @property
    def loss(self) -> float:
        if callable(self._loss):
            self._loss = float(self._loss())
        return self._loss

    def _key(self) -> tuple[int, int, int, float, float]:
        return self.epoch, self.step, self.steps_per_epoch, self.loss, self.samples_per_second

    def __eq__(self, other: object) -> bool:
        return isinstance(other, StepInfo) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __repr__(self) -> str:
        epoch, step, steps, loss, speed = self._key()
        return (
            f"StepInfo(epoch={epoch}, step={step}, steps_per_epoch={steps}, loss={loss}, "
            f"samples_per_second={speed})"
        )


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint file durably in place: after `epoch` completed epochs, at `uri`
    (absolute path), with its sha256 (hex)."""

    epoch: int
    uri: str
    sha256: str


class TrainingHooks(Protocol):
    """Called by `run_training` on the thread that trains."""

    def on_start(self, info: StartInfo) -> None: ...

    def check(self, step: StepInfo) -> Control:
        """Asked after every training step: keep this cheap (read a flag)."""
        ...

    def on_epoch(self, metrics: Metrics, is_best: bool, checkpoint: Checkpoint) -> None:
        """An epoch ended: its metrics and the checkpoint already written after it."""
        ...

    def on_checkpoint(self, epoch: int, uri: str, sha256: str) -> None:
        """After the file is durably in place; `uri` is its absolute path."""
        ...


class NullHooks:
    """Hooks that listen to nothing and always continue."""

    def on_start(self, info: StartInfo) -> None:
        return None

    def check(self, step: StepInfo) -> Control:
        return Control.CONTINUE

    def on_epoch(self, metrics: Metrics, is_best: bool, checkpoint: Checkpoint) -> None:
        return None

    def on_checkpoint(self, epoch: int, uri: str, sha256: str) -> None:
        return None


@dataclass(frozen=True)
class Outcome:
    """How `run_training` ended; `epoch` counts the epochs fully completed."""

    kind: Literal["completed", "paused", "preempted", "cancelled"]
    epoch: int
    checkpoint_uri: str | None
    final_metrics: Metrics = field(default_factory=dict)
    best_epoch: int | None = None
    best_val_loss: float | None = None
    model_uri: str | None = None
    step: int = 0  # steps done into the next epoch (a pause or preemption mid-epoch)
