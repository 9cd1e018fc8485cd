"""Trainer leases: a heartbeat row per running job, so a dead trainer is noticed.

Expiry is judged by the database's clock alone (`ReadStore.NOW_SQL`), so trainers on hosts
whose clocks disagree never see each other's healthy leases as lapsed."""

from __future__ import annotations

from dataclasses import dataclass

from shared.domainmodel import ACTIVE_RUN, QUEUED
from shared.readmodel.store import ReadStore


@dataclass(frozen=True)
class Lease:
    job_id: str
    worker: str
    attempt: int
    expires_at: float  # seconds since the epoch, by the database's clock
    expired: bool


LEASES_DDL = """CREATE TABLE IF NOT EXISTS trainer_leases (
    job_id TEXT PRIMARY KEY, worker TEXT NOT NULL, attempt INTEGER NOT NULL,
    expires_at DOUBLE PRECISION NOT NULL)"""


class LeaseBook:
    """Leases live beside the read tables (made by the first trainer that keeps one);
    they are operational state, not history, so replay neither reads nor rebuilds them."""

    def __init__(self, store: ReadStore, lease_seconds: float) -> None:
        self.store, self.lease_seconds = store, lease_seconds
        with store.transaction() as tx:
            tx.execute(LEASES_DDL)

    def queued_job_ids(self, limit: int = 20) -> list[str]:
        """Runnable jobs of the read table, oldest first (`Trainer.run_next`)."""
        with self.store.reading() as tx:
            rows = tx.fetchall(
                "SELECT id FROM training_jobs WHERE status = ? ORDER BY created_at, id LIMIT ?",
                [QUEUED, limit],
            )
        return [str(r["id"]) for r in rows]

    def renew(self, job_id: str, worker: str, attempt: int) -> None:
        """Take or extend the lease of `attempt`. A trainer of an older attempt (one that
        hung and woke up) never takes the lease back from the one that replaced it."""
        with self.store.transaction() as tx:
            tx.execute(
                "INSERT INTO trainer_leases (job_id, worker, attempt, expires_at)"
                f" VALUES (?, ?, ?, {self.store.NOW_SQL} + ?) ON CONFLICT (job_id) DO UPDATE SET"
                " worker = excluded.worker, attempt = excluded.attempt,"
                " expires_at = excluded.expires_at"
                " WHERE trainer_leases.attempt <= excluded.attempt",
                [job_id, worker, attempt, self.lease_seconds],
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
                f" AND (l.expires_at IS NULL OR l.expires_at < {self.store.NOW_SQL})",
                sorted(ACTIVE_RUN),
            )
        return [str(r["id"]) for r in rows]

    def holder(self, job_id: str) -> Lease | None:
        with self.store.transaction() as tx:
            rows = tx.fetchall(
                "SELECT job_id, worker, attempt, expires_at,"
                f" CASE WHEN expires_at < {self.store.NOW_SQL} THEN 1 ELSE 0 END AS expired"
                " FROM trainer_leases WHERE job_id = ?",
                [job_id],
            )
        if not rows:
            return None
        return Lease(**{**rows[0], "expired": bool(rows[0]["expired"])})
