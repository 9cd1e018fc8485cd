"""The training job aggregate: its events, its state machine and its errors (DESIGN §3)."""

from __future__ import annotations

from datetime import datetime
from typing import Any
from uuid import UUID

from eventsourcing.domain import Aggregate, event
from eventsourcing.utils import register_topic

TOPIC = "heimdall.training:"

QUEUED, RUNNING, PAUSING, PAUSED = "queued", "running", "pausing", "paused"
CANCELLING, COMPLETED, FAILED, CANCELLED = "cancelling", "completed", "failed", "cancelled"
TERMINAL = frozenset({COMPLETED, FAILED, CANCELLED})
ACTIVE_RUN = frozenset({RUNNING, PAUSING, CANCELLING})
STATUSES = (QUEUED, RUNNING, PAUSING, PAUSED, CANCELLING, COMPLETED, FAILED, CANCELLED)
# The statuses in which each command from people changes something.
COMMAND_STATUSES = {
    "pause": frozenset({QUEUED, RUNNING}),
    "resume": frozenset({PAUSED}),
    "cancel": frozenset({QUEUED, RUNNING, PAUSING, PAUSED}),
}

Metrics = dict[str, Any]
Shape = tuple[int, int, int]  # a model's inputs: receivers, n_mels, frames


class TrainingJobError(Exception):
    """A command that the job's current state does not allow."""

    def __init__(self, message: str, status: str) -> None:
        super().__init__(message)
        self.status = status


class IllegalTransitionError(TrainingJobError):
    """The job's status does not allow this command (the api answers 409)."""


class ClaimLostError(TrainingJobError):
    """A trainer wrote to a job it no longer owns: it must stop."""


class InitFromError(ValueError):
    """`init_from` names no job whose final weights can start the new one (the api's 422)."""


class TrainingJob(Aggregate):
    """One training job; every change of its state is an event in its stream."""

    id: UUID  # lets the application choose the id (idempotency keys)

    class Event(Aggregate.Event):
        """Bodies may read `modified_on` as this event's own time (eventsourcing sets it after)."""

        def mutate(self, aggregate: Any) -> Any:
            if aggregate is not None:
                aggregate.modified_on = self.timestamp
            return super().mutate(aggregate)

    @event("Submitted", topic=TOPIC + "Submitted")
    def __init__(
        self,
        id: UUID,
        job_name: str,
        description: str,
        config: dict[str, Any],
        actor: str,
        parameter_count: int | None = None,
        warnings: list[str] | None = None,
    ) -> None:
        """`parameter_count` and `warnings` are what the api's preflight found at submit
        (the model's trainable parameters; what the job will cost), None when not checked."""
        self.job_name, self.description, self.config = job_name, description, config
        self.submitted_by = actor
        self.parameter_count = parameter_count
        self.warnings = list(warnings or [])
        self.device: str | None = None  # the last claim's, as its trainer described it
        self.status = QUEUED
        self.archived = False
        self.worker: str | None = None
        self.attempt = 0
        self.workers_lost = 0
        self.resume_pending = False
        self.current_epoch = 0
        self.attempt_epoch = 0  # the last epoch recorded by the current attempt
        self.total_epochs = int(config.get("epochs", 0))
        self.last_metrics: Metrics = {}
        self.best_epoch: int | None = None
        self.best_val_loss: float | None = None
        self.checkpoint_epoch = 0
        self.checkpoint_path: str | None = None
        self.checkpoint_sha256: str | None = None
        self.model_path: str | None = None
        self.error_message: str | None = None
        self.started_at: datetime | None = None
        self.completed_at: datetime | None = None

    # Commands from people (through the api).

    def request_pause(self, actor: str) -> None:
        self._require(COMMAND_STATUSES["pause"], "pause")
        self._pause_requested(actor=actor)

    def request_resume(self, actor: str) -> None:
        self._require(COMMAND_STATUSES["resume"], "resume")
        self._resume_requested(actor=actor)

    def request_cancel(self, actor: str) -> bool:
        """Cancel is idempotent: False when the job is already cancelled or cancelling."""
        if self.status in (CANCELLED, CANCELLING):
            return False
        self._require(COMMAND_STATUSES["cancel"], "cancel")
        self._cancel_requested(actor=actor)
        return True

    def archive(self, actor: str) -> bool:
        """Archive is idempotent: False when the job is already archived."""
        self._require(TERMINAL, "archive")
        if self.archived:
            return False
        self._archived(actor=actor)
        return True

    def delete(self, actor: str) -> None:
        """What DELETE means: a finished job is archived (nothing is ever deleted from the
        store), an active one is cancelled. Afterwards `archived` says which happened."""
        if self.status in TERMINAL:
            self.archive(actor)
        else:
            self.request_cancel(actor)

    def continue_into(self, child_id: UUID, architecture: str, actor: str) -> None:
        """Job `child_id` starts from this job's final weights (`Continued`): a fact about
        this job, not a command on it, so its status stays as it is."""
        self.check_seeds(architecture)
        self._continued(child_job_id=str(child_id), actor=actor)

    # Facts from trainers.

    def claim(self, worker: str, device: str, train_size: int, val_size: int) -> None:
        """A trainer takes a queued job: `Resumed` after a pause, `Started` otherwise."""
        self._require({QUEUED}, "start")
        if self.resume_pending and self.checkpoint_path:
            self._resumed(
                epoch=self.checkpoint_epoch,
                checkpoint_uri=self.checkpoint_path,
                worker=worker,
                attempt=self.attempt + 1,
                actor=worker,
                device=device,
            )
        else:
            self._started(
                worker=worker,
                attempt=self.attempt + 1,
                device=device,
                resumed_from_epoch=self.checkpoint_epoch if self.checkpoint_path else 0,
                train_size=train_size,
                val_size=val_size,
                actor=worker,
            )

    def complete_epoch(self, worker: str, attempt: int, metrics: Metrics, is_best: bool) -> None:
        """Idempotent within an attempt: a write retried after an outage records nothing new."""
        self.check_claim(worker, attempt)
        if int(metrics["epoch"]) <= self.attempt_epoch:
            return
        self._epoch_completed(
            epoch=int(metrics["epoch"]),
            total_epochs=self.total_epochs,
            metrics=metrics,
            is_best=is_best,
            actor=worker,
        )

    def save_checkpoint(self, worker: str, attempt: int, epoch: int, uri: str, sha256: str) -> None:
        """A checkpoint of `epoch` is durably at `uri` (idempotent)."""
        self.check_claim(worker, attempt)
        if (epoch, uri) == (self.checkpoint_epoch, self.checkpoint_path):
            return
        self._checkpoint_saved(epoch=epoch, uri=uri, sha256=sha256, actor=worker)

    def record_paused(self, worker: str, attempt: int, epoch: int, checkpoint_uri: str) -> None:
        """The trainer stopped for a pause; a cancel asked meanwhile has the last word."""
        self.check_claim(worker, attempt)
        if self.status == CANCELLING:
            self._cancelled(epoch=epoch, actor=worker)
        else:
            self._paused(epoch=epoch, checkpoint_uri=checkpoint_uri, actor=worker)

    def complete(
        self,
        worker: str,
        attempt: int,
        final_metrics: Metrics,
        best_epoch: int | None,
        best_val_loss: float | None,
        model_uri: str | None,
    ) -> None:
        """The run ended normally; `model_uri` is the final weights."""
        self.check_claim(worker, attempt)
        self._completed(
            final_metrics=final_metrics,
            best_epoch=best_epoch,
            best_val_loss=best_val_loss,
            model_uri=model_uri,
            actor=worker,
        )

    def fail(self, worker: str, attempt: int, error: str, error_type: str) -> None:
        """The run ended with an error."""
        self.check_claim(worker, attempt)
        self._failed(error=error, error_type=error_type, epoch=self.current_epoch, actor=worker)

    def preempt(
        self, worker: str, attempt: int, reason: str, epoch: int, step: int, checkpoint_uri: str
    ) -> None:
        """The trainer was stopped (SIGTERM: a deploy, a scale-in) and checkpointed at a step
        boundary: the job is queued again to resume from there, and this is not a lost
        worker (it never counts against `max_attempts`). A pause or cancel asked meanwhile
        wins, as it would have at that step."""
        self.check_claim(worker, attempt)
        if self.status == CANCELLING:
            self._cancelled(epoch=epoch, actor=worker)
        elif self.status == PAUSING:
            self._paused(epoch=epoch, checkpoint_uri=checkpoint_uri, actor=worker)
        else:
            self._preempted(
                reason=reason, epoch=epoch, step=step, checkpoint_uri=checkpoint_uri, actor=worker
            )

    def record_cancelled(self, worker: str, attempt: int, epoch: int) -> None:
        """The trainer stopped for a cancel."""
        self.check_claim(worker, attempt)
        self._cancelled(epoch=epoch, actor=worker)

    def lose_worker(self, attempt: int, actor: str) -> bool:
        """Record once that the trainer of `attempt` is gone; False if already handled."""
        if self.status not in ACTIVE_RUN or attempt != self.attempt:
            return False
        self._worker_lost(worker=self.worker or "", attempt=attempt, actor=actor)
        return True

    # Rules.

    def current_warnings(self) -> list[str]:
        """What a user should know before trusting the job's pace: the submit's warnings,
        and from the claim on, a job that asked for any accelerator but got a CPU."""
        found = list(self.warnings)
        asked = self.config.get("accelerator", "auto")
        if self.device and self.device.startswith("cpu") and asked != "cpu":
            found.append(f"running on {self.device}: its trainer has no GPU")
        return found

    def allowed_commands(self) -> list[str]:
        """The commands from people that would change this job now, for clients to offer."""
        return [name for name, statuses in COMMAND_STATUSES.items() if self.status in statuses]

    def check_claim(self, worker: str, attempt: int) -> None:
        """ClaimLostError unless `worker`'s `attempt` is the one running the job."""
        if self.status not in ACTIVE_RUN or (self.worker, self.attempt) != (worker, attempt):
            raise ClaimLostError(
                f"job {self.id} is not run by {worker} attempt {attempt}", self.status
            )

    def check_seeds(self, architecture: str, shapes: tuple[Shape, Shape] | None = None) -> None:
        """InitFromError unless this job completed with final weights of `architecture`,
        and, given `shapes` (the new job's inputs, then those this job trained on), of the
        same input shape: only then can its weights start the new job."""
        if self.status != COMPLETED or not self.model_path:
            raise InitFromError(
                f"job {self.id} is {self.status}: only a completed job's final weights can"
                " start another"
            )
        trained = self.config.get("model_architecture")
        if architecture != trained:
            raise InitFromError(
                f"job {self.id} trained a {trained}, not a {architecture}: use"
                f" model_architecture: {trained}"
            )
        if shapes is not None and shapes[0] != shapes[1]:
            raise InitFromError(
                f"job {self.id} trained on inputs of {list(shapes[1])} (receivers, n_mels,"
                f" frames), this job's are {list(shapes[0])}: they must be the same"
            )

    def _require(self, allowed: set[str] | frozenset[str], action: str) -> None:
        if self.status not in allowed:
            raise IllegalTransitionError(
                f"cannot {action} a job that is {self.status}", self.status
            )

    # Events: each body only applies a fact; the rules ran before it was triggered.

    @event("PauseRequested", topic=TOPIC + "PauseRequested")
    def _pause_requested(self, actor: str) -> None:
        self.status = PAUSING if self.status == RUNNING else PAUSED

    @event("ResumeRequested", topic=TOPIC + "ResumeRequested")
    def _resume_requested(self, actor: str) -> None:
        self.status, self.resume_pending = QUEUED, True

    @event("CancelRequested", topic=TOPIC + "CancelRequested")
    def _cancel_requested(self, actor: str) -> None:
        if self.status in ACTIVE_RUN:
            self.status = CANCELLING
        else:
            self.status, self.completed_at = CANCELLED, self.modified_on

    @event("Started", topic=TOPIC + "Started")
    def _started(
        self,
        worker: str,
        attempt: int,
        device: str,
        resumed_from_epoch: int,
        train_size: int,
        val_size: int,
        actor: str,
    ) -> None:
        self.status, self.worker, self.attempt = RUNNING, worker, attempt
        self.device = device
        self.started_at = self.started_at or self.modified_on
        self.attempt_epoch = resumed_from_epoch
        self.resume_pending = False

    @event("Resumed", topic=TOPIC + "Resumed")
    def _resumed(
        self,
        epoch: int,
        checkpoint_uri: str,
        worker: str,
        attempt: int,
        actor: str,
        device: str | None = None,
    ) -> None:
        self.status, self.worker, self.attempt = RUNNING, worker, attempt
        self.device = device or self.device
        self.resume_pending = False
        self.attempt_epoch = epoch

    @event("EpochCompleted", topic=TOPIC + "EpochCompleted")
    def _epoch_completed(
        self, epoch: int, total_epochs: int, metrics: Metrics, is_best: bool, actor: str
    ) -> None:
        self.current_epoch, self.last_metrics = epoch, metrics
        self.attempt_epoch = epoch
        if is_best:
            self.best_epoch, self.best_val_loss = epoch, metrics.get("val_loss")

    @event("CheckpointSaved", topic=TOPIC + "CheckpointSaved")
    def _checkpoint_saved(self, epoch: int, uri: str, sha256: str, actor: str) -> None:
        self.checkpoint_epoch, self.checkpoint_path = epoch, uri
        self.checkpoint_sha256 = sha256

    @event("Preempted", topic=TOPIC + "Preempted")
    def _preempted(
        self, reason: str, epoch: int, step: int, checkpoint_uri: str, actor: str
    ) -> None:
        self.status, self.worker, self.resume_pending = QUEUED, None, True
        self._use_checkpoint(epoch, checkpoint_uri)

    def _use_checkpoint(self, epoch: int, uri: str) -> None:
        """Resume from `uri` next; its digest is known if `CheckpointSaved` recorded it."""
        if uri != self.checkpoint_path:
            self.checkpoint_sha256 = None
        self.checkpoint_epoch, self.checkpoint_path = epoch, uri

    @event("Paused", topic=TOPIC + "Paused")
    def _paused(self, epoch: int, checkpoint_uri: str, actor: str) -> None:
        self.status, self.worker = PAUSED, None
        self._use_checkpoint(epoch, checkpoint_uri)

    @event("Completed", topic=TOPIC + "Completed")
    def _completed(
        self,
        final_metrics: Metrics,
        best_epoch: int | None,
        best_val_loss: float | None,
        model_uri: str | None,
        actor: str,
    ) -> None:
        self.status, self.completed_at, self.worker = COMPLETED, self.modified_on, None
        self.best_epoch, self.best_val_loss, self.model_path = best_epoch, best_val_loss, model_uri
        self.last_metrics = final_metrics or self.last_metrics

    @event("Failed", topic=TOPIC + "Failed")
    def _failed(self, error: str, error_type: str, epoch: int, actor: str) -> None:
        self.status, self.completed_at, self.worker = FAILED, self.modified_on, None
        self.error_message = f"{error_type}: {error}"

    @event("Cancelled", topic=TOPIC + "Cancelled")
    def _cancelled(self, epoch: int, actor: str) -> None:
        self.status, self.completed_at, self.worker = CANCELLED, self.modified_on, None

    @event("WorkerLost", topic=TOPIC + "WorkerLost")
    def _worker_lost(self, worker: str, attempt: int, actor: str) -> None:
        self.workers_lost += 1
        self.worker, self.resume_pending = None, False
        if self.status == CANCELLING:
            self.status, self.completed_at = CANCELLED, self.modified_on
        elif self.status == PAUSING:
            self.status = PAUSED
        elif self.workers_lost >= int(self.config.get("max_attempts", 3)):
            self.status, self.completed_at = FAILED, self.modified_on
            self.error_message = f"WorkerLost: {self.workers_lost} trainers lost"
        else:
            self.status = QUEUED

    @event("Archived", topic=TOPIC + "Archived")
    def _archived(self, actor: str) -> None:
        self.archived = True

    @event("Continued", topic=TOPIC + "Continued")
    def _continued(self, child_job_id: str, actor: str) -> None:
        """The link to the new job is the event itself (the history); no state changes."""


def _upcast_v1_v2(defaults: dict[str, Any]) -> Any:
    """An upcast that gives a version-1 state the fields version 2 added (eventsourcing
    calls `upcast_v1_v2(state)` on stored events and snapshots older than `class_version`)."""

    def upcast(state: dict[str, Any]) -> None:
        for name, value in defaults.items():
            state.setdefault(name, value)

    return staticmethod(upcast)


# Version 2 added the preflight's findings to `Submitted` and the device to `Resumed`.
_VERSION_2: dict[type, dict[str, Any]] = {
    TrainingJob: {"parameter_count": None, "warnings": [], "device": None},
    TrainingJob.Submitted: {"parameter_count": None, "warnings": None},  # type: ignore[attr-defined]
    TrainingJob.Resumed: {"device": None},  # type: ignore[attr-defined]
}
for _cls, _defaults in _VERSION_2.items():
    _cls.class_version = 2  # type: ignore[attr-defined]
    _cls.upcast_v1_v2 = _upcast_v1_v2(_defaults)  # type: ignore[attr-defined]


def _register_topics() -> None:
    """Pin the stored topics, so that any process can decode them and modules can move."""
    register_topic(TOPIC + "TrainingJob", TrainingJob)
    register_topic(TOPIC + "TrainingJob.Snapshot", TrainingJob.Snapshot)
    for member in vars(TrainingJob).values():
        pinned = getattr(member, "TOPIC", None)
        if isinstance(member, type) and isinstance(pinned, str):
            register_topic(pinned, member)


_register_topics()


def job_kind(event_topic_or_name: str) -> str:
    """`heimdall.training:EpochCompleted` or `EpochCompleted` → the event's name."""
    return event_topic_or_name.rsplit(":", 1)[-1].rsplit(".", 1)[-1]


def job_id_of(value: str) -> UUID | None:
    try:
        return UUID(value)
    except ValueError:
        return None
