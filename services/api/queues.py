"""What the work queues say about a queued job: why it waits, and their depths in /metrics.

Each api replica asks the bus every `REFRESH_SECONDS` for each work queue's ready
messages and consumers (`Bus.work_depths`), keeps the last answer, and shows it in its
`/metrics` as `heimdall_work_queue_ready{queue}` and
`heimdall_work_queue_consumers{queue}`. A queued job's REST representation then names
why it waits (`JobView.waiting`): no connected trainer takes its kind of work, or every
one that does is busy. Live-only, like
`progress`: never stored, so not in replay's comparison.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from typing import Any

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from shared.bus import ACCELERATOR_OF_WORK_QUEUE, Bus, WorkDepth, work_queue
from shared.domainmodel import QUEUED
from shared.waiting import wait_event

log = logging.getLogger(__name__)
REFRESH_SECONDS = 2.0
# What each work queue's jobs need, in words, for the reason a job waits.
NEEDS = {"gpu": "a GPU", "cpu": "the CPU", "any": "any device"}


class WorkQueues(Collector):
    """The last work-queue depths this replica heard, and the reason a queued job waits."""

    def __init__(self) -> None:
        self.depths: dict[str, WorkDepth] | None = None

    async def refresh(self, bus: Bus) -> None:
        """Ask the bus now; on failure the depths are unknown (None) until the next answer."""
        try:
            self.depths = await bus.work_depths()
        except Exception as error:
            log.debug("work queue depths unknown: %r", error)
            self.depths = None

    async def refresh_forever(self, bus: Bus, stop: asyncio.Event) -> None:
        while not stop.is_set():
            await self.refresh(bus)
            await wait_event(stop, REFRESH_SECONDS)

    def collect(self) -> Iterator[GaugeMetricFamily]:
        """The last depths as Prometheus gauges (none while unknown), for this app's
        `/metrics` registry."""
        ready = GaugeMetricFamily(
            "heimdall_work_queue_ready", "Work messages waiting for a trainer", labels=["queue"]
        )
        consumers = GaugeMetricFamily(
            "heimdall_work_queue_consumers", "Trainers consuming a work queue", labels=["queue"]
        )
        for queue, depth in (self.depths or {}).items():
            ready.add_metric([queue], depth.ready)
            consumers.add_metric([queue], depth.consumers)
        yield ready
        yield consumers

    def waiting(self, status: str, config: dict[str, Any]) -> str | None:
        """Why a queued job has not started, or None (not queued, or the depths unknown)."""
        if status != QUEUED or self.depths is None:
            return None
        queue = work_queue(config)
        depth = self.depths.get(queue)
        if depth is None:
            return None
        if depth.consumers == 0:  # a busy trainer consumes nothing: busy and gone look alike
            return (
                f"no free trainer takes jobs that need {NEEDS[queue]} (accelerator:"
                f" {ACCELERATOR_OF_WORK_QUEUE[queue]}): every one is busy, or none is"
                f" connected; it waits in the `{queue}` work queue ({depth.ready} message(s))"
            )
        return (
            f"waiting for a free trainer: {depth.ready} message(s) in the `{queue}` work"
            f" queue, {depth.consumers} idle trainer(s) consuming it"
        )
