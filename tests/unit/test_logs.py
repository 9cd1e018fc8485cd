"""One JSON object per log line, with the job id of the work at hand."""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections.abc import Iterator

import pytest

from services.projector.runner import Projector
from shared.bootstrap import build_app, build_read_store
from shared.bus import InProcessBus
from shared.logs import configure_logging, job_context
from shared.settings import Settings


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    logging.captureWarnings(False)


def lines(err: str) -> list[dict[str, object]]:
    return [json.loads(line) for line in err.splitlines() if line.strip()]


def test_json_lines_carry_the_job_id_across_threads(
    restore_logging: None, capsys: pytest.CaptureFixture[str]
) -> None:
    configure_logging("json", "INFO")
    log = logging.getLogger("heimdall.test")
    job_id = str(uuid.uuid4())

    async def work() -> None:
        with job_context(job_id):
            log.info("in the task")
            await asyncio.to_thread(log.info, "in a worker thread")
        log.info("after the job")

    asyncio.run(work())
    log.warning("explicit", extra={"job_id": "other", "epoch": 3})
    try:
        raise ValueError("boom")
    except ValueError:
        log.exception("failed")
    records = lines(capsys.readouterr().err)
    assert [r["message"] for r in records] == [
        "in the task",
        "in a worker thread",
        "after the job",
        "explicit",
        "failed",
    ]
    assert [r.get("job_id") for r in records] == [job_id, job_id, None, "other", None]
    assert set(records[0]) == {"time", "level", "logger", "message", "job_id"}
    assert records[0]["level"] == "INFO" and records[0]["logger"] == "heimdall.test"
    assert str(records[0]["time"]).endswith("+00:00")
    assert records[3]["epoch"] == 3
    assert "ValueError: boom" in str(records[4]["exception"])


def test_text_format_and_uvicorn_goes_through_the_root_logger(
    restore_logging: None, capsys: pytest.CaptureFixture[str]
) -> None:
    configure_logging("text", "INFO")
    with job_context("j-1"):
        logging.getLogger("uvicorn.access").info('%s - "%s %s"', "1.2.3.4", "GET", "/health")
    err = capsys.readouterr().err
    assert 'INFO uvicorn.access 1.2.3.4 - "GET /health" [job j-1]' in err


async def test_the_projectors_lines_carry_the_job_id(
    restore_logging: None, capsys: pytest.CaptureFixture[str], sqlite_settings: Settings
) -> None:
    jobs, reads = build_app(sqlite_settings), build_read_store(sqlite_settings)
    job = jobs.submit("logged", "", {"epochs": 1}, "tester").job
    configure_logging("json", "DEBUG")
    assert await Projector(jobs, reads, InProcessBus()).project_pending() == 1
    records = lines(capsys.readouterr().err)
    projected = [r for r in records if r["message"] == "projected position 1"]
    assert [r["job_id"] for r in projected] == [str(job.id)]


def test_api_keys_never_reach_a_log_line(
    restore_logging: None, capsys: pytest.CaptureFixture[str]
) -> None:
    configure_logging("json", "INFO")
    access = logging.getLogger("uvicorn.access")
    access.info('%s - "%s %s"', "1.2.3.4", "GET", "/?token=s3cretKEY&x=1")
    logging.getLogger("uvicorn.error").info('"WebSocket /ws/training?token=s3cretKEY" [accepted]')
    logging.getLogger("heimdall").info("headers %s", {"authorization": "Bearer s3cretKEY"})
    err = capsys.readouterr().err
    assert "s3cretKEY" not in err, err
    assert err.count("[redacted]") == 3
