"""`make bench`: every benchmark in one go, then docs/BENCHMARKS.md from their figures.

Each bench runs as its own process with a time limit; one that fails is reported as
failed and the others still run. `--quick` runs every bench at its smoke size.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import subprocess
import sys
import time
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import psycopg

from bench.common import BROKER_URL, DATABASE_URL
from bench.report import render

# (name, module, extra arguments, time limit in seconds at full size)
BENCHES: tuple[tuple[str, str, tuple[str, ...], int], ...] = (
    ("trainer", "bench.trainer", (), 720),
    ("commands", "bench.commands", (), 180),
    ("queries", "bench.queries", (), 300),
    ("replay", "bench.replay", (), 240),
    ("live", "bench.live", (), 240),
    ("load", "bench.load", (), 180),
    ("openloop", "bench.openloop", (), 600),
    ("group", "bench.group", (), 900),
    ("gpu", "bench.gpu", ("--cpu",), 300),
    ("ml", "bench.ml", (), 1800),
)
# Run only when named with --only (`make bench-peers`): the peer has a virtualenv of its own.
OPTIONAL = (("peers", "bench.peers", (), 900),)


def machine() -> dict[str, Any]:
    cpu = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    mem_kb = next(
        int(line.split()[1])
        for line in Path("/proc/meminfo").read_text().splitlines()
        if line.startswith("MemTotal:")
    )
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "ram_gib": round(mem_kb / 2**20, 1),
        "os": f"{platform.system()} {platform.release()}",
    }


def versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for package in ("torch", "timm", "eventsourcing", "fastapi", "uvicorn", "psycopg"):
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            found[package] = "not installed"
    found["postgresql"] = _postgres_version()
    found["rabbitmq"] = asyncio.run(_rabbit_version())
    return found


def _postgres_version() -> str:
    try:
        with psycopg.connect(DATABASE_URL, connect_timeout=5) as conn:
            row = conn.execute("SHOW server_version").fetchone()
            return str(row[0]) if row else "unknown"
    except psycopg.Error as error:
        return f"unreachable ({type(error).__name__})"


async def _rabbit_version() -> str:
    import aio_pika

    try:
        connection = await aio_pika.connect(BROKER_URL, timeout=5)
    except Exception as error:
        return f"unreachable ({type(error).__name__})"
    try:
        underlay = connection.transport
        properties = underlay.connection.server_properties if underlay else {}
        return str(properties.get("version", "unknown"))
    finally:
        await connection.close()


def load_average() -> float:
    return round(os.getloadavg()[0], 2)


def run_one(
    name: str, module: str, extra: tuple[str, ...], limit: int, quick: bool, results: Path
) -> dict[str, Any]:
    out = results / f"{name}.json"
    out.unlink(missing_ok=True)
    argv = [
        sys.executable,
        "-m",
        module,
        "--json",
        str(out),
        *extra,
        *(["--quick"] if quick else []),
    ]
    print(f"== {name}: {' '.join(argv[1:])}", flush=True)
    before, started = load_average(), time.monotonic()
    try:
        done = subprocess.run(argv, timeout=limit, capture_output=True, text=True)
        error = None if done.returncode == 0 else done.stderr[-2000:] or done.stdout[-2000:]
    except subprocess.TimeoutExpired:
        error = f"did not finish within {limit} s"
    seconds = time.monotonic() - started
    figures: dict[str, Any] = json.loads(out.read_text()) if out.exists() and not error else {}
    figures |= {
        "seconds": round(seconds, 1),
        "load_before": before,
        "load_after": load_average(),
        "measured_at": datetime.now(UTC).isoformat(timespec="minutes"),
    }
    if error:
        figures["error"] = error
        print(f"   failed: {error[-500:]}", flush=True)
    else:
        print(f"   done in {seconds:.0f} s", flush=True)
    return figures


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--quick", action="store_true", help="every bench at its smoke size")
    p.add_argument("--only", nargs="*", help="run only these benches")
    p.add_argument("--out", type=Path, default=Path("docs/BENCHMARKS.md"))
    p.add_argument("--results", type=Path, default=Path("var/bench"), help="JSON figures")
    p.add_argument("--render", action="store_true", help="only rewrite --out from all.json")
    args = p.parse_args()
    if args.render:
        args.out.write_text(render(json.loads((args.results / "all.json").read_text())))
        return
    args.results.mkdir(parents=True, exist_ok=True)
    started = datetime.now(UTC)
    report: dict[str, Any] = {"machine": machine(), "versions": versions(), "quick": args.quick}
    report["benches"] = {}
    previous = args.results / "all.json"
    if args.only and previous.exists():  # the others keep their last figures
        report["benches"] = json.loads(previous.read_text())["benches"]
    for name, module, extra, limit in BENCHES + OPTIONAL:
        wanted = name in args.only if args.only else (name, module, extra, limit) in BENCHES
        if not wanted:
            continue
        report["benches"][name] = run_one(name, module, extra, limit, args.quick, args.results)
    report["started"] = started.isoformat(timespec="seconds")
    report["minutes"] = round((datetime.now(UTC) - started).total_seconds() / 60, 1)
    (args.results / "all.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(render(report))
    print(f"wrote {args.out} ({report['minutes']} min)")


if __name__ == "__main__":
    main()
