"""Closed-loop async HTTP clients: each sends its next request when the last one answers.

The clients run on aiohttp: on these two cores the load generator shares the CPU with
the server it measures, and httpx's AsyncClient spent about 4.6 ms of CPU per request
(aiohttp: about 1 ms), enough to make the client the bottleneck of a fast route."""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp

from bench.common import latency_summary

Client = aiohttp.ClientSession
Send = Callable[[Client, int], Awaitable[tuple[str, int]]]


@dataclass(frozen=True)
class Answer:
    status: int
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


async def call(
    client: Client,
    method: str,
    path: str,
    body: Any = None,
    params: dict[str, Any] | None = None,
) -> Answer:
    """One request, its answer read to the end."""
    async with client.request(method, path, json=body, params=params) as response:
        return Answer(response.status, await response.read())


@dataclass(frozen=True)
class Sample:
    kind: str
    status: int  # 0: no answer (connection error or timeout)
    seconds: float


@dataclass(frozen=True)
class Run:
    samples: list[Sample]
    seconds: float

    @property
    def rate(self) -> float:
        return len(self.samples) / self.seconds

    def latencies(self, kind: str | None = None) -> dict[str, float]:
        return latency_summary([s.seconds for s in self.samples if kind in (None, s.kind)])


async def run_clients(
    base_url: str,
    clients: int,
    send: Send,
    total: int | None = None,
    duration: float | None = None,
    timeout: float = 30.0,
) -> Run:
    """`clients` concurrent loops calling `send(client, n)` until `total` or `duration`."""
    if total is None and duration is None:
        raise ValueError("give total or duration")
    counter = itertools.count()
    samples: list[Sample] = []
    # Idle connections are dropped before the server's 5 s keep-alive can close one under us.
    connector = aiohttp.TCPConnector(limit=clients, keepalive_timeout=2.0)
    timeouts = aiohttp.ClientTimeout(total=timeout)
    async with Client(base_url, connector=connector, timeout=timeouts) as client:
        started = time.perf_counter()
        deadline = started + duration if duration is not None else None

        async def loop() -> None:
            while deadline is None or time.perf_counter() < deadline:
                n = next(counter)
                if total is not None and n >= total:
                    return
                begun = time.perf_counter()
                try:
                    kind, status = await send(client, n)
                except (aiohttp.ClientError, TimeoutError) as error:
                    kind, status = f"error {type(error).__name__}", 0
                samples.append(Sample(kind, status, time.perf_counter() - begun))

        await asyncio.gather(*(loop() for _ in range(clients)))
        return Run(samples, time.perf_counter() - started)
