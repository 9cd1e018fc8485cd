"""Figure 3: GET /jobs (a page of 50 of 10,000 jobs) and GET /jobs/{id}/metrics (a job of
5,000 epochs) on a real api process, vs a bare FastAPI route running the same SQL."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import httpx

from bench.common import (
    API,
    DATABASE_URL,
    Process,
    Result,
    emit,
    free_port,
    fresh_schema,
    heimdall_env,
    median,
    parser,
    ratio,
    wait_http,
    workdir,
)
from bench.loadgen import Client, Run, call, run_clients
from bench.populate import populate
from shared.bootstrap import build_app, build_read_store
from shared.settings import Settings

GOAL_RATE, GOAL_P99 = 0.7, 1.5


def endpoints(long_job: str) -> dict[str, tuple[str, str]]:
    """Per figure: (system path, bare path)."""
    return {
        "list_jobs": (f"{API}/jobs?limit=50&offset=0", "/bare/jobs?limit=50&offset=0"),
        "job_metrics": (f"{API}/jobs/{long_job}/metrics", f"/bare/jobs/{long_job}/metrics"),
    }


def measure(base: str, path: str, clients: int, total: int) -> Run:
    async def send(client: Client, n: int) -> tuple[str, int]:
        return "get", (await call(client, "GET", path)).status

    asyncio.run(run_clients(base, clients, send, total=clients))  # warm up
    run = asyncio.run(run_clients(base, clients, send, total=total))
    bad = [s for s in run.samples if s.status != 200]
    if bad:
        raise RuntimeError(f"{base}{path}: {len(bad)} failed, e.g. {bad[0]}")
    return run


def same_rows(system: httpx.Response, bare: httpx.Response) -> None:
    """Both sides return the same rows (a check that the baseline does the same work)."""
    a, b = system.json(), bare.json()
    if isinstance(a, dict):
        a, b = (
            [r["id"] for r in a["jobs"]] + [a["total"]],
            [r["id"] for r in b["jobs"]] + [b["total"]],
        )
    else:
        a, b = [r["epoch"] for r in a], [r["epoch"] for r in b]
    if a != b:
        raise RuntimeError("the bare route does not return the same rows as the api")


def main(
    jobs: int, epochs: int, clients: int, totals: dict[str, int], rounds: int, out: Path | None
) -> None:
    with fresh_schema("bench_query") as schema, workdir() as tmp:
        settings = Settings(database_url=DATABASE_URL, database_schema=schema, data_dir=tmp)
        app, reads = build_app(settings), build_read_store(settings)
        setup = populate(app, reads, jobs, epochs)
        reads.close()
        app.close()
        print(f"set up: {setup}", flush=True)
        port, bare_port = free_port(), free_port()
        api = Process.heimdall("api", heimdall_env(schema, tmp, api_port=str(port)), tmp)
        bare = Process(
            "bare",
            [sys.executable, "-m", "bench.bare_api", "--port", str(bare_port), "--schema", schema],
            heimdall_env(schema, tmp),
            tmp,
        )
        base, bare_base = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{bare_port}"
        try:
            api.start()
            bare.start()
            wait_http(f"{base}/health")
            wait_http(f"{bare_base}/bare/health")
            figures = {}
            for name, (path, bare_path) in endpoints(setup["long_job"]).items():
                same_rows(
                    httpx.get(base + path, timeout=30), httpx.get(bare_base + bare_path, timeout=30)
                )
                runs: dict[str, list[Run]] = {"system": [], "bare": []}
                for r in range(rounds):
                    for side in ("system", "bare") if r % 2 == 0 else ("bare", "system"):
                        url, p = (base, path) if side == "system" else (bare_base, bare_path)
                        runs[side].append(measure(url, p, clients, totals[name]))
                        print(f"{name} {side}: {runs[side][-1].rate:.0f}/s", flush=True)
                figures[name] = _compare(runs)
        finally:
            api_peak, bare_peak = api.stop(), bare.stop()
    emit(
        {
            "figure": "queries",
            "jobs": jobs + 1,
            "epochs": epochs,
            "clients": clients,
            "requests_per_round": totals,
            "rounds": rounds,
            "setup": setup,
            **figures,
            "api_peak_rss_mb": api_peak,
            "bare_peak_rss_mb": bare_peak,
            "goal_rate": GOAL_RATE,
            "goal_p99": GOAL_P99,
        },
        out,
    )


def _compare(runs: dict[str, list[Run]]) -> Result:
    sides: dict[str, Result] = {}
    for side, rs in runs.items():
        pooled = Run([s for r in rs for s in r.samples], sum(r.seconds for r in rs))
        rates = [r.rate for r in rs]
        sides[side] = {"best_per_s": max(rates), "median_per_s": median(rates), "all_per_s": rates}
        sides[side] |= pooled.latencies()
    s, b = sides["system"], sides["bare"]
    return {
        "system": s,
        "bare": b,
        "ratio_best": ratio(s["best_per_s"], b["best_per_s"]),
        "ratio_median": ratio(s["median_per_s"], b["median_per_s"]),
        "p99_ratio": ratio(s["p99_ms"], b["p99_ms"]),
    }


if __name__ == "__main__":
    p = parser(__doc__ or "")
    p.add_argument("--jobs", type=int, default=10_000)
    p.add_argument("--epochs", type=int, default=5_000)
    p.add_argument("--clients", type=int, default=10)
    p.add_argument("--list-requests", type=int, default=1500, help="per round and side")
    p.add_argument("--metrics-requests", type=int, default=60, help="per round and side")
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args()
    if args.quick:
        args.jobs, args.epochs, args.list_requests, args.metrics_requests = 1000, 500, 200, 20
        args.rounds = 1
    totals = {"list_jobs": args.list_requests, "job_metrics": args.metrics_requests}
    main(args.jobs, args.epochs, args.clients, totals, args.rounds, args.json)
