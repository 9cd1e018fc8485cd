"""Bad input never reaches a table or a trainer: every refusal is a 4xx naming the field."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from hypothesis import given, settings
from hypothesis import strategies as st
from starlette.types import Receive, Scope, Send

from services.api import errors
from services.api.app import create_app
from services.api.deps import ApiContext
from services.api.inputs import BlankInputs
from services.api.preflight import PreflightError
from services.runtime import build_api
from shared.settings import Settings

API = "/api/v1/training"
JSON_HEADERS = {"Content-Type": "application/json"}
JSON = {"content-type": "application/json"}
SURROGATE = "\ud800"
FILES = {"kind": "files", "path": "data/rf"}


def _client(settings: Settings) -> tuple[TestClient, ApiContext]:
    """The api as `create_app` builds it, with the blank-input middleware around it."""
    context, background = build_api(settings, with_projector=True)
    return TestClient(BlankInputs(create_app(context, background))), context


@pytest.fixture
def api(sqlite_settings: Settings) -> Iterator[tuple[TestClient, ApiContext]]:
    client, context = _client(sqlite_settings)
    with client:
        yield client, context


@pytest.fixture(scope="module")
def shared_client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    """One app for the property tests (hypothesis runs each example on the same fixture)."""
    folder = tmp_path_factory.mktemp("bad-input")
    client, _ = _client(Settings(data_dir=folder / "var", poll_seconds=0.05, _env_file=None))
    with client:
        yield client


def post_raw(client: TestClient, body: dict[str, Any]) -> Any:
    """The body as JSON with every non-ASCII character escaped, so lone surrogates survive."""
    content = json.dumps(body, ensure_ascii=True).encode()
    return client.post(f"{API}/jobs", content=content, headers=JSON)


def with_value(path: tuple[str, ...], value: object) -> dict[str, Any]:
    """A submit body with `value` at `path` (files datasets get their kind)."""
    body: dict[str, Any] = {"job_name": f"bad-{uuid.uuid4().hex[:8]}", "config": {}}
    if path[:2] == ("config", "dataset"):
        body["config"]["dataset"] = dict(FILES)
    target = body
    for part in path[:-1]:
        target = target[part]
    target[path[-1]] = value
    return body


def refused(response: Any) -> list[dict[str, Any]]:
    """A JSON 422 whose every string can be sent, and no traceback."""
    assert response.status_code == 422, response.text
    assert response.headers["content-type"].startswith("application/json")
    response.content.decode("utf-8")  # strict: the body is valid UTF-8
    detail: list[dict[str, Any]] = response.json()["detail"]
    return detail


STRING_FIELDS: list[tuple[str, ...]] = [
    ("job_name",),
    ("description",),
    ("config", "model_architecture"),
    ("config", "pretrained_path"),
    ("config", "dataset", "path"),
]


def loc(path: tuple[str, ...]) -> list[str]:
    """Where pydantic reports `path`: a dataset's fields sit under its kind's tag."""
    tagged = (
        ("config", "dataset", "files", *path[2:]) if path[:2] == ("config", "dataset") else path
    )
    return ["body", *tagged]


def nothing_stored(context: ApiContext) -> None:
    assert context.jobs.recorder.max_notification_id() in (0, None)


# Lone surrogates: a 422 naming the field, never a 500 while echoing the input.


@pytest.mark.parametrize("path", STRING_FIELDS)
def test_a_lone_surrogate_is_422_naming_the_field(
    api: tuple[TestClient, ApiContext], path: tuple[str, ...]
) -> None:
    client, context = api
    detail = refused(post_raw(client, with_value(path, f"a{SURROGATE}b")))
    assert loc(path) in [d["loc"] for d in detail]
    assert "a\\ud800b" in [d["input"] for d in detail]  # echoed as its escape
    nothing_stored(context)


def test_a_surrogate_next_to_another_error_is_422(api: tuple[TestClient, ApiContext]) -> None:
    client, _ = api
    body = {"job_name": 5, "description": SURROGATE, "config": {SURROGATE: SURROGATE}}
    detail = refused(post_raw(client, body))
    locs = [d["loc"] for d in detail]
    assert ["body", "job_name"] in locs and ["body", "description"] in locs
    # pydantic cannot read such a key as a field name: it refuses the whole config.
    assert {"loc": ["body", "config"], "input": "\\ud800"}.items() <= detail[-1].items()


# NUL and other control characters: refused, except tab and newlines in a description.

CONTROL = ["\x00", "\x07", "\x1b[31m", "\x7f", "\x85", "\n", "\t", "\r"]
LINE_BREAKS = "\n\t\r"  # allowed in a description: see the next test
REFUSED = [
    pytest.param(path, control, id=f"{'.'.join(path)}-{control!r}")
    for path in STRING_FIELDS
    for control in CONTROL
    if not (path == ("description",) and control in LINE_BREAKS)
]


@pytest.mark.parametrize(("path", "control"), REFUSED)
def test_control_characters_are_422_naming_the_field(
    api: tuple[TestClient, ApiContext], path: tuple[str, ...], control: str
) -> None:
    client, context = api
    detail = refused(post_raw(client, with_value(path, f"a{control}b")))
    error = next(d for d in detail if d["loc"] == loc(path))
    assert f"U+{ord(control[0]):04X}" in error["msg"]
    nothing_stored(context)


def test_a_description_may_have_lines_and_tabs(api: tuple[TestClient, ApiContext]) -> None:
    client, _ = api
    body = {"job_name": "lines", "description": "first line\n\tsecond\r\nthird"}
    response = post_raw(client, body)
    assert response.status_code == 201, response.text
    assert response.json()["description"] == body["description"]


def test_any_other_text_is_accepted(api: tuple[TestClient, ApiContext]) -> None:
    text = "naïve \u2013 日本語 🚀 zero\u200bwidth \u202eright-to-left \ufeff"
    response = post_raw(client := api[0], {"job_name": text, "description": text})
    assert response.status_code == 201, response.text
    assert client.get(f"{API}/jobs/{response.json()['id']}").json()["job"]["job_name"] == text


# Empty query parameters mean absent; blank optional headers are ignored.


@pytest.mark.parametrize(
    "query",
    [
        "/jobs?status=&limit=50&offset=0",
        "/jobs?status=&limit=&offset=&include_archived=",
        "/jobs?status",
        "/events?after=&limit=",
    ],
)
def test_an_empty_query_parameter_means_absent(
    api: tuple[TestClient, ApiContext], query: str
) -> None:
    client, _ = api
    response = client.get(API + query)
    assert response.status_code == 200, response.text


def test_an_empty_query_parameter_means_absent_on_a_job(
    api: tuple[TestClient, ApiContext],
) -> None:
    client, _ = api
    job = post_raw(client, {"job_name": "q"}).json()
    for path in ("/events?after=&limit=", "/metrics?limit="):
        response = client.get(f"{API}/jobs/{job['id']}{path}")
        assert response.status_code == 200, (path, response.text)


@pytest.mark.parametrize("blank", ["", " ", "\t "])
def test_a_blank_idempotency_key_is_no_key(api: tuple[TestClient, ApiContext], blank: str) -> None:
    client, _ = api
    headers = {**JSON, "Idempotency-Key": blank}
    first = client.post(f"{API}/jobs", content=b'{"job_name": "a"}', headers=headers)
    second = client.post(f"{API}/jobs", content=b'{"job_name": "b"}', headers=headers)
    assert (first.status_code, second.status_code) == (201, 201), second.text
    assert first.json()["id"] != second.json()["id"]


def test_a_blank_position_header_is_no_position(api: tuple[TestClient, ApiContext]) -> None:
    client, _ = api
    response = client.get(f"{API}/jobs", headers={"Heimdall-Position": " "})
    assert response.status_code == 200, response.text


async def test_the_middleware_drops_only_blank_inputs() -> None:
    seen: list[Scope] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        seen.append(scope)

    headers = [
        (b"idempotency-key", b"  "),
        (b"heimdall-position", b""),
        (b"x-other", b""),
        (b"idempotency-key", b"k1"),
    ]
    for kind in ("http", "websocket"):
        query = b"a=1&b=&c&&d=%20&e=x=&f="
        await BlankInputs(app)(
            {"type": kind, "query_string": query, "headers": headers}, _never, _never
        )
    for changed in seen:
        assert changed["query_string"] == b"a=1&d=%20&e=x="
        assert changed["headers"] == [(b"x-other", b""), (b"idempotency-key", b"k1")]


async def _never(*_: Any) -> Any:
    raise AssertionError("not called")


# Preflight errors answer in FastAPI's own 422 shape.


def test_a_preflight_error_is_a_422_in_fastapis_shape() -> None:
    app = FastAPI()
    errors.install(app)

    @app.post("/check")
    def check() -> None:
        raise PreflightError("dataset.path", f"data/{SURROGATE}: not a directory")

    response = TestClient(app).post("/check")
    [detail] = refused(response)
    assert detail["loc"] == ["body", "config", "dataset", "path"]
    assert detail["type"] == "preflight" and "not a directory" in detail["msg"]


def test_a_config_that_cannot_run_is_refused_at_submit(
    api: tuple[TestClient, ApiContext],
) -> None:
    client, context = api
    body = {"job_name": "bn", "config": {"model_architecture": "resnet18", "batch_size": 1}}
    [detail] = refused(post_raw(client, body))
    assert detail["loc"] == ["body", "config", "batch_size"]
    assert detail["msg"] == "batch_size 1: resnet18 uses batch norm; use 2 or more"
    nothing_stored(context)


# Properties: arbitrary text anywhere a string goes never gets a 5xx.

# Every code point, with surrogates and controls drawn often: as one alphabet, hypothesis
# would merge them into the rest and draw them about never.
ANY_CHAR = st.characters(codec=None, exclude_categories=()) | st.characters(categories=("Cs", "Cc"))
ANY_TEXT = st.lists(ANY_CHAR, max_size=40).map("".join)
SUBMIT_STRINGS: list[tuple[str, ...]] = [
    *STRING_FIELDS,
    ("config", "lr_scheduler"),
    ("config", "precision"),
    ("config", "accelerator"),
    ("config", "dataset", "kind"),
]


@settings(derandomize=True, max_examples=200, deadline=None)
@given(path=st.sampled_from(SUBMIT_STRINGS), text=ANY_TEXT, key=st.none() | ANY_TEXT)
def test_any_text_in_any_submit_string_is_never_a_5xx(
    shared_client: TestClient, path: tuple[str, ...], text: str, key: str | None
) -> None:
    body = with_value(path, text)
    if key is not None:  # as a key too: unknown fields are echoed in the 422
        body["config"][key] = text
    response = post_raw(shared_client, body)
    assert response.status_code < 500, response.text
    response.content.decode("utf-8")


@settings(derandomize=True, max_examples=200, deadline=None)
@given(
    params=st.dictionaries(
        st.sampled_from(["status", "limit", "offset", "include_archived", "bogus"]), ANY_TEXT
    )
)
def test_any_text_in_the_list_query_is_never_a_5xx(
    shared_client: TestClient, params: dict[str, str]
) -> None:
    query = "&".join(f"{k}={quote(v.encode('utf-8', 'surrogatepass'))}" for k, v in params.items())
    response = shared_client.get(f"{API}/jobs?{query}")
    assert response.status_code in (200, 422), response.text
    response.content.decode("utf-8")


@pytest.mark.parametrize("depth", [520, 700, 900])
def test_input_nested_hundreds_deep_is_refused_not_a_500(
    api: tuple[TestClient, ApiContext], depth: int
) -> None:
    client, context = api
    body = '{"job_name": "a", "x": ' + "[" * depth + "]" * depth + "}"
    response = client.post(
        f"{API}/jobs", content=body, headers={"Content-Type": "application/json"}
    )
    assert response.status_code in (400, 422), response.text
    nothing_stored(context)


def test_a_dataset_seed_a_checkpoint_cannot_hold_is_refused(
    api: tuple[TestClient, ApiContext],
) -> None:
    client, context = api
    body = {"job_name": "s", "config": {"dataset": {"seed": 10**700}}}
    response = client.post(f"{API}/jobs", content=json.dumps(body), headers=JSON_HEADERS)
    assert response.status_code == 422 and "seed" in response.text, response.text
    nothing_stored(context)


def test_whitespace_around_an_idempotency_key_is_not_part_of_it(
    api: tuple[TestClient, ApiContext],
) -> None:
    client, _ = api
    body = {"job_name": "once", "config": {"epochs": 1}}
    first = client.post(f"{API}/jobs", json=body, headers={"Idempotency-Key": "k"})
    again = client.post(f"{API}/jobs", json=body, headers={"Idempotency-Key": "k \t"})
    assert first.status_code == 201 and again.status_code == 201, again.text
    assert again.json()["id"] == first.json()["id"]
