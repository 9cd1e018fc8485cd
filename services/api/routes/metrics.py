"""`/metrics` in Prometheus text format: open, like `/health`, for a scraper on the network."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, FastAPI, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, generate_latest

from services.api.queues import WorkQueues
from shared.application import TrainingJobs
from shared.metrics import StoreCollector
from shared.readmodel.store import ReadStore

router = APIRouter(tags=["metrics"], include_in_schema=False)


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    """This process's metrics, then the store's positions and jobs by status, read now."""
    scraped: CollectorRegistry = request.app.state.scraped
    body = await asyncio.to_thread(lambda: generate_latest(REGISTRY) + generate_latest(scraped))
    return Response(body, media_type=CONTENT_TYPE_LATEST)


def install(app: FastAPI, jobs: TrainingJobs, reads: ReadStore, queues: WorkQueues) -> None:
    """The route, and this app's own view of the store and of the work queues (each app
    has its own)."""
    app.state.scraped = CollectorRegistry()
    app.state.scraped.register(StoreCollector(jobs, reads, job_counts=True))
    app.state.scraped.register(queues)
    app.include_router(router)
