"""On the WebSockets, a job's step telemetry never comes before the event that started it.

Telemetry goes from the trainer straight to the bus; `Started` goes through the store and
the projector. So the first step can reach the api before the event that explains it.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from starlette.testclient import WebSocketTestSession
from starlette.websockets import WebSocketDisconnect

from services.api.app import create_app
from services.api.deps import ApiContext
from services.runtime import build_api
from shared.bus import Envelope
from shared.settings import Settings

API = "/api/v1/training"
LIMIT = 256


@pytest.fixture
def live(sqlite_settings: Settings) -> Iterator[tuple[TestClient, ApiContext]]:
    settings = sqlite_settings.model_copy(update={"ws_max_message_bytes": LIMIT})
    context, background = build_api(settings, with_projector=True)
    with TestClient(create_app(context, background)) as client:
        yield client, context


def step(client: TestClient, context: ApiContext, job_id: str, number: int) -> None:
    """What a trainer's telemetry hook publishes after a step."""
    data = {"epoch": 1, "total_epochs": 2, "step": number, "steps_per_epoch": 4, "loss": 0.5}
    envelope = Envelope.step(job_id, "trainer-1", data)
    assert client.portal is not None
    client.portal.call(context.bus.publish_telemetry, envelope)


def until(socket: WebSocketTestSession, event: str, job_id: str) -> list[dict[str, Any]]:
    """The messages about `job_id` up to and including the first `event` of it."""
    seen: list[dict[str, Any]] = []
    while not seen or seen[-1]["event"] != event:
        message = socket.receive_json()
        if message.get("job_id") == job_id:
            seen.append(message)
    return seen


def hang_up(socket: WebSocketTestSession) -> None:
    """Have the server close the socket (TestClient cannot leave a live one cleanly)."""
    socket.send_text("x" * (LIMIT + 1))
    with pytest.raises(WebSocketDisconnect):
        while True:
            socket.receive_json()


@pytest.mark.parametrize("path", ["/ws/training/{id}", "/ws/training"])
def test_the_first_step_comes_after_training_started(
    live: tuple[TestClient, ApiContext], path: str
) -> None:
    client, context = live
    response = client.post(f"{API}/jobs", json={"job_name": "t", "config": {"epochs": 2}})
    job_id = response.json()["id"]
    with client.websocket_connect(path.format(id=job_id)) as socket:
        until(socket, "training_status", job_id)
        step(client, context, job_id, 1)  # the trainer is faster than the projector
        context.jobs.change(uuid.UUID(job_id), lambda job: job.claim("trainer-1", "cpu", 8, 2))
        seen = until(socket, "training_started", job_id)
        step(client, context, job_id, 2)
        seen += until(socket, "training_step", job_id)
        hang_up(socket)
    kinds = [m["event"] for m in seen]
    assert kinds.index("training_started") < kinds.index("training_step"), kinds
    assert seen[-1]["data"]["step"] == 2, seen[-1]  # the early step was not sent late either
