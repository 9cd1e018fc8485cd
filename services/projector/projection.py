"""The projection: each stored event into the read tables, with its position, exactly once."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any
from uuid import UUID

from eventsourcing.persistence import Notification

from shared.application import JobFold, TrainingJobs
from shared.domainmodel import TrainingJob
from shared.readmodel.schema import JOB_COLUMNS, METRIC_COLUMNS
from shared.readmodel.store import ReadStore
from shared.views import Row, job_row, metric_row

# The one event that adds a metrics row (eventsourcing makes the class from `@event`).
EPOCH_COMPLETED: type = TrainingJob.EpochCompleted  # type: ignore[attr-defined]


class JobsProjection:
    """Rebuilds each job's state by applying its events in order, as the aggregate does."""

    def __init__(self, app: TrainingJobs, store: ReadStore) -> None:
        self.app, self.store = app, store
        self.fold = JobFold(app)

    def process(self, notification: Notification) -> bool:
        """Apply one notification; False if its position was already projected."""
        return self.process_batch([notification]) > 0

    def process_batch(self, notifications: Sequence[Notification]) -> int:
        """Apply consecutive notifications in one transaction, each job's row written once
        (its state after the batch); 0 if the first was already projected."""
        if not notifications:
            return 0
        jobs: dict[UUID, tuple[TrainingJob, int]] = {}
        metrics: list[Row] = []
        for notification in notifications:
            job, metric = self._apply(notification)
            jobs[job.id] = job, notification.id
            metrics += [metric] if metric is not None else []
        first, last = notifications[0].id, notifications[-1].id
        rows = [job_row(*jp) for jp in jobs.values()]
        with self.store.transaction() as tx:
            moved = tx.execute(
                "UPDATE projector_positions SET position = ? WHERE name = 'projected'"
                " AND position < ?",
                [last, first],
            )
            if not moved:
                return 0
            self.store.announce_projected(tx, last)
            tx.upsert_many("training_jobs", JOB_COLUMNS, ("id",), rows)
            tx.upsert_many("training_metrics", METRIC_COLUMNS, ("job_id", "epoch"), metrics)
        return len(notifications)

    def _apply(self, notification: Notification) -> tuple[TrainingJob, Row | None]:
        """The job after this event, and the event's metrics row if it has one."""
        domain_event = self.app.mapper.to_domain_event(notification)
        assert isinstance(domain_event, TrainingJob.Event)
        job = self.fold.after(domain_event)
        if not isinstance(domain_event, EPOCH_COMPLETED):
            return job, None
        metrics: dict[str, Any] = vars(domain_event)["metrics"]
        return job, metric_row(str(job.id), metrics, domain_event.timestamp, notification.id)
