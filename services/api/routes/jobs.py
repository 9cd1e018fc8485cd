"""REST commands and queries on training jobs (DESIGN §4)."""

from __future__ import annotations

import asyncio
from functools import partial
from typing import Annotated
from uuid import UUID

from fastapi import APIRouter, Depends, Header, Query, Request, Response
from pydantic import BaseModel, TypeAdapter

from services.api.auth import current_client
from services.api.deps import (
    ActorDep,
    ApiContext,
    ContextDep,
    JobIdDep,
    read_after,
    require_database,
)
from services.api.freshness import POSITION_HEADER
from services.api.preflight import check_submit
from services.api.schemas import (
    ERROR_RESPONSES,
    CommandResult,
    Job,
    JobDetail,
    JobList,
    MetricRow,
    SubmitJob,
)
from shared.application import Accepted, JobNotFoundError
from shared.domainmodel import STATUSES
from shared.views import job_row, metric_json

router = APIRouter(
    prefix="/api/v1/training",
    tags=["jobs"],
    responses=ERROR_RESPONSES,
    dependencies=[Depends(current_client), Depends(require_database)],
)
# Queries answer once the read tables reach the position a client names (if any).
READ_AFTER = [Depends(read_after)]
# Empty means absent (services/api/inputs.py drops it before validation): the schema says so.
StatusQuery = Annotated[str | None, Query(pattern="^(" + "|".join(("", *STATUSES)) + ")$")]
RECENT_METRICS = 10
# Big answers are validated and written by pydantic-core in one pass, not model by model.
JSON = "application/json"
METRIC_ROWS: TypeAdapter[list[MetricRow]] = TypeAdapter(list[MetricRow])


def _json(model: BaseModel, status_code: int = 200) -> Response:
    """The model as the answer, skipping FastAPI's second validation of `response_model`."""
    return Response(model.model_dump_json(), status_code, media_type=JSON)


def command_result(
    context: ApiContext, accepted: Accepted, message: str, status_code: int = 202
) -> Response:
    """The job after the command (with its live progress when it runs), with the command's
    position in the body and a header."""
    job = accepted.job
    view = context.job_view(job_row(job, position=accepted.position))
    result = CommandResult(**view, job_id=str(job.id), message=message, position=accepted.position)
    response = _json(result, status_code)
    response.headers[POSITION_HEADER] = str(accepted.position)
    return response


@router.post("/jobs", status_code=201, response_model=CommandResult)
async def submit_job(
    body: SubmitJob,
    context: ContextDep,
    actor: ActorDep,
    idempotency_key: Annotated[str | None, Header(max_length=200)] = None,
) -> Response:
    """Submit a training job; it is queued for the next free trainer."""
    limit = context.settings.max_dataset_bytes
    check = partial(check_submit, body.config, context.jobs, limit)
    config = body.config.model_dump(mode="json")
    key = idempotency_key.strip() if idempotency_key else None  # HTTP trims header values
    accepted = await context.commands.submit(
        body.job_name, body.description, config, actor, key or None, check
    )
    return command_result(context, accepted, "job queued", 201)


@router.get("/jobs", response_model=JobList, dependencies=READ_AFTER)
async def list_jobs(
    context: ContextDep,
    status: StatusQuery = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    offset: Annotated[int, Query(ge=0, le=2**63 - 1)] = 0,
    include_archived: bool = False,
) -> Response:
    """Jobs, newest first, optionally of one status."""
    return await asyncio.to_thread(_job_list, context, status, limit, offset, include_archived)


def _job_list(
    context: ApiContext, status: str | None, limit: int, offset: int, include_archived: bool
) -> Response:
    rows, total = context.reads.list_jobs(status, limit, offset, include_archived)
    return _json(
        JobList.model_validate({"jobs": [context.job_view(r) for r in rows], "total": total})
    )


@router.get("/jobs/{job_id}", response_model=JobDetail, dependencies=READ_AFTER)
async def get_job(job_id: JobIdDep, context: ContextDep, request: Request) -> Response:
    """One job with its latest metrics and where to watch it live."""
    scheme = "wss" if request.url.scheme == "https" else "ws"
    websocket_url = f"{scheme}://{request.url.netloc}/ws/training/{job_id}"
    return await asyncio.to_thread(_job_detail, context, job_id, websocket_url)


def _job_detail(context: ApiContext, job_id: UUID, websocket_url: str) -> Response:
    row = context.reads.get_job(str(job_id))
    if row is None:
        raise JobNotFoundError(f"job {job_id} not found")
    recent = context.reads.metrics(str(job_id), RECENT_METRICS, latest=True)
    detail = JobDetail(
        job=Job(**context.job_view(row)),
        recent_metrics=[MetricRow(**metric_json(m)) for m in recent],
        websocket_url=websocket_url,
    )
    return _json(detail)


@router.get("/jobs/{job_id}/metrics", response_model=list[MetricRow], dependencies=READ_AFTER)
async def job_metrics(
    job_id: JobIdDep,
    context: ContextDep,
    limit: Annotated[int | None, Query(ge=1, le=100_000)] = None,
) -> Response:
    """Per-epoch metrics, ascending by epoch."""
    return await asyncio.to_thread(_job_metrics, context, job_id, limit)


def _job_metrics(context: ApiContext, job_id: UUID, limit: int | None) -> Response:
    rows = context.reads.job_metrics(str(job_id), limit)
    if rows is None:  # not projected yet, or not a job at all (404)
        context.jobs.get_job(job_id)
        rows = []
    rows = [metric_json(row) for row in rows]
    return Response(METRIC_ROWS.dump_json(METRIC_ROWS.validate_python(rows)), media_type=JSON)


@router.post("/jobs/{job_id}/pause", status_code=202, response_model=CommandResult)
@router.post(
    "/pause/{job_id}", status_code=202, response_model=CommandResult, include_in_schema=False
)
async def pause_job(job_id: JobIdDep, context: ContextDep, actor: ActorDep) -> Response:
    """Pause at the next step boundary (a queued job pauses at once)."""
    accepted = await context.commands.pause(job_id, actor)
    return command_result(context, accepted, f"pause requested; job is {accepted.job.status}")


@router.post("/jobs/{job_id}/resume", status_code=202, response_model=CommandResult)
@router.post(
    "/resume/{job_id}", status_code=202, response_model=CommandResult, include_in_schema=False
)
async def resume_job(job_id: JobIdDep, context: ContextDep, actor: ActorDep) -> Response:
    """Queue a paused job again; it resumes from its checkpoint."""
    accepted = await context.commands.resume(job_id, actor)
    return command_result(context, accepted, "resume requested; job is queued")


@router.post("/jobs/{job_id}/cancel", status_code=202, response_model=CommandResult)
async def cancel_job(job_id: JobIdDep, context: ContextDep, actor: ActorDep) -> Response:
    """Cancel (idempotent); a running job stops at the next step boundary."""
    accepted = await context.commands.cancel(job_id, actor)
    return command_result(context, accepted, f"cancel requested; job is {accepted.job.status}")


@router.delete(
    "/jobs/{job_id}",
    status_code=202,
    response_model=CommandResult,
    responses={204: {"description": "finished job archived"}},
)
async def delete_job(job_id: JobIdDep, context: ContextDep, actor: ActorDep) -> Response:
    """An active job is cancelled; a finished one is archived (nothing is ever deleted)."""
    accepted = await context.commands.delete(job_id, actor)
    if accepted.job.archived:
        headers = {POSITION_HEADER: str(accepted.position)}
        return Response(status_code=204, headers=headers)
    return command_result(context, accepted, f"cancel requested; job is {accepted.job.status}")
