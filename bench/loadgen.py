"""Closed-loop async HTTP clients: each sends its next request when the last one answers."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import httpx

from bench.common import latency_summary

Send = Callable[[httpx.AsyncClient, int], Awaitable[tuple[str, int]]]


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
    limits = httpx.Limits(
        max_connections=clients, max_keepalive_connections=clients, keepalive_expiry=2.0
    )
    async with httpx.AsyncClient(base_url=base_url, limits=limits, timeout=timeout) as client:
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
                except httpx.HTTPError as error:
                    kind, status = f"error {type(error).__name__}", 0
                samples.append(Sample(kind, status, time.perf_counter() - begun))

        await asyncio.gather(*(loop() for _ in range(clients)))
        return Run(samples, time.perf_counter() - started)
