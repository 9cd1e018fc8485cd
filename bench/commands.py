"""Figure 2: POST /jobs per second from 50 concurrent clients against a real api process on
PostgreSQL, vs eventsourcing's own save() of the same aggregate from 50 threads."""

from __future__ import annotations

import asyncio
import itertools
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

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
from bench.loadgen import Client, Run, Sample, call, run_clients
from shared.config import JobConfig
from shared.settings import DEFAULT_SUBMIT_BATCH

GOAL = 0.5
CONFIG: dict[str, Any] = {
    "epochs": 3,
    "batch_size": 16,
    "accelerator": "cpu",
    "dataset": {"samples": 256, "n_mels": 16, "frames": 16},
}


def http_side(
    clients: int, total: int, log_dir: Path, submit_batch: int = DEFAULT_SUBMIT_BATCH
) -> tuple[Run, float | None, list[float]]:
    """An api process and its projector on their own schema, hammered by `clients` async
    clients (a 201 waits for the projection: read-your-writes); `submit_batch` 1 turns the
    api's group commit off (one transaction per submit). Returns the run, the api's peak
    memory and the projector's lag for each submit (store to read table, seconds)."""
    with fresh_schema("bench_cmd") as schema:
        port = free_port()
        env = heimdall_env(schema, log_dir, api_port=str(port), submit_batch=str(submit_batch))
        api = Process.heimdall("api", env, log_dir).start()
        projector = Process.heimdall("projector", env, log_dir).start()
        try:
            base = f"http://127.0.0.1:{port}"
            wait_http(f"{base}/health")
            body = {"job_name": "bench", "description": "", "config": CONFIG}

            async def send(client: Client, n: int) -> tuple[str, int]:
                return "submit", (await call(client, "POST", f"{API}/jobs", body)).status

            asyncio.run(run_clients(base, clients, send, total=clients))  # warm up
            run, lag = asyncio.run(
                with_projection_lag(schema, run_clients(base, clients, send, total=total))
            )
        finally:
            peak = api.stop()
            projector.stop()
        bad = [s for s in run.samples if s.status != 201]
        if bad:
            raise RuntimeError(f"{len(bad)} submits failed, e.g. {bad[0]}\n{api.log_tail()}")
        return run, peak, lag


def raw_side(threads: int, total: int, log_dir: Path) -> Run:
    """`TrainingJobs.save()` (eventsourcing's Application.save) of the same aggregate."""
    from shared.bootstrap import build_app
    from shared.domainmodel import TrainingJob
    from shared.settings import Settings

    config = JobConfig.model_validate(CONFIG).model_dump(mode="json")
    with fresh_schema("bench_raw") as schema:
        app = build_app(Settings(database_url=DATABASE_URL, database_schema=schema))
        lock, latencies = threading.Lock(), []

        def save_one() -> None:
            job = TrainingJob(
                id=uuid.uuid4(), job_name="bench", description="", config=config, actor="bench"
            )
            begun = time.perf_counter()
            app.save(job)
            with lock:
                latencies.append(time.perf_counter() - begun)

        def drive(pool: ThreadPoolExecutor, n: int) -> float:
            counter = itertools.count()

            def worker(_: int) -> None:
                while next(counter) < n:
                    save_one()

            started = time.perf_counter()
            list(pool.map(worker, range(threads)))
            return time.perf_counter() - started

        with ThreadPoolExecutor(threads) as pool:
            drive(pool, threads)  # warm up
            latencies.clear()
            seconds = drive(pool, total)
        app.close()
    return Run([Sample("save", 201, s) for s in latencies], seconds)


def main(clients: int, total: int, rounds: int, out: Path | None) -> None:
    runs: dict[str, list[Run]] = {"http": [], "single": [], "raw": []}
    peaks: list[float] = []
    lags: list[float] = []
    with workdir() as log_dir:
        for r in range(rounds):
            sides = ("http", "raw", "single") if r % 2 == 0 else ("single", "raw", "http")
            for side in sides:
                if side == "raw":
                    runs[side].append(raw_side(clients, total, log_dir))
                else:
                    batch = 1 if side == "single" else DEFAULT_SUBMIT_BATCH
                    run, peak, lag = http_side(clients, total, log_dir, submit_batch=batch)
                    runs[side].append(run)
                    lags += lag if side == "http" else []
                    peaks += [peak] if peak is not None else []
                print(f"{side}: {runs[side][-1].rate:.0f}/s")
    system, bare, single = _side(runs["http"]), _side(runs["raw"]), _side(runs["single"])
    emit(
        {
            "figure": "commands",
            "clients": clients,
            "requests_per_round": total,
            "rounds": rounds,
            "system": system | {"api_peak_rss_mb": max(peaks, default=None)},
            "bare": bare,
            "single": single,
            "ratio_best": ratio(system["best_per_s"], bare["best_per_s"]),
            "ratio_median": ratio(system["median_per_s"], bare["median_per_s"]),
            "single_ratio_best": ratio(single["best_per_s"], bare["best_per_s"]),
            "projector_lag": latency_summary(lags) | {"events": len(lags)},
            "goal": GOAL,
        },
        out,
    )


def _side(runs: list[Run]) -> Result:
    rates = [r.rate for r in runs]
    pooled = [s.seconds for r in runs for s in r.samples]
    figures = {"best_per_s": max(rates), "median_per_s": median(rates), "all_per_s": rates}
    return figures | latency_summary(pooled)


if __name__ == "__main__":
    p = parser(__doc__ or "")
    p.add_argument("--clients", type=int, default=50)
    p.add_argument("--requests", type=int, default=3000, help="per round and side")
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args()
    total = 300 if args.quick else args.requests
    main(args.clients, total, 1 if args.quick else args.rounds, args.json)
    sys.exit(0)
