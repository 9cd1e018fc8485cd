"""Assembles each service from settings: the embedded all-in-one run, or one service each."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from functools import partial
from types import FrameType

import uvicorn
from fastapi import FastAPI

from services.api.app import Background, create_app
from services.api.auth import check_exposure
from services.api.availability import DatabaseWatch
from services.api.deps import ApiContext
from services.projector.runner import Projector
from shared.bootstrap import build_app, build_bus, build_read_store, postgres_pools
from shared.lifetime import freeze_startup_heap
from shared.metrics import StoreCollector, serve_metrics
from shared.settings import Settings

log = logging.getLogger(__name__)


def build_api(settings: Settings, with_projector: bool) -> tuple[ApiContext, list[Background]]:
    """The api's context, plus the projector on the same loop when it runs embedded."""
    jobs, reads, bus = build_app(settings), build_read_store(settings), build_bus(settings)
    context = ApiContext(settings=settings, jobs=jobs, reads=reads, bus=bus)
    background: list[Background] = []
    if settings.database_url:
        context.watch = DatabaseWatch(settings.database_url)
        context.watch.guard(*postgres_pools(jobs, reads))
        background.append(context.watch.run_forever)
        if reads.projected_channel and not with_projector:
            listen = partial(
                context.freshness.listen_forever, settings.database_url, reads.projected_channel
            )
            background.append(listen)
    if with_projector:
        projector = Projector(
            jobs, reads, bus, settings.poll_seconds, settings.database_url, settings.sweep_seconds
        )
        jobs.saved_hooks.append(lambda _: projector.wake())
        projector.projected_hooks.append(context.freshness.advance)
        background.append(projector.run_forever)
    return context, background


def warm_up_preflight() -> None:
    """Ask the model probes for timm's model names and check the default model before
    serving, so that the first submit does not wait for a child process to import torch
    (or, where torch is loaded, for the import to hold the interpreter long enough for the
    database watch's probes to time out and requests to get false 503s)."""
    from services.api.preflight import preflight
    from services.api.probes import PROBES
    from shared.config import JobConfig, use_architecture_source

    use_architecture_source(PROBES.architectures)
    preflight(JobConfig())


def serve(settings: Settings, with_projector: bool) -> None:
    """Run the api (and, embedded, the projector) until interrupted."""
    check_exposure(settings)
    warm_up_preflight()
    context, background = build_api(settings, with_projector)
    serve_http(create_app(context, background), settings)


def serve_http(app: FastAPI, settings: Settings) -> None:
    """uvicorn with our logging (its access lines too) and the WebSocket message limit."""
    config = uvicorn.Config(
        app,
        host=settings.api_host,
        port=settings.api_port,
        log_config=None,
        log_level=settings.log_level.lower(),
        ws_max_size=settings.ws_max_message_bytes,
    )
    freeze_startup_heap()
    GracefulServer(config).run()


class GracefulServer(uvicorn.Server):
    """uvicorn, except that a stop on SIGTERM or SIGINT that shut down cleanly (the
    lifespan checkpointed a running job and handed it back) exits 0. uvicorn re-raises the
    signal after its shutdown, so the exit status would say "killed" and a supervisor
    would count a clean deploy as a crash."""

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        super().handle_exit(sig, frame)
        self._captured_signals.clear()  # uvicorn's record of signals to re-raise


def stop_on_signals(stop: asyncio.Event) -> None:
    """SIGTERM (a deploy, `docker stop`) and SIGINT end the service gracefully: a trainer
    checkpoints and hands its job back, a projector finishes its transaction."""
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)


def run_projector(settings: Settings) -> None:
    """The projector alone, as its own process."""

    async def main() -> None:
        jobs, reads, bus = build_app(settings), build_read_store(settings), build_bus(settings)
        projector = Projector(
            jobs, reads, bus, settings.poll_seconds, settings.database_url, settings.sweep_seconds
        )
        stop = asyncio.Event()
        stop_on_signals(stop)
        serve_metrics(settings, StoreCollector(jobs, reads, job_counts=False))
        await bus.start()
        freeze_startup_heap()
        log.info("projector ready")
        try:
            await projector.run_forever(stop)
        finally:
            await bus.stop()

    asyncio.run(main())


def serve_embedded(settings: Settings) -> None:
    """Everything in one process: api, projector and a trainer on an in-process bus."""
    from services.trainer.worker import build_trainer, check_trainer_kind

    check_exposure(settings)
    check_trainer_kind(settings)
    warm_up_preflight()
    context, background = build_api(settings, with_projector=True)
    trainer = build_trainer(settings, context.jobs, context.reads, context.bus)
    background.append(trainer.run_forever)
    log.info("embedded run: store and read tables under %s", settings.data_dir.resolve())
    log.info("trainer %s ready on %s", settings.worker_name, device_summary())
    serve_http(create_app(context, background), settings)


def run_trainer(settings: Settings) -> None:
    """One trainer as its own process, on the configured broker."""
    from services.trainer.worker import build_trainer, check_trainer_kind

    check_trainer_kind(settings)

    async def main() -> None:
        jobs, reads, bus = build_app(settings), build_read_store(settings), build_bus(settings)
        trainer = build_trainer(settings, jobs, reads, bus)
        stop = asyncio.Event()
        stop_on_signals(stop)
        serve_metrics(settings)
        await bus.start()
        log.info("trainer %s ready on %s", settings.worker_name, device_summary())
        try:
            await trainer.run_forever(stop)
        finally:
            await bus.stop()

    asyncio.run(main())


def device_summary() -> str:
    """What a trainer can train on, for its start line: each GPU it sees (name, memory,
    compute capability) and the CPUs. Reads device properties only; runs nothing."""
    import torch

    cpus = f"{os.cpu_count() or 1} CPUs, {torch.get_num_threads()} torch threads"
    if not torch.cuda.is_available():
        return f"cpu only ({cpus})"
    gpus = []
    for index in range(torch.cuda.device_count()):
        gpu = torch.cuda.get_device_properties(index)
        memory = gpu.total_memory / 2**30
        gpus.append(f"cuda:{index} {gpu.name} ({memory:.0f} GiB, sm_{gpu.major}{gpu.minor})")
    return f"{', '.join(gpus)} ({cpus})"
