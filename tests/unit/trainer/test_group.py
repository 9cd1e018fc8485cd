"""torchrun groups on the CPU (gloo, two ranks of one thread each), driven by the real
trainer on the embedded store: completion, pause and resume bit for bit, a rank killed."""

from __future__ import annotations

import os
import re
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest
import torch

from services.projector.runner import Projector
from services.trainer.checkpoints import load_model
from services.trainer.worker import Trainer
from shared.application import TrainingJobs
from shared.bootstrap import build_app, build_read_store
from shared.bus import InProcessBus
from shared.settings import Settings
from tests.unit.trainer.configs import tiny_config

TWO_RANKS: dict[str, Any] = {"devices": 2, "epochs": 3}


class Stack:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.jobs: TrainingJobs = build_app(settings)
        self.reads = build_read_store(settings)
        self.trainer = Trainer(settings, self.jobs, self.reads, InProcessBus())

    def submit(self, **config: Any) -> UUID:
        fields = tiny_config(**(TWO_RANKS | config)).model_dump(mode="json")
        return self.jobs.submit("w", "", fields, "tester").job.id

    async def run_next(self) -> bool:
        await Projector(self.jobs, self.reads, InProcessBus()).project_pending()
        return await self.trainer.run_next()

    def kinds(self, job_id: UUID) -> list[str]:
        return [e.kind for e in self.jobs.history(job_id)]

    def weights(self, job_id: UUID) -> dict[str, torch.Tensor]:
        model, _ = load_model(self.settings.artifacts / str(job_id) / "model.pt")
        return model.state_dict()


@pytest.fixture
def stack(sqlite_settings: Settings, tmp_path: Path) -> Iterator[Stack]:
    settings = sqlite_settings.model_copy(
        update={"artifacts_dir": tmp_path / "artifacts", "rank_threads": 1}
    )
    yield Stack(settings)


def when(stack: Stack, ready: Callable[[Any], bool], act: Callable[[], None]) -> threading.Thread:
    """Run `act` once the running job's last step report satisfies `ready`."""

    def watch() -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            hooks = stack.trainer.current
            if hooks is not None and hooks.last_step is not None and ready(hooks.last_step):
                act()
                return
            time.sleep(0.005)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


async def test_a_two_rank_job_completes_with_each_event_written_once(stack: Stack) -> None:
    job_id = stack.submit()
    assert await stack.run_next()
    kinds = stack.kinds(job_id)
    epoch = ["EpochCompleted", "CheckpointSaved"]
    assert kinds == ["Submitted", "Started", *epoch * 3, "Completed"], kinds
    epochs = [
        e.data["metrics"]["epoch"] for e in stack.jobs.history(job_id) if e.kind == "EpochCompleted"
    ]
    assert epochs == [1, 2, 3]
    job = stack.jobs.get_job(job_id)
    assert job.device is not None and job.device.endswith("x 2 ranks")
    assert stack.weights(job_id)


async def test_pause_and_resume_of_a_two_rank_job_ends_bit_identical_to_a_straight_run(
    stack: Stack,
) -> None:
    straight = stack.submit(epochs=4)
    assert await stack.run_next()
    assert stack.kinds(straight)[-1] == "Completed"

    paused = stack.submit(epochs=4)

    def pause(job_id: UUID) -> None:
        stack.jobs.pause(job_id, "tester")
        if (hooks := stack.trainer.current) is not None:
            hooks.nudged.set()  # what the bus's nudge does

    pausing = when(stack, lambda step: (step.epoch, step.step) >= (2, 2), lambda: pause(paused))
    assert await stack.run_next()
    pausing.join()
    job = stack.jobs.get_job(paused)
    assert job.status == "paused", stack.kinds(paused)
    checkpoint = Path(job.checkpoint_path or "")
    assert "-step-" in checkpoint.name  # paused mid-epoch, at a step boundary
    stack.jobs.resume(paused, "tester")
    assert await stack.run_next()
    assert stack.kinds(paused)[-1] == "Completed"

    a, b = stack.weights(straight), stack.weights(paused)
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, different
    metrics = [stack.jobs.get_job(j).last_metrics for j in (straight, paused)]
    for key in ("train_loss", "val_loss", "gradient_norm"):
        assert metrics[0][key] == metrics[1][key], key


RANK_END = re.compile(r"rank (\d) of 2: (\w+) after (\d+) epochs and (\d+) steps")


def rank_ends(output: str) -> dict[int, tuple[str, int, int]]:
    """What each rank's last log line says it did: outcome, epochs done, steps into the next."""
    return {int(r): (kind, int(e), int(s)) for r, kind, e, s in RANK_END.findall(output)}


@pytest.mark.parametrize("stop", ["cancel", "preempt"])
async def test_every_rank_stops_at_the_same_step_boundary(
    stack: Stack, stop: str, capfd: pytest.CaptureFixture[str]
) -> None:
    job_id = stack.submit(epochs=3)

    def act() -> None:
        hooks = stack.trainer.current
        assert hooks is not None
        if stop == "cancel":
            stack.jobs.cancel(job_id, "tester")
            hooks.nudged.set()
        else:
            hooks.preempting.set()  # what a trainer told to stop does

    acting = when(stack, lambda step: (step.epoch, step.step) >= (1, 3), act)
    assert await stack.run_next()
    acting.join()
    ends = rank_ends(capfd.readouterr().err)
    assert set(ends) == {0, 1}, ends
    assert ends[0] == ends[1], ends  # the same epoch and step on both ranks
    kind, epoch, step = ends[0]
    assert (kind, epoch) == ({"cancel": "cancelled", "preempt": "preempted"}[stop], 0)
    assert 3 <= step < 6  # mid-epoch, at the boundary where the stop arrived
    last = stack.jobs.history(job_id)[-1]
    assert last.kind == {"cancel": "Cancelled", "preempt": "Preempted"}[stop], last
    if stop == "preempt":
        assert last.data["step"] == step and "-step-" in last.data["checkpoint_uri"]


def ranks_of(parent: int) -> dict[int, int]:
    """LOCAL_RANK -> pid of the group ranks whose parent is `parent`."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            if int(stat[1]) != parent:
                continue
            environ = (entry / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError):
            continue
        values = dict(v.split(b"=", 1) for v in environ if b"=" in v)
        if (
            b"LOCAL_RANK" in values
            and b"services.trainer.group" in (entry / "cmdline").read_bytes()
        ):
            found[int(values[b"LOCAL_RANK"])] = int(entry.name)
    return found


async def test_kill_9_of_one_rank_gives_worker_lost_and_a_resume(stack: Stack) -> None:
    job_id = stack.submit(epochs=3)
    killed: list[int] = []

    def kill_rank_1() -> None:
        pid = ranks_of(os.getpid())[1]
        os.kill(pid, signal.SIGKILL)
        killed.append(pid)

    killing = when(stack, lambda step: (step.epoch, step.step) >= (2, 3), kill_rank_1)
    assert await stack.run_next()
    killing.join()
    assert killed
    kinds = stack.kinds(job_id)
    assert kinds[-1] == "WorkerLost", kinds
    lost_at = stack.jobs.get_job(job_id)
    assert lost_at.status == "queued" and lost_at.checkpoint_path
    assert not ranks_of(os.getpid())  # the other rank went with it

    assert await stack.run_next()  # the resume, from the epoch-1 checkpoint
    events = stack.jobs.history(job_id)
    kinds = [e.kind for e in events]
    assert kinds[-1] == "Completed", kinds
    assert kinds.count("Started") == 2 and kinds.count("WorkerLost") == 1
    epochs = [e.data["metrics"]["epoch"] for e in events if e.kind == "EpochCompleted"]
    assert epochs == [1, 2, 3]  # epoch 2 was cut short and recorded once, after the resume


@pytest.mark.parametrize(
    ("stop", "kind", "status"),
    [("cancel", "Cancelled", "cancelled"), ("pause", "Paused", "paused"),
     ("preempt", "Preempted", "queued")],
)  # fmt: skip
async def test_a_stop_while_the_nodes_meet_is_recorded_not_a_failure(
    stack: Stack, stop: str, kind: str, status: str
) -> None:
    """A `nodes: 2` job with no second trainer waits at its rendezvous (10 s here); a
    cancel, pause or preemption asked meanwhile is what the attempt records when the wait
    ends, not a failure."""
    stack.trainer.settings = stack.settings.model_copy(update={"rendezvous_seconds": 10.0})
    job_id = stack.submit(nodes=2, devices=1)
    asked: list[float] = []

    def act() -> None:
        deadline = time.monotonic() + 60
        while (hooks := stack.trainer.current) is None:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        time.sleep(1.0)  # the claim is stored: the agent now waits for the other node
        asked.append(time.monotonic())
        if stop == "preempt":
            hooks.preempting.set()  # what a trainer told to stop does
            return
        getattr(stack.jobs, stop)(job_id, "tester")
        hooks.nudged.set()

    acting = threading.Thread(target=act, daemon=True)
    acting.start()
    assert await stack.run_next()
    acting.join()
    waited = time.monotonic() - asked[0]
    last = stack.jobs.history(job_id)[-1]
    assert (last.kind, last.status) == (kind, status), stack.kinds(job_id)
    assert waited < 60, waited
    assert "Failed" not in stack.kinds(job_id)
