"""Prometheus metrics of the projector, what is read at scrape time, and their server.

The trainer's own metrics live with the trainer (`services/trainer/reporting.py`).

The counters and gauges live in prometheus_client's process registry: the embedded run
shows them all on the api's `/metrics`; a projector or trainer process of its own serves
them on `HEIMDALL_METRICS_PORT`.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterable, Iterator

from prometheus_client import REGISTRY, Counter, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from shared.application import TrainingJobs
from shared.domainmodel import STATUSES
from shared.readmodel.store import ReadStore
from shared.settings import Settings

log = logging.getLogger(__name__)

EVENTS_PROJECTED = Counter(
    "heimdall_events_projected", "Events applied to the read tables by this process"
)
EVENTS_PUBLISHED = Counter("heimdall_events_published", "Events published to the bus")


class StoreCollector(Collector):
    """Store and projector positions, the projector's lag, and (api) jobs by status."""

    def __init__(self, jobs: TrainingJobs, reads: ReadStore, job_counts: bool) -> None:
        self.jobs, self.reads, self.job_counts = jobs, reads, job_counts

    def describe(self) -> Iterable[Metric]:
        return list(self._families())

    def collect(self) -> Iterable[Metric]:
        families = self._families()
        up = families.pop()
        try:
            self._fill(*families)
        except Exception as error:  # the store is down: say so, scrape the rest
            log.warning("metrics: reading the store failed: %s", error)
            up.add_metric([], 0)
            return [up]
        up.add_metric([], 1)
        return [*families, up]

    def _fill(self, *families: GaugeMetricFamily) -> None:
        store, positions, lag, publish_lag, stuck, *jobs = families
        head = int(self.jobs.recorder.max_notification_id() or 0)
        at = self.reads.positions()
        store.add_metric([], head)
        for stage in ("projected", "published"):
            positions.add_metric([stage], at[stage])
        lag.add_metric([], max(0, head - at["projected"]))
        publish_lag.add_metric([], max(0, head - at["published"]))
        faults = {str(f["stage"]): int(f["position"]) for f in self.reads.faults()}
        for stage in ("projecting", "publishing"):
            stuck.add_metric([stage], faults.get(stage, 0))
        if jobs:
            counts = self.reads.count_by_status()
            for status in STATUSES:
                jobs[0].add_metric([status], counts.get(status, 0))

    def _families(self) -> list[GaugeMetricFamily]:
        families = [
            GaugeMetricFamily("heimdall_store_position", "Last position in the event store"),
            GaugeMetricFamily(
                "heimdall_projector_position", "Last position handled", labels=["stage"]
            ),
            GaugeMetricFamily(
                "heimdall_projector_lag_events", "Store position minus projected position"
            ),
            GaugeMetricFamily(
                "heimdall_projector_publish_lag_events", "Store position minus published position"
            ),
            GaugeMetricFamily(
                "heimdall_projector_stuck_position",
                "The position the projector keeps failing on (0: none); see /health",
                labels=["stage"],
            ),
        ]
        if self.job_counts:
            families.append(
                GaugeMetricFamily("heimdall_jobs", "Jobs in the read table", labels=["status"])
            )
        families.append(GaugeMetricFamily("heimdall_store_up", "1 when the scrape read the store"))
        return families


class GpuCollector(Collector):
    """CUDA memory of this process, once torch has put something on a GPU."""

    def collect(self) -> Iterator[Metric]:
        torch = sys.modules.get("torch")
        if torch is None or not torch.cuda.is_available() or not torch.cuda.is_initialized():
            return
        family = GaugeMetricFamily(
            "heimdall_trainer_gpu_memory_bytes",
            "CUDA memory held by this process's tensors",
            labels=["device", "kind"],
        )
        for index in range(torch.cuda.device_count()):
            device = f"cuda:{index}"
            family.add_metric([device, "allocated"], torch.cuda.memory_allocated(index))
            family.add_metric([device, "reserved"], torch.cuda.memory_reserved(index))
            family.add_metric([device, "peak"], torch.cuda.max_memory_allocated(index))
        yield family


REGISTRY.register(GpuCollector())


def serve_metrics(settings: Settings, *collectors: Collector) -> None:
    """A process's own `/metrics` on HEIMDALL_METRICS_PORT, when that is set."""
    if settings.metrics_port is None:
        return
    for collector in collectors:
        REGISTRY.register(collector)
    start_http_server(settings.metrics_port, addr=settings.metrics_host)
    log.info("metrics on http://%s:%d/metrics", settings.metrics_host, settings.metrics_port)
