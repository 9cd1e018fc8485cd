"""Whether PostgreSQL answers, known within a fraction of a second.

During an outage every request would otherwise wait on a connection pool before it
failed. The watch probes the database a few times a second on its own connection, so
requests can get their 503 at once, and clears itself as soon as the database is back.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import psycopg
from psycopg_pool import ConnectionPool, PoolTimeout

from shared.waiting import wait_event

log = logging.getLogger(__name__)
PROBE_SECONDS = 0.25
PROBE_TIMEOUT_SECONDS = 0.75
PATIENCE_SECONDS = 5.0


class DatabaseUnavailableError(ConnectionError):
    """PostgreSQL did not answer the last probe."""


class DatabaseWatch:
    def __init__(self, url: str) -> None:
        self.url = url
        self.down: str | None = None
        self._conn: psycopg.Connection[object] | None = None
        self._pools: list[ConnectionPool[Any]] = []
        # A thread of its own: probes queued behind request work (a burst of submits
        # waiting on the model-probe child holds every worker thread) would time out and
        # declare an outage that is not happening.
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="database-watch")

    def guard(self, *pools: ConnectionPool[Any]) -> None:
        """Make the pools wait for a connection only while the database is not known to be
        down: a request caught by an outage fails as soon as a probe notices it (a quarter
        of a second), yet a busy but healthy pool is waited on for up to `PATIENCE_SECONDS`."""
        self._pools.extend(pools)
        for pool in pools:
            pool.getconn = self._patient(pool.getconn)  # type: ignore[method-assign]

    def _renew_pools(self) -> None:
        """Connections are not pinged on every checkout (a round trip per request): after
        an outage, replace the dead ones before requests are let through again."""
        for pool in self._pools:
            try:
                pool.check()
            except Exception as error:
                log.warning("checking the pool's connections: %r", error)

    def _patient(self, getconn: Callable[..., Any]) -> Callable[..., Any]:
        def patient_getconn(timeout: float | None = None) -> Any:
            deadline = time.monotonic() + (PATIENCE_SECONDS if timeout is None else timeout)
            while True:
                if self.down is not None:
                    raise PoolTimeout(f"PostgreSQL is down: {self.down}")
                left = deadline - time.monotonic()
                try:
                    return getconn(timeout=max(0.01, min(PROBE_SECONDS, left)))
                except PoolTimeout:
                    if time.monotonic() >= deadline:
                        raise

        return patient_getconn

    def require(self) -> None:
        if self.down is not None:
            raise DatabaseUnavailableError(f"PostgreSQL is down: {self.down}")

    def mark_down(self, reason: str) -> None:
        """A request just met the outage: refuse the next ones until a probe succeeds."""
        if self.down is None:
            log.warning("PostgreSQL unavailable: %s", reason)
        self.down = reason

    async def run_forever(self, stop: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        while not stop.is_set():
            try:
                probe = loop.run_in_executor(self._thread, self._probe)
                await asyncio.wait_for(probe, PROBE_TIMEOUT_SECONDS)
            except TimeoutError:
                self.mark_down(f"no answer within {PROBE_TIMEOUT_SECONDS} s")
            except Exception as error:
                self.mark_down(type(error).__name__)
            else:
                if self.down is not None:
                    log.info("PostgreSQL is back")
                    await loop.run_in_executor(self._thread, self._renew_pools)
                self.down = None
            await wait_event(stop, PROBE_SECONDS)
        self._close()
        self._thread.shutdown(wait=False)

    def _probe(self) -> None:
        """On the watch's one thread: a probe never runs beside another."""
        try:
            if self._conn is None or self._conn.closed:
                self._conn = psycopg.connect(self.url, autocommit=True, connect_timeout=2)
            self._conn.execute("SELECT 1")
        except Exception:
            self._close()
            raise

    def _close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.close()
            except Exception as error:
                log.debug("closing the probe connection: %s", error)
