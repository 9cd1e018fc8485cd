"""Issue 5's load test: 200 concurrent async clients for 60 s on loopback, mixing commands
(submit, pause, resume, cancel) and queries against a real api + projector on PostgreSQL
and RabbitMQ. 409s from racing commands are expected and counted apart; anything else
that is not a success is an error. Afterwards every accepted submit must be listed."""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx

from bench.common import (
    API,
    Process,
    drop_broker_names,
    emit,
    free_port,
    fresh_schema,
    heimdall_env,
    latency_summary,
    parser,
    raise_open_files,
    wait_http,
    workdir,
)
from bench.loadgen import Client, Run, call, run_clients

MIX = {
    "submit": 15,
    "list": 30,
    "get": 20,
    "metrics": 10,
    "history": 5,
    "pause": 7,
    "resume": 7,
    "cancel": 6,
}
COMMANDS = ("pause", "resume", "cancel")
OK = {"submit": {201}, **{k: {202} for k in COMMANDS}}
EXPECTED_CONFLICT = 409
SEED_JOBS = 200
BODY = {
    "job_name": "load",
    "description": "load test",
    "config": {"epochs": 3, "batch_size": 16, "accelerator": "cpu"},
}


class Mix:
    """Picks each request; knows the jobs submitted and the ones already listed."""

    def __init__(self, seeded: list[str]) -> None:
        self.submitted, self.listed = list(seeded), list(seeded)
        self.kinds, self.weights = list(MIX), list(MIX.values())
        self.random = random.Random(5)

    async def send(self, client: Client, n: int) -> tuple[str, int]:
        kind = self.random.choices(self.kinds, self.weights)[0]
        if kind == "submit":
            answer = await call(client, "POST", f"{API}/jobs", BODY)
            if answer.status == 201:
                self.submitted.append(answer.json()["id"])
        elif kind == "list":
            offset = self.random.choice((0, 0, 0, 50, 100))
            params = {"limit": 50, "offset": offset}
            answer = await call(client, "GET", f"{API}/jobs", params=params)
            if answer.status == 200:
                self.listed += [j["id"] for j in answer.json()["jobs"][:5]]
        elif kind in COMMANDS:
            job_id = self.random.choice(self.submitted)
            answer = await call(client, "POST", f"{API}/jobs/{job_id}/{kind}")
        else:
            job_id = self.random.choice(self.listed)
            path = {"get": "", "metrics": "/metrics", "history": "/events"}[kind]
            answer = await call(client, "GET", f"{API}/jobs/{job_id}{path}")
        return kind, answer.status


def seed(base: str, n: int) -> list[str]:
    with httpx.Client(base_url=base, timeout=30) as client:
        ids = [client.post(f"{API}/jobs", json=BODY).json()["id"] for _ in range(n)]
        wait_listed(client, n)
    return ids


def wait_listed(client: httpx.Client, total: int, timeout: float = 60.0) -> bool:
    """Until GET /jobs counts `total` jobs (the projector has caught up)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if client.get(f"{API}/jobs", params={"limit": 1}).json()["total"] >= total:
            return True
        time.sleep(0.5)
    return False


def report(run: Run) -> dict[str, Any]:
    by_kind: dict[str, Any] = {}
    unexpected: Counter[str] = Counter()
    conflicts = 0
    for kind in sorted({s.kind for s in run.samples}):
        samples = [s for s in run.samples if s.kind == kind]
        statuses = Counter(s.status for s in samples)
        by_kind[kind] = {"requests": len(samples), "statuses": dict(statuses)}
        by_kind[kind] |= latency_summary([s.seconds for s in samples])
        for status, count in statuses.items():
            if kind in COMMANDS and status == EXPECTED_CONFLICT:
                conflicts += count
            elif status not in OK.get(kind, {200}):
                unexpected[f"{kind} {status}"] += count
    return {
        "requests": len(run.samples),
        "seconds": run.seconds,
        "per_s": run.rate,
        "conflicts_409": conflicts,
        "unexpected_errors": sum(unexpected.values()),
        "unexpected": dict(unexpected),
        "by_kind": by_kind,
    } | run.latencies()


def main(clients: int, seconds: float, out: Path | None) -> None:
    raise_open_files(4 * clients + 1024)
    with fresh_schema("bench_load") as schema, workdir() as tmp:
        port = free_port()
        env = heimdall_env(schema, tmp, broker=True, api_port=str(port))
        api = Process.heimdall("api", env, tmp).start()
        projector = Process.heimdall("projector", env, tmp).start()
        try:
            base = f"http://127.0.0.1:{port}"
            wait_http(f"{base}/health")
            mix = Mix(seed(base, SEED_JOBS))
            run = asyncio.run(run_clients(base, clients, mix.send, duration=seconds))
            with httpx.Client(base_url=base, timeout=30) as client:
                all_listed = wait_listed(client, len(mix.submitted))
        finally:
            api_peak, projector_peak = api.stop(), projector.stop()
            drop_broker_names(schema)
        figures = report(run)
        if figures["unexpected_errors"]:
            print(api.log_tail(60))
    emit(
        {
            "figure": "load",
            "clients": clients,
            "duration_s": seconds,
            "mix": MIX,
            **figures,
            "accepted_submits": len(mix.submitted),
            "every_accepted_submit_listed": all_listed,
            "api_peak_rss_mb": api_peak,
            "projector_peak_rss_mb": projector_peak,
        },
        out,
    )


if __name__ == "__main__":
    p = parser(__doc__ or "")
    p.add_argument("--clients", type=int, default=200)
    p.add_argument("--seconds", type=float, default=60.0)
    args = p.parse_args()
    main(args.clients, 10.0 if args.quick else args.seconds, args.json)
