"""The REST contract of DESIGN §4 on the embedded default (SQLite, in-process bus)."""

from __future__ import annotations

import re
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Protocol

import psycopg
import pytest
from fastapi.testclient import TestClient

from services.api.app import create_app
from services.api.deps import ApiContext
from services.runtime import build_api
from shared.domainmodel import TrainingJob
from shared.settings import Settings

API = "/api/v1/training"
JOB_FIELDS = {
    "id",
    "job_name",
    "description",
    "status",
    "config",
    "created_at",
    "started_at",
    "completed_at",
    "current_epoch",
    "total_epochs",
    "progress_percent",
    "train_loss",
    "val_loss",
    "train_accuracy",
    "val_accuracy",
    "learning_rate",
    "best_epoch",
    "best_val_loss",
    "checkpoint_path",
    "model_path",
    "error_message",
    "attempt",
    "model_architecture",
}
METRIC_FIELDS = {
    "epoch",
    "train_loss",
    "val_loss",
    "train_accuracy",
    "val_accuracy",
    "learning_rate",
    "gradient_norm",
    "val_distance_p50_m",
    "val_distance_p95_m",
    "val_rmse_m",
    "epoch_seconds",
    "samples_per_second",
}
MAX_BODY = 4096
CONFIG_LOC = ["body", "config"]
TRAINER = "trainer-1"


@dataclass
class Api:
    client: TestClient
    context: ApiContext

    def submit(self, name: str | None = None, **config: Any) -> dict[str, Any]:
        body = {"job_name": name or f"job-{uuid.uuid4().hex[:8]}", "config": {"epochs": 4}}
        body["config"].update(config)  # type: ignore[attr-defined]
        response = self.client.post(f"{API}/jobs", json=body)
        assert response.status_code == 201, response.text
        job: dict[str, Any] = response.json()
        return job

    def read(self, job_id: str, until: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
        """The job as queries show it, once the projector has caught up to `until`."""
        deadline = time.monotonic() + 10
        while True:
            response = self.client.get(f"{API}/jobs/{job_id}")
            if response.status_code == 200 and until(response.json()["job"]):
                body: dict[str, Any] = response.json()
                return body
            assert time.monotonic() < deadline, f"read side never showed it: {response.text}"
            time.sleep(0.01)

    def status(self, job_id: str, status: str) -> dict[str, Any]:
        return self.read(job_id, lambda job: job["status"] == status)["job"]  # type: ignore[no-any-return]

    def trainer(self, job_id: str, command: Callable[[TrainingJob], object]) -> None:
        """What a trainer would append, written straight to the store."""
        self.context.jobs.change(uuid.UUID(job_id), command)

    def start(self, job_id: str) -> None:
        self.trainer(job_id, lambda job: job.claim(TRAINER, "cpu", 80, 20))

    def stored_kinds(self, job_id: str) -> list[str]:
        return [e.kind for e in self.context.jobs.history(uuid.UUID(job_id))]


@pytest.fixture
def api(sqlite_settings: Settings) -> Iterator[Api]:
    settings = sqlite_settings.model_copy(update={"max_body_bytes": MAX_BODY})
    context, background = build_api(settings, with_projector=True)
    with TestClient(create_app(context, background)) as client:
        yield Api(client, context)


class Reply(Protocol):
    """A TestClient response (httpx's or httpx2's, whichever Starlette picked)."""

    @property
    def status_code(self) -> int: ...

    @property
    def text(self) -> str: ...

    @property
    def headers(self) -> Mapping[str, str]: ...

    def json(self) -> Any: ...


def error(response: Reply, status: int) -> Any:
    """A clean JSON error: the status, a `detail`, and no traceback."""
    assert response.status_code == status, response.text
    assert "Traceback" not in response.text
    assert response.headers["content-type"].startswith("application/json")
    return response.json()["detail"]


def epoch_metrics(epoch: int) -> dict[str, Any]:
    return {
        "epoch": epoch,
        "train_loss": 2.0 / epoch,
        "val_loss": 2.5 / epoch,
        "train_accuracy": 0.1 * epoch,
        "val_accuracy": 0.09 * epoch,
        "learning_rate": 1e-3,
        "gradient_norm": 0.7,
        "val_distance_p50_m": 900.0,
        "val_distance_p95_m": 3000.0,
        "val_rmse_m": 1500.0,
        "epoch_seconds": 1.5,
        "samples_per_second": 400.0,
    }


def utc(stamp: str) -> datetime:
    moment = datetime.fromisoformat(stamp)
    assert moment.utcoffset() == timedelta(0), stamp
    return moment


# Commands and queries.


def test_submit_returns_201_with_the_job(api: Api) -> None:
    response = api.client.post(
        f"{API}/jobs",
        json={"job_name": "first", "description": "d", "config": {"epochs": 7}},
    )
    assert response.status_code == 201
    job = response.json()
    assert set(job) >= JOB_FIELDS
    assert (job["job_name"], job["description"], job["status"]) == ("first", "d", "queued")
    assert (job["total_epochs"], job["current_epoch"], job["progress_percent"]) == (7, 0, 0.0)
    assert job["config"]["epochs"] == 7 and job["config"]["model_architecture"] == "convnext_atto"
    assert job["model_architecture"] == "convnext_atto" and job["attempt"] == 0
    uuid.UUID(job["id"])
    utc(job["created_at"])
    assert api.stored_kinds(job["id"]) == ["Submitted"]


def test_the_seed_example_answers_what_it_will_cost(api: Api) -> None:
    """The 201 and the row carry the parameter count and the submit's warning; from the
    claim on, a job that asked for any device but got a CPU says so too."""
    job = api.submit(model_architecture="convnext_large", epochs=5, batch_size=16)
    assert 190e6 < job["parameter_count"] < 200e6
    assert len(job["warnings"]) == 1 and "on a trainer without a GPU" in job["warnings"][0]
    assert api.read(job["id"], lambda j: True)["job"]["warnings"] == job["warnings"]
    api.trainer(job["id"], lambda j: j.claim(TRAINER, "cpu (fp32)", 80, 20))
    running = api.status(job["id"], "running")
    assert running["device"] == "cpu (fp32)"
    assert running["warnings"] == [
        *job["warnings"],
        "running on cpu (fp32): its trainer has no GPU",
    ]
    quick = api.submit(accelerator="cpu")
    api.trainer(quick["id"], lambda j: j.claim(TRAINER, "cpu (fp32)", 80, 20))
    assert api.status(quick["id"], "running")["warnings"] == []  # it asked for the CPU


def test_get_job_has_job_metrics_and_websocket_url(api: Api) -> None:
    job = api.submit()
    detail = api.read(job["id"], lambda j: True)
    assert set(detail) == {"job", "recent_metrics", "websocket_url"}
    assert detail["job"]["id"] == job["id"] and detail["job"]["status"] == "queued"
    assert set(detail["job"]) >= JOB_FIELDS
    assert detail["recent_metrics"] == []
    assert detail["websocket_url"] == f"ws://testserver/ws/training/{job['id']}"


def test_list_is_newest_first_with_filters_and_paging(api: Api) -> None:
    ids = [api.submit(f"list-{i}")["id"] for i in range(3)]
    api.client.post(f"{API}/jobs/{ids[1]}/pause")
    api.status(ids[1], "paused")
    for job_id in ids:
        api.read(job_id, lambda j: True)
    page = api.client.get(f"{API}/jobs").json()
    assert [j["id"] for j in page["jobs"]] == ids[::-1] and page["total"] == 3
    assert all(set(j) >= JOB_FIELDS for j in page["jobs"])
    paused = api.client.get(f"{API}/jobs", params={"status": "paused"}).json()
    assert ([j["id"] for j in paused["jobs"]], paused["total"]) == ([ids[1]], 1)
    second = api.client.get(f"{API}/jobs", params={"limit": 1, "offset": 1}).json()
    assert ([j["id"] for j in second["jobs"]], second["total"]) == ([ids[1]], 3)
    beyond = api.client.get(f"{API}/jobs", params={"offset": 5}).json()
    assert (beyond["jobs"], beyond["total"]) == ([], 3)
    none = api.client.get(f"{API}/jobs", params={"status": "running"}).json()
    assert (none["jobs"], none["total"]) == ([], 0)


def test_metrics_are_per_epoch_ascending(api: Api) -> None:
    job_id = api.submit()["id"]
    api.start(job_id)
    for epoch in (1, 2, 3):
        api.trainer(
            job_id,
            lambda job, e=epoch: job.complete_epoch(TRAINER, 1, epoch_metrics(e), e == 3),  # type: ignore[misc]
        )
    detail = api.read(job_id, lambda j: j["current_epoch"] == 3)
    row = detail["job"]
    assert (row["status"], row["progress_percent"], row["best_epoch"]) == ("running", 75.0, 3)
    assert row["val_loss"] == pytest.approx(2.5 / 3) and row["attempt"] == 1
    assert [m["epoch"] for m in detail["recent_metrics"]] == [1, 2, 3]
    response = api.client.get(f"{API}/jobs/{job_id}/metrics")
    assert response.status_code == 200
    rows = response.json()
    assert [m["epoch"] for m in rows] == [1, 2, 3]
    assert set(rows[0]) >= METRIC_FIELDS
    assert {k: rows[1][k] for k in METRIC_FIELDS} == pytest.approx(epoch_metrics(2))
    limited = api.client.get(f"{API}/jobs/{job_id}/metrics", params={"limit": 2}).json()
    assert [m["epoch"] for m in limited] == [1, 2]


def test_metrics_of_a_job_without_epochs_is_empty(api: Api) -> None:
    job_id = api.submit()["id"]
    assert api.client.get(f"{API}/jobs/{job_id}/metrics").json() == []


@pytest.mark.parametrize(
    ("path", "status"),
    [("/jobs/{id}/pause", "paused"), ("/pause/{id}", "paused")],
)
def test_pause_and_its_alias(api: Api, path: str, status: str) -> None:
    job_id = api.submit()["id"]
    response = api.client.post(API + path.format(id=job_id))
    assert response.status_code == 202
    body = response.json()
    assert (body["job_id"], body["id"], body["status"]) == (job_id, job_id, status)
    assert isinstance(body["message"], str) and body["message"]
    assert set(body) >= JOB_FIELDS
    assert api.stored_kinds(job_id) == ["Submitted", "PauseRequested"]
    api.status(job_id, status)


@pytest.mark.parametrize("path", ["/jobs/{id}/resume", "/resume/{id}"])
def test_resume_and_its_alias(api: Api, path: str) -> None:
    job_id = api.submit()["id"]
    api.client.post(f"{API}/jobs/{job_id}/pause")
    response = api.client.post(API + path.format(id=job_id))
    assert response.status_code == 202
    body = response.json()
    assert (body["job_id"], body["status"]) == (job_id, "queued") and body["message"]
    assert api.stored_kinds(job_id) == ["Submitted", "PauseRequested", "ResumeRequested"]


def test_pause_of_a_running_job_is_pausing(api: Api) -> None:
    job_id = api.submit()["id"]
    api.start(job_id)
    body = api.client.post(f"{API}/jobs/{job_id}/pause").json()
    assert body["status"] == "pausing"
    api.status(job_id, "pausing")


def test_cancel_is_202_and_idempotent(api: Api) -> None:
    job_id = api.submit()["id"]
    api.start(job_id)
    first = api.client.post(f"{API}/jobs/{job_id}/cancel")
    again = api.client.post(f"{API}/jobs/{job_id}/cancel")
    assert (first.status_code, again.status_code) == (202, 202)
    assert first.json()["status"] == again.json()["status"] == "cancelling"
    assert first.json()["job_id"] == job_id and first.json()["message"]
    assert api.stored_kinds(job_id) == ["Submitted", "Started", "CancelRequested"]


def test_delete_cancels_an_active_job_then_archives_it(api: Api) -> None:
    job_id = api.submit()["id"]
    cancelled = api.client.delete(f"{API}/jobs/{job_id}")
    assert cancelled.status_code == 202
    assert (cancelled.json()["job_id"], cancelled.json()["status"]) == (job_id, "cancelled")
    archived = api.client.delete(f"{API}/jobs/{job_id}")
    assert (archived.status_code, archived.content) == (204, b"")
    api.read(job_id, lambda j: j["archived"] is True)
    listed = api.client.get(f"{API}/jobs").json()
    assert job_id not in [j["id"] for j in listed["jobs"]] and listed["total"] == 0
    everything = api.client.get(f"{API}/jobs", params={"include_archived": "true"}).json()
    assert [j["id"] for j in everything["jobs"]] == [job_id] and everything["total"] == 1
    assert api.client.delete(f"{API}/jobs/{job_id}").status_code == 204
    assert api.stored_kinds(job_id) == ["Submitted", "CancelRequested", "Archived"]
    events = api.client.get(f"{API}/jobs/{job_id}/events").json()["events"]
    assert [e["kind"] for e in events] == ["Submitted", "CancelRequested", "Archived"]
    feed = api.client.get(f"{API}/events").json()["events"]
    assert "Archived" in [e["kind"] for e in feed if e["job_id"] == job_id]


def test_delete_of_a_running_job_cancels_it(api: Api) -> None:
    job_id = api.submit()["id"]
    api.start(job_id)
    response = api.client.delete(f"{API}/jobs/{job_id}")
    assert (response.status_code, response.json()["status"]) == (202, "cancelling")


def test_delete_of_a_completed_job_archives_it(api: Api) -> None:
    job_id = api.submit()["id"]
    api.start(job_id)
    result: dict[str, Any] = {"final_metrics": {}, "best_epoch": None, "best_val_loss": None}
    result["model_uri"] = "m"
    api.trainer(job_id, lambda job: job.complete(TRAINER, 1, **result))
    assert api.client.delete(f"{API}/jobs/{job_id}").status_code == 204
    row = api.read(job_id, lambda j: j["archived"] is True)["job"]
    assert (row["status"], row["model_path"]) == ("completed", "m")


def test_job_events_are_the_history_with_positions(api: Api) -> None:
    job_id = api.submit()["id"]
    other = api.submit()["id"]
    api.client.post(f"{API}/jobs/{job_id}/pause")
    api.client.post(f"{API}/jobs/{other}/pause")
    api.client.post(f"{API}/jobs/{job_id}/resume")
    response = api.client.get(f"{API}/jobs/{job_id}/events")
    assert response.status_code == 200
    page = response.json()
    events = page["events"]
    assert [e["kind"] for e in events] == ["Submitted", "PauseRequested", "ResumeRequested"]
    assert [e["event"] for e in events][1] == "training_pause_requested"
    assert [e["version"] for e in events] == [1, 2, 3]
    positions = [e["position"] for e in events]
    assert positions == sorted(positions) and len(set(positions)) == 3
    assert page["last_position"] == positions[-1]
    assert all(e["actor"] == "anonymous" and e["job_id"] == job_id for e in events)
    stamps = [utc(e["timestamp"]) for e in events]
    assert stamps == sorted(stamps)
    assert events[0]["data"]["job_name"] and events[0]["data"]["config"]["epochs"] == 4
    after = api.client.get(f"{API}/jobs/{job_id}/events", params={"after": positions[0]})
    assert [e["position"] for e in after.json()["events"]] == positions[1:]
    tail = api.client.get(f"{API}/jobs/{job_id}/events", params={"after": positions[-1]}).json()
    assert (tail["events"], tail["last_position"]) == ([], positions[-1])


def test_event_feed_pages_through_everything(api: Api) -> None:
    ids = [api.submit()["id"] for _ in range(3)]
    for job_id in ids:
        api.client.post(f"{API}/jobs/{job_id}/pause")
    api.client.post(f"{API}/jobs/{ids[0]}/cancel")
    expected = [e.position for e in api.context.jobs.feed(0, 1000)]
    assert len(expected) == 7
    seen: list[dict[str, Any]] = []
    after = 0
    while True:
        page = api.client.get(f"{API}/events", params={"after": after, "limit": 2}).json()
        assert len(page["events"]) <= 2
        if not page["events"]:
            assert page["last_position"] == after
            break
        seen += page["events"]
        after = page["last_position"]
    assert [e["position"] for e in seen] == expected
    assert {e["job_id"] for e in seen} == set(ids)
    whole = api.client.get(f"{API}/events").json()
    assert [e["position"] for e in whole["events"]] == expected


# Idempotency.


def test_idempotency_key_makes_one_job(api: Api) -> None:
    body = {"job_name": "once", "config": {"epochs": 3}}
    headers = {"Idempotency-Key": f"key-{uuid.uuid4()}"}
    first = api.client.post(f"{API}/jobs", json=body, headers=headers)
    retry = api.client.post(f"{API}/jobs", json=body, headers=headers)
    assert first.status_code == 201 and retry.status_code in (200, 201)
    assert first.json()["id"] == retry.json()["id"]
    submitted = [e for e in api.context.jobs.feed(0, 1000) if e.kind == "Submitted"]
    assert [str(e.job_id) for e in submitted] == [first.json()["id"]]
    changed = {"job_name": "once", "config": {"epochs": 4}}
    detail = error(api.client.post(f"{API}/jobs", json=changed, headers=headers), 422)
    assert ["header", "idempotency-key"] in [d["loc"] for d in detail]
    assert len(api.context.jobs.feed(0, 1000)) == 1
    other = api.client.post(f"{API}/jobs", json=body, headers={"Idempotency-Key": "another"})
    assert other.status_code == 201 and other.json()["id"] != first.json()["id"]


# Bad input: a clear error, nothing changed.


def test_malformed_json_is_400(api: Api) -> None:
    for body in (b'{"job_name": ', b"not json", b"\xff\xfe"):
        response = api.client.post(
            f"{API}/jobs", content=body, headers={"content-type": "application/json"}
        )
        assert "malformed" in error(response, 400)
    assert api.context.jobs.recorder.max_notification_id() in (0, None)


CONFIG_ERRORS: list[tuple[str, Any]] = [
    ("epochs", 0),
    ("epochs", 5001),
    ("batch_size", 0),
    ("batch_size", 1025),
    ("learning_rate", 0),
    ("weight_decay", -0.5),
    ("dropout_rate", 0.95),
    ("validation_split", 0.6),
    ("lr_scheduler", "linear"),
    ("accelerator", "tpu"),
    ("precision", "fp8"),
    ("model_architecture", "convnext_tny"),
    ("bogus_field", 1),
]


@pytest.mark.parametrize(("field", "value"), CONFIG_ERRORS)
def test_invalid_config_is_422_naming_the_field(api: Api, field: str, value: Any) -> None:
    body = {"job_name": "bad", "config": {field: value}}
    detail = error(api.client.post(f"{API}/jobs", json=body), 422)
    assert ["body", "config", field] in [d["loc"] for d in detail]
    assert api.context.jobs.recorder.max_notification_id() in (0, None)


def test_unknown_model_is_422_with_suggestions(api: Api) -> None:
    body = {"job_name": "bad", "config": {"model_architecture": "resnet181"}}
    detail = error(api.client.post(f"{API}/jobs", json=body), 422)
    assert "unknown model" in detail[0]["msg"] and "resnet18" in detail[0]["msg"]


@pytest.mark.parametrize(
    ("body", "loc"),
    [
        (b'{"config": {}}', ["body", "job_name"]),
        (b'{"job_name": ""}', ["body", "job_name"]),
        (b'{"job_name": "x", "extra": 1}', ["body", "extra"]),
        (b'{"job_name": "x", "config": []}', ["body", "config"]),
        (b'{"job_name": "x", "config": {"learning_rate": NaN}}', [*CONFIG_LOC, "learning_rate"]),
        (b'{"job_name": "x", "config": {"epochs": 1e400}}', [*CONFIG_LOC, "epochs"]),
        (
            b'{"job_name": "x", "config": {"max_grad_norm": Infinity}}',
            [*CONFIG_LOC, "max_grad_norm"],
        ),
        (b"[1]", ["body"]),
    ],
)
def test_wrong_shapes_are_422(api: Api, body: bytes, loc: list[str]) -> None:
    response = api.client.post(
        f"{API}/jobs", content=body, headers={"content-type": "application/json"}
    )
    assert loc in [d["loc"] for d in error(response, 422)]
    assert api.context.jobs.recorder.max_notification_id() in (0, None)


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/jobs/{id}"),
        ("GET", "/jobs/{id}/metrics"),
        ("GET", "/jobs/{id}/events"),
        ("POST", "/jobs/{id}/pause"),
        ("POST", "/jobs/{id}/resume"),
        ("POST", "/jobs/{id}/cancel"),
        ("POST", "/pause/{id}"),
        ("POST", "/resume/{id}"),
        ("DELETE", "/jobs/{id}"),
    ],
)
def test_unknown_job_is_404(api: Api, method: str, path: str) -> None:
    for job_id in (str(uuid.uuid4()), "not-a-uuid", "1"):
        response = api.client.request(method, API + path.format(id=job_id))
        assert job_id in error(response, 404)
    assert api.context.jobs.recorder.max_notification_id() in (0, None)


@pytest.mark.parametrize(
    ("setup", "command", "status"),
    [
        ([], "resume", "queued"),
        (["pause"], "pause", "paused"),
        (["cancel"], "pause", "cancelled"),
        (["cancel"], "resume", "cancelled"),
    ],
)
def test_illegal_transition_is_409_with_the_status(
    api: Api, setup: list[str], command: str, status: str
) -> None:
    job_id = api.submit()["id"]
    for step in setup:
        assert api.client.post(f"{API}/jobs/{job_id}/{step}").status_code == 202
    before = api.context.jobs.recorder.max_notification_id()
    response = api.client.post(f"{API}/jobs/{job_id}/{command}")
    assert status in error(response, 409)
    assert response.json()["status"] == status
    assert api.context.jobs.recorder.max_notification_id() == before


@pytest.mark.parametrize(("outcome", "status"), [("complete", "completed"), ("fail", "failed")])
def test_cancel_of_a_finished_job_is_409(api: Api, outcome: str, status: str) -> None:
    job_id = api.submit()["id"]
    api.start(job_id)
    if outcome == "complete":
        result: dict[str, Any] = {"final_metrics": {}, "best_epoch": None}
        result.update(best_val_loss=None, model_uri=None)
        api.trainer(job_id, lambda job: job.complete(TRAINER, 1, **result))
    else:
        api.trainer(job_id, lambda job: job.fail(TRAINER, 1, "out of memory", "MemoryError"))
    before = api.context.jobs.recorder.max_notification_id()
    response = api.client.post(f"{API}/jobs/{job_id}/cancel")
    assert status in error(response, 409)
    assert response.json()["status"] == status
    assert api.context.jobs.recorder.max_notification_id() == before


def test_oversize_body_is_413_with_content_length(api: Api) -> None:
    body = b'{"job_name": "' + b"x" * MAX_BODY + b'"}'
    response = api.client.post(
        f"{API}/jobs", content=body, headers={"content-type": "application/json"}
    )
    assert "content-length" in {k.lower() for k in response.request.headers}
    assert "bytes" in error(response, 413)
    assert api.context.jobs.recorder.max_notification_id() in (0, None)


def test_oversize_body_is_413_when_chunked(api: Api) -> None:
    def chunks() -> Iterator[bytes]:
        yield b'{"job_name": "'
        for _ in range(10):
            yield b"x" * 1000
        yield b'"}'

    response = api.client.post(
        f"{API}/jobs", content=chunks(), headers={"content-type": "application/json"}
    )
    assert response.request.headers.get("transfer-encoding") == "chunked"
    assert "bytes" in error(response, 413)
    assert api.context.jobs.recorder.max_notification_id() in (0, None)


def test_a_small_chunked_body_still_works(api: Api) -> None:
    def chunks() -> Iterator[bytes]:
        yield b'{"job_name": "streamed",'
        yield b' "config": {"epochs": 2}}'

    response = api.client.post(
        f"{API}/jobs", content=chunks(), headers={"content-type": "application/json"}
    )
    assert response.status_code == 201, response.text
    assert response.json()["job_name"] == "streamed"


@pytest.mark.parametrize(
    ("path", "params"),
    [
        ("/jobs", {"limit": 0}),
        ("/jobs", {"limit": 501}),
        ("/jobs", {"offset": -1}),
        ("/jobs", {"status": "bogus"}),
        ("/jobs", {"include_archived": "perhaps"}),
        ("/events", {"after": -1}),
        ("/events", {"limit": 0}),
        ("/events", {"limit": "ten"}),
    ],
)
def test_wrong_query_params_are_422(api: Api, path: str, params: dict[str, Any]) -> None:
    detail = error(api.client.get(API + path, params=params), 422)
    assert ["query", next(iter(params))] in [d["loc"] for d in detail]


def test_wrong_job_query_params_are_422(api: Api) -> None:
    job_id = api.submit()["id"]
    cases: list[tuple[str, dict[str, Any]]] = [
        ("/metrics", {"limit": 0}),
        ("/events", {"after": "x"}),
    ]
    for path, params in cases:
        detail = error(api.client.get(f"{API}/jobs/{job_id}{path}", params=params), 422)
        assert ["query", next(iter(params))] in [d["loc"] for d in detail]


def test_internal_errors_and_outages_leak_nothing(
    api: Api, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*_: object) -> Any:
        raise RuntimeError("secret internals")

    def outage(*_: object) -> Any:
        raise psycopg.OperationalError("connection refused")

    app = create_app(api.context)
    with TestClient(app, raise_server_exceptions=False) as client:
        monkeypatch.setattr(api.context.reads, "list_jobs", broken)
        response = client.get(f"{API}/jobs")
        assert error(response, 500) == "internal server error"
        assert "secret" not in response.text
        monkeypatch.setattr(api.context.reads, "list_jobs", outage)
        response = client.get(f"{API}/jobs")
        assert "unavailable" in error(response, 503)
        assert response.headers["retry-after"].isdigit()


# Service endpoints.


def test_health_is_ok(api: Api) -> None:
    response = api.client.get("/health")
    assert response.status_code == 200
    assert response.json() == {
        "status": "ok",
        "store": "ok",
        "read_store": "ok",
        "broker": "ok",
        "projection": "ok",
    }


def test_health_names_what_is_down(api: Api, monkeypatch: pytest.MonkeyPatch) -> None:
    def outage() -> Any:
        raise psycopg.OperationalError("down")

    monkeypatch.setattr(api.context.reads, "positions", outage)
    response = api.client.get("/health")
    assert response.status_code == 503
    body = response.json()
    assert (body["status"], body["store"], body["broker"]) == ("degraded", "ok", "ok")
    assert body["read_store"].startswith("down")


def test_openapi_lists_the_routes(api: Api) -> None:
    response = api.client.get("/openapi.json")
    assert response.status_code == 200
    paths = response.json()["paths"]
    for path in (
        "/jobs",
        "/jobs/{job_id}",
        "/jobs/{job_id}/metrics",
        "/jobs/{job_id}/pause",
        "/jobs/{job_id}/resume",
        "/jobs/{job_id}/cancel",
        "/jobs/{job_id}/events",
        "/events",
    ):
        assert API + path in paths
    assert set(paths[f"{API}/jobs/{{job_id}}"]) == {"get", "delete"}
    assert "/health" in paths


def test_a_page_after_the_head_names_the_head_as_last_position(api: Api) -> None:
    job_id = api.submit()["id"]
    head = api.context.jobs.recorder.max_notification_id()
    assert head
    for path in ("/events", f"/jobs/{job_id}/events"):
        page = api.client.get(f"{API}{path}", params={"after": head + 1000}).json()
        assert (page["events"], page["last_position"]) == ([], head), path
        page = api.client.get(f"{API}{path}", params={"after": head}).json()
        assert (page["events"], page["last_position"]) == ([], head), path


@pytest.mark.parametrize(("page", "marker"), [("/docs", "SwaggerUIBundle"), ("/redoc", "redoc")])
def test_the_docs_need_no_network(api: Api, page: str, marker: str) -> None:
    response = api.client.get(page)
    assert response.status_code == 200 and marker in response.text
    assert "http://" not in response.text and "https://" not in response.text, response.text
    assets = re.findall(r'(?:src|href)="([^"]+)"', response.text)
    assert any(a.endswith(".js") for a in assets), assets
    for asset in assets:
        assert asset.startswith("/"), asset
        served = api.client.get(asset)
        assert served.status_code == 200 and served.content, asset


def test_a_job_says_which_commands_its_status_allows(api: Api) -> None:
    job = api.submit()
    assert job["allowed_commands"] == ["pause", "cancel"]
    paused = api.client.post(f"{API}/jobs/{job['id']}/pause").json()
    assert (paused["status"], paused["allowed_commands"]) == ("paused", ["resume", "cancel"])
    listed = api.client.get(f"{API}/jobs").json()["jobs"][0]
    assert listed["allowed_commands"] == ["resume", "cancel"]
    api.client.post(f"{API}/jobs/{job['id']}/resume")
    api.start(job["id"])
    running = api.status(job["id"], "running")
    assert running["allowed_commands"] == ["pause", "cancel"]
    api.client.post(f"{API}/jobs/{job['id']}/cancel")
    assert api.status(job["id"], "cancelling")["allowed_commands"] == []


def test_the_docs_fetch_nothing_from_elsewhere(api: Api) -> None:
    for page in ("/docs", "/redoc"):
        assert "connect-src 'self'" in api.client.get(page).headers["content-security-policy"]
    redoc = api.client.get("/vendor/docs/redoc.standalone.js")
    assert redoc.status_code == 200 and b"cdn.redoc.ly" not in redoc.content


def test_reads_answer_while_every_submit_waits_on_its_model_check(
    api: Api, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Submits of models not probed yet wait for the one probe child, each on a worker
    thread; 60 of them held every thread that reads also used, and a list waited for
    them (seconds, in a burst of new configs)."""
    from concurrent.futures import ThreadPoolExecutor

    from services.api import probes

    released = threading.Event()
    entered = threading.Semaphore(0)
    gave_up: list[int] = []
    real_probe = probes.PROBES.probe

    def slow_probe(architecture: str, maps: probes.Maps, batch: int) -> probes.ModelProbe:
        entered.release()
        if not released.wait(15):
            gave_up.append(batch)
        return real_probe(architecture, maps, batch)

    monkeypatch.setattr(probes.PROBES, "probe", slow_probe)
    submits = 60
    with ThreadPoolExecutor(submits) as pool:
        waiting = [pool.submit(api.submit) for _ in range(submits)]
        try:
            for _ in range(20):  # at least this many checks hold a thread now
                assert entered.acquire(timeout=10)
            for _ in range(3):
                response = api.client.get(f"{API}/jobs?limit=5")
                assert response.status_code == 200, response.text
            assert not gave_up, "the reads answered only once the model checks gave up"
        finally:
            released.set()
        assert len({future.result()["job_id"] for future in waiting}) == submits
