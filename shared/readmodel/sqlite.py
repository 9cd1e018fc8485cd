"""The read store in a SQLite file (the embedded default)."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from shared.readmodel.schema import upsert
from shared.readmodel.store import ReadStore, Row, Tx, rows_of

# How long a transaction waits for another writer's lock before "database is locked".
LOCK_WAIT_SECONDS = 5.0


class _SQLiteTx:
    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        return self.conn.execute(sql, params).rowcount

    def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        self.conn.executemany(sql, rows)

    def fetchall(self, sql: str, params: Sequence[Any] = ()) -> list[Row]:
        return [dict(row) for row in self.conn.execute(sql, params).fetchall()]

    def upsert_many(
        self, table: str, columns: Sequence[str], key: Sequence[str], rows: Sequence[Row]
    ) -> None:
        statement = upsert(table, tuple(columns), tuple(key))
        self.conn.executemany(statement, rows_of(columns, rows))


class SQLiteReadStore(ReadStore):
    NOW_SQL = "((julianday('now') - 2440587.5) * 86400.0)"

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        with self._connect() as conn:
            conn.execute("PRAGMA journal_mode=WAL")

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, timeout=LOCK_WAIT_SECONDS, isolation_level=None)
        conn.row_factory = sqlite3.Row
        conn.execute(f"PRAGMA busy_timeout = {int(LOCK_WAIT_SECONDS * 1000)}")
        return conn

    @contextmanager
    def reading(self) -> Iterator[Tx]:
        """A deferred transaction: in WAL mode a consistent snapshot that neither waits for
        nor blocks a writer (`transaction()` takes the write lock at once)."""
        conn = self._connect()
        try:
            conn.execute("BEGIN DEFERRED")
            yield _SQLiteTx(conn)
            conn.execute("COMMIT")
        finally:
            conn.close()

    @contextmanager
    def transaction(self) -> Iterator[Tx]:
        """A write transaction; "database is locked" after `LOCK_WAIT_SECONDS` of waiting
        for another writer (the api answers that with 503)."""
        conn = self._connect()
        try:
            conn.execute("BEGIN IMMEDIATE")
        except BaseException:
            conn.close()
            raise
        try:
            yield _SQLiteTx(conn)
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        finally:
            conn.close()

    def close(self) -> None:
        """Nothing stays open between transactions."""
