"""Each shape is declared once (shared/readmodel/shapes.py) and bound by name everywhere:
no other module spells a list of its fields, and every consumer has every field."""

from __future__ import annotations

import ast
import re
import sqlite3
import uuid
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from starlette.websockets import WebSocketDisconnect

from services.api.app import create_app
from services.runtime import build_api
from shared.readmodel.shapes import EpochMetrics, JobRow, JobView, MetricRow
from shared.settings import Settings
from shared.views import job_json, job_row
from tests.readwrites import API

ROOT = Path(__file__).resolve().parents[2]
SOURCES = ("shared", "services", "heimdall_cli", "bench")
DECLARATION = ROOT / "shared" / "readmodel" / "shapes.py"
# Names so generic that a list of them says nothing about these shapes.
GENERIC = {"id", "status", "config", "description", "version", "position", "epoch"}
FIELDS = (set(JobRow.model_fields) | set(MetricRow.model_fields)) - GENERIC
SPELLED_OUT = 4  # this many field names in one literal list or class is a second copy


def field_names(node: ast.AST) -> list[str]:
    if isinstance(node, ast.Tuple | ast.List | ast.Set):
        elements = node.elts
    elif isinstance(node, ast.ClassDef):
        elements = [s.target for s in node.body if isinstance(s, ast.AnnAssign)]
        return [e.id for e in elements if isinstance(e, ast.Name) and e.id in FIELDS]
    else:
        return []
    strings = [e.value for e in elements if isinstance(e, ast.Constant)]
    return [s for s in strings if isinstance(s, str) and s in FIELDS]


def copies_in_python() -> list[str]:
    found = []
    for folder in SOURCES:
        for path in sorted((ROOT / folder).rglob("*.py")):
            if path == DECLARATION:
                continue
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                names = field_names(node)
                if len(names) >= SPELLED_OUT:
                    found.append(f"{path.relative_to(ROOT)}:{getattr(node, 'lineno', 0)}: {names}")
    return found


def copies_in_javascript() -> list[str]:
    found = []
    for path in sorted((ROOT / "services").rglob("*.js")):
        for array in re.finditer(r"\[[^\[\]]*\]", path.read_text()):
            names = [n for n in re.findall(r"[\"'](\w+)[\"']", array.group()) if n in FIELDS]
            if len(names) >= SPELLED_OUT:
                found.append(f"{path.relative_to(ROOT)}: {names}")
    return found


def test_no_module_spells_out_a_list_of_the_declared_fields() -> None:
    assert copies_in_python() == []
    assert copies_in_javascript() == []


def test_every_declared_field_is_in_the_tables_the_api_and_the_messages(
    sqlite_settings: Settings,
) -> None:
    context, background = build_api(sqlite_settings, with_projector=True)
    with TestClient(create_app(context, background)) as client:
        schemas = client.get("/openapi.json").json()["components"]["schemas"]
        job_id = client.post(f"{API}/jobs", json={"job_name": "shapes"}).json()["id"]
        client.post(f"{API}/jobs/{job_id}/cancel")  # ended: the server closes the socket
        with client.websocket_connect(f"/ws/training/{job_id}") as socket:
            socket.receive_json()
            status = socket.receive_json()
            with pytest.raises(WebSocketDisconnect):
                while True:
                    socket.receive_json()
    with sqlite3.connect(sqlite_settings.data_dir / "read.sqlite") as db:
        columns = {
            table: {row[1] for row in db.execute(f"PRAGMA table_info({table})")}
            for table in ("training_jobs", "training_metrics")
        }
    assert set(JobRow.model_fields) == columns["training_jobs"]
    assert set(MetricRow.model_fields) | {"job_id", "position"} == columns["training_metrics"]
    assert set(JobView.model_fields) <= set(schemas["JobView"]["properties"])
    assert set(JobView.model_fields) <= set(schemas["CommandResult"]["properties"])
    assert set(MetricRow.model_fields) == set(schemas["MetricRow"]["properties"])
    assert set(EpochMetrics.model_fields) <= set(MetricRow.model_fields)
    assert set(JobView.model_fields) <= set(status)
    job = context.jobs.get_job(uuid.UUID(job_id))
    assert set(job_row(job, 1)) == set(JobRow.model_fields)
    assert set(job_json(job_row(job, 1))) == set(JobView.model_fields)
