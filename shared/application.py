"""The event-store application: one method per use case of a training job."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeVar
from uuid import NAMESPACE_URL, UUID, uuid4, uuid5

from eventsourcing.application import AggregateNotFoundError, Application
from eventsourcing.domain import DomainEventProtocol
from eventsourcing.persistence import IntegrityError, Notification, Recording

from shared.domainmodel import InitFromError, Metrics, TrainingJob, job_id_of, job_kind
from shared.groupcommit import GroupCommit
from shared.settings import DEFAULT_SUBMIT_BATCH
from shared.store import JobNotifications

T = TypeVar("T")
MAX_CONFLICT_RETRIES = 20
FOLD_CACHE_SIZE = 1000
_IDEMPOTENCY_NAMESPACE = uuid5(NAMESPACE_URL, "heimdall-training/idempotency-key")
_ENVELOPE_FIELDS = ("originator_id", "originator_version", "timestamp", "originator_topic", "id")


class JobNotFoundError(LookupError):
    """No job has this id."""


class IdempotencyConflictError(ValueError):
    """An Idempotency-Key was reused with a different request."""


@dataclass(frozen=True)
class StoredJobEvent:
    """One event of a job's stream with its position in the store, as clients see it."""

    position: int
    job_id: UUID
    version: int
    kind: str
    timestamp: datetime
    actor: str
    data: dict[str, Any]
    status: str  # the job's status after this event, as the aggregate computed it


@dataclass(frozen=True)
class Accepted:
    """A command's outcome: the job after it, and the store position of the command's last
    event (for a command that recorded nothing new, the store's head when it ran)."""

    job: TrainingJob
    position: int


class JobFold:
    """Each job's state after each of its events, folded in stream order.

    Keeps the last state of up to `size` jobs, so following the store in order costs one
    `mutate` per event; an event out of that order loads the job as it was just before
    (a version check also catches a cached state whose event was rolled back). Owned by
    one reader (the projection, or the application's decoder), and thread-safe.
    """

    def __init__(self, app: Application[UUID], size: int = FOLD_CACHE_SIZE) -> None:
        self.app, self.size = app, size
        self._jobs: OrderedDict[UUID, TrainingJob] = OrderedDict()
        self._lock = threading.Lock()

    def after(self, domain_event: TrainingJob.Event) -> TrainingJob:
        """The job after `domain_event`; the returned object is the fold's own: read it
        before folding that job's next event."""
        job_id, version = domain_event.originator_id, domain_event.originator_version
        with self._lock:
            job = self._jobs.get(job_id)
            if job is None or job.version != version - 1:
                job = self._before(job_id, version)
            mutated = domain_event.mutate(job)
            assert isinstance(mutated, TrainingJob)
            self._jobs[job_id] = mutated
            self._jobs.move_to_end(job_id)
            while len(self._jobs) > self.size:
                self._jobs.popitem(last=False)
            return mutated

    def _before(self, job_id: UUID, version: int) -> TrainingJob | None:
        if version == TrainingJob.INITIAL_VERSION:
            return None
        job: object = self.app.repository.get(job_id, version=version - 1)
        assert isinstance(job, TrainingJob)
        return job


class TrainingJobs(Application[UUID]):
    """Commands load the job, check the rule in the aggregate, record an event and save."""

    name = "TrainingJobs"
    snapshotting_intervals = {TrainingJob: 100}  # noqa: RUF012 (eventsourcing's own API)
    SUBMIT_BATCH = "SUBMIT_BATCH"  # the env key: new jobs per transaction at most

    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        super().__init__(env)
        batch = int(self.env.get(self.SUBMIT_BATCH) or DEFAULT_SUBMIT_BATCH)
        self.saved_hooks: list[Callable[[int], None]] = []
        self.submits = GroupCommit(self.save, batch, name="submit-group-commit")
        self.fold = JobFold(self)

    def submit(
        self,
        job_name: str,
        description: str,
        config: dict[str, Any],
        actor: str,
        idempotency_key: str | None = None,
        parameter_count: int | None = None,
        warnings: list[str] | None = None,
    ) -> Accepted:
        """A new queued job; the same idempotency key (per actor) never makes a second one.
        A config with `init_from` also records `Continued` on the job it names, in the same
        transaction (InitFromError when that job cannot start this one). `parameter_count`
        and `warnings` are the preflight's findings, stored with the job's `Submitted`."""
        if idempotency_key is None:
            job_id = uuid4()
        else:
            job_id = uuid5(_IDEMPOTENCY_NAMESPACE, f"{actor}\n{idempotency_key}")
            existing = self._find(job_id)
            if existing is not None:
                return self._same_request(existing, job_name, description, config)
        fields: dict[str, Any] = {
            "job_name": job_name,
            "description": description,
            "config": config,
            "parameter_count": parameter_count,
            "warnings": list(warnings or []),
        }
        try:
            if config.get("init_from"):
                return self._continuation(job_id, fields, actor)
            job = TrainingJob(id=job_id, actor=actor, **fields)
            return Accepted(job, self.submits.save(job))
        except IntegrityError:
            if idempotency_key is None:
                raise
            return self._same_request(self.get_job(job_id), job_name, description, config)

    def parent_of(self, init_from: str) -> TrainingJob:
        """The job an `init_from` names; InitFromError when there is no such job."""
        job = self._find(job_id) if (job_id := job_id_of(init_from)) else None
        if job is None:
            raise InitFromError(f"job {init_from} not found")
        return job

    def _continuation(self, job_id: UUID, fields: dict[str, Any], actor: str) -> Accepted:
        """The new job and its parent's `Continued`, saved together outside the group commit
        (which saves one aggregate per caller); a concurrent write to the parent (another
        continuation) makes it load the parent and try again."""
        for _ in range(MAX_CONFLICT_RETRIES):
            parent = self.parent_of(str(fields["config"]["init_from"]))
            child = TrainingJob(id=job_id, actor=actor, **fields)
            parent.continue_into(job_id, str(fields["config"].get("model_architecture")), actor)
            try:
                return Accepted(child, last_position(self.save(child, parent)))
            except IntegrityError:
                if self._find(job_id) is not None:  # the same idempotency key, concurrently
                    raise
        raise IntegrityError(f"job {job_id}: gave up after {MAX_CONFLICT_RETRIES} conflicts")

    def get_job(self, job_id: UUID) -> TrainingJob:
        job = self._find(job_id)
        if job is None:
            raise JobNotFoundError(f"job {job_id} not found")
        return job

    # People's commands (the api): each returns the job and its position.

    def pause(self, job_id: UUID, actor: str) -> Accepted:
        return self.command(job_id, lambda job: job.request_pause(actor))

    def resume(self, job_id: UUID, actor: str) -> Accepted:
        return self.command(job_id, lambda job: job.request_resume(actor))

    def cancel(self, job_id: UUID, actor: str) -> Accepted:
        return self.command(job_id, lambda job: job.request_cancel(actor))

    def archive(self, job_id: UUID, actor: str) -> Accepted:
        return self.command(job_id, lambda job: job.archive(actor))

    def delete(self, job_id: UUID, actor: str) -> Accepted:
        """DELETE: cancel an active job, archive a finished one (the aggregate decides)."""
        return self.command(job_id, lambda job: job.delete(actor))

    # Trainers' facts: the aggregate checks that the trainer still holds the job.

    def claim(
        self, job_id: UUID, worker: str, device: str, train_size: int, val_size: int
    ) -> TrainingJob:
        """Take a queued job (`Started`, or `Resumed` after a pause); IllegalTransitionError
        if it is not queued any more (another trainer won)."""
        return self.change(job_id, lambda job: job.claim(worker, device, train_size, val_size))

    def record_epoch(
        self,
        job_id: UUID,
        worker: str,
        attempt: int,
        metrics: Metrics,
        is_best: bool,
        checkpoint: tuple[int, str, str] | None = None,
    ) -> TrainingJob:
        """`EpochCompleted` and, given `(epoch, uri, sha256)` of the checkpoint file already
        written, its `CheckpointSaved`, in one transaction: no epoch without its checkpoint."""

        def record(job: TrainingJob) -> None:
            job.complete_epoch(worker, attempt, metrics, is_best)
            if checkpoint is not None:
                job.save_checkpoint(worker, attempt, *checkpoint)

        return self.change(job_id, record)

    def record_checkpoint(
        self, job_id: UUID, worker: str, attempt: int, epoch: int, uri: str, sha256: str
    ) -> TrainingJob:
        return self.change(
            job_id, lambda job: job.save_checkpoint(worker, attempt, epoch, uri, sha256)
        )

    def record_paused(
        self, job_id: UUID, worker: str, attempt: int, epoch: int, checkpoint_uri: str
    ) -> TrainingJob:
        return self.change(
            job_id, lambda job: job.record_paused(worker, attempt, epoch, checkpoint_uri)
        )

    def preempt(
        self,
        job_id: UUID,
        worker: str,
        attempt: int,
        reason: str,
        epoch: int,
        step: int,
        checkpoint_uri: str,
    ) -> TrainingJob:
        """The trainer stopped on request and hands the job back (`Preempted`)."""
        return self.change(
            job_id, lambda job: job.preempt(worker, attempt, reason, epoch, step, checkpoint_uri)
        )

    def record_cancelled(self, job_id: UUID, worker: str, attempt: int, epoch: int) -> TrainingJob:
        return self.change(job_id, lambda job: job.record_cancelled(worker, attempt, epoch))

    def complete(
        self,
        job_id: UUID,
        worker: str,
        attempt: int,
        final_metrics: Metrics,
        best_epoch: int | None,
        best_val_loss: float | None,
        model_uri: str | None,
    ) -> TrainingJob:
        return self.change(
            job_id,
            lambda job: job.complete(
                worker, attempt, final_metrics, best_epoch, best_val_loss, model_uri
            ),
        )

    def fail(
        self,
        job_id: UUID,
        worker: str,
        attempt: int,
        error: str,
        error_type: str,
        claim_first: bool = False,
    ) -> TrainingJob:
        """Record the run's failure; with `claim_first`, a job that failed before its run
        could start is claimed and failed in one save."""

        def failed(job: TrainingJob) -> None:
            if claim_first:
                job.claim(worker, "none", 0, 0)
            job.fail(worker, attempt, error, error_type)

        return self.change(job_id, failed)

    def lose_worker(self, job_id: UUID, attempt: int, actor: str) -> TrainingJob:
        """Record once that `attempt`'s trainer is gone (its lease lapsed)."""
        return self.change(job_id, lambda job: job.lose_worker(attempt, actor))

    def change(self, job_id: UUID, command: Callable[[TrainingJob], object]) -> TrainingJob:
        """Apply a command and save; on a concurrent write, reload and apply it again."""
        return self.command(job_id, command).job

    def command(self, job_id: UUID, command: Callable[[TrainingJob], object]) -> Accepted:
        """`change`, also saying where in the store the command's effect is."""
        for _ in range(MAX_CONFLICT_RETRIES):
            job = self.get_job(job_id)
            command(job)
            try:
                recordings = self.save(job)
            except IntegrityError:
                continue
            return Accepted(
                job, last_position(recordings) or self.recorder.max_notification_id() or 0
            )
        raise IntegrityError(f"job {job_id}: gave up after {MAX_CONFLICT_RETRIES} conflicts")

    def save(self, *objs: Any, **kwargs: Any) -> list[Recording[UUID]]:
        """eventsourcing's save; then each of `saved_hooks` hears the last position (the
        embedded projector wakes at once instead of at its next poll)."""
        recordings = super().save(*objs, **kwargs)
        position = last_position(recordings)
        if position:
            for hook in self.saved_hooks:
                hook(position)
        return recordings

    def history(self, job_id: UUID, after: int = 0, limit: int = 1000) -> list[StoredJobEvent]:
        """The job's events with their store positions, oldest first."""
        self.get_job(job_id)
        recorder = self.recorder
        assert isinstance(recorder, JobNotifications)
        return self.decode_all(recorder.select_stream_notifications(job_id, after, limit))

    def feed(self, after: int = 0, limit: int = 100) -> list[StoredJobEvent]:
        """Every job's events after a position, in store order."""
        found = self.recorder.select_notifications(after, limit, inclusive_of_start=False)
        return self.decode_all(found)

    def decode_all(self, notifications: Sequence[Notification]) -> list[StoredJobEvent]:
        return [self.decode(n) for n in notifications]

    def decode(self, notification: Notification) -> StoredJobEvent:
        """One stored event as clients see it, with the job's status after it."""
        domain_event = self.mapper.to_domain_event(notification)
        assert isinstance(domain_event, TrainingJob.Event)
        return StoredJobEvent(
            position=notification.id,
            job_id=domain_event.originator_id,
            version=domain_event.originator_version,
            kind=job_kind(notification.topic),
            timestamp=domain_event.timestamp,
            actor=str(getattr(domain_event, "actor", "")),
            data=event_data(domain_event),
            status=self.fold.after(domain_event).status,
        )

    def _find(self, job_id: UUID) -> TrainingJob | None:
        try:
            job: object = self.repository.get(job_id)
        except AggregateNotFoundError:
            return None
        assert isinstance(job, TrainingJob)
        return job

    def _same_request(
        self, job: TrainingJob, job_name: str, description: str, config: dict[str, Any]
    ) -> Accepted:
        if (job.job_name, job.description, job.config) != (job_name, description, config):
            raise IdempotencyConflictError("Idempotency-Key was already used for another job")
        return Accepted(job, self.recorder.max_notification_id() or 0)


def event_data(domain_event: DomainEventProtocol[UUID]) -> dict[str, Any]:
    """The event's own payload, without the fields every event carries."""
    fields = vars(domain_event)
    return {k: v for k, v in fields.items() if k not in _ENVELOPE_FIELDS and k != "actor"}


def last_position(recordings: Sequence[Recording[UUID]]) -> int:
    """The highest store position among `recordings` (0 when there are none)."""
    return max((r.notification.id for r in recordings), default=0)
