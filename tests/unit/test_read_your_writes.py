"""Reads follow writes (DESIGN §2.9) and statuses come from the domain alone, on the
embedded stack: the api, its projector and the in-process bus in one process."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from starlette.websockets import WebSocketDisconnect

from services.api.app import create_app
from services.api.deps import ApiContext
from services.runtime import build_api
from shared.bus import ALL_KEYS, Envelope
from shared.domainmodel import TrainingJob
from shared.settings import Settings
from tests.processes import wait_until
from tests.readwrites import API, create_then_read, delete_then_list, pause_then_read, submit

TRAINER = "trainer-1"


@pytest.fixture
def stack(sqlite_settings: Settings) -> Iterator[tuple[TestClient, ApiContext]]:
    """The embedded stack with the projector's real polling interval."""
    settings = sqlite_settings.model_copy(update={"poll_seconds": 0.2})
    context, background = build_api(settings, with_projector=True)
    with TestClient(create_app(context, background)) as client:
        yield client, context


def claimer(context: ApiContext) -> Callable[[str], None]:
    def claim(job_id: str) -> None:
        context.jobs.change(uuid.UUID(job_id), lambda j: j.claim(TRAINER, "cpu", 80, 20))

    return claim


def test_a_created_job_is_readable_at_once(stack: tuple[TestClient, ApiContext]) -> None:
    client, _ = stack
    assert create_then_read(client, client) == []


def test_a_paused_job_reads_pausing_at_once(stack: tuple[TestClient, ApiContext]) -> None:
    client, context = stack
    assert pause_then_read(client, client, claimer(context)) == []


def test_a_deleted_job_leaves_the_list_at_once(stack: tuple[TestClient, ApiContext]) -> None:
    client, _ = stack
    assert delete_then_list(client, client) == []


def last_position(context: ApiContext, job_id: str) -> int:
    return context.jobs.history(uuid.UUID(job_id))[-1].position


def test_every_command_answer_carries_its_events_position(
    stack: tuple[TestClient, ApiContext],
) -> None:
    client, context = stack
    created = client.post(f"{API}/jobs", json={"job_name": "positions"})
    job_id = created.json()["job_id"]
    answers = [created]
    for verb in ("pause", "resume", "cancel"):
        answers.append(client.post(f"{API}/jobs/{job_id}/{verb}"))
        assert answers[-1].json()["position"] == last_position(context, job_id)
    for answer in answers:
        assert int(answer.headers["Heimdall-Position"]) == answer.json()["position"] > 0
    deleted = client.delete(f"{API}/jobs/{job_id}")
    assert deleted.status_code == 204
    assert int(deleted.headers["Heimdall-Position"]) == last_position(context, job_id)
    assert created.json()["job_id"] == created.json()["id"]
    assert created.json()["job_type"] == "training"


def test_a_query_waits_for_the_position_it_names_then_503(sqlite_settings: Settings) -> None:
    settings = sqlite_settings.model_copy(update={"read_wait_seconds": 0.3})
    context, background = build_api(settings, with_projector=True)
    with TestClient(create_app(context, background)) as client:
        position = submit(client)["position"]
        assert client.get(f"{API}/jobs", params={"min_position": position}).status_code == 200
    context, background = build_api(settings, with_projector=False)  # the projector is down
    with TestClient(create_app(context, background)) as client:
        stored = context.jobs.pause(context.jobs.feed()[0].job_id, "someone").position
        for asked in (
            {"params": {"min_position": stored}},
            {"headers": {"Heimdall-Position": str(stored)}},
        ):
            late = client.get(f"{API}/jobs", **asked)
            assert late.status_code == 503, late.text
            assert late.headers["Retry-After"] and late.json()["position"] == stored
            assert late.json()["stored"] is False
        never = client.get(f"{API}/jobs", params={"min_position": stored + 1000})
        assert never.status_code == 422, never.text
        assert never.json()["detail"][0]["loc"] == ["query", "min_position"]


def test_without_a_projector_a_command_is_stored_and_answers_503(
    sqlite_settings: Settings,
) -> None:
    settings = sqlite_settings.model_copy(update={"read_wait_seconds": 0.3})
    context, background = build_api(settings, with_projector=False)
    with TestClient(create_app(context, background)) as client:
        body = {"job_name": "unreadable"}
        answer = client.post(f"{API}/jobs", json=body, headers={"Idempotency-Key": "k1"})
        assert answer.status_code == 503, answer.text
        assert answer.json()["stored"] is True and "retry" in answer.json()["detail"]
        position = int(answer.headers["Heimdall-Position"])
    found = context.jobs.feed(0, 10)
    assert [(e.kind, e.position) for e in found] == [("Submitted", position)]


# Status from the domain alone: every event kind, and each message's status is the read
# table's status at that position.


class Driver:
    """Drives jobs through every event kind, noting the read table's status after each."""

    def __init__(self, client: TestClient, context: ApiContext) -> None:
        self.client, self.context = client, context
        self.seen: dict[int, tuple[str, str]] = {}  # position -> (kind, read status)

    def http(self, method: str, path: str, **kwargs: Any) -> str:
        answer = self.client.request(method, f"{API}{path}", **kwargs)
        assert answer.status_code in (201, 202, 204), answer.text
        position = int(answer.headers["Heimdall-Position"])
        return self._note(position, answer.json()["job_id"] if answer.content else path)

    def trainer(self, job_id: str, command: Callable[[TrainingJob], object]) -> str:
        return self._note(self.context.jobs.command(uuid.UUID(job_id), command).position, job_id)

    def _note(self, position: int, job_id: str) -> str:
        job_id = job_id.rsplit("/", 1)[-1]
        row = self.client.get(f"{API}/jobs/{job_id}", params={"min_position": position})
        assert row.json()["job"]["version"] == self.context.jobs.get_job(uuid.UUID(job_id)).version
        kind = self.context.jobs.history(uuid.UUID(job_id))[-1].kind
        self.seen[position] = (kind, row.json()["job"]["status"])
        return job_id


def drive_every_kind(d: Driver) -> None:
    claim = lambda j: j.claim(TRAINER, "cpu", 80, 20)  # noqa: E731
    metrics = {"epoch": 1, "train_loss": 0.5, "val_loss": 0.6}
    a = d.http("POST", "/jobs", json={"job_name": "a", "config": {"epochs": 2}})
    d.http("POST", f"/jobs/{a}/pause")
    d.http("POST", f"/jobs/{a}/resume")
    d.trainer(a, claim)
    d.trainer(a, lambda j: j.complete_epoch(TRAINER, 1, metrics, True))
    d.trainer(a, lambda j: j.save_checkpoint(TRAINER, 1, 1, "/c/1.pt", "ab"))
    d.http("POST", f"/jobs/{a}/pause")
    d.trainer(a, lambda j: j.record_paused(TRAINER, 1, 1, "/c/1.pt"))
    d.http("POST", f"/jobs/{a}/resume")
    d.trainer(a, claim)  # Resumed
    d.http("POST", f"/jobs/{a}/cancel")
    d.trainer(a, lambda j: j.record_cancelled(TRAINER, 2, 1))
    d.http("DELETE", f"/jobs/{a}")
    b = d.http("POST", "/jobs", json={"job_name": "b"})
    d.trainer(b, claim)
    d.trainer(b, lambda j: j.lose_worker(1, "reaper"))
    d.trainer(b, claim)
    result: dict[str, Any] = {
        "final_metrics": metrics,
        "best_epoch": 1,
        "best_val_loss": 0.6,
        "model_uri": "m",
    }
    d.trainer(b, lambda j: j.complete(TRAINER, 2, **result))
    c = d.http("POST", "/jobs", json={"job_name": "c", "config": {"max_attempts": 1}})
    d.trainer(c, claim)
    d.trainer(c, lambda j: j.lose_worker(1, "reaper"))  # the last attempt: failed
    e = d.http("POST", "/jobs", json={"job_name": "e"})
    d.trainer(e, claim)
    d.trainer(e, lambda j: j.fail(TRAINER, 1, "boom", "RuntimeError"))
    f = d.http("POST", "/jobs", json={"job_name": "f"})
    d.http("DELETE", f"/jobs/{f}")  # a queued job: cancelled at once
    g = d.http("POST", "/jobs", json={"job_name": "g"})
    d.trainer(g, claim)
    d.trainer(g, lambda j: j.preempt(TRAINER, 1, "deploy", 0, 3, "/c/g.pt"))  # queued again
    d.http("DELETE", f"/jobs/{g}")


def test_every_message_carries_the_status_the_read_table_has(sqlite_settings: Settings) -> None:
    context, background = build_api(sqlite_settings, with_projector=True)
    published: list[Envelope] = []

    async def collect(envelope: Envelope) -> None:
        published.append(envelope)

    context.bus.subscribe_fanout(ALL_KEYS, collect)
    with TestClient(create_app(context, background)) as client:
        driver = Driver(client, context)
        drive_every_kind(driver)
        kinds = {kind for kind, _ in driver.seen.values()}
        assert len(kinds) == 15, kinds  # every event kind of DESIGN §3
        expected = {p: status for p, (_, status) in driver.seen.items()}
        history = client.get(f"{API}/events", params={"limit": 1000}).json()["events"]
        assert {e["position"]: e["status"] for e in history} == expected
        for job_id in {e["job_id"] for e in history}:
            with client.websocket_connect(f"/ws/training/{job_id}?after=0") as socket:
                messages = [socket.receive_json() for _ in range(2)]  # connected, status
                with pytest.raises(WebSocketDisconnect) as closed:  # after the job's end
                    while True:
                        messages.append(socket.receive_json())
            assert closed.value.code == 1000
            events = messages[2:]
            assert events[-1]["status"] in ("completed", "failed", "cancelled")
            assert [m["status"] for m in events] == [expected[m["position"]] for m in events]
        wait_until(lambda: len(published) >= len(expected), 10, "the bus to carry everything")
    assert {e.position: e.status for e in published} == expected
