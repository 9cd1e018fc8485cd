"""Reads follow writes across processes (DESIGN §2.9): PostgreSQL, RabbitMQ, a projector
and two api processes on different ports. Each command goes to one api and the read at
once to the other, as a load balancer may send them."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from shared.application import TrainingJobs
from shared.bootstrap import build_app
from shared.settings import Settings
from tests.integration.test_cluster import Cluster
from tests.processes import Service, free_port, settings_env, wait_healthy
from tests.readwrites import create_then_read, delete_then_list, pause_then_read

pytestmark = [pytest.mark.postgres, pytest.mark.rabbit]


@pytest.fixture
def apis(broker_settings: Settings, tmp_path: Path) -> Iterator[tuple[Cluster, httpx.Client]]:
    """Two api processes and a projector; no trainer (the test claims as one would)."""
    settings = broker_settings.model_copy(
        update={
            "poll_seconds": 0.2,  # the default: NOTIFY is what makes it fast
        }
    )
    cluster = Cluster(settings, tmp_path)
    second_port = free_port()
    second = httpx.Client(base_url=f"http://127.0.0.1:{second_port}", timeout=15)
    try:
        cluster.start("api", "api")
        env = settings_env(cluster.settings, api_port=second_port)
        cluster.services["api2"] = Service("api", env, tmp_path, "api2").start()
        cluster.start("projector", "projector")
        wait_healthy(cluster.client)
        wait_healthy(second)
        yield cluster, second
    except BaseException:
        print(cluster.logs())
        raise
    finally:
        second.close()
        cluster.stop()


def test_created_jobs_are_readable_on_the_other_api_at_once(
    apis: tuple[Cluster, httpx.Client],
) -> None:
    cluster, second = apis
    assert create_then_read(cluster.client, second, rounds=25) == []
    assert create_then_read(second, cluster.client, rounds=25) == []


def test_paused_jobs_read_pausing_on_the_other_api_at_once(
    apis: tuple[Cluster, httpx.Client],
) -> None:
    cluster, second = apis
    store: TrainingJobs = build_app(cluster.settings)

    def claim(job_id: str) -> None:
        store.change(uuid.UUID(job_id), lambda j: j.claim("trainer-1", "cpu", 80, 20))

    assert pause_then_read(cluster.client, second, claim, rounds=25) == []
    assert pause_then_read(second, cluster.client, claim, rounds=25) == []


def test_deleted_jobs_leave_the_other_apis_list_at_once(
    apis: tuple[Cluster, httpx.Client],
) -> None:
    cluster, second = apis
    assert delete_then_list(cluster.client, second, rounds=25) == []
    assert delete_then_list(second, cluster.client, rounds=25) == []
