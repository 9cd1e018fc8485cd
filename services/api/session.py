"""One WebSocket client: its status, what it missed from the store, then the live tail.

No gap and no repeat: the hub subscription starts buffering before anything is read, the
store is replayed up to the projected position read after that (everything later is
published after it, so it reaches the buffer), and the buffer is drained skipping
positions already sent. A `Gap` in the buffer (the hub may have missed messages) is filled
the same way: the store after the last position sent, up to the projected position read
then, before the buffer is drained on.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Mapping
from typing import Any
from uuid import UUID

from fastapi import WebSocket
from starlette.websockets import WebSocketDisconnect

from services.api.deps import ApiContext
from services.api.errors import OUTAGES
from services.api.hub import (
    Gap,
    Hub,
    Message,
    Outgoing,
    Subscription,
    encode,
    error_message,
    now,
)
from services.api.hub import status_message as status
from shared.application import JobNotFoundError, StoredJobEvent
from shared.bus import Envelope
from shared.domainmodel import ACTIVE_RUN, TERMINAL
from shared.views import job_json, job_row

log = logging.getLogger(__name__)
REPLAY_PAGE = 500
ACTIVE_LIMIT = 500
# How long a client that fell behind gets to read the error before it is dropped.
OVERFLOW_GRACE_SECONDS = 30.0
CLOSE_NORMAL, CLOSE_ERROR, CLOSE_TRY_AGAIN, CLOSE_NOT_FOUND = 1000, 1011, 1013, 4404
CLOSE_TOO_BIG = 1009


class LiveSession:
    """Serves one accepted socket until the job ends, the client leaves or falls behind."""

    def __init__(
        self,
        websocket: WebSocket,
        context: ApiContext,
        hub: Hub,
        job_id: UUID | None,
        after: int | None,
    ) -> None:
        self.websocket, self.context, self.hub = websocket, context, hub
        self.job_id, self.after = job_id, after
        self.last = self.cap = 0
        self._sending = asyncio.Lock()
        self._running: set[str] = set()  # jobs whose last status sent here has a trainer

    async def run(self) -> None:
        subscription = self.hub.subscribe(str(self.job_id) if self.job_id else None)
        try:
            await self._serve(subscription)
        except WebSocketDisconnect:
            pass
        except JobNotFoundError as missing:
            await self.refuse(CLOSE_NOT_FOUND, str(missing))
        except OUTAGES as error:
            log.warning("websocket session: store unavailable: %r", error)
            await self.refuse(CLOSE_TRY_AGAIN, "the store is unavailable; reconnect shortly")
        except Exception:
            log.exception("websocket session failed")
            await self.refuse(CLOSE_ERROR, "internal server error")
        finally:
            self.hub.unsubscribe(subscription)

    async def refuse(self, code: int, detail: str) -> None:
        """Say why, then close with `code` (best effort: the client may be gone)."""
        with contextlib.suppress(Exception):
            async with asyncio.timeout(5):
                await self.send(encode(error_message(detail)))
                await self.websocket.close(code, detail[:120])

    async def send(self, text: str) -> None:
        async with self._sending:
            await self.websocket.send_text(text)

    async def _serve(self, subscription: Subscription) -> None:
        await self._start()
        writer = asyncio.create_task(self._write(subscription))
        reader = asyncio.create_task(self._read())
        behind = asyncio.create_task(subscription.overflowed.wait())
        tasks = {writer, reader, behind}
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        if writer.done() and not writer.cancelled():
            writer.result()  # the job ended (or the writer failed: raise it)
            await self.websocket.close(CLOSE_NORMAL)
        elif behind.done() and not behind.cancelled():
            await self._drop_behind()

    async def _drop_behind(self) -> None:
        detail = f"too far behind; reconnect with ?after={self.last}"
        with contextlib.suppress(Exception):
            async with asyncio.timeout(OVERFLOW_GRACE_SECONDS):
                await self.send(encode(error_message(detail)))
                await self.websocket.close(CLOSE_TRY_AGAIN, "too far behind")

    async def _write(self, subscription: Subscription) -> None:
        """Returns once a per-job socket has sent its job's end."""
        if await self._replay():
            return
        while True:
            item = await subscription.queue.get()
            if isinstance(item, Gap):
                if await self._fill():
                    return
            elif item.position is not None and item.position <= self.last:
                continue
            elif await self._deliver(item):
                return

    async def _fill(self) -> bool:
        """What the store holds after `last`, up to the projected position read now (all
        later events are published after this read, so they reach the queue)."""
        self.cap = (await asyncio.to_thread(self.context.reads.positions))["projected"]
        return await self._replay()

    async def _start(self) -> None:
        """`connected`, then the status; without `?after=`, events after that status follow."""
        start: int | None = None
        # The cap first: an event projected meanwhile is replayed (and maybe also in the
        # statuses), never lost between the two reads.
        self.cap = (await asyncio.to_thread(self.context.reads.positions))["projected"]
        if self.job_id is None:
            views = await asyncio.to_thread(self._active_jobs)
        else:
            view, start = await asyncio.to_thread(self._job_view, self.job_id)
            views = [view]
        default = self.cap if start is None else start
        self.last = default if self.after is None else self.after
        connected = {"event": "connected", "job_id": _str(self.job_id), "timestamp": now()}
        await self.send(encode(connected))
        for view in views:
            await self.send(encode(status(view)))
            self._saw(view["id"], view["status"])

    async def _replay(self) -> bool:
        """Send what the store holds after `last` up to the cap; True if the job ended."""
        while self.last < self.cap:
            page = await asyncio.to_thread(self._page, self.last)
            events = [e for e in page if e.position <= self.cap]
            for event in events:
                if await self._deliver(Outgoing.of(Envelope.of(event))):
                    return True
            if len(events) < len(page) or len(page) < REPLAY_PAGE:
                break
        return self.job_id is not None and await asyncio.to_thread(self._ended_now)

    async def _deliver(self, item: Outgoing) -> bool:
        """Send one message; True if it ended a per-job socket's job."""
        if item.position is None:  # telemetry comes straight from the trainer: drop it
            if item.job_id in self._running:  # until the event that started it was sent
                await self.send(item.text)
            return False
        await self.send(item.text)
        self._saw(item.job_id, item.status)
        self.last = item.position
        return self.job_id is not None and item.status in TERMINAL

    def _saw(self, job_id: str, job_status: str) -> None:
        if job_status in ACTIVE_RUN:
            self._running.add(job_id)
        else:
            self._running.discard(job_id)

    async def _read(self) -> None:
        """Answer the client's messages; returns when it disconnects."""
        while True:
            message = await self.websocket.receive()
            if message["type"] == "websocket.disconnect":
                return
            size = len(message.get("text") or message.get("bytes") or "")
            limit = self.context.settings.ws_max_message_bytes
            if size > limit:  # uvicorn's ws_max_size says the same before it gets here
                await self.refuse(CLOSE_TOO_BIG, f"message over {limit} bytes")
                return
            await self.send(encode(reply(message)))

    def _job_view(self, job_id: UUID) -> tuple[Message, int]:
        """The read row and its position; from the store if the projector is not there yet."""
        row = self.context.reads.get_job(str(job_id))
        if row is not None:
            return self.context.job_view(row), int(row["position"])
        return job_json(job_row(self.context.jobs.get_job(job_id), position=0)), 0

    def _active_jobs(self) -> list[Message]:
        rows, _ = self.context.reads.list_jobs(None, ACTIVE_LIMIT, 0, include_archived=False)
        return [self.context.job_view(r) for r in reversed(rows) if r["status"] not in TERMINAL]

    def _page(self, after: int) -> list[StoredJobEvent]:
        if self.job_id is None:
            return self.context.jobs.feed(after, REPLAY_PAGE)
        return self.context.jobs.history(self.job_id, after, REPLAY_PAGE)

    def _ended_now(self) -> bool:
        """After the replay: the job has ended and its end is already sent."""
        assert self.job_id is not None
        row = self.context.reads.get_job(str(self.job_id))
        return row is not None and row["status"] in TERMINAL and int(row["position"]) <= self.last


def reply(message: Mapping[str, Any]) -> Message:
    """The answer to one client message: `pong` to a ping, an error to anything else."""
    text = message.get("text")
    if text is None:
        return error_message('send JSON text messages such as {"event": "ping"}, not binary')
    try:
        body = json.loads(text)
    except ValueError as error:
        return error_message(f"malformed JSON: {error}")
    if not isinstance(body, dict) or "event" not in body:
        return error_message('expected a JSON object with an "event" field, e.g. {"event": "ping"}')
    if body["event"] != "ping":
        return error_message(f'unknown event {body["event"]!r}; the server understands "ping"')
    return {"event": "pong", "timestamp": now()}


def _str(job_id: UUID | None) -> str | None:
    return str(job_id) if job_id else None
