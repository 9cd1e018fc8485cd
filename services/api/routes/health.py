"""Liveness of the api and reachability of what it depends on."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from services.api.deps import ContextDep
from services.api.schemas import Health

router = APIRouter(tags=["health"])
CHECK_SECONDS = 2.0


@router.get("/health", response_model=Health, responses={503: {"model": Health}})
async def health(context: ContextDep) -> JSONResponse:
    """200 when the store, the read store and the broker answer; 503 naming what is down."""
    store, reads, broker = await asyncio.gather(
        _check(asyncio.to_thread(context.jobs.recorder.max_notification_id)),
        _check(asyncio.to_thread(context.reads.positions)),
        _check(context.bus.healthy()),
    )
    parts = {"store": store, "read_store": reads, "broker": broker}
    ok = all(v == "ok" for v in parts.values())
    body = Health(status="ok" if ok else "degraded", **parts)
    return JSONResponse(body.model_dump(), status_code=200 if ok else 503)


async def _check(probe: Awaitable[object]) -> str:
    try:
        result = await asyncio.wait_for(probe, CHECK_SECONDS)
    except Exception as error:
        return f"down: {type(error).__name__}"
    return "ok" if result is not False else "down"
