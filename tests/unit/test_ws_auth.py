"""API keys on the WebSocket streams: header or `token`, and a message size limit.

The cap on sockets per key needs sockets open at once on one server: tests/e2e/test_security.py.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from starlette.websockets import WebSocketDisconnect

from services.api.app import create_app
from services.runtime import build_api
from shared.settings import Settings

KEY = "ws-" + uuid.uuid4().hex
VIEWER = "view-" + uuid.uuid4().hex
LIMIT = 512


@pytest.fixture
def client(sqlite_settings: Settings) -> Iterator[TestClient]:
    settings = Settings.model_validate(
        {
            **sqlite_settings.model_dump(),
            "api_keys": f"frontend:{KEY}:operator,grafana:{VIEWER}:viewer",
            "ws_max_message_bytes": LIMIT,
        }
    )
    context, background = build_api(settings, with_projector=True)
    with TestClient(create_app(context, background)) as test_client:
        yield test_client


def closed_with(client: TestClient, url: str, **kwargs: Any) -> tuple[int, str]:
    """The close code and reason of a socket the server closes before sending anything."""
    with (
        client.websocket_connect(url, **kwargs) as socket,
        pytest.raises(WebSocketDisconnect) as closed,
    ):
        socket.receive_text()
    return closed.value.code, closed.value.reason


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"headers": {"Authorization": "Bearer not-a-key-of-ours"}},
        {"headers": {"Authorization": f"Basic {KEY}"}},
    ],
    ids=["missing", "unknown", "basic"],
)
def test_an_unknown_key_is_closed_4401_before_anything_is_sent(
    client: TestClient, kwargs: dict[str, Any]
) -> None:
    code, reason = closed_with(client, "/ws/training", **kwargs)
    assert (code, reason) == (4401, "missing or unknown API key")
    code, _ = closed_with(client, f"/ws/training?token=wrong-{KEY}")
    assert code == 4401


@pytest.mark.parametrize(
    "how",
    [
        {"headers": {"Authorization": f"Bearer {KEY}"}},
        {"query": f"?token={VIEWER}"},
    ],
    ids=["header", "token"],
)
def test_a_known_key_in_the_header_or_the_query_is_let_in(
    client: TestClient, how: dict[str, Any]
) -> None:
    # A job that does not exist: past the key check, the stream itself says so and closes.
    url = f"/ws/training/{uuid.uuid4()}{how.get('query', '')}"
    with client.websocket_connect(url, headers=how.get("headers", {})) as socket:
        assert socket.receive_json()["event"] == "error"
        with pytest.raises(WebSocketDisconnect) as closed:
            socket.receive_text()
    assert closed.value.code == 4404


def test_a_message_over_the_limit_closes_the_socket(client: TestClient) -> None:
    with client.websocket_connect(f"/ws/training?token={KEY}") as socket:
        assert socket.receive_json()["event"] == "connected"
        socket.send_text('{"event": "ping"}')
        assert socket.receive_json()["event"] == "pong"
        socket.send_text('{"event": "ping", "pad": "' + "x" * LIMIT + '"}')
        error = socket.receive_json()
        assert error["event"] == "error" and f"over {LIMIT} bytes" in str(error)
        with pytest.raises(WebSocketDisconnect) as closed:
            socket.receive_text()
    assert closed.value.code == 1009
