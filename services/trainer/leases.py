"""Trainer leases: a heartbeat row per running job, so a dead trainer is noticed."""

from __future__ import annotations

import time
from dataclasses import dataclass

from shared.domainmodel import ACTIVE_RUN
from shared.readmodel.store import ReadStore


@dataclass(frozen=True)
class Lease:
    job_id: str
    worker: str
    attempt: int
    expires_at: float


class LeaseBook:
    """Leases live beside the read tables; they are operational state, not history."""

    def __init__(self, store: ReadStore, lease_seconds: float) -> None:
        self.store, self.lease_seconds = store, lease_seconds

    def renew(self, job_id: str, worker: str, attempt: int) -> None:
        """Take or extend the lease of `attempt`. A trainer of an older attempt (one that
        hung and woke up) never takes the lease back from the one that replaced it."""
        expires = time.time() + self.lease_seconds
        with self.store.transaction() as tx:
            tx.execute(
                "INSERT INTO trainer_leases (job_id, worker, attempt, expires_at)"
                " VALUES (?, ?, ?, ?) ON CONFLICT (job_id) DO UPDATE SET"
                " worker = excluded.worker, attempt = excluded.attempt,"
                " expires_at = excluded.expires_at"
                " WHERE trainer_leases.attempt <= excluded.attempt",
                [job_id, worker, attempt, expires],
            )

    def release(self, job_id: str, worker: str, attempt: int) -> None:
        with self.store.transaction() as tx:
            tx.execute(
                "DELETE FROM trainer_leases WHERE job_id = ? AND worker = ? AND attempt = ?",
                [job_id, worker, attempt],
            )

    def lapsed(self) -> list[str]:
        """Jobs the read tables show running whose lease is missing or expired."""
        placeholders = ", ".join("?" * len(ACTIVE_RUN))
        with self.store.transaction() as tx:
            rows = tx.fetchall(
                "SELECT j.id FROM training_jobs j LEFT JOIN trainer_leases l ON l.job_id = j.id"
                f" WHERE j.status IN ({placeholders})"
                " AND (l.expires_at IS NULL OR l.expires_at < ?)",
                [*sorted(ACTIVE_RUN), time.time()],
            )
        return [str(r["id"]) for r in rows]

    def holder(self, job_id: str) -> Lease | None:
        with self.store.transaction() as tx:
            rows = tx.fetchall("SELECT * FROM trainer_leases WHERE job_id = ?", [job_id])
        return Lease(**rows[0]) if rows else None
