"""The read store in PostgreSQL, in the configured schema, through a connection pool."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import psycopg
from psycopg.rows import dict_row
from psycopg_pool import ConnectionPool

from shared.readmodel.store import ReadStore, Row, Tx


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


class PostgresReadStore(ReadStore):
    def __init__(self, url: str, schema: str, pool_size: int = 10) -> None:
        self.pool: ConnectionPool[psycopg.Connection[Row]] = ConnectionPool(
            url,
            min_size=1,
            max_size=pool_size,
            timeout=2.0,  # the wait for a free connection (the api waits less in an outage)
            kwargs={
                "options": f"-c search_path={schema}",
                "connect_timeout": 2,
                "row_factory": dict_row,
            },
            open=True,
        )

    @contextmanager
    def transaction(self) -> Iterator[Tx]:
        with self.pool.connection() as conn, conn.transaction(), conn.cursor() as cursor:
            yield _PostgresTx(cursor)

    def close(self) -> None:
        self.pool.close()
