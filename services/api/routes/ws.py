"""The live WebSocket streams (DESIGN §5): one job, or every job."""

from __future__ import annotations

import asyncio
from uuid import UUID

from fastapi import APIRouter, WebSocket

from services.api.deps import ApiContext, job_id_of
from services.api.hub import Hub
from services.api.session import CLOSE_NOT_FOUND, LiveSession
from shared.application import JobNotFoundError

router = APIRouter(tags=["live"])
MAX_POSITION = 2**63 - 1
CLOSE_BAD_REQUEST = 4400


class BadQueryError(ValueError):
    """A query parameter of the socket's URL is not valid."""


@router.websocket("/ws/training/{job_id}")
async def watch_job(websocket: WebSocket, job_id: str) -> None:
    """One job: `connected`, its status, each event after `?after=`; closed once it ends."""
    async with websocket.app.state.sockets.admit(websocket) as client:
        if client is not None:
            await open_stream(websocket, job_id)


@router.websocket("/ws/training")
async def watch_all(websocket: WebSocket) -> None:
    """Every job: `connected`, each active job's status, then every event after `?after=`."""
    async with websocket.app.state.sockets.admit(websocket) as client:
        if client is not None:
            await open_stream(websocket, None)


async def open_stream(websocket: WebSocket, job_id: str | None) -> None:
    """The one way into a stream: accept, check the request, then serve it live."""
    await websocket.accept()
    context, hub = websocket.app.state.context, websocket.app.state.hub
    assert isinstance(context, ApiContext) and isinstance(hub, Hub)
    target: UUID | None = None
    session = LiveSession(websocket, context, hub, None, None)
    try:
        after = parse_after(websocket.query_params.getlist("after"))
        target = job_id_of(job_id) if job_id is not None else None
        if after is not None:
            head = await asyncio.to_thread(context.jobs.recorder.max_notification_id) or 0
            if after > head:  # no answer ever gave it: the stream would wait for ever
                raise BadQueryError(f"after: {after} is past the store's last position {head}")
    except BadQueryError as error:
        await session.refuse(CLOSE_BAD_REQUEST, str(error))
        return
    except JobNotFoundError as error:
        await session.refuse(CLOSE_NOT_FOUND, str(error))
        return
    await LiveSession(websocket, context, hub, target, after).run()


def parse_after(values: list[str]) -> int | None:
    """`?after=<position>`: one integer from 0 to 2^63-1, or absent."""
    if not values:
        return None
    given = values[0] if len(values) == 1 else f"{len(values)} values"
    problem = f"after: must be an integer from 0 to {MAX_POSITION}, got {given!r}"
    text = values[0]
    if len(values) > 1 or not (text.isascii() and text.isdigit() and len(text) <= 19):
        raise BadQueryError(problem)
    if int(text) > MAX_POSITION:
        raise BadQueryError(problem)
    return int(text)
