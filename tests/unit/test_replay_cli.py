"""`heimdall replay` judges only a store it can see: a missing or empty one is exit 2."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from typer.testing import CliRunner, Result

from heimdall_cli import main
from services.projector.replay import rebuild
from shared.bootstrap import build_app, build_read_store
from shared.settings import Settings
from tests.conftest import POSTGRES_URL, drop_schema

runner = CliRunner()
TINY = {"epochs": 1, "accelerator": "cpu", "dataset": {"samples": 64, "n_mels": 16, "frames": 16}}


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("HEIMDALL_DATABASE_URL", "HEIMDALL_DATABASE_SCHEMA", "HEIMDALL_DATA_DIR"):
        monkeypatch.delenv(name, raising=False)


def on_sqlite(monkeypatch: pytest.MonkeyPatch, data_dir: Path) -> Settings:
    monkeypatch.setenv("HEIMDALL_DATA_DIR", str(data_dir))
    return Settings(_env_file=None)


def replay(*args: str) -> Result:
    return runner.invoke(main.app, ["replay", *args])


def refused(result: Result, *words: str) -> str:
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("heimdall: "), result.stderr
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


def test_a_store_that_does_not_exist_is_refused_and_not_made(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    on_sqlite(monkeypatch, tmp_path / "var")
    refused(replay(), str(tmp_path / "var" / "events.sqlite"), "no event store", "--allow-empty")
    assert not (tmp_path / "var").exists()


def test_an_empty_store_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    settings = on_sqlite(monkeypatch, tmp_path / "var")
    build_app(settings)  # the tables, and no event
    refused(replay(), str(tmp_path / "var" / "events.sqlite"), "no events")


def test_allow_empty_judges_an_empty_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    on_sqlite(monkeypatch, tmp_path / "var")
    result = replay("--allow-empty")
    assert result.exit_code == 0, result.output
    assert "replayed 0 events" in result.stdout and "equal" in result.stdout


def test_a_store_with_events_is_judged(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    settings = on_sqlite(monkeypatch, tmp_path / "var")
    app = build_app(settings)
    app.submit("replayed", "", TINY, "test")
    rebuild(app, build_read_store(settings), app.recorder.max_notification_id() or 0)
    result = replay()
    assert result.exit_code == 0, result.output
    assert "replayed 1 events" in result.stdout and "equal" in result.stdout


@pytest.fixture
def schema() -> Iterator[str]:
    name = f"t_{uuid.uuid4().hex[:16]}"
    yield name
    drop_schema(name)


def schema_exists(name: str) -> bool:
    with psycopg.connect(POSTGRES_URL) as conn:
        found = conn.execute("SELECT 1 FROM pg_namespace WHERE nspname = %s", (name,))
        return found.fetchone() is not None


@pytest.mark.postgres
def test_a_postgres_schema_without_a_store_is_refused_and_not_made(
    schema: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HEIMDALL_DATABASE_URL", POSTGRES_URL.replace("postgres@", "postgres:pw@"))
    monkeypatch.setenv("HEIMDALL_DATABASE_SCHEMA", schema)
    line = refused(replay(), f'schema "{schema}"', "127.0.0.1:5432/test", "no event store")
    assert ":pw@" not in line  # a password never reaches a terminal
    assert not schema_exists(schema)
    build_app(Settings(_env_file=None))
    refused(replay(), f'schema "{schema}"', "no events")


@pytest.mark.parametrize("allow_empty", [(), ("--allow-empty",)])
def test_a_store_that_cannot_be_opened_is_one_line_even_with_allow_empty(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, allow_empty: tuple[str, ...]
) -> None:
    """A data folder that is a file (it was a traceback with --allow-empty), and a
    database nothing listens for (--allow-empty retried for ever): exit 2, one line."""
    (tmp_path / "afile").write_text("")
    on_sqlite(monkeypatch, tmp_path / "afile")
    line = refused(replay(*allow_empty), "cannot open the store", "is a file")
    assert "--allow-empty" not in line
    monkeypatch.setenv("HEIMDALL_DATABASE_URL", "postgresql://x:secret@127.0.0.1:1/db")
    line = refused(replay(*allow_empty), "cannot open the store", "127.0.0.1:1/db")
    assert "secret" not in line and "--allow-empty" not in line
