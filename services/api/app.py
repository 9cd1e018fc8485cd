"""Builds the api: routes, error mapping, limits, and the services that share its loop."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from services.api import errors
from services.api.auth import RequireKey, SocketGate
from services.api.deps import ApiContext
from services.api.freshness import NotReadableYetError, not_readable_yet
from services.api.hub import Hub
from services.api.inputs import BlankInputs
from services.api.limits import BodyLimit
from services.api.metrics import HttpMetrics
from services.api.routes import dashboard, docs, events, health, jobs, metrics, models, ws
from shared.bus import ALL_KEYS

log = logging.getLogger(__name__)
WORKER_THREADS = 40
Background = Callable[[asyncio.Event], Coroutine[Any, Any, None]]


def create_app(context: ApiContext, background: Sequence[Background] = ()) -> FastAPI:
    """The FastAPI app; `background` services (projector, trainer) run on its event loop."""

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        stop = asyncio.Event()
        # Blocking reads go to asyncio's executor, a cheaper hop than Starlette's
        # `run_in_threadpool`, with as many threads; commands have threads of their own.
        asyncio.get_running_loop().set_default_executor(
            ThreadPoolExecutor(WORKER_THREADS, thread_name_prefix="api-worker")
        )
        await context.bus.start()
        tasks = [asyncio.create_task(service(stop)) for service in background]
        tasks.append(asyncio.create_task(context.queues.refresh_forever(context.bus, stop)))
        try:
            yield
        finally:
            stop.set()
            await asyncio.gather(*tasks, return_exceptions=True)
            await context.bus.stop()

    app = FastAPI(
        title="Heimdall Training",
        version="0.1.0",
        lifespan=lifespan,
        description="Submit, watch, pause, resume, cancel and audit training jobs.",
        docs_url=None,  # served by routes/docs.py, from local files
        redoc_url=None,
    )
    app.state.context = context
    app.state.hub = Hub(context.settings.ws_queue, context.progress)
    context.bus.subscribe_fanout(ALL_KEYS, app.state.hub.relay)
    app.add_middleware(BodyLimit, max_bytes=context.settings.max_body_bytes)
    app.add_middleware(BlankInputs)
    app.add_middleware(RequireKey, keys=context.settings.api_keys)
    app.state.sockets = SocketGate(context.settings.api_keys, context.settings.ws_clients_per_key)
    if context.settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(context.settings.cors_origins),
            allow_credentials=context.settings.cors_allow_credentials,
            allow_methods=["GET", "POST", "DELETE"],
            allow_headers=["Authorization", "Content-Type", "Idempotency-Key"],
            max_age=600,
        )
    app.add_middleware(HttpMetrics)
    errors.install(app)
    app.add_exception_handler(NotReadableYetError, not_readable_yet)
    for module in (jobs, events, health, ws, models):
        app.include_router(module.router)
    dashboard.install(app)
    docs.install(app)
    metrics.install(app, context.jobs, context.reads, context.queues)
    return app
