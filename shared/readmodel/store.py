"""The read store: the same queries over SQLite or PostgreSQL (`?` placeholders)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any, Protocol

from shared.readmodel.schema import (
    DDL,
    READ_DDL,
    READ_SHAPE,
    READ_TABLES,
)

Row = dict[str, Any]


class Tx(Protocol):
    """One open transaction: statements use `?` placeholders on every backend."""

    def execute(self, sql: str, params: Sequence[Any] = ()) -> int: ...

    def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None: ...

    def fetchall(self, sql: str, params: Sequence[Any] = ()) -> list[Row]: ...

    def upsert_many(
        self, table: str, columns: Sequence[str], key: Sequence[str], rows: Sequence[Row]
    ) -> None:
        """Insert or update rows (dicts keyed by `columns`); a later row with the same key
        wins, as with one upsert after another."""
        ...


def rows_of(columns: Sequence[str], rows: Sequence[Row]) -> list[list[Any]]:
    """Each row's values in the order of `columns`."""
    return [[row[c] for c in columns] for row in rows]


def last_per_key(key: Sequence[str], rows: Sequence[Row]) -> list[Row]:
    """The rows in order, only the last of each key kept."""
    return list({tuple(row[k] for k in key): row for row in rows}.values())


class ReadStore(ABC):
    """Rows for queries; positions and rows written in one transaction by the projector."""

    # The database's own clock in seconds since the epoch, as SQL: every host that compares
    # times (leases) reads this one clock, never its own.
    NOW_SQL = "0"
    # Where a committed move of the projected position is announced (PostgreSQL's LISTEN
    # channel), or None where nothing announces it (SQLite: the projector runs in the api).
    projected_channel: str | None = None

    @abstractmethod
    @contextmanager
    def transaction(self) -> Iterator[Tx]:
        """A transaction committed on success and rolled back on error."""

    @contextmanager
    def reading(self) -> Iterator[Tx]:
        """Reads only: no write lock, and on PostgreSQL no BEGIN and COMMIT round trips
        (each statement sees the latest commit). Here, a transaction."""
        with self.transaction() as tx:
            yield tx

    @abstractmethod
    def close(self) -> None: ...

    def create_tables(self) -> None:
        """Create what is missing. Read tables of another shape (a field was added to
        `shared/readmodel/shapes.py`) are dropped and the projected position reset, so the
        projector rebuilds them from the store; the published position is kept."""
        with self.transaction() as tx:
            for statement in DDL[len(READ_DDL) :]:
                tx.execute(statement)
            found = tx.fetchall("SELECT digest FROM read_shape WHERE name = 'read'")
            if not found or found[0]["digest"] != READ_SHAPE:
                for table in READ_TABLES:
                    tx.execute(f"DROP TABLE IF EXISTS {table}")
                tx.execute("UPDATE projector_positions SET position = 0 WHERE name = 'projected'")
                tx.execute(
                    "INSERT INTO read_shape VALUES ('read', ?)"
                    " ON CONFLICT (name) DO UPDATE SET digest = excluded.digest",
                    [READ_SHAPE],
                )
            for statement in READ_DDL:
                tx.execute(statement)

    def list_jobs(
        self, status: str | None, limit: int, offset: int, include_archived: bool
    ) -> tuple[list[Row], int]:
        where, params = ["1 = 1"], []
        if status:
            where.append("status = ?")
            params.append(status)
        if not include_archived:
            where.append("archived = 0")
        clause = " AND ".join(where)
        with self.reading() as tx:
            total = tx.fetchall(f"SELECT COUNT(*) AS n FROM training_jobs WHERE {clause}", params)
            rows = tx.fetchall(
                f"SELECT * FROM training_jobs WHERE {clause}"
                " ORDER BY created_at DESC, id DESC LIMIT ? OFFSET ?",
                [*params, limit, offset],
            )
        return rows, int(total[0]["n"])

    def get_job(self, job_id: str) -> Row | None:
        with self.reading() as tx:
            rows = tx.fetchall("SELECT * FROM training_jobs WHERE id = ?", [job_id])
        return rows[0] if rows else None

    def runnable_jobs(self, updated_before: str, limit: int = 1000) -> list[Row]:
        """Queued jobs whose last event is older than `updated_before` (ISO-8601 UTC),
        oldest first: what the projector's sweep checks against the work queues."""
        with self.reading() as tx:
            return tx.fetchall(
                "SELECT * FROM training_jobs WHERE status = 'queued' AND updated_at < ?"
                " ORDER BY created_at, id LIMIT ?",
                [updated_before, limit],
            )

    def metrics(self, job_id: str, limit: int | None = None, latest: bool = False) -> list[Row]:
        """Per-epoch rows ascending; with `latest`, the last `limit` of them."""
        sql, params = _metrics_query(job_id, limit, "DESC" if latest else "ASC")
        with self.reading() as tx:
            rows = tx.fetchall(sql, params)
        return rows[::-1] if latest else rows

    def job_metrics(self, job_id: str, limit: int | None = None) -> list[Row] | None:
        """A job's per-epoch rows ascending; None if no such job row."""
        sql, params = _metrics_query(job_id, limit, "ASC")
        with self.reading() as tx:
            if not tx.fetchall("SELECT 1 AS found FROM training_jobs WHERE id = ?", [job_id]):
                return None
            return tx.fetchall(sql, params)

    def count_by_status(self) -> dict[str, int]:
        """How many jobs the read table holds in each status (archived ones included)."""
        with self.reading() as tx:
            rows = tx.fetchall("SELECT status, COUNT(*) AS n FROM training_jobs GROUP BY status")
        return {str(r["status"]): int(r["n"]) for r in rows}

    def announce_projected(self, tx: Tx, position: int) -> None:
        """Tell `projected_channel`'s listeners, when `tx` commits, that the read tables
        hold `position`. Nothing to do without a channel."""
        return None

    def positions(self) -> dict[str, int]:
        with self.reading() as tx:
            rows = tx.fetchall("SELECT name, position FROM projector_positions")
        return {str(r["name"]): int(r["position"]) for r in rows}

    def record_fault(self, stage: str, position: int, error: str) -> None:
        """The projector cannot get past `position` (`stage`: projecting or publishing):
        kept until it does, counting the attempts, for /health and /metrics."""
        with self.transaction() as tx:
            tx.execute(
                "INSERT INTO projector_faults VALUES (?, ?, ?, ?, 1) ON CONFLICT (stage) DO"
                " UPDATE SET error = excluded.error, attempts = CASE WHEN"
                " projector_faults.position = excluded.position THEN projector_faults.attempts"
                " + 1 ELSE 1 END, since = CASE WHEN projector_faults.position ="
                " excluded.position THEN projector_faults.since ELSE excluded.since END,"
                " position = excluded.position",
                [stage, position, error[:2000], datetime.now(UTC).isoformat()],
            )

    def clear_fault(self, stage: str) -> None:
        with self.transaction() as tx:
            tx.execute("DELETE FROM projector_faults WHERE stage = ?", [stage])

    def faults(self) -> list[Row]:
        """What the projector is stuck on: stage, position, error, since, attempts."""
        with self.reading() as tx:
            return tx.fetchall("SELECT * FROM projector_faults ORDER BY stage")

    def record_published(self, position: int) -> None:
        with self.transaction() as tx:
            tx.execute(
                "UPDATE projector_positions SET position = ? WHERE name = 'published'"
                " AND position < ?",
                [position, position],
            )

    def snapshot(self) -> tuple[int, list[Row], list[Row]]:
        """The projected position with every job and metric row, read at one moment."""
        with self.transaction() as tx:
            pos = tx.fetchall("SELECT position FROM projector_positions WHERE name = 'projected'")
            jobs = tx.fetchall("SELECT * FROM training_jobs ORDER BY id")
            metrics = tx.fetchall("SELECT * FROM training_metrics ORDER BY job_id, epoch")
        return int(pos[0]["position"]), jobs, metrics


def _metrics_query(job_id: str, limit: int | None, order: str) -> tuple[str, list[Any]]:
    sql = f"SELECT * FROM training_metrics WHERE job_id = ? ORDER BY epoch {order}"
    params: list[Any] = [job_id]
    if limit is not None:
        sql += " LIMIT ?"
        params.append(limit)
    return sql, params
