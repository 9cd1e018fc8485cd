"""Liveness of the api and reachability of what it depends on."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from services.api.deps import ApiContext, ContextDep
from services.api.errors import RETRY_AFTER_SECONDS
from services.api.schemas import Health

router = APIRouter(tags=["health"])
CHECK_SECONDS = 0.8  # /health answers within a second, whatever is down


@router.get("/health", response_model=Health, responses={503: {"model": Health}})
async def health(context: ContextDep) -> JSONResponse:
    """200 when the store, the read store and the broker answer and the projector is not
    stuck; 503 naming what is down or stuck."""
    if context.watch is not None and context.watch.down is not None:
        down = f"down: {context.watch.down}"
        broker = await _check(context.bus.healthy())
        parts = {"store": down, "read_store": down, "broker": broker, "projection": "unknown"}
    else:
        store, reads, broker, projection = await asyncio.gather(
            _check(asyncio.to_thread(context.jobs.recorder.max_notification_id)),
            _check(asyncio.to_thread(context.reads.positions)),
            _check(context.bus.healthy()),
            _projection(context),
        )
        parts = {"store": store, "read_store": reads, "broker": broker, "projection": projection}
    ok = all(v == "ok" for k, v in parts.items() if k != "projection" or v != "unknown")
    body = Health(status="ok" if ok else "degraded", **parts)
    if ok:
        return JSONResponse(body.model_dump())
    return JSONResponse(body.model_dump(), 503, headers={"Retry-After": RETRY_AFTER_SECONDS})


async def _projection(context: ApiContext) -> str:
    """ok, or what the projector cannot get past (no later event reaches the read tables,
    the bus or the WebSockets until it does: README, When things fail)."""
    try:
        faults = await asyncio.wait_for(asyncio.to_thread(context.reads.faults), CHECK_SECONDS)
    except Exception:
        return "unknown"  # the read store is down: read_store says so
    return (
        "; ".join(
            f"stuck {f['stage']} position {f['position']} since {f['since']}"
            f" ({f['attempts']} attempts): {f['error']}"
            for f in faults
        )
        or "ok"
    )


async def _check(probe: Awaitable[object]) -> str:
    try:
        result = await asyncio.wait_for(probe, CHECK_SECONDS)
    except Exception as error:
        return f"down: {type(error).__name__}"
    return "ok" if result is not False else "down"
