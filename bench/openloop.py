"""Open-loop mixed load: the api (with its projector) vs a bare async app, same SQL, same DB.

Requests arrive at a fixed offered rate (Poisson arrivals, seeded), whatever the server
does: 80 % `GET /jobs?limit=20`, 20 % `POST /jobs`, over at most `--clients` (50)
connections. A request's latency runs from its scheduled arrival, so time spent waiting
for a connection counts (no coordinated omission). The two sides alternate round by
round on the same PostgreSQL database: the api and its projector (a 201 waits for the
projection: read-your-writes), and `bench/bare_async.py` (Starlette, an async psycopg
pool, the api's newest-first query and count for GET, one insert and commit for POST).

It reports p50/p99 of GET and POST and requests served per second on each side, and
their ratios (goals: GET p99 <= 1.5x, POST p99 <= 2.5x, served >= 0.9x). During the
api's rounds it also samples the projector's lag: for each store position, the time from
its appearance in the store to its projection (polled every 5 ms). On a shared machine
the servers' CPU milliseconds per answered request (api and projector together, against
the bare app) say more than the latencies, which follow whatever else runs.
"""

from __future__ import annotations

import asyncio
import os
import random
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp

from bench.common import (
    API,
    DATABASE_URL,
    Process,
    Result,
    emit,
    free_port,
    fresh_schema,
    heimdall_env,
    latency_summary,
    median,
    parser,
    ratio,
    wait_http,
    with_projection_lag,
    workdir,
)
from bench.loadgen import Sample
from bench.populate import add_jobs
from services.projector.replay import rebuild
from shared.bootstrap import build_app, build_read_store
from shared.settings import Settings

GOALS = {"get_p99": 1.5, "post_p99": 2.5, "served": 0.9}
GET_SHARE = 0.8
CONFIG: dict[str, Any] = {
    "epochs": 3,
    "batch_size": 16,
    "accelerator": "cpu",
    "dataset": {"samples": 256, "n_mels": 16, "frames": 16},
}
WARM_UP_REQUESTS = 5
API_PATHS = {"get": f"{API}/jobs?limit=20", "post": f"{API}/jobs"}


async def offer(
    base: str, paths: dict[str, str], rate: float, seconds: float, clients: int, seed: int
) -> tuple[list[Sample], float]:
    """Poisson arrivals at `rate`/s for `seconds`; each a GET or a POST. Returns every
    answer (status 0: none) with its latency from the scheduled arrival, and the seconds
    until the last answer."""
    rng = random.Random(seed)
    samples: list[Sample] = []
    body = {"job_name": "openloop", "description": "", "config": CONFIG}
    connector = aiohttp.TCPConnector(limit=clients, keepalive_timeout=2.0)
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(base, connector=connector, timeout=timeout) as client:

        async def one(kind: str, due: float) -> None:
            try:
                if kind == "get":
                    async with client.get(paths["get"]) as response:
                        await response.read()
                else:
                    async with client.post(paths["post"], json=body) as response:
                        await response.read()
                status = response.status
            except (aiohttp.ClientError, TimeoutError):
                status = 0
            samples.append(Sample(kind, status, time.perf_counter() - due))

        tasks: list[asyncio.Task[None]] = []
        started = time.perf_counter()
        due = started
        while due < started + seconds:
            due += rng.expovariate(rate)
            await asyncio.sleep(max(0.0, due - time.perf_counter()))
            kind = "get" if rng.random() < GET_SHARE else "post"
            tasks.append(asyncio.create_task(one(kind, due)))
        await asyncio.gather(*tasks)
        return samples, time.perf_counter() - started


async def warm_up(base: str, paths: dict[str, str]) -> None:
    """A few requests of each kind before the measured window, on either side: the first
    submit of the bench's config costs the api one model probe (35-160 ms, once per
    architecture, shape and batch size), which a running api pays once per new config."""
    body = {"job_name": "warm-up", "description": "", "config": CONFIG}
    async with aiohttp.ClientSession(base) as client:
        for _ in range(WARM_UP_REQUESTS):
            async with client.get(paths["get"]) as response:
                response.raise_for_status()
            async with client.post(paths["post"], json=body) as response:
                response.raise_for_status()


async def api_round(
    base: str, schema: str, rate: float, seconds: float, clients: int, seed: int
) -> tuple[list[Sample], float, list[float]]:
    """One round against the api, with the projector's lag watched meanwhile."""
    (samples, took), lag = await with_projection_lag(
        schema, offer(base, API_PATHS, rate, seconds, clients, seed)
    )
    return samples, took, lag


def cpu_seconds(*processes: Process) -> float:
    """User plus system CPU seconds the processes have used (`/proc/PID/stat`)."""
    total = 0.0
    for process in processes:
        if process.popen is None:
            continue
        fields = Path(f"/proc/{process.popen.pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def summary(samples: list[Sample], seconds: float, cpu: float) -> Result:
    """Latencies of the answered requests, how many were answered per second, and the
    server's CPU milliseconds per answered request."""
    served = [s for s in samples if s.status in (200, 201)]
    gets = [s.seconds for s in served if s.kind == "get"]
    posts = [s.seconds for s in served if s.kind == "post"]
    failed = len(samples) - len(served)
    return {
        "offered": len(samples),
        "served_per_s": len(served) / seconds,
        "failed": failed,
        "cpu_ms_per_request": 1000 * cpu / max(len(served), 1),
        "get": latency_summary(gets),
        "post": latency_summary(posts),
    }


def populate(schema: str, jobs: int) -> None:
    settings = Settings(database_url=DATABASE_URL, database_schema=schema)
    app, reads = build_app(settings), build_read_store(settings)
    try:
        add_jobs(app, jobs)
        rebuild(app, reads, app.recorder.max_notification_id() or 0)
    finally:
        reads.close()
        app.close()


def main(
    rate: float, seconds: float, rounds: int, clients: int, jobs: int, out: Path | None
) -> None:
    sides: dict[str, list[Result]] = {"api": [], "bare": []}
    lags: list[float] = []
    peaks: list[float] = []
    with workdir() as log_dir, fresh_schema("bench_open") as schema:
        populate(schema, jobs)
        api_port, bare_port = free_port(), free_port()
        env = heimdall_env(schema, log_dir, api_port=str(api_port))
        bare_argv = [sys.executable, "-m", "bench.bare_async", "--schema", schema]
        bare_argv += ["--port", str(bare_port)]
        for r in range(rounds):
            order = ("api", "bare") if r % 2 == 0 else ("bare", "api")
            for side in order:
                if side == "api":
                    server = Process.heimdall("api", env, log_dir).start()
                    projector = Process.heimdall("projector", env, log_dir).start()
                    try:
                        base = f"http://127.0.0.1:{api_port}"
                        wait_http(f"{base}/health", 120)
                        asyncio.run(warm_up(base, API_PATHS))
                        before = cpu_seconds(server, projector)
                        samples, took, lag = asyncio.run(
                            api_round(base, schema, rate, seconds, clients, seed=r)
                        )
                        cpu = cpu_seconds(server, projector) - before
                    finally:
                        peaks += [p for p in (server.stop(),) if p is not None]
                        projector.stop()
                    lags += lag
                    sides["api"].append(summary(samples, took, cpu))
                else:
                    baseline = Process("bare", bare_argv, env, log_dir).start()
                    try:
                        base = f"http://127.0.0.1:{bare_port}"
                        wait_http(f"{base}/health", 60)
                        paths = {"get": "/bare/jobs?limit=20", "post": "/bare/jobs"}
                        asyncio.run(warm_up(base, paths))
                        before = cpu_seconds(baseline)
                        samples, took = asyncio.run(
                            offer(base, paths, rate, seconds, clients, seed=r)
                        )
                        cpu = cpu_seconds(baseline) - before
                    finally:
                        baseline.stop()
                    sides["bare"].append(summary(samples, took, cpu))
                last = sides[side][-1]
                print(
                    f"round {r + 1} {side}: served {last['served_per_s']:.0f}/s, GET p99"
                    f" {last['get']['p99_ms']:.0f} ms, POST p99 {last['post']['p99_ms']:.0f} ms"
                )
    system, bare = _pooled(sides["api"]), _pooled(sides["bare"])
    emit(
        {
            "figure": "openloop",
            "offered_per_s": rate,
            "seconds_per_round": seconds,
            "rounds": rounds,
            "clients": clients,
            "jobs_listed_from": jobs,
            "api": system | {"peak_rss_mb": max(peaks, default=None)},
            "bare": bare,
            "ratio_get_p99": ratio(system["get_p99_ms"], bare["get_p99_ms"]),
            "ratio_post_p99": ratio(system["post_p99_ms"], bare["post_p99_ms"]),
            "ratio_served": ratio(system["served_per_s"], bare["served_per_s"]),
            "projector_lag": latency_summary(lags) | {"events": len(lags)},
            "goals": GOALS,
        },
        out,
    )


def _pooled(rounds: list[Result]) -> Result:
    """Medians over rounds."""
    return {
        "served_per_s": median([r["served_per_s"] for r in rounds]),
        "failed": sum(r["failed"] for r in rounds),
        "cpu_ms_per_request": median([r["cpu_ms_per_request"] for r in rounds]),
        "get_p50_ms": median([r["get"]["p50_ms"] for r in rounds]),
        "get_p99_ms": median([r["get"]["p99_ms"] for r in rounds]),
        "post_p50_ms": median([r["post"]["p50_ms"] for r in rounds]),
        "post_p99_ms": median([r["post"]["p99_ms"] for r in rounds]),
    }


if __name__ == "__main__":
    p = parser(__doc__ or "")
    p.add_argument("--rate", type=float, default=240.0, help="offered requests per second")
    p.add_argument("--seconds", type=float, default=20.0, help="per round and side")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--clients", type=int, default=50, help="connections at most")
    p.add_argument("--jobs", type=int, default=1000, help="jobs in the table before the load")
    args = p.parse_args()
    if args.quick:
        args.seconds, args.rounds, args.jobs = 5.0, 2, 100
    main(args.rate, args.seconds, args.rounds, args.clients, args.jobs, args.json)
    sys.exit(0)
