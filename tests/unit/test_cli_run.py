"""What `heimdall up`, `api`, `projector` and `trainer` say: text logs for a person at a
terminal, JSON for a collector; the dashboard's polling below INFO; the trainer's device."""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator

import pytest

from services.runtime import device_summary
from shared.logs import configure_logging
from shared.settings import Settings


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root, access = logging.getLogger(), logging.getLogger("uvicorn.access")
    handlers, level, access_level = list(root.handlers), root.level, access.level
    access.setLevel(logging.NOTSET)
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    access.setLevel(access_level)
    logging.captureWarnings(False)


@pytest.mark.parametrize(("stderr", "expected"), [(Terminal(), "text"), (io.StringIO(), "json")])
def test_logs_are_text_at_a_terminal_and_json_otherwise(
    monkeypatch: pytest.MonkeyPatch, stderr: io.StringIO, expected: str
) -> None:
    monkeypatch.delenv("HEIMDALL_LOG_FORMAT", raising=False)
    monkeypatch.setattr("sys.stderr", stderr)
    assert Settings(_env_file=None).log_format == expected
    monkeypatch.setenv("HEIMDALL_LOG_FORMAT", "json")
    assert Settings(_env_file=None).log_format == "json"


def access(method: str, path: str, status: int) -> None:
    """An access line as uvicorn writes it."""
    line = '%s - "%s %s HTTP/%s" %d'
    logging.getLogger("uvicorn.access").info(line, "127.0.0.1:5", method, path, "1.1", status)


def test_reads_are_logged_at_debug_and_commands_and_errors_at_info(
    restore_logging: None, capsys: pytest.CaptureFixture[str]
) -> None:
    configure_logging("text", "INFO")
    access("GET", "/api/v1/training/jobs?limit=100", 200)
    access("GET", "/static/app.js", 304)
    access("POST", "/api/v1/training/jobs/x/pause", 202)
    access("GET", "/api/v1/training/jobs/x", 404)
    err = capsys.readouterr().err
    assert "limit=100" not in err and "app.js" not in err, err
    assert "INFO uvicorn.access" in err and "/pause" in err and "/jobs/x" in err, err
    configure_logging("text", "DEBUG")
    access("GET", "/api/v1/training/jobs?limit=100", 200)
    assert "DEBUG uvicorn.access" in capsys.readouterr().err


def test_a_trainer_names_what_it_trains_on() -> None:
    summary = device_summary()
    assert "CPUs" in summary and ("cuda:0" in summary or summary.startswith("cpu only"))
