"""Request counts and latencies by route template and status; the job id on access logs."""

from __future__ import annotations

import time

from prometheus_client import Counter, Histogram
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from shared.logs import current_job

REQUESTS = Counter(
    "heimdall_http_requests", "HTTP requests answered", ["method", "route", "status"]
)
LATENCY = Histogram(
    "heimdall_http_request_duration_seconds",
    "Time to answer an HTTP request",
    ["method", "route"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
)
# No template: an unknown path (a scanner's random paths must not each become a series),
# or a request refused before routing (401 without a key, 413).
UNMATCHED = "<unmatched>"


def route_template(scope: Scope) -> str:
    """The matched route's path template (`/jobs/{job_id}`), never the raw path."""
    route = scope.get("route")
    path = getattr(route, "path", None)
    return path if isinstance(path, str) else UNMATCHED


class HttpMetrics:
    """Outermost middleware: it sees every answer, 401s and 413s included."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started, status = time.perf_counter(), 500

        async def observed(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                # The router has filled in the path parameters by now; uvicorn writes
                # its access line inside this call, so the line gets the job id.
                job_id = scope.get("path_params", {}).get("job_id")
                if job_id is not None:
                    current_job.set(str(job_id))
            await send(message)

        try:
            await self.app(scope, receive, observed)
        finally:
            route, method = route_template(scope), scope["method"]
            REQUESTS.labels(method, route, str(status)).inc()
            LATENCY.labels(method, route).observe(time.perf_counter() - started)
