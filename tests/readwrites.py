"""Read-your-writes as the Heimdall frontend exercises it (DESIGN §2.9): each command,
then at once the read a user would make, counting every read that missed the effect.

`write` and `read` are HTTP clients (TestClient or httpx); with several api processes
they point at different ones, as a load balancer would send them.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

API = "/api/v1/training"
ROUNDS = 50


Client = Any  # an httpx.Client, or Starlette's TestClient (httpx's or httpx2's)
Claim = Callable[[str], None]  # what a trainer does: claim the queued job with this id


def submit(write: Client) -> dict[str, Any]:
    body = {"job_name": f"ryw-{uuid.uuid4().hex[:8]}", "config": {"epochs": 2}}
    response = write.post(f"{API}/jobs", json=body)
    assert response.status_code == 201, response.text
    job: dict[str, Any] = response.json()
    return job


def listed(read: Client, job_id: str, **params: Any) -> bool:
    page = read.get(f"{API}/jobs", params={"limit": 500, **params}).json()
    return any(j["id"] == job_id for j in page["jobs"])


def create_then_read(write: Client, read: Client, rounds: int = ROUNDS) -> list[str]:
    """POST /jobs, then at once GET it by id, in the list (with and without a filter),
    its metrics and its history."""
    missed = []
    for _ in range(rounds):
        job_id = submit(write)["id"]
        by_id = read.get(f"{API}/jobs/{job_id}")
        if by_id.status_code != 200 or by_id.json()["job"]["status"] != "queued":
            missed.append(f"GET /jobs/{job_id}: {by_id.status_code} {by_id.text[:80]}")
        if not listed(read, job_id):
            missed.append(f"GET /jobs lacks {job_id}")
        if not listed(read, job_id, status="queued"):
            missed.append(f"GET /jobs?status=queued lacks {job_id}")
        if read.get(f"{API}/jobs/{job_id}/metrics").status_code != 200:
            missed.append(f"GET /jobs/{job_id}/metrics")
        kinds = [e["kind"] for e in read.get(f"{API}/jobs/{job_id}/events").json()["events"]]
        if kinds != ["Submitted"]:
            missed.append(f"GET /jobs/{job_id}/events: {kinds}")
    return missed


def pause_then_read(write: Client, read: Client, claim: Claim, rounds: int = ROUNDS) -> list[str]:
    """A running job paused (202), then at once GET: `pausing`, never `running`."""
    missed = []
    for _ in range(rounds):
        job_id = submit(write)["id"]
        claim(job_id)
        paused = write.post(f"{API}/jobs/{job_id}/pause")
        assert paused.status_code == 202, paused.text
        assert paused.json()["status"] == "pausing", paused.text
        status = read.get(f"{API}/jobs/{job_id}").json()["job"]["status"]
        if status != "pausing":
            missed.append(f"GET /jobs/{job_id} after pause: {status}")
        if not listed(read, job_id, status="pausing"):
            missed.append(f"GET /jobs?status=pausing lacks {job_id}")
    return missed


def delete_then_list(write: Client, read: Client, rounds: int = ROUNDS) -> list[str]:
    """A finished job deleted (204: archived), then at once GET /jobs: not listed."""
    missed = []
    for _ in range(rounds):
        job_id = submit(write)["id"]
        assert write.post(f"{API}/jobs/{job_id}/cancel").status_code == 202
        deleted = write.delete(f"{API}/jobs/{job_id}")
        assert deleted.status_code == 204, deleted.text
        if listed(read, job_id):
            missed.append(f"GET /jobs still lists {job_id}")
        if listed(read, job_id, status="cancelled"):
            missed.append(f"GET /jobs?status=cancelled still lists {job_id}")
        if not read.get(f"{API}/jobs/{job_id}").json()["job"]["archived"]:
            missed.append(f"GET /jobs/{job_id} not archived")
    return missed
