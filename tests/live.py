"""A real WebSocket client for tests of the live streams (the `websockets` library)."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from tests.processes import API

Message = dict[str, Any]


def ws_base(client: httpx.Client) -> str:
    return str(client.base_url).rstrip("/").replace("http://", "ws://", 1)


@dataclass
class Received:
    """What one connection got, and how it was closed."""

    messages: list[Message] = field(default_factory=list)
    close_code: int | None = None
    close_reason: str = ""

    def events(self) -> list[Message]:
        """The stored events only (they have positions)."""
        return [m for m in self.messages if "position" in m and m["event"].startswith("training_")]

    def positions(self) -> list[int]:
        return [m["position"] for m in self.events()]

    def of(self, event: str) -> list[Message]:
        return [m for m in self.messages if m["event"] == event]


async def receive(
    socket: ClientConnection,
    into: Received,
    until: Callable[[Message], bool] | None = None,
    seconds: float = 120.0,
) -> Received:
    """Read messages until `until(message)` holds or the server closes the socket."""
    try:
        async with asyncio.timeout(seconds):
            async for raw in socket:
                into.messages.append(json.loads(raw))
                if until is not None and until(into.messages[-1]):
                    return into
    except ConnectionClosed:
        pass
    into.close_code, into.close_reason = socket.close_code, socket.close_reason or ""
    return into


async def read_all(url: str, seconds: float = 120.0, **options: Any) -> Received:
    """Connect, read until the server closes, and say how it closed."""
    async with connect(url, **options) as socket:
        return await receive(socket, Received(), seconds=seconds)


def store_events(client: httpx.Client, job_id: str) -> list[Message]:
    """The job's history from the store, over REST."""
    events: list[Message] = client.get(f"{API}/jobs/{job_id}/events").json()["events"]
    return events


def assert_matches_the_store(positions: list[int], client: httpx.Client, job_id: str) -> None:
    """Every stored event of the job, once each, in store order."""
    stored = [e["position"] for e in store_events(client, job_id)]
    assert positions == stored, f"websocket {positions} != store {stored}"


def tiny_window_socket(port: int, receive_buffer: int = 4096, segment: int = 536) -> socket.socket:
    """A TCP socket that holds little unread data, so a client that stops reading soon
    backs up the server's writes. The small segment size matters on loopback: the
    kernel sizes the sender's buffer from the segment size (64 kB there by default)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG, segment)
    sock.connect(("127.0.0.1", port))
    return sock
