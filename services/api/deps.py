"""What routes depend on, as `Annotated` aliases; built once in `create_app`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Annotated
from uuid import UUID

from fastapi import Depends, Request

from services.api.auth import OperatorDep
from services.api.availability import DatabaseWatch
from shared.application import JobNotFoundError, TrainingJobs
from shared.bus import Bus
from shared.readmodel.store import ReadStore
from shared.settings import Settings


@dataclass
class ApiContext:
    """The api's collaborators: the event store app, the read store and the bus."""

    settings: Settings
    jobs: TrainingJobs
    reads: ReadStore
    bus: Bus
    after_command: Callable[[], None] = field(default=lambda: None)
    watch: DatabaseWatch | None = None  # PostgreSQL only: SQLite is a local file


def get_context(request: Request) -> ApiContext:
    context = request.app.state.context
    assert isinstance(context, ApiContext)
    return context


async def require_database(request: Request) -> None:
    """During a PostgreSQL outage, a 503 at once rather than a wait on the pool."""
    watch = get_context(request).watch
    if watch is not None:
        watch.require()


def get_actor(client: OperatorDep) -> str:
    """The caller's key name, recorded in the events (`anonymous` when no keys are set)."""
    return client.name


def parse_job_id(job_id: str) -> UUID:
    """Ids are opaque to clients: anything that is not one of ours is simply not found."""
    try:
        return UUID(job_id)
    except ValueError:
        raise JobNotFoundError(f"job {job_id} not found") from None


ContextDep = Annotated[ApiContext, Depends(get_context)]
ActorDep = Annotated[str, Depends(get_actor)]
JobIdDep = Annotated[UUID, Depends(parse_job_id)]
