"""The WebSocket contract (DESIGN §5) against `heimdall up` over real HTTP and WebSockets."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import uuid
from collections.abc import Iterator
from datetime import datetime
from itertools import pairwise
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.asyncio.client import connect

from shared.settings import Settings
from tests.live import Received, assert_matches_the_store, read_all, receive, store_events, ws_base
from tests.processes import (
    API,
    HEIMDALL,
    Service,
    free_port,
    settings_env,
    tiny_config,
    wait_healthy,
    wait_job,
)

# Two short epochs: three steps each on two shared cores.
QUICK = {"epochs": 2, "dataset": {"samples": 64, "n_mels": 16, "frames": 16}}


@pytest.fixture(scope="module")
def embedded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[httpx.Client]:
    """One `heimdall up` for the module: each test owns its jobs."""
    folder = tmp_path_factory.mktemp("ws")
    port = free_port()
    settings = Settings(data_dir=folder / "var", poll_seconds=0.05)
    env = settings_env(settings, api_port=port, api_host="127.0.0.1")
    service = Service("up", env, folder, "up").start()
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=15) as client:
        try:
            wait_healthy(client)
            yield client
        finally:
            service.stop()
            print(service.log()[-3000:])


def submit(client: httpx.Client, **config: Any) -> str:
    body = {"job_name": f"ws-{uuid.uuid4().hex[:6]}", "config": tiny_config(**config)}
    response = client.post(f"{API}/jobs", json=body)
    assert response.status_code == 201, response.text
    job_id: str = response.json()["id"]
    return job_id


async def test_status_then_every_event_in_order_with_live_telemetry_then_a_normal_close(
    embedded: httpx.Client,
) -> None:
    job_id = submit(embedded, **QUICK)
    got = await read_all(f"{ws_base(embedded)}/ws/training/{job_id}?after=0")
    connected, status = got.messages[0], got.messages[1]
    assert connected["event"] == "connected" and connected["job_id"] == job_id
    assert status["event"] == "training_status" and status["id"] == job_id
    assert {"status", "current_epoch", "total_epochs", "config"} <= set(status)
    assert got.close_code == 1000 and got.messages[-1]["event"] == "training_completed"
    assert_matches_the_store(got.positions(), embedded, job_id)
    stored = store_events(embedded, job_id)
    assert [m["event"] for m in got.events()] == [e["event"] for e in stored]
    assert [m["data"] for m in got.events()] == [e["data"] for e in stored]
    progress = got.of("training_progress")
    assert [p["data"]["epoch"] for p in progress] == [1, 2]
    assert_step_telemetry_is_live_only(got, embedded, job_id)


def assert_step_telemetry_is_live_only(got: Received, client: httpx.Client, job_id: str) -> None:
    steps = got.of("training_step")
    assert steps, "no training_step message while the job trained"
    for step in steps:
        assert "position" not in step and step["job_id"] == job_id
        data = step["data"]
        assert data["steps_per_epoch"] == steps[0]["data"]["steps_per_epoch"] >= 1
        assert 1 <= data["step"] <= data["steps_per_epoch"]
        assert data["total_epochs"] == 2 and data["samples_per_second"] > 0
        assert data["loss"] is None or isinstance(data["loss"], float)
    seconds = [datetime.fromisoformat(s["timestamp"]).timestamp() for s in steps]
    assert all(b - a >= 0.9 for a, b in pairwise(seconds)), seconds
    kinds = {e["kind"] for e in store_events(client, job_id)}
    feed = client.get(f"{API}/events", params={"limit": 1000}).json()["events"]
    assert "Step" not in kinds and all(e["event"] != "training_step" for e in feed)


async def test_ping_pong_and_bad_messages_leave_the_socket_open(embedded: httpx.Client) -> None:
    async with connect(f"{ws_base(embedded)}/ws/training") as socket:
        first = json.loads(await socket.recv())
        assert first == {"event": "connected", "job_id": None, "timestamp": first["timestamp"]}
        bad_messages: list[tuple[str | bytes, str]] = [
            ("{not json", "malformed JSON"),
            ('["ping"]', '"event" field'),
            ('{"event": "shout"}', "unknown event 'shout'"),
            (b"\x01\x02", "not binary"),
        ]
        for bad, expected in bad_messages:
            await socket.send(bad)
            await socket.send('{"event": "ping"}')
            error, pong = await _next_two(socket)
            assert error["event"] == "error" and expected in error["detail"], error
            assert pong["event"] == "pong" and "timestamp" in pong


async def _next_two(socket: Any) -> list[dict[str, Any]]:
    """The next two replies, skipping live traffic from other tests' jobs."""
    replies: list[dict[str, Any]] = []
    while len(replies) < 2:
        message = json.loads(await asyncio.wait_for(socket.recv(), 10))
        if message["event"] in ("error", "pong"):
            replies.append(message)
    return replies


@pytest.mark.parametrize(
    ("path", "code", "detail"),
    [
        (f"/ws/training/{uuid.uuid4()}?after=-1", 4400, "after: must be an integer"),
        ("/ws/training?after=soon", 4400, "after: must be an integer"),
        (f"/ws/training/{uuid.uuid4()}", 4404, "not found"),
        ("/ws/training/not-a-uuid", 4404, "not found"),
    ],
)
async def test_bad_requests_get_a_reason_and_a_close_code(
    embedded: httpx.Client, path: str, code: int, detail: str
) -> None:
    got = await read_all(ws_base(embedded) + path, seconds=15)
    assert got.close_code == code and detail in got.close_reason
    [error] = got.messages
    assert error["event"] == "error" and detail in error["detail"]


async def test_resume_after_a_disconnect_has_no_gap_and_no_repeat(
    embedded: httpx.Client,
) -> None:
    job_id = submit(embedded, **{**QUICK, "epochs": 3})
    url = f"{ws_base(embedded)}/ws/training/{job_id}"
    async with connect(f"{url}?after=0") as socket:
        first = await receive(socket, Received(), until=lambda m: m["event"] == "training_started")
    last = first.positions()[-1]
    await asyncio.to_thread(
        wait_job, embedded, job_id, lambda j: j["current_epoch"] >= 1, 120, "epoch 1"
    )
    rest = await read_all(f"{url}?after={last}")
    assert rest.messages[0]["event"] == "connected" and rest.close_code == 1000
    assert rest.positions()[0] > last
    assert_matches_the_store(first.positions() + rest.positions(), embedded, job_id)


async def test_cancelling_closes_the_socket_and_a_later_one_gets_the_final_status(
    embedded: httpx.Client,
) -> None:
    job_id = submit(embedded, **QUICK)
    url = f"{ws_base(embedded)}/ws/training/{job_id}"
    async with connect(f"{url}?after=0") as socket:
        opening = await receive(socket, Received(), until=lambda m: m["event"] == "training_status")
        cancelled = embedded.post(f"{API}/jobs/{job_id}/cancel")
        assert cancelled.status_code == 202, cancelled.text
        rest = await receive(socket, Received(), seconds=60)
    assert rest.close_code == 1000
    assert_matches_the_store(opening.positions() + rest.positions(), embedded, job_id)
    late = await read_all(url)
    assert [m["event"] for m in late.messages] == ["connected", "training_status"]
    assert late.messages[1]["status"] == "cancelled" and late.close_code == 1000


def test_submit_watch_follows_the_job_to_its_end(embedded: httpx.Client, tmp_path: Path) -> None:
    config = tmp_path / "job.json"
    config.write_text(json.dumps(tiny_config(**QUICK)))
    env = {**os.environ, "HEIMDALL_API_URL": str(embedded.base_url), "COLUMNS": "200"}
    watched = subprocess.run(
        [*HEIMDALL, "submit", str(config), "--name", "watched", "--watch"],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    output = watched.stdout + watched.stderr
    assert watched.returncode == 0, output
    assert "epoch 2/2" in output and "completed; model:" in output
