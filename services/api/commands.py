"""People's commands as the api runs them: each use case of the application on a worker
thread, answered only once the read tables show its effect (read-your-writes).

Routes reach the application's commands only through this class, so the wait cannot be
forgotten by a route.
"""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any, ParamSpec
from uuid import UUID

from services.api.freshness import ReadFreshness
from services.api.preflight import Estimate
from shared.application import Accepted, TrainingJobs

P = ParamSpec("P")
COMMAND_THREADS = 40


class Commands:
    """`submit`, `pause`, `resume`, `cancel` and `delete`, each returning `Accepted`."""

    def __init__(self, jobs: TrainingJobs, freshness: ReadFreshness) -> None:
        self.jobs, self.freshness = jobs, freshness
        # Threads of their own: a burst of submits whose model checks wait on the probe
        # child holds them all, and reads (on the loop's executor) go on meanwhile.
        # Not shut down with the app's lifespan: an app may be served again (tests do);
        # idle threads end when the executor is collected.
        self._threads = ThreadPoolExecutor(COMMAND_THREADS, thread_name_prefix="api-command")

    async def submit(
        self,
        job_name: str,
        description: str,
        config: dict[str, Any],
        actor: str,
        idempotency_key: str | None,
        check: Callable[[], Estimate] | None = None,
    ) -> Accepted:
        """A new job. `check` (the submit's preflight, blocking) runs first, on the same
        worker thread: what it raises is raised and nothing is stored; its `Estimate` is
        stored with the job."""

        def checked_submit() -> Accepted:
            estimate = check() if check is not None else None
            return self.jobs.submit(
                job_name,
                description,
                config,
                actor,
                idempotency_key,
                estimate.parameter_count if estimate else None,
                estimate.warnings if estimate else None,
            )

        return await self._run(checked_submit)

    async def pause(self, job_id: UUID, actor: str) -> Accepted:
        return await self._run(self.jobs.pause, job_id, actor)

    async def resume(self, job_id: UUID, actor: str) -> Accepted:
        return await self._run(self.jobs.resume, job_id, actor)

    async def cancel(self, job_id: UUID, actor: str) -> Accepted:
        return await self._run(self.jobs.cancel, job_id, actor)

    async def delete(self, job_id: UUID, actor: str) -> Accepted:
        return await self._run(self.jobs.delete, job_id, actor)

    async def _run(
        self, use_case: Callable[P, Accepted], *args: P.args, **kwargs: P.kwargs
    ) -> Accepted:
        """The use case (on a command thread: eventsourcing is synchronous; with the
        caller's context variables, as `asyncio.to_thread`), then the wait for its
        position in the read tables."""
        call = partial(contextvars.copy_context().run, use_case, *args, **kwargs)
        accepted = await asyncio.get_running_loop().run_in_executor(self._threads, call)
        await self.freshness.require(accepted.position, stored=True)
        return accepted
