"""Read-your-writes (DESIGN §2.9): waiting until the read tables reach a store position.

Every command answer carries the position of its last event, and is only sent once the
read tables have projected that position; a query may name a position to wait for
(`?min_position=` or the `Heimdall-Position` header). Both waits are bounded: past
`read_wait_seconds` the answer is 503 with Retry-After, never a stale read.

The projector announces each projected position on PostgreSQL's NOTIFY channel of the
read tables (`ReadStore.projected_channel`) when its transaction commits; the api LISTENs
(`listen_forever`), so a wait ends as soon as the position is readable, without a query.
An embedded projector tells it directly (`advance`). A poller reads the projected position
for every waiter at once: every 5 ms while no LISTEN connection is up (an outage, SQLite
without an embedded projector), every 100 ms as a safety net while one is.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import psycopg
from fastapi import Request
from fastapi.responses import JSONResponse
from psycopg import sql

from shared.readmodel.store import ReadStore
from shared.waiting import wait_event

log = logging.getLogger(__name__)
POSITION_HEADER = "Heimdall-Position"
POLL_SECONDS = 0.005
POLL_SECONDS_LISTENING = 0.1
RELISTEN_SECONDS = 1.0
RETRY_AFTER_SECONDS = "2"


class NotReadableYetError(Exception):
    """The read tables did not reach `position` within the wait (the projector is behind
    or down); `stored` says whether the request's own command is already in the store."""

    def __init__(self, position: int, projected: int, stored: bool) -> None:
        what = "the command is stored, but its effect" if stored else "the position asked for"
        super().__init__(
            f"{what} (store position {position}) is not readable yet: the read tables are at"
            f" {projected}; retry the read with ?min_position={position}"
        )
        self.position, self.projected, self.stored = position, projected, stored


class ReadFreshness:
    """How far the read tables are, and bounded waits for a position to be reached."""

    def __init__(self, reads: ReadStore, wait_seconds: float) -> None:
        self.reads, self.wait_seconds = reads, wait_seconds
        self.projected = 0
        self._changed = asyncio.Condition()
        self._poller: asyncio.Task[None] | None = None
        self._waiting = 0
        self.listening = False

    def advance(self, position: int) -> None:
        """The read tables hold everything up to `position` (on the api's event loop)."""
        if position > self.projected:
            self.projected = position
            asyncio.get_running_loop().create_task(self._wake_all())

    async def require(self, position: int, stored: bool = False) -> None:
        """Return once the read tables hold `position`; NotReadableYetError after the wait."""
        if position <= self.projected:
            return
        self._waiting += 1
        try:
            async with asyncio.timeout(self.wait_seconds), self._changed:
                self._start_polling()
                await self._changed.wait_for(lambda: position <= self.projected)
        except TimeoutError:
            raise NotReadableYetError(position, self.projected, stored) from None
        finally:
            self._waiting -= 1

    def _start_polling(self) -> None:
        if self._poller is None or self._poller.done():
            self._poller = asyncio.get_running_loop().create_task(self._poll())

    async def _poll(self) -> None:
        """Read the projected position while anyone waits: one query serves every waiter."""
        while self._waiting:
            with contextlib.suppress(Exception):  # an outage: the waits time out as 503
                positions = await asyncio.to_thread(self.reads.positions)
                if positions["projected"] > self.projected:
                    self.projected = positions["projected"]
                    await self._wake_all()
            await asyncio.sleep(POLL_SECONDS_LISTENING if self.listening else POLL_SECONDS)

    async def listen_forever(self, url: str, channel: str, stop: asyncio.Event) -> None:
        """Follow the projector's announcements on `channel` (PostgreSQL LISTEN) until
        `stop`. A lost connection is opened again every second; the poller covers the gap
        (every 5 ms while anyone waits, and every 100 ms once listening again)."""
        listen = sql.SQL("LISTEN {}").format(sql.Identifier(channel))
        while not stop.is_set():
            try:
                async with await psycopg.AsyncConnection.connect(
                    url, autocommit=True, connect_timeout=2
                ) as conn:
                    await conn.execute(listen)
                    self.listening = True
                    while not stop.is_set():
                        async for notify in conn.notifies(timeout=RELISTEN_SECONDS):
                            self.advance(int(notify.payload))
            except (psycopg.Error, OSError, ValueError) as error:
                if self.listening:
                    log.info("read waits: LISTEN %s lost (%s); polling meanwhile", channel, error)
            finally:
                self.listening = False
            await wait_event(stop, RELISTEN_SECONDS)

    async def _wake_all(self) -> None:
        async with self._changed:
            self._changed.notify_all()


async def not_readable_yet(request: Request, exc: Exception) -> JSONResponse:
    """503 with Retry-After and the position to read after."""
    assert isinstance(exc, NotReadableYetError)
    log.warning("%s %s: %s", request.method, request.url.path, exc)
    headers = {"Retry-After": RETRY_AFTER_SECONDS, POSITION_HEADER: str(exc.position)}
    body = {"detail": str(exc), "position": exc.position, "stored": exc.stored}
    return JSONResponse(body, status_code=503, headers=headers)
