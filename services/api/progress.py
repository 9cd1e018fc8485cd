"""The live-only part of a job's REST representation: its last step telemetry.

Step telemetry (`training.step`) is never stored, so it is no part of the read tables or
of replay. Each api replica keeps the last one it heard per job while the job runs, and
the job routes add it to the row as `progress` (`LiveProgress`). A stored event that ends
the run (pause, preemption, a lost trainer, an end) forgets it, and so does the status
the row shows: a job that is not running has no progress.
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from shared.bus import TELEMETRY_KEY, Envelope
from shared.domainmodel import ACTIVE_RUN
from shared.readmodel.shapes import LiveProgress

# More running jobs than this at once and the oldest report is forgotten first.
MAX_JOBS = 10_000
# Stored events after which an earlier report describes another attempt.
RUN_STARTS = frozenset({"Started", "Resumed"})


class ProgressBoard:
    """The last `LiveProgress` per running job, as this replica heard it on the bus."""

    def __init__(self, max_jobs: int = MAX_JOBS) -> None:
        self.max_jobs = max_jobs
        self._last: dict[str, dict[str, Any]] = {}

    def observe(self, envelope: Envelope) -> None:
        """Keep a step's telemetry; forget the job's when a stored event ends its run."""
        if envelope.routing_key != TELEMETRY_KEY:
            if envelope.status not in ACTIVE_RUN or envelope.kind in RUN_STARTS:
                self._last.pop(envelope.job_id, None)
            return
        try:
            report = LiveProgress(**envelope.data, reported_at=envelope.timestamp.isoformat())
        except ValidationError:  # a trainer of another version: no progress rather than junk
            return
        self._last.pop(envelope.job_id, None)  # re-inserted: the newest last
        self._last[envelope.job_id] = report.model_dump()
        while len(self._last) > self.max_jobs:
            self._last.pop(next(iter(self._last)))

    def of(self, job_id: str, status: str) -> dict[str, Any] | None:
        """The job's last report, or None when it is not running or none was heard."""
        return self._last.get(job_id) if status in ACTIVE_RUN else None
