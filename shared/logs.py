"""Logs as one JSON object per line (or plain text), with the job id of the work at hand."""

from __future__ import annotations

import contextvars
import json
import logging
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime

# The job a line concerns: set around a job's work, read by every record made meanwhile
# (asyncio tasks and `asyncio.to_thread` carry it along).
current_job: contextvars.ContextVar[str | None] = contextvars.ContextVar("job_id", default=None)
_STANDARD = set(vars(logging.makeLogRecord({}))) | {
    "message",
    "asctime",
    "taskName",
    "color_message",
}


@contextmanager
def job_context(job_id: object) -> Iterator[None]:
    """Every log line made inside carries `job_id`."""
    token = current_job.set(str(job_id))
    try:
        yield
    finally:
        current_job.reset(token)


class JobIdFilter(logging.Filter):
    """Puts the current job id on a record that was not given one with `extra`."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "job_id", None) is None:
            job_id = current_job.get()
            if job_id is not None:
                record.job_id = job_id
        return True


# A secret in a URL or a header: `?token=KEY` (the dashboard's WebSockets) and
# `Authorization: Bearer KEY`.
_SECRETS = re.compile(
    r"((?:[?&]token=)|(?:authorization[\"']?\s*[:=,]\s*[\"']?(?:bearer\s+)?))[^&\s\"',)]+", re.I
)
REDACTED = "[redacted]"


def redact(text: str) -> str:
    """`text` with API keys in URLs and Authorization headers replaced by [redacted]."""
    return _SECRETS.sub(lambda m: m.group(1) + REDACTED, text)


class RedactFilter(logging.Filter):
    """No API key reaches a log line: uvicorn's access and WebSocket lines include the
    query string, and any line may quote a request's headers."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        cleaned = redact(message)
        if cleaned != message:
            record.msg, record.args = cleaned, None
        return True


class QuietReads(logging.Filter):
    """uvicorn's access line of a GET that succeeded goes at DEBUG: the dashboard's polling
    and the health checks would bury the commands, which stay at INFO with every error."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args  # uvicorn's: client, method, path, HTTP version, status
        if record.levelno != logging.INFO or not isinstance(args, tuple) or len(args) != 5:
            return True
        method, status = args[1], args[4]
        if method not in ("GET", "HEAD") or not isinstance(status, int) or status >= 400:
            return True
        record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        return logging.getLogger(record.name).isEnabledFor(logging.DEBUG)


class JsonFormatter(logging.Formatter):
    """time, level, logger, message, job_id when known, any other `extra`, exception."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                line[key] = value if isinstance(value, int | float | bool | None) else str(value)
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            line["stack"] = self.formatStack(record.stack_info)
        return json.dumps(line, default=str)


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        job_id = getattr(record, "job_id", None)
        return f"{text} [job {job_id}]" if job_id else text


def configure_logging(log_format: str = "json", level: str = "INFO") -> None:
    """The root logger writes to stderr; uvicorn's loggers and warnings go through it."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    handler.addFilter(JobIdFilter())
    handler.addFilter(RedactFilter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access", "uvicorn.asgi"):
        uvicorn_logger = logging.getLogger(name)
        uvicorn_logger.handlers.clear()
        uvicorn_logger.propagate = True
        # A dictConfig elsewhere (disable_existing_loggers) may have switched them off.
        uvicorn_logger.disabled = False
        uvicorn_logger.setLevel(logging.NOTSET)
    access = logging.getLogger("uvicorn.access")
    if not any(isinstance(f, QuietReads) for f in access.filters):
        access.addFilter(QuietReads())
    logging.captureWarnings(True)
