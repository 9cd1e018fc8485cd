"""`/ws/training` at connect: an event projected while the session reads its starting
state is delivered, not lost between the statuses and the position cap (audit B5)."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from fastapi.testclient import TestClient
from starlette.websockets import WebSocketDisconnect

from services.api import session as live
from services.api.app import create_app
from services.runtime import build_api
from shared.settings import Settings
from tests.processes import wait_until
from tests.readwrites import API, submit


def test_an_event_projected_while_the_statuses_are_read_is_delivered(
    sqlite_settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    context, background = build_api(sqlite_settings, with_projector=True)
    with TestClient(create_app(context, background)) as client:
        job_id = submit(client)["id"]
        read_rows = live.LiveSession._active_jobs

        def rows_then_a_pause(self: live.LiveSession) -> list[Any]:
            rows = read_rows(self)
            context.jobs.pause(uuid.UUID(job_id), "someone")
            head = context.jobs.recorder.max_notification_id() or 0
            wait_until(lambda: context.reads.positions()["projected"] >= head, 10, "it")
            return rows

        monkeypatch.setattr(live.LiveSession, "_active_jobs", rows_then_a_pause)
        with client.websocket_connect("/ws/training") as socket:
            assert socket.receive_json()["event"] == "connected"
            status = socket.receive_json()
            assert (status["event"], status["status"]) == ("training_status", "queued")
            event = socket.receive_json()
            socket.close()
        assert (event["event"], event["status"]) == ("training_pause_requested", "paused")
        assert client.get(f"{API}/jobs/{job_id}").json()["job"]["status"] == "paused"


def test_after_past_the_stores_end_is_refused_not_left_silent(sqlite_settings: Settings) -> None:
    context, background = build_api(sqlite_settings, with_projector=True)
    with TestClient(create_app(context, background)) as client:
        job_id = submit(client)["id"]
        for path in (f"/ws/training/{job_id}?after=99999999", "/ws/training?after=99999999"):
            with client.websocket_connect(path) as socket:
                error = socket.receive_json()
                with pytest.raises(WebSocketDisconnect) as closed:
                    socket.receive_json()
            assert error["event"] == "error" and "past the store" in error["detail"]
            assert closed.value.code == 4400
