"""The resident memory of an idle `heimdall up`, fresh and after a big job (not a test).

`python -m bench.idle_memory [--model convnext_base]` starts `heimdall up` on its own
SQLite store, reads its RSS once it is healthy and idle, submits a job with a big model
(batch 16, the default maps, on the CPU), cancels it after it has trained a few steps,
and reads the RSS again once the job is cancelled and the trainer idle. It prints one
JSON object: the RSS in MB fresh, while training, and idle after the job.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import httpx

from shared.settings import Settings
from tests.processes import API, Service, free_port, settings_env, wait_healthy, wait_job

SETTLE_SECONDS = 5.0  # idle before reading: the trainer's job has ended, nothing else runs


def rss_mb(pid: int) -> float:
    """VmRSS of process `pid`, MB (Linux `/proc/PID/status`)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for {pid}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="convnext_base")
    parser.add_argument("--steps", type=int, default=3, help="steps to train before the cancel")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        port = free_port()
        env = settings_env(Settings(data_dir=Path(folder) / "var"), api_port=port)
        service = Service("up", env, Path(folder), "up").start()
        assert service.process is not None
        try:
            with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
                wait_healthy(client, timeout=120)
                time.sleep(SETTLE_SECONDS)
                fresh = rss_mb(service.process.pid)
                config = {"model_architecture": args.model, "batch_size": 16, "accelerator": "cpu"}
                job = client.post(f"{API}/jobs", json={"job_name": "big", "config": config})
                job_id = job.json()["id"]
                wait_job(
                    client,
                    job_id,
                    lambda j: (j["progress"] or {}).get("step", 0) >= args.steps,
                    timeout=1200,
                    what="steps",
                )
                training = rss_mb(service.process.pid)
                client.post(f"{API}/jobs/{job_id}/cancel")
                wait_job(client, job_id, lambda j: j["status"] == "cancelled", 600, "cancelled")
                time.sleep(SETTLE_SECONDS)
                idle = rss_mb(service.process.pid)
        finally:
            service.stop()
    report = {"model": args.model, "fresh_mb": fresh, "training_mb": training, "idle_mb": idle}
    print(json.dumps({k: round(v) if isinstance(v, float) else v for k, v in report.items()}))


if __name__ == "__main__":
    main()
