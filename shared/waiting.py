"""Waiting: on an asyncio event for at most a while, and retrying with backoff."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import TypeVar

from tenacity import (
    AsyncRetrying,
    RetryCallState,
    Retrying,
    retry_if_exception_type,
    stop_after_delay,
    stop_never,
    wait_exponential_jitter,
)

log = logging.getLogger(__name__)
T = TypeVar("T")
FIRST_WAIT_SECONDS, MAX_WAIT_SECONDS = 0.2, 10.0


async def wait_event(event: asyncio.Event, seconds: float) -> bool:
    """True if the event was set within `seconds`."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(event.wait(), seconds)
    return event.is_set()


def _log_retry(what: str) -> Callable[[RetryCallState], None]:
    def before_sleep(state: RetryCallState) -> None:
        error = state.outcome.exception() if state.outcome else None
        log.warning("%s failed (%r); retry %d", what, error, state.attempt_number)

    return before_sleep


def retrying_until(stop: asyncio.Event, what: str) -> AsyncRetrying:
    """Retry an async step until it works or `stop` is set (then its error is raised):
    0.2 s first, doubling up to 10 s, with jitter; the wait ends early on `stop`."""

    async def sleep(seconds: float) -> None:
        await wait_event(stop, seconds)

    return AsyncRetrying(
        retry=retry_if_exception_type(Exception),
        wait=wait_exponential_jitter(
            multiplier=FIRST_WAIT_SECONDS, jitter=FIRST_WAIT_SECONDS, max=MAX_WAIT_SECONDS
        ),
        stop=lambda _: stop.is_set(),
        sleep=sleep,
        before_sleep=_log_retry(what),
        reraise=True,
    )


def until_reachable(
    what: str, build: Callable[[], T], errors: tuple[type[BaseException], ...] = (OSError,)
) -> T:
    """`build()` once the servers it needs answer: a service started before PostgreSQL
    or RabbitMQ waits for them; any other error (configuration) is raised at once."""
    retrying = Retrying(
        retry=retry_if_exception_type(errors),
        wait=wait_exponential_jitter(
            multiplier=FIRST_WAIT_SECONDS, jitter=FIRST_WAIT_SECONDS, max=5.0
        ),
        stop=stop_never,
        before_sleep=_log_retry(what),
        reraise=True,
    )
    return retrying(build)


def durably(
    what: str,
    call: Callable[[], T],
    errors: tuple[type[BaseException], ...],
    patience_seconds: float,
) -> T:
    """`call()`, retried with backoff while it meets `errors` (an outage), for at most
    `patience_seconds`; then its error is raised. The call must be safe to repeat."""
    retrying = Retrying(
        retry=retry_if_exception_type(errors),
        wait=wait_exponential_jitter(
            multiplier=FIRST_WAIT_SECONDS, jitter=FIRST_WAIT_SECONDS, max=5.0
        ),
        stop=stop_after_delay(patience_seconds),
        before_sleep=_log_retry(what),
        reraise=True,
    )
    return retrying(call)
