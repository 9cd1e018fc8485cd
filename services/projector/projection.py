"""The projection: each stored event into the read tables, with its position, exactly once."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from uuid import UUID

from eventsourcing.persistence import Notification

from shared.application import TrainingJobs
from shared.domainmodel import TrainingJob
from shared.readmodel.schema import JOB_COLUMNS, METRIC_COLUMNS
from shared.readmodel.store import UPSERT_JOB, UPSERT_METRIC, ReadStore
from shared.views import Row, job_row, metric_row

CACHE_SIZE = 1000


class JobsProjection:
    """Rebuilds each job's state by applying its events in order, as the aggregate does."""

    def __init__(self, app: TrainingJobs, store: ReadStore) -> None:
        self.app, self.store = app, store
        self._jobs: OrderedDict[UUID, TrainingJob] = OrderedDict()

    def process(self, notification: Notification) -> bool:
        """Apply one notification; False if its position was already projected."""
        job, metric = self._apply(notification)
        with self.store.transaction() as tx:
            moved = tx.execute(
                "UPDATE projector_positions SET position = ? WHERE name = 'projected'"
                " AND position < ?",
                [notification.id, notification.id],
            )
            if not moved:
                return False
            tx.execute(UPSERT_JOB, list(job_row(job, notification.id).values()))
            if metric is not None:
                tx.execute(UPSERT_METRIC, list(metric.values()))
        return True

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
            tx.upsert_many("training_jobs", JOB_COLUMNS, ("id",), rows)
            tx.upsert_many("training_metrics", METRIC_COLUMNS, ("job_id", "epoch"), metrics)
        return len(notifications)

    def _apply(self, notification: Notification) -> tuple[TrainingJob, Row | None]:
        """The job after this event (cached: a version check catches a rolled-back one),
        and the event's metrics row if it has one."""
        domain_event = self.app.mapper.to_domain_event(notification)
        assert isinstance(domain_event, TrainingJob.Event)
        job = self._job_before(domain_event.originator_id, domain_event.originator_version)
        mutated = domain_event.mutate(job)
        assert isinstance(mutated, TrainingJob)
        self._remember(mutated)
        metrics = getattr(domain_event, "metrics", None)
        if metrics is None:
            return mutated, None
        return mutated, metric_row(
            str(mutated.id), metrics, domain_event.timestamp, notification.id
        )

    def _job_before(self, job_id: UUID, version: int) -> TrainingJob | None:
        """The job as it was just before this event (from the cache or the store)."""
        if version == TrainingJob.INITIAL_VERSION:
            return None
        cached = self._jobs.get(job_id)
        if cached is not None and cached.version == version - 1:
            return cached
        job: object = self.app.repository.get(job_id, version=version - 1)
        assert isinstance(job, TrainingJob)
        return job

    def _remember(self, job: TrainingJob) -> None:
        self._jobs[job.id] = job
        self._jobs.move_to_end(job.id)
        while len(self._jobs) > CACHE_SIZE:
            self._jobs.popitem(last=False)
