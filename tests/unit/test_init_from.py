"""`init_from`: a job that starts from a completed job's final weights (fresh optimizer),
linked in both histories, and refused with a 422 naming `config.init_from` otherwise."""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient
from torch import nn

from services.api.app import create_app
from services.api.deps import ApiContext
from services.runtime import build_api
from services.trainer import job as run
from services.trainer.checkpoints import load_model
from services.trainer.control import NullHooks
from services.trainer.job import run_training
from services.trainer.worker import Trainer
from shared.bus import InProcessBus
from shared.domainmodel import COMPLETED, InitFromError, TrainingJob
from shared.settings import Settings
from tests.unit.trainer.configs import tiny_config

API = "/api/v1/training"
LOC = ["body", "config", "init_from"]
TRAINER = "trainer-1"
Weights = dict[str, torch.Tensor]
MAPS = {"samples": 128, "n_mels": 16, "frames": 16}  # tiny_config's dataset


@dataclass
class Platform:
    """The api with its projector, and a trainer on the same store."""

    client: TestClient
    context: ApiContext
    trainer: Trainer

    def post(self, **config: Any) -> Any:
        fields = tiny_config().model_dump(mode="json") | config
        body = {"job_name": f"job-{uuid.uuid4().hex[:8]}", "config": fields}
        return self.client.post(f"{API}/jobs", json=body)

    def submit(self, **config: Any) -> str:
        response = self.post(**config)
        assert response.status_code == 201, response.text
        job_id: str = response.json()["id"]
        return job_id

    def train(self) -> None:
        """The trainer takes the oldest queued job and runs it to its end."""
        assert asyncio.run(self.trainer.run_next())

    def job(self, job_id: str) -> TrainingJob:
        return self.context.jobs.get_job(uuid.UUID(job_id))

    def history(self, job_id: str) -> list[dict[str, Any]]:
        response = self.client.get(f"{API}/jobs/{job_id}/events")
        assert response.status_code == 200, response.text
        events: list[dict[str, Any]] = response.json()["events"]
        return events

    def first_train_loss(self, job_id: str) -> float:
        epochs = [e for e in self.history(job_id) if e["kind"] == "EpochCompleted"]
        return float(epochs[0]["data"]["metrics"]["train_loss"])

    def fake_completed(self, model_uri: str | None = None, **config: Any) -> str:
        """A job completed as a trainer records it, without training it."""
        job_id = self.submit(**config)
        uri = model_uri or f"/artifacts/{job_id}/model.pt"
        change = self.context.jobs.change
        change(uuid.UUID(job_id), lambda job: job.claim(TRAINER, "cpu", 96, 32))
        change(uuid.UUID(job_id), lambda job: job.complete(TRAINER, 1, {}, 1, 0.1, uri))
        return job_id

    def stored(self) -> int:
        return len(self.context.jobs.feed(0, 10_000))


@pytest.fixture
def platform(sqlite_settings: Settings) -> Iterator[Platform]:
    settings = sqlite_settings.model_copy(update={"worker_name": TRAINER})
    context, background = build_api(settings, with_projector=True)
    trainer = Trainer(settings, context.jobs, context.reads, InProcessBus())
    with TestClient(create_app(context, background)) as client:
        yield Platform(client, context, trainer)


@pytest.fixture
def initial_weights(monkeypatch: pytest.MonkeyPatch) -> list[Weights]:
    """Each run's weights as its optimizer first sees them (before any step)."""
    seen: list[Weights] = []
    stateful = run._stateful

    def capture(model: nn.Module, *args: Any) -> Any:
        seen.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        return stateful(model, *args)

    monkeypatch.setattr(run, "_stateful", capture)
    return seen


def test_a_continued_job_starts_from_its_parents_final_weights(
    platform: Platform, initial_weights: list[Weights]
) -> None:
    parent = platform.submit(epochs=3)
    platform.train()
    child = platform.submit(epochs=1, init_from=parent)
    platform.train()
    fresh = platform.submit(epochs=1)
    platform.train()

    parent_job = platform.job(parent)
    assert [platform.job(j).status for j in (parent, child, fresh)] == [COMPLETED] * 3
    final, _ = load_model(Path(str(parent_job.model_path)))
    _, child_start, fresh_start = initial_weights
    assert child_start.keys() == final.state_dict().keys()
    assert all(torch.equal(child_start[k], v) for k, v in final.state_dict().items())
    assert not all(torch.equal(fresh_start[k], v) for k, v in final.state_dict().items())

    child_loss, fresh_loss = platform.first_train_loss(child), platform.first_train_loss(fresh)
    print(f"first-epoch train loss: continued {child_loss:.4f}, fresh {fresh_loss:.4f}")
    assert child_loss < fresh_loss


def test_both_histories_record_the_link(platform: Platform) -> None:
    parent = platform.fake_completed()
    child = platform.submit(init_from=parent)
    submitted = platform.history(child)[0]
    assert (submitted["kind"], submitted["data"]["config"]["init_from"]) == ("Submitted", parent)
    continued = platform.history(parent)[-1]
    assert continued["kind"] == "Continued"
    assert continued["data"] == {"child_job_id": child}
    assert continued["event"] == "training_continued"
    assert continued["status"] == COMPLETED  # a fact about the parent, not a command on it
    row = platform.client.get(f"{API}/jobs/{parent}").json()["job"]
    assert row["status"] == COMPLETED


def test_concurrent_continuations_of_one_job_all_land(platform: Platform) -> None:
    parent = platform.fake_completed()
    config = tiny_config(init_from=parent).model_dump(mode="json")
    children: list[str] = []

    def submit() -> None:
        accepted = platform.context.jobs.submit("c", "", config, "tester")
        children.append(str(accepted.job.id))

    threads = [threading.Thread(target=submit) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    history = platform.context.jobs.history(uuid.UUID(parent))
    links = [e.data["child_job_id"] for e in history if e.kind == "Continued"]
    assert sorted(links) == sorted(children) and len(children) == 6
    assert platform.job(parent).status == COMPLETED


def refused(platform: Platform, response: Any, *words: str) -> None:
    assert response.status_code == 422, response.text
    (error,) = response.json()["detail"]
    assert error["loc"] == LOC, error
    assert all(word in error["msg"] for word in words), error


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"model_architecture": "resnet18"}, ("convnext_atto", "resnet18")),
        ({"dataset": {**MAPS, "n_mels": 32}}, ("[7, 16, 16]", "[7, 32, 16]")),
        ({"dataset": {**MAPS, "receivers": 5}}, ("[5, 16, 16]",)),
    ],
    ids=["another-architecture", "another-n_mels", "another-receivers"],
)
def test_a_parent_of_another_shape_is_refused(
    platform: Platform, change: dict[str, Any], words: tuple[str, ...]
) -> None:
    parent = platform.fake_completed()
    before = platform.stored()
    refused(platform, platform.post(init_from=parent, **change), *words)
    assert platform.stored() == before


def test_an_unknown_job_is_refused(platform: Platform) -> None:
    unknown = str(uuid.uuid4())
    before = platform.stored()
    refused(platform, platform.post(init_from=unknown), unknown, "not found")
    assert platform.stored() == before


@pytest.mark.parametrize("outcome", ["queued", "running", "failed", "cancelled"])
def test_a_job_not_completed_is_refused(platform: Platform, outcome: str) -> None:
    parent = platform.submit()
    jobs, parent_id = platform.context.jobs, uuid.UUID(parent)
    if outcome != "queued":
        jobs.change(parent_id, lambda job: job.claim(TRAINER, "cpu", 96, 32))
    if outcome == "failed":
        jobs.change(parent_id, lambda job: job.fail(TRAINER, 1, "boom", "RuntimeError"))
    if outcome == "cancelled":
        jobs.cancel(parent_id, "tester")
        jobs.change(parent_id, lambda job: job.record_cancelled(TRAINER, 1, 0))
    before = platform.stored()
    refused(platform, platform.post(init_from=parent), outcome, "completed")
    assert platform.stored() == before


@pytest.mark.parametrize(
    ("value", "word"), [("not-a-uuid", "UUID"), ("", "UUID"), ("1234", "UUID"), (42, "string")]
)
def test_a_malformed_id_is_refused(platform: Platform, value: Any, word: str) -> None:
    before = platform.stored()
    refused(platform, platform.post(init_from=value), word)
    assert platform.stored() == before


def test_the_application_refuses_what_the_api_would(platform: Platform) -> None:
    """A direct caller of the use case (the CLI, a script) meets the same rule."""
    queued = platform.submit()
    config = tiny_config(init_from=queued).model_dump(mode="json")
    with pytest.raises(InitFromError, match="completed"):
        platform.context.jobs.submit("c", "", config, "tester")
    atto = platform.fake_completed()
    other = tiny_config(init_from=atto, model_architecture="resnet18").model_dump(mode="json")
    with pytest.raises(InitFromError, match="resnet18"):
        platform.context.jobs.submit("c", "", other, "tester")


def test_a_terminal_job_stays_terminal_when_continued() -> None:
    config = {"epochs": 1, "model_architecture": "convnext_atto"}
    parent = TrainingJob(id=uuid.uuid4(), job_name="p", description="", config=config, actor="a")
    parent.claim(TRAINER, "cpu", 8, 2)
    parent.complete(TRAINER, 1, {}, 1, 0.1, "/a/model.pt")
    completed_at = parent.completed_at
    parent.continue_into(uuid.uuid4(), "convnext_atto", "alice")
    parent.continue_into(uuid.uuid4(), "convnext_atto", "bob")
    assert (parent.status, parent.completed_at) == (COMPLETED, completed_at)


@pytest.mark.parametrize("damage", ["missing", "not-a-model"])
def test_a_missing_or_changed_parent_file_fails_the_job_clearly(
    platform: Platform, tmp_path: Path, damage: str
) -> None:
    model = tmp_path / "gone" / "model.pt"
    if damage == "not-a-model":
        model.parent.mkdir()
        model.write_bytes(b"not a model")
    parent = platform.fake_completed(model_uri=str(model))
    child = platform.submit(init_from=parent)
    platform.train()
    job = platform.job(child)
    assert job.status == "failed"
    assert parent in (job.error_message or ""), job.error_message


def test_a_resume_of_its_own_checkpoint_does_not_reload_the_parent(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a resume the job's own checkpoint holds its weights: the parent's file is not read.
    Without the parent's file and nothing to resume, the run refuses to start."""
    monkeypatch.setattr(run, "export_at_completion", lambda *args: None)
    parent = run_training(tiny_config(epochs=1), tmp_path / "parent", NullHooks())
    config = tiny_config(epochs=1, init_from=str(uuid.uuid4()))
    with pytest.raises(ValueError, match="init_from"):
        run_training(config, tmp_path / "child", NullHooks())
    child = run_training(
        config, tmp_path / "child", NullHooks(), init_weights=Path(str(parent.model_uri))
    )
    gone = tmp_path / "nowhere" / "model.pt"
    resumed = Path(str(child.checkpoint_uri))
    again = run_training(config, tmp_path / "child", NullHooks(), resumed, 2, init_weights=gone)
    assert again.kind == "completed"


def test_a_config_without_init_from_dumps_as_before() -> None:
    """Stored configs, idempotency checks and checkpoints of older jobs still compare equal."""
    assert "init_from" not in tiny_config().model_dump(mode="json")
    assert tiny_config(init_from=str(uuid.UUID(int=1))).model_dump()["init_from"] == str(
        uuid.UUID(int=1)
    )
