"""The event-store application: one method per use case of a training job."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeVar
from uuid import NAMESPACE_URL, UUID, uuid4, uuid5

from eventsourcing.application import AggregateNotFoundError, Application
from eventsourcing.domain import DomainEventProtocol
from eventsourcing.persistence import IntegrityError, Notification

from shared.domainmodel import TrainingJob, job_kind
from shared.groupcommit import GroupCommit
from shared.settings import DEFAULT_SUBMIT_BATCH
from shared.store import JobNotifications

T = TypeVar("T")
MAX_CONFLICT_RETRIES = 20
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


class TrainingJobs(Application[UUID]):
    """Commands load the job, check the rule in the aggregate, record an event and save."""

    name = "TrainingJobs"
    snapshotting_intervals = {TrainingJob: 100}  # noqa: RUF012 (eventsourcing's own API)
    SUBMIT_BATCH = "SUBMIT_BATCH"  # the env key: new jobs per transaction at most

    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        super().__init__(env)
        batch = int(self.env.get(self.SUBMIT_BATCH) or DEFAULT_SUBMIT_BATCH)
        self.submits = GroupCommit(self.save, batch, name="submit-group-commit")

    def submit(
        self,
        job_name: str,
        description: str,
        config: dict[str, Any],
        actor: str,
        idempotency_key: str | None = None,
    ) -> TrainingJob:
        """A new queued job; the same idempotency key (per actor) never makes a second one."""
        if idempotency_key is None:
            job_id = uuid4()
        else:
            job_id = uuid5(_IDEMPOTENCY_NAMESPACE, f"{actor}\n{idempotency_key}")
            existing = self._find(job_id)
            if existing is not None:
                return self._same_request(existing, job_name, description, config)
        job = TrainingJob(
            id=job_id, job_name=job_name, description=description, config=config, actor=actor
        )
        try:
            self.submits.save(job)
        except IntegrityError:
            if idempotency_key is None:
                raise
            return self._same_request(self.get_job(job_id), job_name, description, config)
        return job

    def get_job(self, job_id: UUID) -> TrainingJob:
        job = self._find(job_id)
        if job is None:
            raise JobNotFoundError(f"job {job_id} not found")
        return job

    def pause(self, job_id: UUID, actor: str) -> TrainingJob:
        return self.change(job_id, lambda job: job.request_pause(actor))

    def resume(self, job_id: UUID, actor: str) -> TrainingJob:
        return self.change(job_id, lambda job: job.request_resume(actor))

    def cancel(self, job_id: UUID, actor: str) -> TrainingJob:
        return self.change(job_id, lambda job: job.request_cancel(actor))

    def archive(self, job_id: UUID, actor: str) -> TrainingJob:
        return self.change(job_id, lambda job: job.archive(actor))

    def change(self, job_id: UUID, command: Callable[[TrainingJob], object]) -> TrainingJob:
        """Apply a command and save; on a concurrent write, reload and apply it again."""
        for _ in range(MAX_CONFLICT_RETRIES):
            job = self.get_job(job_id)
            command(job)
            try:
                self.save(job)
            except IntegrityError:
                continue
            return job
        raise IntegrityError(f"job {job_id}: gave up after {MAX_CONFLICT_RETRIES} conflicts")

    def history(self, job_id: UUID, after: int = 0, limit: int = 1000) -> list[StoredJobEvent]:
        """The job's events with their store positions, oldest first."""
        self.get_job(job_id)
        recorder = self.recorder
        assert isinstance(recorder, JobNotifications)
        return [self.decode(n) for n in recorder.select_stream_notifications(job_id, after, limit)]

    def feed(self, after: int = 0, limit: int = 100) -> list[StoredJobEvent]:
        """Every job's events after a position, in store order."""
        found = self.recorder.select_notifications(after, limit, inclusive_of_start=False)
        return [self.decode(n) for n in found]

    def decode(self, notification: Notification) -> StoredJobEvent:
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
        )

    def _find(self, job_id: UUID) -> TrainingJob | None:
        try:
            job: object = self.repository.get(job_id)
        except AggregateNotFoundError:
            return None
        assert isinstance(job, TrainingJob)
        return job

    @staticmethod
    def _same_request(
        job: TrainingJob, job_name: str, description: str, config: dict[str, Any]
    ) -> TrainingJob:
        if (job.job_name, job.description, job.config) != (job_name, description, config):
            raise IdempotencyConflictError("Idempotency-Key was already used for another job")
        return job


def event_data(domain_event: DomainEventProtocol[UUID]) -> dict[str, Any]:
    """The event's own payload, without the fields every event carries."""
    fields = vars(domain_event)
    return {k: v for k, v in fields.items() if k not in _ENVELOPE_FIELDS and k != "actor"}
