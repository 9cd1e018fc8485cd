"""Figure 12 (optional: `make bench-peers`): the api against MLflow's tracking server.

The same four operations, on each system's own PostgreSQL database, under the same
closed-loop load (10 and 50 clients, aiohttp, each client sending its next request when
the last one answers), one operation at a time, the systems alternating:
- create: a job with 10 config fields set (`POST /jobs`, which answers once the job is
  readable) against an MLflow run with 10 params (`runs/create` then `runs/log-batch`:
  MLflow has no one call for it, so the operation is both, timed together);
- list: the newest 50 of 1,000 (`GET /jobs?limit=50` against `runs/search`,
  `max_results` 50, newest first);
- get: one job against one run (`runs/get`);
- history: a 200-epoch job's metrics (`GET /jobs/{id}/metrics`, every metric of every
  epoch) against one metric's 200 points (`metrics/get-history`).
MLflow runs from its own virtualenv (`.venv-peers`, made by `make bench-peers`) with one
worker; the api and its projector are the `heimdall` processes. Memory is each server's
peak resident set, its child processes included.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import psycopg

from bench.common import (
    DATABASE_URL,
    Process,
    Result,
    emit,
    free_port,
    fresh_schema,
    heimdall_env,
    parser,
    wait_http,
    workdir,
)
from bench.loadgen import Client, Send, call, run_clients
from bench.populate import populate
from shared.bootstrap import build_app, build_read_store
from shared.settings import Settings

PEER_PYTHON = Path(os.environ.get("HEIMDALL_PEER_PYTHON", ".venv-peers/bin/python"))
OPERATIONS = ("create", "list", "get", "history")
CLIENTS = (10, 50)
RUNS, EPOCHS, PARAMS = 1000, 200, 10
API = "/api/v1/training"
MLFLOW = "/api/2.0/mlflow"
# The goals of issue 17: at least 5x the peer's throughput, at most 1/3 of its p99.
THROUGHPUT_GOAL, P99_GOAL = 5.0, 1 / 3


def config_fields(n: int) -> dict[str, Any]:
    """10 fields of a job config, as a user sets them (tiny, never trained here)."""
    return {
        "epochs": 3,
        "batch_size": 16,
        "learning_rate": 0.001 + n % 7 * 1e-4,
        "weight_decay": 0.05,
        "model_architecture": "convnext_atto",
        "dropout_rate": 0.1,
        "lr_scheduler": "cosine",
        "warmup_epochs": 1,
        "accelerator": "cpu",
        "seed": n % 1000,
    }


def tree_rss_mb(pid: int, children: bool = True) -> float:
    """Resident MiB of `pid` and (`children`) every process below it."""
    found = 0.0
    for child in [pid, *(descendants(pid) if children else [])]:
        try:
            status = Path(f"/proc/{child}/status").read_text()
        except OSError:
            continue
        found += next(int(line.split()[1]) for line in status.splitlines() if "VmRSS" in line)
    return found / 1024


def descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError):
                continue
            children.setdefault(parent, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


class Peak:
    """The highest resident MiB seen at each `sample`: of the process alone (`own_mb`) and
    with every process below it (`mb`: a server's workers, the api's model-probe child)."""

    def __init__(self, pid: int) -> None:
        self.pid, self.mb, self.own_mb = pid, 0.0, 0.0

    def sample(self) -> None:
        self.mb = max(self.mb, tree_rss_mb(self.pid))
        self.own_mb = max(self.own_mb, tree_rss_mb(self.pid, children=False))


@contextmanager
def mlflow_server(log_dir: Path) -> Iterator[tuple[str, Process]]:
    """MLflow's tracking server on a database of its own, dropped afterwards."""
    if not PEER_PYTHON.exists():
        raise SystemExit(f"{PEER_PYTHON} is missing: `make bench-peers` makes it")
    database = f"bench_mlflow_{uuid.uuid4().hex[:8]}"
    admin = DATABASE_URL.rsplit("/", 1)[0] + "/postgres"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{database}"')
    port = free_port()
    store = DATABASE_URL.rsplit("/", 1)[0] + f"/{database}"
    argv = [
        str(PEER_PYTHON), "-m", "mlflow", "server", "--backend-store-uri", store,
        "--default-artifact-root", str(log_dir / "mlruns"), "--host", "127.0.0.1",
        "--port", str(port), "--workers", "1",
    ]  # fmt: skip
    server = Process("mlflow", argv, {**os.environ, "PYTHONUNBUFFERED": "1"}, log_dir).start()
    try:
        wait_http(f"http://127.0.0.1:{port}/health", timeout=120)
        yield f"http://127.0.0.1:{port}", server
    finally:
        server.stop()
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')


@contextmanager
def heimdall_server(schema: str, log_dir: Path) -> Iterator[tuple[str, Process, Process]]:
    """The api and its projector on their own schema."""
    port = free_port()
    env = heimdall_env(schema, log_dir, api_port=str(port), log_level="WARNING")
    api = Process.heimdall("api", env, log_dir).start()
    projector = Process.heimdall("projector", env, log_dir).start()
    try:
        wait_http(f"http://127.0.0.1:{port}/health")
        yield f"http://127.0.0.1:{port}", api, projector
    finally:
        api.stop()
        projector.stop()


def seed_mlflow(base: str) -> dict[str, str]:
    """An experiment with RUNS runs of PARAMS params, one of them with EPOCHS points of
    `val_loss`; returns the ids the operations use."""
    with httpx.Client(base_url=base, timeout=30) as client:
        experiment = client.post(
            f"{MLFLOW}/experiments/create", json={"name": f"bench-{uuid.uuid4().hex[:6]}"}
        ).json()["experiment_id"]
        run_id = ""
        for n in range(RUNS):
            run_id = _create_run(client, experiment, n)
        metrics = [
            {"key": "val_loss", "value": 1.0 / (1 + e), "timestamp": 0, "step": e}
            for e in range(1, EPOCHS + 1)
        ]
        client.post(f"{MLFLOW}/runs/log-batch", json={"run_id": run_id, "metrics": metrics})
    return {"experiment": experiment, "run": run_id}


def _create_run(client: httpx.Client, experiment: str, n: int) -> str:
    run = client.post(
        f"{MLFLOW}/runs/create",
        json={"experiment_id": experiment, "start_time": int(time.time() * 1000)},
    ).json()["run"]["info"]["run_id"]
    params = [{"key": k, "value": str(v)} for k, v in config_fields(n).items()]
    client.post(f"{MLFLOW}/runs/log-batch", json={"run_id": run, "params": params})
    return str(run)


def seed_heimdall(schema: str, data_dir: Path) -> dict[str, str]:
    """RUNS jobs and one of EPOCHS epochs, saved as real aggregates and projected."""
    settings = Settings(database_url=DATABASE_URL, database_schema=schema, data_dir=data_dir)
    app, reads = build_app(settings), build_read_store(settings)
    try:
        filled = populate(app, reads, RUNS, EPOCHS)
    finally:
        reads.close()
    return {"job": str(filled["long_job"])}


def heimdall_sends(ids: dict[str, str]) -> dict[str, Send]:
    async def create(client: Client, n: int) -> tuple[str, int]:
        body = {"job_name": f"peer-{n}", "config": config_fields(n)}
        return "create", (await call(client, "POST", f"{API}/jobs", body)).status

    async def listing(client: Client, n: int) -> tuple[str, int]:
        return "list", (await call(client, "GET", f"{API}/jobs", params={"limit": 50})).status

    async def get(client: Client, n: int) -> tuple[str, int]:
        return "get", (await call(client, "GET", f"{API}/jobs/{ids['job']}")).status

    async def history(client: Client, n: int) -> tuple[str, int]:
        return "history", (await call(client, "GET", f"{API}/jobs/{ids['job']}/metrics")).status

    return {"create": create, "list": listing, "get": get, "history": history}


def mlflow_sends(ids: dict[str, str]) -> dict[str, Send]:
    async def create(client: Client, n: int) -> tuple[str, int]:
        body = {"experiment_id": ids["experiment"], "start_time": int(time.time() * 1000)}
        made = await call(client, "POST", f"{MLFLOW}/runs/create", body)
        if made.status != 200:
            return "create", made.status
        run = made.json()["run"]["info"]["run_id"]
        params = [{"key": k, "value": str(v)} for k, v in config_fields(n).items()]
        logged = await call(
            client, "POST", f"{MLFLOW}/runs/log-batch", {"run_id": run, "params": params}
        )
        return "create", logged.status

    async def listing(client: Client, n: int) -> tuple[str, int]:
        body = {
            "experiment_ids": [ids["experiment"]],
            "max_results": 50,
            "order_by": ["attributes.start_time DESC"],
        }
        return "list", (await call(client, "POST", f"{MLFLOW}/runs/search", body)).status

    async def get(client: Client, n: int) -> tuple[str, int]:
        params = {"run_id": ids["run"]}
        return "get", (await call(client, "GET", f"{MLFLOW}/runs/get", params=params)).status

    async def history(client: Client, n: int) -> tuple[str, int]:
        params = {"run_id": ids["run"], "metric_key": "val_loss", "max_results": EPOCHS}
        path = f"{MLFLOW}/metrics/get-history"
        return "history", (await call(client, "GET", path, params=params)).status

    return {"create": create, "list": listing, "get": get, "history": history}


def measure(base: str, send: Send, clients: int, seconds: float, peak: Peak) -> Result:
    """One operation under `clients` closed-loop clients for `seconds`."""

    async def main() -> Result:
        sampling = True

        async def sample() -> None:
            while sampling:
                peak.sample()
                await asyncio.sleep(0.5)

        sampler = asyncio.create_task(sample())
        run = await run_clients(base, clients, send, duration=seconds)
        sampling = False
        await sampler
        ok = [s for s in run.samples if 200 <= s.status < 300]
        latencies = run.latencies()
        return {
            "ops_per_s": len(ok) / run.seconds,
            "errors": len(run.samples) - len(ok),
            "p50_ms": latencies["p50_ms"],
            "p99_ms": latencies["p99_ms"],
        }

    return asyncio.run(main())


def main(seconds: float, out: Path | None) -> None:
    figures: dict[str, dict[str, dict[str, Result]]] = {"heimdall": {}, "mlflow": {}}
    memory: dict[str, float] = {}
    with workdir() as tmp, fresh_schema("bench_peers") as schema:
        print("seeding both systems", flush=True)
        ours = seed_heimdall(schema, tmp)  # before its projector starts: one writer at a time
        with (
            mlflow_server(tmp) as (mlflow_base, mlflow),
            heimdall_server(schema, tmp) as (
                api_base,
                api,
                projector,
            ),
        ):
            sends = {
                "heimdall": heimdall_sends(ours),
                "mlflow": mlflow_sends(seed_mlflow(mlflow_base)),
            }
            bases = {"heimdall": api_base, "mlflow": mlflow_base}
            assert mlflow.popen and api.popen and projector.popen
            peaks = {
                "heimdall": Peak(api.popen.pid),
                "mlflow": Peak(mlflow.popen.pid),
                "projector": Peak(projector.popen.pid),
            }
            for clients in CLIENTS:
                for operation in OPERATIONS:
                    for side in ("heimdall", "mlflow") if clients == 10 else ("mlflow", "heimdall"):
                        got = measure(
                            bases[side], sends[side][operation], clients, seconds, peaks[side]
                        )
                        peaks["projector"].sample()
                        figures[side].setdefault(str(clients), {})[operation] = got
                        print(
                            f"{side} {operation} x{clients}: {got['ops_per_s']:.0f}/s,"
                            f" p99 {got['p99_ms']:.1f} ms, {got['errors']} errors",
                            flush=True,
                        )
            memory = {name: peak.mb for name, peak in peaks.items()}
            memory |= {f"{name}_alone": peak.own_mb for name, peak in peaks.items()}
    emit(
        {
            "figure": "peers",
            "peer": f"MLflow {peer_version()} tracking server, 1 worker, PostgreSQL store",
            "seconds_per_cell": seconds,
            "runs": RUNS,
            "epochs": EPOCHS,
            "heimdall": figures["heimdall"],
            "mlflow": figures["mlflow"],
            "ratios": ratios(figures),
            "memory_mb": memory,
            "goals": {"throughput": THROUGHPUT_GOAL, "p99": P99_GOAL},
        },
        out,
    )


def ratios(figures: dict[str, dict[str, dict[str, Result]]]) -> dict[str, dict[str, Result]]:
    """Per clients and operation: heimdall's throughput / MLflow's, heimdall's p99 / MLflow's."""
    out: dict[str, dict[str, Result]] = {}
    for clients, operations in figures["heimdall"].items():
        for operation, ours in operations.items():
            theirs = figures["mlflow"][clients][operation]
            out.setdefault(clients, {})[operation] = {
                "throughput": ours["ops_per_s"] / max(theirs["ops_per_s"], 1e-9),
                "p99": ours["p99_ms"] / max(theirs["p99_ms"], 1e-9),
            }
    return out


def peer_version() -> str:
    done = subprocess.run(
        [str(PEER_PYTHON), "-c", "import mlflow; print(mlflow.__version__)"],
        capture_output=True,
        text=True,
        check=False,
    )
    return done.stdout.strip() or "unknown"


if __name__ == "__main__":
    p = parser(__doc__ or "")
    p.add_argument("--seconds", type=float, default=10.0, help="load per operation and size")
    args = p.parse_args()
    main(3.0 if args.quick else args.seconds, args.json)
    sys.exit(0)
