"""The audit trail, read from the event store itself."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Query

from services.api.auth import current_client
from services.api.deps import ApiContext, ContextDep, JobIdDep, read_after, require_database
from services.api.schemas import ERROR_RESPONSES, EventOut, EventPage

router = APIRouter(
    prefix="/api/v1/training",
    tags=["events"],
    responses=ERROR_RESPONSES,
    dependencies=[Depends(current_client), Depends(require_database), Depends(read_after)],
)
After = Annotated[
    int, Query(ge=0, le=2**63 - 1, description="only events after this store position")
]


@router.get("/jobs/{job_id}/events", response_model=EventPage)
def job_events(
    job_id: JobIdDep,
    context: ContextDep,
    after: After = 0,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 1000,
) -> EventPage:
    """One job's history: every event with its position, actor and timestamp."""
    events = [EventOut.of(e) for e in context.jobs.history(job_id, after, limit)]
    return EventPage(events=events, last_position=_last_position(events, after, context))


@router.get("/events", response_model=EventPage)
def all_events(
    context: ContextDep,
    after: After = 0,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> EventPage:
    """Every job's events in store order: page on with `after=last_position`."""
    events = [EventOut.of(e) for e in context.jobs.feed(after, limit)]
    return EventPage(events=events, last_position=_last_position(events, after, context))


def _last_position(events: list[EventOut], after: int, context: ApiContext) -> int:
    """Where to ask again from: the last event's position; with none, `after`, or the head
    of the store when `after` is past it (read after the page, so nothing is skipped)."""
    if events:
        return events[-1].position
    return min(after, context.jobs.recorder.max_notification_id() or 0)
