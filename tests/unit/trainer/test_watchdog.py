"""The trainer's heartbeat renews a job's lease only while its training thread shows life."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from uuid import uuid4

from services.trainer.reporting import StoreHooks
from services.trainer.worker import Trainer
from shared.bootstrap import build_app, build_read_store
from shared.bus import InProcessBus
from shared.settings import Settings


async def heartbeats(tmp_path: Path, silent_seconds: float, in_steps: bool = True) -> bool:
    """Whether a lease was renewed for a job whose thread was silent that long (while
    running steps, or in a phase that reports no progress: data, validation)."""
    settings = Settings(data_dir=tmp_path, lease_seconds=0.3, stall_seconds=5.0)
    jobs, reads = build_app(settings), build_read_store(settings)
    trainer = Trainer(settings, jobs, reads, InProcessBus())
    hooks = StoreHooks(jobs, uuid4(), settings.worker_name, attempt=1)
    hooks.active_at = time.monotonic() - silent_seconds
    hooks.in_steps = in_steps
    beat = asyncio.create_task(trainer._heartbeat(hooks))
    await asyncio.sleep(0.5)
    beat.cancel()
    return trainer.leases.holder(str(hooks.job_id)) is not None


async def test_a_live_training_thread_keeps_its_lease(tmp_path: Path) -> None:
    assert await heartbeats(tmp_path, silent_seconds=0.0)


async def test_a_training_thread_silent_past_stall_seconds_lets_the_lease_lapse(
    tmp_path: Path,
) -> None:
    assert not await heartbeats(tmp_path, silent_seconds=60.0)


async def test_a_long_phase_without_steps_is_not_a_stall(tmp_path: Path) -> None:
    assert await heartbeats(tmp_path, silent_seconds=60.0, in_steps=False)
