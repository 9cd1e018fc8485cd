"""Figure 4: from an event's append to its arrival at 1,000 WebSocket clients of one api
process (store → projector → RabbitMQ → hub), vs a bare FastAPI route that broadcasts one
message to the same number of clients."""

from __future__ import annotations

import asyncio
import json
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
from websockets.asyncio.client import ClientConnection, connect

from bench.common import (
    API,
    DATABASE_URL,
    Process,
    drop_broker_names,
    emit,
    free_port,
    fresh_schema,
    heimdall_env,
    latency_summary,
    own_peak_rss_mb,
    parser,
    raise_open_files,
    ratio,
    wait_http,
    workdir,
)
from bench.populate import WORKER, config, epoch_metrics
from shared.bootstrap import build_app
from shared.domainmodel import TrainingJob
from shared.settings import Settings

CONNECT_BATCH = 50
ARRIVAL_TIMEOUT = 15.0


class Clients:
    """`n` sockets, each noting when every message of a given sequence number reaches it."""

    def __init__(self, url: str, n: int, seq_of: Callable[[dict[str, Any]], int | None]) -> None:
        self.url, self.n, self.seq_of = url, n, seq_of
        self.arrivals: dict[int, list[float]] = {}
        self.sockets: list[ClientConnection] = []
        self._tasks: list[asyncio.Task[None]] = []

    async def open(self) -> None:
        for start in range(0, self.n, CONNECT_BATCH):
            batch = min(CONNECT_BATCH, self.n - start)
            self.sockets += await asyncio.gather(
                *(connect(self.url, max_queue=None, open_timeout=60) for _ in range(batch))
            )
        self._tasks = [asyncio.create_task(self._read(s)) for s in self.sockets]

    async def _read(self, socket: ClientConnection) -> None:
        async for raw in socket:
            seq = self.seq_of(json.loads(raw))
            if seq is not None:
                self.arrivals.setdefault(seq, []).append(time.perf_counter())

    async def wait_all(self, seq: int) -> None:
        deadline = time.monotonic() + ARRIVAL_TIMEOUT
        while len(self.arrivals.get(seq, ())) < self.n and time.monotonic() < deadline:
            await asyncio.sleep(0.005)

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*(s.close() for s in self.sockets), return_exceptions=True)


async def drive(
    clients: Clients, events: int, gap: float, send: Callable[[int], Awaitable[float]]
) -> dict[str, Any]:
    """Send `events` messages one after another; latency = arrival - the sender's clock."""
    await clients.open()
    await asyncio.sleep(1.0)  # let connection set-up settle
    latencies: list[float] = []
    missing = 0
    for seq in range(1, events + 1):
        sent = await send(seq)
        await clients.wait_all(seq)
        arrived = clients.arrivals.get(seq, [])
        missing += clients.n - len(arrived)
        latencies += [t - sent for t in arrived]
        await asyncio.sleep(gap)
    await clients.close()
    return {"latencies": latencies, "missing": missing}


def system_side(n: int, events: int, gap: float, tmp: Path) -> dict[str, Any]:
    with fresh_schema("bench_live") as schema:
        port = free_port()
        env = heimdall_env(
            schema, tmp, broker=True, api_port=str(port), ws_clients_per_key=str(10 * n)
        )
        env["HEIMDALL_WS_QUEUE"] = "1000"
        app = build_app(Settings(database_url=DATABASE_URL, database_schema=schema))
        job = TrainingJob(
            id=uuid.uuid4(), job_name="bench-live", description="", config=config(5000), actor="b"
        )
        job.claim(WORKER, "cpu (fp32)", 1638, 410)
        app.save(job)
        api = Process.heimdall("api", env, tmp).start()
        projector = Process.heimdall("projector", env, tmp).start()
        try:
            base = f"http://127.0.0.1:{port}"
            wait_http(f"{base}/health")
            wait_http(f"{base}{API}/jobs/{job.id}")

            def epoch_of(message: dict[str, Any]) -> int | None:
                if message.get("event") != "training_progress":
                    return None
                return int(message["data"]["epoch"])

            async def append(seq: int) -> float:
                def save() -> float:
                    current = app.get_job(job.id)
                    current.complete_epoch(WORKER, current.attempt, epoch_metrics(seq), False)
                    sent = time.perf_counter()
                    app.save(current)
                    return sent

                return await asyncio.to_thread(save)

            url = f"ws://127.0.0.1:{port}/ws/training/{job.id}"
            result = asyncio.run(drive(Clients(url, n, epoch_of), events, gap, append))
        except Exception:
            print(api.log_tail(), projector.log_tail(), sep="\n", file=sys.stderr)
            raise
        finally:
            result_api, result_projector = api.stop(), projector.stop()
            app.close()
            drop_broker_names(schema)
    return result | {"api_peak_rss_mb": result_api, "projector_peak_rss_mb": result_projector}


def bare_side(n: int, events: int, gap: float, tmp: Path) -> dict[str, Any]:
    port = free_port()
    argv = [sys.executable, "-m", "bench.bare_api", "--port", str(port)]
    bare = Process("bare-ws", argv, heimdall_env("public", tmp), tmp).start()
    try:
        base = f"http://127.0.0.1:{port}"
        wait_http(f"{base}/bare/health")

        def seq_of(message: dict[str, Any]) -> int | None:
            return int(message["seq"]) if "seq" in message else None

        async def main() -> dict[str, Any]:
            async with httpx.AsyncClient(base_url=base, timeout=30) as http:

                async def broadcast(seq: int) -> float:
                    sent = time.perf_counter()
                    body = json.dumps({"event": "training_progress", "seq": seq})
                    await http.post("/bare/broadcast", content=body)
                    return sent

                return await drive(
                    Clients(f"ws://127.0.0.1:{port}/bare/ws", n, seq_of), events, gap, broadcast
                )

        result = asyncio.run(main())
    finally:
        peak = bare.stop()
    return result | {"bare_peak_rss_mb": peak}


def pooled(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Latencies of every round together; the largest peak memory of any round."""
    latencies = [t for r in runs for t in r["latencies"]]
    out = latency_summary(latencies) | {"messages": len(latencies)}
    out["missing"] = sum(r["missing"] for r in runs)
    for key in {k for r in runs for k in r if k.endswith("_mb")}:
        out[key] = max(r[key] for r in runs if r.get(key) is not None)
    return out


def main(n: int, events: int, gap: float, rounds: int, out: Path | None) -> None:
    limit = raise_open_files(4 * n + 1024)
    runs: dict[str, list[dict[str, Any]]] = {"bare": [], "system": []}
    with workdir() as tmp:
        for r in range(rounds):
            for side in ("bare", "system") if r % 2 == 0 else ("system", "bare"):
                run = (bare_side if side == "bare" else system_side)(n, events, gap, tmp)
                runs[side].append(run)
                summary = latency_summary(run["latencies"])
                print(f"{side}: p50 {summary['p50_ms']:.1f} ms, p99 {summary['p99_ms']:.1f} ms")
    system, bare = pooled(runs["system"]), pooled(runs["bare"])
    emit(
        {
            "figure": "live",
            "clients": n,
            "events": events,
            "rounds": rounds,
            "open_file_limit": limit,
            "system": system,
            "bare": bare,
            "p99_ratio": ratio(system["p99_ms"], bare["p99_ms"]),
            "p50_ratio": ratio(system["p50_ms"], bare["p50_ms"]),
            "bench_peak_rss_mb": own_peak_rss_mb(),
            "goal": "system p99 <= bare p99",
        },
        out,
    )


if __name__ == "__main__":
    p = parser(__doc__ or "")
    p.add_argument("--clients", type=int, default=1000)
    p.add_argument("--events", type=int, default=20)
    p.add_argument("--gap", type=float, default=0.3, help="seconds between events")
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args()
    if args.quick:
        args.clients, args.events, args.rounds = 100, 5, 1
    main(args.clients, args.events, args.gap, args.rounds, args.json)
