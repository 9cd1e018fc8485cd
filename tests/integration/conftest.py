"""Integration fixtures: a TCP hop to RabbitMQ that a test cuts to fake an outage."""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import AsyncIterator
from urllib.parse import urlsplit, urlunsplit

import pytest

RABBIT_URL = os.environ.get("HEIMDALL_TEST_BROKER_URL", "amqp://guest:guest@127.0.0.1:5672/")


class TcpProxy:
    """Clients connect to `url`; `cut()` drops them as a broker restart would, and
    `cut(stay_down=True)` also refuses new connections until `open()`."""

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        self.target = (parts.hostname or "127.0.0.1", parts.port or 5672)
        self.port = _free_port()
        netloc = f"{parts.netloc.rsplit('@', 1)[0]}@127.0.0.1:{self.port}"
        self.url = urlunsplit(parts._replace(netloc=netloc))
        self._server: asyncio.Server | None = None
        self._links: set[asyncio.StreamWriter] = set()

    async def open(self) -> None:
        self._server = await asyncio.start_server(self._link, "127.0.0.1", self.port)

    async def cut(self, *, stay_down: bool = False) -> None:
        if stay_down and self._server:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        for writer in list(self._links):
            writer.transport.abort()

    async def _link(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(*self.target)
        self._links |= {writer, up_writer}
        await asyncio.gather(
            _pipe(reader, up_writer), _pipe(up_reader, writer), return_exceptions=True
        )
        self._links -= {writer, up_writer}


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    finally:
        writer.transport.abort()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@pytest.fixture
async def rabbit_proxy() -> AsyncIterator[TcpProxy]:
    """An open proxy to the test RabbitMQ; closed after the test."""
    proxy = TcpProxy(RABBIT_URL)
    await proxy.open()
    yield proxy
    await proxy.cut(stay_down=True)
