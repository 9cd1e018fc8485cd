"""The read store in PostgreSQL, in the configured schema, through a connection pool."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import psycopg
from psycopg.rows import dict_row
from psycopg_pool import ConnectionPool

from shared.readmodel.schema import upsert
from shared.readmodel.store import ReadStore, Row, Tx, last_per_key, rows_of

# From this many rows an upsert goes through COPY into a staging table: one statement
# for all of them instead of one per row (a replay writes pages of hundreds).
COPY_FROM_ROWS = 32


def projected_channel(schema: str) -> str:
    """The NOTIFY channel on which the projected position of `schema`'s read tables is
    announced: one per schema, a valid identifier within PostgreSQL's 63 bytes."""
    return "heimdall_projected_" + hashlib.sha256(schema.encode()).hexdigest()[:16]


class _PostgresTx:
    def __init__(self, cursor: psycopg.Cursor[Row]) -> None:
        self.cursor = cursor

    def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        self.cursor.execute(sql.replace("?", "%s"), params)
        return self.cursor.rowcount

    def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        if rows:
            self.cursor.executemany(sql.replace("?", "%s"), rows)

    def fetchall(self, sql: str, params: Sequence[Any] = ()) -> list[Row]:
        self.cursor.execute(sql.replace("?", "%s"), params)
        return self.cursor.fetchall()

    def upsert_many(
        self, table: str, columns: Sequence[str], key: Sequence[str], rows: Sequence[Row]
    ) -> None:
        if len(rows) < COPY_FROM_ROWS:
            self.executemany(upsert(table, tuple(columns), tuple(key)), rows_of(columns, rows))
            return
        # ON CONFLICT may touch a row once per statement: only the last of each key.
        rows = last_per_key(key, rows)
        stage, names = f"stage_{table}", ", ".join(columns)
        self.cursor.execute(
            f"CREATE TEMP TABLE IF NOT EXISTS {stage} (LIKE {table}) ON COMMIT DELETE ROWS"
        )
        with self.cursor.copy(f"COPY {stage} ({names}) FROM STDIN") as copy:
            for row in rows_of(columns, rows):
                copy.write_row(row)
        self.cursor.execute(upsert(table, tuple(columns), tuple(key), source=stage))


class PostgresReadStore(ReadStore):
    NOW_SQL = "EXTRACT(EPOCH FROM clock_timestamp())"

    def __init__(self, url: str, schema: str, pool_size: int = 10) -> None:
        self.projected_channel = projected_channel(schema)
        self.pool: ConnectionPool[psycopg.Connection[Row]] = ConnectionPool(
            url,
            min_size=1,
            max_size=pool_size,
            timeout=2.0,  # the wait for a free connection (the api waits less in an outage)
            kwargs={
                "options": f"-c search_path={schema}",
                "connect_timeout": 2,
                "row_factory": dict_row,
                "autocommit": True,  # a read is one round trip; transaction() says BEGIN
            },
            open=True,
        )

    @contextmanager
    def transaction(self) -> Iterator[Tx]:
        with self.pool.connection() as conn, conn.transaction(), conn.cursor() as cursor:
            yield _PostgresTx(cursor)

    @contextmanager
    def reading(self) -> Iterator[Tx]:
        """Statements on an autocommit connection: one round trip each."""
        with self.pool.connection() as conn, conn.cursor() as cursor:
            yield _PostgresTx(cursor)

    def announce_projected(self, tx: Tx, position: int) -> None:
        """NOTIFY is transactional: listeners hear it only once `tx` commits."""
        tx.execute("SELECT pg_notify(?, ?)", [self.projected_channel, str(position)])

    def close(self) -> None:
        self.pool.close()
