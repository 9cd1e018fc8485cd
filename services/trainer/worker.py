"""The trainer service: claim a runnable job, ack, train it off the event loop, record it."""

from __future__ import annotations

import asyncio
import ctypes
import gc
import logging
import os
import socket
import time
from collections.abc import Awaitable
from pathlib import Path
from typing import Literal
from uuid import UUID

import numpy as np
import torch

from services.trainer.checkpoints import CheckpointError
from services.trainer.control import Control, Outcome
from services.trainer.dataset import split_indices
from services.trainer.group import RankSpec
from services.trainer.job import run_training
from services.trainer.launcher import (
    GroupStoppedError,
    JoinerHooks,
    RankFailedError,
    RankLostError,
    Rendezvous,
    launch_group,
)
from services.trainer.leases import LeaseBook
from services.trainer.loop import DeviceUnavailableError, resolve_runtime
from services.trainer.reporting import BUSY, JOBS_RUN, StepTelemetry, StoreHooks
from shared.application import TrainingJobs
from shared.bootstrap import STORE_OUTAGES
from shared.bus import JOIN_KIND, NUDGE_KEYS, WORK_QUEUES_OF_TRAINER, Bus, Envelope, work_queue
from shared.config import FilesDataset, JobConfig
from shared.domainmodel import (
    ACTIVE_RUN,
    QUEUED,
    ClaimLostError,
    IllegalTransitionError,
    TrainingJob,
)
from shared.logs import job_context
from shared.readmodel.store import ReadStore
from shared.security import ConfigurationError
from shared.settings import Settings
from shared.waiting import wait_event

log = logging.getLogger(__name__)
PREEMPT_REASON = "the trainer was asked to stop (SIGTERM or SIGINT)"
# How a stop asked before a group's nodes met ends the attempt.
STOPPED_AS: dict[Control, Literal["paused", "preempted", "cancelled"]] = {
    Control.PAUSE: "paused",
    Control.PREEMPT: "preempted",
    Control.CANCEL: "cancelled",
}


class TrainerStoppingError(RuntimeError):
    """A work message reached a trainer that is stopping: it goes back to its queue."""


def trainer_kind(settings: Settings) -> str:
    """`gpu` or `cpu`: the kind of work this trainer takes (`WORK_QUEUES_OF_TRAINER`)."""
    if settings.trainer_kind != "auto":
        return settings.trainer_kind
    return "gpu" if torch.cuda.is_available() else "cpu"


def check_trainer_kind(settings: Settings) -> None:
    """ConfigurationError when the trainer is to take GPU work where CUDA sees no device:
    it would take every GPU job from the queue only to find it cannot run it."""
    if settings.trainer_kind == "gpu" and not torch.cuda.is_available():
        raise ConfigurationError(
            "HEIMDALL_TRAINER_KIND=gpu, but CUDA sees no device here: set it to cpu or auto"
            " (or give the trainer its GPU)"
        )


class Trainer:
    """One job at a time, from the work queues of its kind (DESIGN §1): a work message
    names a job; the trainer claims it in the store, the bus acks the message, and the
    trainer trains it off the event loop while the bus delivers it nothing else."""

    def __init__(self, settings: Settings, jobs: TrainingJobs, reads: ReadStore, bus: Bus) -> None:
        self.settings, self.jobs, self.reads, self.bus = settings, jobs, reads, bus
        self.worker = settings.worker_name
        self.kind = trainer_kind(settings)
        self.leases = LeaseBook(reads, settings.lease_seconds)
        self.current: StoreHooks | None = None
        self._stopping = False
        self._idle = asyncio.Event()
        self._idle.set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self.joined: JoinerHooks | None = None  # a share of another trainer's group
        bus.subscribe_work(self.on_work, WORK_QUEUES_OF_TRAINER[self.kind])
        bus.subscribe_fanout(NUDGE_KEYS, self.on_nudge)

    async def on_work(self, envelope: Envelope) -> Awaitable[None] | None:
        """Trainers of the queue's kind compete for its jobs, one job each at a time.

        Claims the job that the work message names and returns the job's run, or None
        when it is not this trainer's to run (no longer queued, claimed by another, or
        unusable and so failed): the message is then dropped. A store error or a
        stopping trainer raises, and the message goes back to its queue. A `JoinGroup`
        message (kind `JOIN_KIND`, from the trainer that claimed a job with `nodes` above
        1) instead runs this node's ranks of that job's group, while that attempt runs."""
        if self._stopping:
            raise TrainerStoppingError(f"trainer {self.worker} is stopping")
        if envelope.kind == JOIN_KIND:
            return await self._join(envelope)
        with job_context(envelope.job_id):  # every log line of its claim and its run names it
            claimed = await asyncio.to_thread(self._claim, UUID(envelope.job_id))
            if claimed is None:
                log.info(
                    "trainer %s: job %s is not runnable here; dropped", self.worker, envelope.job_id
                )
                return None
        self._idle.clear()
        return self._train_named(claimed)

    async def _train_named(self, claimed: tuple[TrainingJob, StoreHooks]) -> None:
        with job_context(str(claimed[0].id)):
            await self._train(claimed)

    async def on_nudge(self, envelope: Envelope) -> None:
        """Each trainer hears pause and cancel requests, confirmed against the store."""
        if self.current is not None and str(self.current.job_id) == envelope.job_id:
            self.current.nudged.set()

    async def run_forever(self, stop: asyncio.Event) -> None:
        """Reap lapsed leases until `stop`; then take no more work, and a running job is
        checkpointed at its next step boundary and handed back (`Preempted`) before this
        returns. Jobs arrive through `on_work`, from the bus."""
        reaper = asyncio.create_task(self._reap_forever(stop))
        await stop.wait()
        self._stopping = True
        await self.bus.stop_work()
        if self.current is not None:
            log.info("trainer %s stopping: preempting job %s", self.worker, self.current.job_id)
            self.current.preempting.set()
        if self.joined is not None:
            log.info("trainer %s stopping: preempting the group it joined", self.worker)
            self.joined.preempting.set()
        await self._idle.wait()
        reaper.cancel()

    async def run_next(self) -> bool:
        """Claim the oldest runnable job of the read table and train it; False when there
        was none. Not how the service finds work (`on_work` is): a direct way in for tests
        and benchmarks that drive one trainer step by step without a bus."""
        for job_id in await asyncio.to_thread(self.leases.queued_job_ids):
            with job_context(job_id):
                claimed = await asyncio.to_thread(self._claim, UUID(job_id))
                if claimed is not None:
                    self._idle.clear()
                    await self._train(claimed)
                    return True
        return False

    def _claim(self, job_id: UUID) -> tuple[TrainingJob, StoreHooks] | None:
        """Claim one queued job; None if it is not ours to run. A job that cannot run
        anywhere (its config or data is unusable here) fails alone; one that needs a
        device this trainer lacks stays queued; a store error is raised, to be retried,
        and never recorded as the job's failure."""
        job = self.jobs.get_job(job_id)
        if job.status != QUEUED:
            return None
        try:
            config = JobConfig.model_validate(job.config)
            device = resolve_runtime(config.accelerator, config.precision, config.devices).describe(
                config.world_size
            )
            train, val = dataset_sizes(config)
        except DeviceUnavailableError as error:
            log.info(
                "trainer %s: leaving job %s to another trainer: %s", self.worker, job_id, error
            )
            return None
        except Exception as error:  # ValidationError, a vanished file: this job only
            log.warning("trainer %s: job %s cannot run: %r", self.worker, job_id, error)
            self._record_failure(job_id, job.attempt + 1, error, claim_first=True)
            return None
        self.leases.renew(str(job_id), self.worker, job.attempt + 1)
        try:
            job = self.jobs.claim(job_id, self.worker, device, train, val)
        except IllegalTransitionError:
            return None
        hooks = StoreHooks(self.jobs, job_id, self.worker, job.attempt, self.settings.lease_seconds)
        if self._stopping:
            hooks.preempting.set()
        return job, hooks

    async def _train(self, claimed: tuple[TrainingJob, StoreHooks]) -> None:
        job, hooks = claimed
        loop = self._loop = asyncio.get_running_loop()
        hooks.telemetry = StepTelemetry(self.bus, loop, str(job.id), self.worker)
        self.current = hooks
        BUSY.labels(self.worker).set(1)
        heartbeat = asyncio.create_task(self._heartbeat(hooks))
        try:
            await asyncio.to_thread(self._run, job, hooks)
        finally:
            heartbeat.cancel()
            self.current = None
            BUSY.labels(self.worker).set(0)
            JOBS_RUN.labels(self.worker).inc()
            await asyncio.to_thread(self.leases.release, str(job.id), self.worker, hooks.attempt)
            await asyncio.to_thread(release_memory)
            self._idle.set()

    def _run(self, job: TrainingJob, hooks: StoreHooks) -> None:
        config = JobConfig.model_validate(job.config)
        workdir = self.settings.artifacts / str(job.id)
        resume = Path(job.checkpoint_path) if job.checkpoint_path else None
        log.info("trainer %s: job %s attempt %d", self.worker, job.id, hooks.attempt)
        try:
            parent = config.init_from if resume is None else None  # a resume has its own
            start = self._parent_weights(parent) if parent else None
            if config.world_size > 1:
                outcome = self._run_group(job, config, hooks, resume, start)
            else:
                outcome = run_training(
                    config, workdir, hooks, resume, hooks.attempt, job.checkpoint_sha256, start
                )
            hooks.record(outcome.kind, lambda: record_outcome(self.jobs, hooks, outcome))
        except RankLostError as lost:  # the group's attempt is over; resume elsewhere
            log.error("trainer %s: job %s: %s; recording a lost worker", self.worker, job.id, lost)
            hooks.record(
                "a lost rank", lambda: self.jobs.lose_worker(job.id, hooks.attempt, self.worker)
            )
        except ClaimLostError as lost:
            log.warning("trainer %s: %s; stopping without writing", self.worker, lost)
        except STORE_OUTAGES as error:  # longer than our patience: the lease decides
            log.error(
                "trainer %s: store unreachable (%r); job %s left to its lease",
                self.worker,
                error,
                job.id,
            )
        except Exception as error:
            log.exception("trainer %s: job %s failed", self.worker, job.id)
            self._record_failure(job.id, hooks.attempt, error)

    def _run_group(
        self,
        job: TrainingJob,
        config: JobConfig,
        hooks: StoreHooks,
        resume: Path | None,
        start: Path | None,
    ) -> Outcome:
        """Train as a torchrun group (`launch_group`) whose reporter uses `hooks`; for
        `nodes` above 1, first ask that many other trainers to join (`_invite`). A stop
        asked before the nodes met ends where the job stood."""
        spec = self._rank_spec(job, config, hooks.attempt, resume, start, claimed_here=True)
        if config.nodes == 1:
            rendezvous = Rendezvous.local(run_id(job.id, hooks.attempt))
        else:
            endpoint = f"{self.settings.rendezvous_host}:{free_port()}"
            rendezvous = self._rendezvous(job.id, hooks.attempt, config.nodes, endpoint, True)
            self._invite(job, config, hooks.attempt, endpoint)
        try:
            return launch_group(spec, config.devices, rendezvous, hooks)
        except GroupStoppedError as stopped:
            return Outcome(STOPPED_AS[stopped.control], job.current_epoch, job.checkpoint_path)

    def _rendezvous(
        self, job_id: UUID, attempt: int, nodes: int, endpoint: str, hosts: bool
    ) -> Rendezvous:
        """A multi-node group's c10d rendezvous at `endpoint`, as this trainer sees it."""
        return Rendezvous(
            endpoint,
            hosts,
            run_id(job_id, attempt),
            nodes,
            self.settings.rendezvous_seconds,
            self.settings.rendezvous_host,
        )

    def _rank_spec(
        self,
        job: TrainingJob,
        config: JobConfig,
        attempt: int,
        resume: Path | None,
        start: Path | None,
        claimed_here: bool,
    ) -> RankSpec:
        threads = self.settings.rank_threads or max(1, (os.cpu_count() or 1) // config.devices)
        return RankSpec(
            job_id=str(job.id),
            config=config.model_dump(mode="json"),
            workdir=str(self.settings.artifacts / str(job.id)),
            attempt=attempt,
            resume_from=str(resume) if resume else None,
            resume_sha256=job.checkpoint_sha256 if resume else None,
            init_weights=str(start) if start else None,
            threads=threads,
            claimed_here=claimed_here,
            hooks_address=None,
            authkey="",
            log_format=self.settings.log_format,
            log_level=self.settings.log_level,
        )

    def _invite(self, job: TrainingJob, config: JobConfig, attempt: int, endpoint: str) -> None:
        """Publish `nodes - 1` join messages on the job's work queue: each trainer that
        takes one runs its share of the group (`_join`)."""
        assert self._loop is not None
        for _ in range(config.nodes - 1):
            join = Envelope.join(
                str(job.id), work_queue(job.config), attempt, endpoint, self.worker
            )
            asyncio.run_coroutine_threadsafe(self.bus.publish(join), self._loop).result(60)

    async def _join(self, envelope: Envelope) -> Awaitable[None] | None:
        """A join message: run this node's ranks of a group another trainer leads, if
        that attempt still runs; else drop the message."""
        with job_context(envelope.job_id):
            job = await asyncio.to_thread(self.jobs.get_job, UUID(envelope.job_id))
            attempt = int(envelope.data["attempt"])
            if job.status not in ACTIVE_RUN or job.attempt != attempt:
                log.info(
                    "trainer %s: group of job %s attempt %d is over; dropped",
                    self.worker,
                    job.id,
                    attempt,
                )
                return None
        self._idle.clear()
        return self._run_join(job, attempt, str(envelope.data["endpoint"]))

    async def _run_join(self, job: TrainingJob, attempt: int, endpoint: str) -> None:
        config = JobConfig.model_validate(job.config)
        resume = Path(job.checkpoint_path) if job.checkpoint_path else None
        rendezvous = self._rendezvous(job.id, attempt, config.nodes, endpoint, False)
        BUSY.labels(self.worker).set(1)
        self.joined = JoinerHooks()
        if self._stopping:
            self.joined.preempting.set()
        try:
            with job_context(str(job.id)):
                log.info(
                    "trainer %s: joining job %s attempt %d at %s",
                    self.worker,
                    job.id,
                    attempt,
                    endpoint,
                )
                parent = config.init_from if resume is None else None
                start = await asyncio.to_thread(self._parent_weights, parent) if parent else None
                spec = self._rank_spec(job, config, attempt, resume, start, claimed_here=False)
                hooks = self.joined
                await asyncio.to_thread(launch_group, spec, config.devices, rendezvous, hooks)
        except Exception as error:  # the claiming trainer records what became of the job
            log.warning("trainer %s: its part of job %s ended: %r", self.worker, job.id, error)
        finally:
            self.joined = None
            BUSY.labels(self.worker).set(0)
            await asyncio.to_thread(release_memory)
            self._idle.set()

    def _parent_weights(self, parent_id: str) -> Path:
        """The `model.pt` of job `parent_id` (`init_from`) under this trainer's artifacts
        location, where the trainer that completed it wrote it (a shared volume)."""
        parent = self.jobs.get_job(UUID(parent_id))
        if parent.model_path is None:
            raise CheckpointError(f"init_from {parent_id}: that job recorded no final weights")
        return self.settings.artifacts / parent_id / Path(parent.model_path).name

    def _record_failure(
        self, job_id: UUID, attempt: int, error: Exception, claim_first: bool = False
    ) -> None:
        kind = error.error_type if isinstance(error, RankFailedError) else type(error).__name__
        try:
            self.jobs.fail(job_id, self.worker, attempt, str(error)[:2000], kind, claim_first)
        except ClaimLostError:
            log.warning(
                "trainer %s: job %s no longer ours; failure not recorded", self.worker, job_id
            )

    async def _heartbeat(self, hooks: StoreHooks) -> None:
        """Renew the lease while the training thread shows life. A thread stuck for
        `stall_seconds` (no step, epoch or write) lets the lease lapse, so another trainer
        records `WorkerLost` and resumes the job; this one then finds its claim lost."""
        while True:
            await asyncio.sleep(self.settings.lease_seconds / 3)
            stalled = time.monotonic() - hooks.active_at
            if hooks.in_steps and stalled > self.settings.stall_seconds:
                log.error(
                    "trainer %s: job %s shows no progress for %.0f s; letting its lease lapse",
                    self.worker,
                    hooks.job_id,
                    stalled,
                )
                continue
            try:
                await asyncio.to_thread(
                    self.leases.renew, str(hooks.job_id), self.worker, hooks.attempt
                )
            except Exception as error:
                log.warning("trainer %s: lease renewal failed: %s", self.worker, error)

    async def _reap_forever(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                await asyncio.to_thread(self.reap)
            except Exception as error:
                log.warning("trainer %s: reaping failed: %s", self.worker, error)
            await wait_event(stop, min(self.settings.lease_seconds / 3, 10.0))

    def reap(self) -> list[str]:
        """Record `WorkerLost` once for each running job whose trainer's lease lapsed."""
        lost = []
        for job_id in self.leases.lapsed():
            lease = self.leases.holder(job_id)
            job = self.jobs.get_job(UUID(job_id))
            if lease is not None and lease.attempt == job.attempt and not lease.expired:
                continue
            self._lose(job.id, job.attempt)
            lost.append(job_id)
        return lost

    def _lose(self, job_id: UUID, attempt: int) -> None:
        self.jobs.lose_worker(job_id, attempt, self.worker)


def run_id(job_id: UUID, attempt: int) -> str:
    """The torchrun run id of a job's attempt: the same on every node of its group."""
    return f"{job_id}-{attempt}"


def free_port() -> int:
    """A TCP port free on this host now, for a group's rendezvous store."""
    with socket.socket() as probe:
        probe.bind(("", 0))
        return int(probe.getsockname()[1])


def release_memory() -> None:
    """Give back to the system what a finished job's tensors freed, so that an idle
    trainer holds about what a fresh one does rather than the last job's peak.

    glibc's allocator keeps freed heap pages for reuse; `malloc_trim(0)` (malloc_trim(3))
    returns them. PyTorch's CPU tensors live on that heap; on a GPU its caching allocator
    keeps blocks until `torch.cuda.empty_cache()`. Elsewhere (no glibc) only the garbage
    collector runs. Measured with bench/idle_memory.py (README: memory after a job).
    """
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    libc.malloc_trim(0)


def record_outcome(jobs: TrainingJobs, hooks: StoreHooks, outcome: Outcome) -> TrainingJob:
    """The one event that says how the run ended."""
    job_id, worker, attempt = hooks.job_id, hooks.worker, hooks.attempt
    if outcome.kind == "completed":
        return jobs.complete(
            job_id,
            worker,
            attempt,
            final_metrics=dict(outcome.final_metrics),
            best_epoch=outcome.best_epoch,
            best_val_loss=outcome.best_val_loss,
            model_uri=outcome.model_uri,
        )
    if outcome.kind == "paused":
        return jobs.record_paused(
            job_id, worker, attempt, outcome.epoch, outcome.checkpoint_uri or ""
        )
    if outcome.kind == "preempted":
        return jobs.preempt(
            job_id,
            worker,
            attempt,
            PREEMPT_REASON,
            outcome.epoch,
            outcome.step,
            outcome.checkpoint_uri or "",
        )
    return jobs.record_cancelled(job_id, worker, attempt, outcome.epoch)


def dataset_sizes(config: JobConfig) -> tuple[int, int]:
    """Train and validation sizes, known without generating or loading the data."""
    if isinstance(config.dataset, FilesDataset):
        n = int(np.load(Path(config.dataset.path) / "inputs.npy", mmap_mode="r").shape[0])
    else:
        n = config.dataset.samples
    train, val = split_indices(n, config.validation_split, config.seed)
    return len(train), len(val)


def build_trainer(settings: Settings, jobs: TrainingJobs, reads: ReadStore, bus: Bus) -> Trainer:
    return Trainer(settings, jobs, reads, bus)
