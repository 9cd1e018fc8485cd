"""What routes depend on, as `Annotated` aliases; built once in `create_app`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated
from uuid import UUID

from fastapi import Depends, Header, Query, Request
from fastapi.exceptions import RequestValidationError
from starlette.concurrency import run_in_threadpool

from services.api.auth import OperatorDep
from services.api.availability import DatabaseWatch
from services.api.commands import Commands
from services.api.freshness import ReadFreshness
from services.api.progress import ProgressBoard
from services.api.queues import WorkQueues
from shared.application import JobNotFoundError, TrainingJobs
from shared.bus import Bus
from shared.readmodel.store import ReadStore
from shared.settings import Settings
from shared.views import Row, job_json


@dataclass
class ApiContext:
    """The api's collaborators: the event store app, the read store and the bus; the
    commands run through `commands`, which answer once the read tables show them."""

    settings: Settings
    jobs: TrainingJobs
    reads: ReadStore
    bus: Bus
    freshness: ReadFreshness = field(init=False)
    commands: Commands = field(init=False)
    watch: DatabaseWatch | None = None  # PostgreSQL only: SQLite is a local file
    progress: ProgressBoard = field(default_factory=ProgressBoard)  # fed by the hub
    queues: WorkQueues = field(default_factory=WorkQueues)  # refreshed in the lifespan

    def job_view(self, row: Row) -> Row:
        """A read row as the api returns it, with the running job's live `progress` and
        the queued job's `waiting` reason."""
        view = job_json(row, self.progress.of(str(row["id"]), str(row["status"])))
        view["waiting"] = self.queues.waiting(view["status"], view["config"])
        return view

    def __post_init__(self) -> None:
        self.freshness = ReadFreshness(self.reads, self.settings.read_wait_seconds)
        self.commands = Commands(self.jobs, self.freshness)


def context_of(request: Request) -> ApiContext:
    context = request.app.state.context
    assert isinstance(context, ApiContext)
    return context


# The dependencies below are `async` although they never wait: FastAPI runs a plain `def`
# dependency in the thread pool, and those hops cost more CPU than a POST's own save.
async def get_context(request: Request) -> ApiContext:
    return context_of(request)


async def require_database(request: Request) -> None:
    """During a PostgreSQL outage, a 503 at once rather than a wait on the pool."""
    watch = context_of(request).watch
    if watch is not None:
        watch.require()


async def get_actor(client: OperatorDep) -> str:
    """The caller's key name, recorded in the events (`anonymous` when no keys are set)."""
    return client.name


def job_id_of(job_id: str) -> UUID:
    """Ids are opaque to clients: anything that is not one of ours is simply not found."""
    try:
        return UUID(job_id)
    except ValueError:
        raise JobNotFoundError(f"job {job_id} not found") from None


async def parse_job_id(job_id: str) -> UUID:
    return job_id_of(job_id)


MAX_POSITION = 2**63 - 1
HEADER_LOC = ("header", "heimdall-position")


async def read_after(
    request: Request,
    min_position: Annotated[
        int | None,
        Query(ge=0, le=MAX_POSITION, description="answer once the read tables hold it"),
    ] = None,
    heimdall_position: Annotated[
        int | None,
        Header(ge=0, le=MAX_POSITION, description="the same as ?min_position="),
    ] = None,
) -> None:
    """A query that names a store position (a command's answer gave it) answers once the
    read tables have reached it, or 503 after `read_wait_seconds`."""
    wanted = max(min_position or 0, heimdall_position or 0)
    if not wanted:
        return
    context = context_of(request)
    if wanted > context.freshness.projected:
        head = await run_in_threadpool(context.jobs.recorder.max_notification_id) or 0
        if wanted > head:  # no command answer ever gave it: waiting would not help
            where = ("query", "min_position") if min_position == wanted else HEADER_LOC
            message = f"position {wanted} is not in the store yet (its last is {head})"
            error = {"type": "position_ahead", "loc": where, "msg": message, "input": wanted}
            raise RequestValidationError([error])
    await context.freshness.require(wanted)


ContextDep = Annotated[ApiContext, Depends(get_context)]
ActorDep = Annotated[str, Depends(get_actor)]
JobIdDep = Annotated[UUID, Depends(parse_job_id)]
