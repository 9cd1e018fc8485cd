"""What every benchmark shares: where PostgreSQL and RabbitMQ are, processes, figures."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import httpx
import psycopg

DATABASE_URL = os.environ.get("BENCH_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test")
BROKER_URL = os.environ.get("BENCH_BROKER_URL", "amqp://guest:guest@127.0.0.1:5672/")
API = "/api/v1/training"
Result = dict[str, Any]
T = TypeVar("T")
LAG_POLL_SECONDS = 0.005
HEAD_SQL = "SELECT max(notification_id) FROM trainingjobs_events"
PROJECTED_SQL = "SELECT position FROM projector_positions WHERE name = 'projected'"


def parser(description: str) -> argparse.ArgumentParser:
    """Every bench takes `--json PATH` for its figures and `--quick` for a short run."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--json", type=Path, help="write the figures here as JSON")
    p.add_argument("--quick", action="store_true", help="small sizes: a smoke run")
    return p


def emit(result: Result, path: Path | None) -> None:
    """Print the figures and, when asked, write them as JSON."""
    text = json.dumps(result, indent=2, default=str)
    print(text)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + "\n")


def latency_summary(seconds: Sequence[float]) -> dict[str, float]:
    """p50, p99 and max in milliseconds."""
    if not seconds:
        return {"p50_ms": float("nan"), "p99_ms": float("nan"), "max_ms": float("nan")}
    ordered = sorted(seconds)
    return {
        "p50_ms": 1000 * percentile(ordered, 50),
        "p99_ms": 1000 * percentile(ordered, 99),
        "max_ms": 1000 * ordered[-1],
    }


def percentile(ordered: Sequence[float], q: float) -> float:
    """The nearest-rank percentile of already sorted values."""
    rank = max(1, min(len(ordered), round(q / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def raise_open_files(wanted: int = 8192) -> int:
    """Lift the soft open-file limit (children inherit it); returns the limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def own_peak_rss_mb() -> float:
    """This process's peak resident memory (Linux reports kilobytes)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def peak_rss_mb(pid: int) -> float | None:
    """A running process's peak resident memory (VmHWM), None where /proc cannot tell."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@contextmanager
def fresh_schema(prefix: str = "bench") -> Iterator[str]:
    """A new PostgreSQL schema of its own, dropped afterwards."""
    schema = f"{prefix}_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(DATABASE_URL, autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA "{schema}"')
    try:
        yield schema
    finally:
        with psycopg.connect(DATABASE_URL, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


def broker_names(schema: str) -> tuple[str, str]:
    """The exchange and work queue of a bench that runs on this schema."""
    tag = schema.replace("_", ".")
    return f"{tag}.exchange", f"{tag}.work"


def drop_broker_names(schema: str) -> None:
    """Delete the bench's exchange and queues from RabbitMQ (they are durable)."""
    import aio_pika

    from shared.rabbit import work_queue_names

    exchange, work = broker_names(schema)

    async def drop() -> None:
        connection = await aio_pika.connect(BROKER_URL, timeout=10)
        async with connection:
            channel = await connection.channel()
            for queue in work_queue_names(work).values():
                await channel.queue_delete(queue)
            await channel.exchange_delete(exchange)

    asyncio.run(drop())


def heimdall_env(schema: str, data_dir: Path, broker: bool = False, **extra: str) -> dict[str, str]:
    """The environment that points a `heimdall` service at this schema (and broker)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HEIMDALL_")}
    env |= {
        "HEIMDALL_DATABASE_URL": DATABASE_URL,
        "HEIMDALL_DATABASE_SCHEMA": schema,
        "HEIMDALL_DATA_DIR": str(data_dir),
        "PYTHONUNBUFFERED": "1",
    }
    if broker:
        exchange, work = broker_names(schema)
        env |= {
            "HEIMDALL_BROKER_URL": BROKER_URL,
            "HEIMDALL_EXCHANGE": exchange,
            "HEIMDALL_WORK_QUEUE": work,
        }
    env |= {f"HEIMDALL_{k.upper()}": v for k, v in extra.items()}
    return env


class Process:
    """A service as a child process, its output in a log file; reports its peak memory."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], log_dir: Path) -> None:
        self.name, self.argv, self.env = name, argv, env
        self.log_path = log_dir / f"{name}.log"
        self.popen: subprocess.Popen[bytes] | None = None
        self.peak_mb: float | None = None

    @classmethod
    def heimdall(cls, command: str, env: dict[str, str], log_dir: Path) -> Process:
        return cls(command, [sys.executable, "-m", "heimdall_cli.main", command], env, log_dir)

    def start(self) -> Process:
        with self.log_path.open("ab") as log:
            self.popen = subprocess.Popen(self.argv, env=self.env, stdout=log, stderr=log)
        return self

    def stop(self) -> float | None:
        """Terminate it; returns its peak resident memory in MiB, read just before."""
        if self.popen is None:
            return None
        self.peak_mb = peak_rss_mb(self.popen.pid)
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(20)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(10)
        return self.peak_mb

    def log_tail(self, lines: int = 30) -> str:
        if not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


def wait_http(url: str, timeout: float = 60.0) -> None:
    """Until `url` answers 200; a clear error naming it otherwise."""
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
            last = "not 200 yet"
        except httpx.HTTPError as error:
            last = error
        time.sleep(0.2)
    raise RuntimeError(f"{url} did not answer 200 within {timeout}s ({last})")


@contextmanager
def workdir() -> Iterator[Path]:
    """A scratch folder for data and logs, removed afterwards."""
    with tempfile.TemporaryDirectory(prefix="heimdall-bench-") as folder:
        yield Path(folder)


def ratio(system: float, bare: float) -> float:
    return system / bare if bare else float("nan")


def run_child(module: str, mode: str, quick: bool, timeout: float) -> Result:
    """One side of a side-by-side bench, `python -m MODULE --child MODE`, in a fresh
    process (so its peak memory is its own); its figures are its last line of output."""
    argv = [sys.executable, "-m", module, "--child", mode, *(["--quick"] if quick else [])]
    # Idle OpenMP threads sleep instead of spinning: on a machine shared with other busy
    # processes, spinning made a run's CPU time depend on its neighbours (same on both sides).
    env = {"OMP_WAIT_POLICY": "PASSIVE", **os.environ}
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"{module} ({mode}) failed:\n{done.stderr[-3000:]}")
    parsed: Result = json.loads(done.stdout.strip().splitlines()[-1])
    return parsed


def alternate(rounds: int, run: Callable[[str], Result]) -> dict[str, list[Result]]:
    """`run("bare")` and `run("system")` alternating ABBA..., so that drift in the
    machine's load hits both sides alike."""
    runs: dict[str, list[Result]] = {"bare": [], "system": []}
    for r in range(rounds):
        for mode in ("bare", "system") if r % 2 == 0 else ("system", "bare"):
            runs[mode].append(run(mode))
    return runs


async def watch_projection_lag(schema: str, stop: asyncio.Event) -> list[float]:
    """Seconds from each store position's appearance to its projection, polled every
    `LAG_POLL_SECONDS`; positions already stored when the watch starts are not counted."""
    seen: dict[int, float] = {}
    lags: list[float] = []
    conn = await psycopg.AsyncConnection.connect(
        DATABASE_URL, autocommit=True, options=f"-c search_path={schema}"
    )

    async def positions() -> tuple[int, int]:
        head = await (await conn.execute(HEAD_SQL)).fetchone()
        done = await (await conn.execute(PROJECTED_SQL)).fetchone()
        return int(head[0] or 0) if head else 0, int(done[0] or 0) if done else 0

    async with conn:
        newest, projected_upto = await positions()
        while not stop.is_set():
            now = time.perf_counter()
            head, done = await positions()
            for position in range(newest + 1, head + 1):
                seen[position] = now
            newest = max(newest, head)
            for position in range(projected_upto + 1, done + 1):
                if position in seen:
                    lags.append(now - seen.pop(position))
            projected_upto = max(projected_upto, done)
            await asyncio.sleep(LAG_POLL_SECONDS)
    return lags


async def with_projection_lag(schema: str, work: Awaitable[T]) -> tuple[T, list[float]]:
    """`work`'s result, and the projector's lag for each store position that appeared
    meanwhile (`watch_projection_lag`)."""
    stop = asyncio.Event()
    lag = asyncio.create_task(watch_projection_lag(schema, stop))
    try:
        result = await work
    finally:
        stop.set()
    return result, await lag
