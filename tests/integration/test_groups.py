"""torchrun groups through the whole system: api, projector and trainers as processes on
PostgreSQL and RabbitMQ, CPU ranks of one thread each (DESIGN §6, issue 13)."""

from __future__ import annotations

import signal
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from shared.settings import Settings
from tests.integration.test_cluster import Cluster, assert_replay_equals_live, running_cluster
from tests.processes import wait_job, wait_status, wait_until

pytestmark = [pytest.mark.postgres, pytest.mark.rabbit]


@pytest.fixture
def cluster(broker_settings: Settings, tmp_path: Path) -> Iterator[Cluster]:
    settings = broker_settings.model_copy(
        update={"artifacts_dir": tmp_path / "artifacts", "rank_threads": 1}
    )
    with running_cluster(settings, tmp_path) as running:
        yield running


def joined_trainer(cluster: Cluster, job_id: str) -> str:
    """The name of the trainer that joined the job's group (its log says so)."""
    joined: list[str] = wait_until(
        lambda: [
            n for n in cluster.services if f"joining job {job_id}" in cluster.services[n].log()
        ],
        30,
        "a trainer to join",
    )
    return joined[0]


def assert_written_once(cluster: Cluster, job_id: str, epochs: int) -> None:
    events = cluster.events(job_id)
    kinds = Counter(e["kind"] for e in events)
    assert kinds["Started"] == 1 and kinds["Completed"] == 1, kinds
    assert kinds["EpochCompleted"] == epochs and kinds["CheckpointSaved"] == epochs, kinds
    epoch_numbers = [e["data"]["metrics"]["epoch"] for e in events if e["kind"] == "EpochCompleted"]
    assert epoch_numbers == list(range(1, epochs + 1))
    assert cluster.metrics_epochs(job_id) == list(range(1, epochs + 1))


def test_a_two_rank_job_completes_with_its_events_written_once(cluster: Cluster) -> None:
    cluster.trainer("t1")
    job_id = cluster.submit(devices=2, epochs=2)
    row = wait_status(cluster.client, job_id, ("completed", "failed"), 240)
    assert row["status"] == "completed", row
    assert row["device"] == "cpu (fp32) x 2 ranks"
    assert_written_once(cluster, job_id, 2)
    assert_replay_equals_live(cluster.settings)


def test_a_two_node_group_on_localhost_completes(cluster: Cluster) -> None:
    """Two trainer processes as two nodes (one CPU rank each) meet at a c10d rendezvous:
    one claims the job and asks for the other node on the work queue."""
    cluster.trainer("t1")
    cluster.trainer("t2")
    job_id = cluster.submit(nodes=2, epochs=2)
    row = wait_status(cluster.client, job_id, ("completed", "failed"), 300)
    assert row["status"] == "completed", row
    assert_written_once(cluster, job_id, 2)
    leader = row["worker"] if row.get("worker") else None
    joined = joined_trainer(cluster, job_id)
    others = [n for n in ("t1", "t2") if n != joined]
    assert f"joining job {job_id}" not in cluster.services[others[0]].log()
    assert leader is None or leader != joined


@pytest.mark.timeout(600)
def test_a_node_killed_mid_run_is_a_lost_worker_and_the_group_forms_again(
    cluster: Cluster,
) -> None:
    """kill -9 of the trainer that joined: its ranks go with it, the other node's ranks
    lose their peer, and the attempt ends as WorkerLost (not Failed); with another
    trainer up, the job resumes as a new group and completes."""
    cluster.trainer("t1")
    cluster.trainer("t2")
    small = {"batch_size": 8, "dataset": {"samples": 256, "n_mels": 16, "frames": 16}}
    job_id = cluster.submit(nodes=2, epochs=2, **small)
    wait_job(cluster.client, job_id, lambda j: (j.get("current_epoch") or 0) >= 1, 300, "epoch 1")
    cluster.services[joined_trainer(cluster, job_id)].kill()
    lost = wait_until(
        lambda: [e for e in cluster.events(job_id) if e["kind"] == "WorkerLost"], 120, "WorkerLost"
    )
    assert len(lost) == 1
    assert not [e for e in cluster.events(job_id) if e["kind"] == "Failed"]
    cluster.trainer("t3")
    row = wait_status(cluster.client, job_id, ("completed", "failed"), 400)
    assert row["status"] == "completed", row
    kinds = Counter(e["kind"] for e in cluster.events(job_id))
    assert (kinds["Started"], kinds["WorkerLost"], kinds["Completed"]) == (2, 1, 1), kinds
    epochs = [
        e["data"]["metrics"]["epoch"]
        for e in cluster.events(job_id)
        if e["kind"] == "EpochCompleted"
    ]
    assert epochs == [1, 2], epochs  # epoch 2, cut short by the kill, recorded once


@pytest.mark.timeout(600)
def test_sigterm_to_the_joined_trainer_preempts_the_whole_group(cluster: Cluster) -> None:
    """The trainer that joined asks for the stop; every rank agrees at one step, the
    claiming trainer records Preempted (not WorkerLost), and the joiner exits at once."""
    cluster.trainer("t1")
    cluster.trainer("t2")
    small = {"batch_size": 8, "dataset": {"samples": 256, "n_mels": 16, "frames": 16}}
    job_id = cluster.submit(nodes=2, epochs=3, **small)
    wait_job(cluster.client, job_id, lambda j: (j.get("current_epoch") or 0) >= 1, 300, "epoch 1")
    joiner = cluster.services[joined_trainer(cluster, job_id)].process
    assert joiner is not None
    joiner.send_signal(signal.SIGTERM)
    assert joiner.wait(60) == 0
    wait_until(
        lambda: any(e["kind"] == "Preempted" for e in cluster.events(job_id)), 60, "Preempted"
    )  # the claiming trainer, free again, may take the job back at once and wait for a node
    kinds = Counter(e["kind"] for e in cluster.events(job_id))
    assert kinds["Preempted"] == 1 and kinds["WorkerLost"] == 0 and kinds["Failed"] == 0, kinds
