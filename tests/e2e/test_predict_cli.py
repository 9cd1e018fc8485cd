"""A trained model leaves the platform: a trainer exports it at completion, `heimdall export`
downloads the bundle over HTTP, and `heimdall predict` runs it with onnxruntime, no torch."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import uvicorn

from heimdall_cli.bundle import read_bundle
from services.api.app import create_app
from services.runtime import build_api
from services.trainer.worker import build_trainer
from shared.settings import Settings
from tests.processes import API, HEIMDALL, free_port, tiny_config, wait_healthy, wait_status
from tests.unit.test_model_routes import with_models

# The CLI in a subprocess that says, as it exits, whether torch was ever imported. Until
# heimdall_cli.main registers `export` and `predict`, a Typer app of those two stands in.
CLI = """
import atexit, sys
atexit.register(lambda: print(f"torch-imported={'torch' in sys.modules}", file=sys.stderr))
import typer
from heimdall_cli import bundle
from heimdall_cli.main import app
names = {c.name or getattr(c.callback, "__name__", "") for c in app.registered_commands}
if not {"export", "predict"} <= names:
    app = typer.Typer()
    app.command()(bundle.export)
    app.command()(bundle.predict)
app(prog_name="heimdall")
"""
MAKE = ["--samples", "48", "--receivers", "5", "--n-mels", "16", "--frames", "16", "--seed", "4"]
DEGREES = 1e-6  # about 0.1 m: the same float32 outputs, de-normalised in float64 twice
UNCERTAINTY = 1e-6  # relative


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[httpx.Client, dict[str, str]]]:
    """api, projector and one trainer on one loop, as `heimdall up` runs them, over HTTP."""
    settings = Settings(data_dir=tmp_path / "var", poll_seconds=0.05, _env_file=None)
    context, background = build_api(settings, with_projector=True)
    trainer = build_trainer(settings, context.jobs, context.reads, context.bus)
    background.append(trainer.run_forever)
    port = free_port()
    app = with_models(create_app(context, background))
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning")
    served = uvicorn.Server(config)
    thread = threading.Thread(target=served.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("HEIMDALL_")}
    try:
        with httpx.Client(base_url=url, timeout=30) as client:
            wait_healthy(client)
            yield client, {**env, "HEIMDALL_API_URL": url}
    finally:
        served.should_exit = True
        thread.join(30)


def heimdall(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", CLI, *args], env=env, capture_output=True, text=True, timeout=120
    )


def predictions(env: dict[str, str], bundle: Path, inputs: Path) -> list[dict[str, Any]]:
    done = heimdall(env, "predict", str(bundle), str(inputs), "--json")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "torch-imported=False" in done.stderr, done.stderr
    rows: list[dict[str, Any]] = json.loads(done.stdout)["predictions"]
    return rows


def assert_reproduced(sample: dict[str, Any], row: dict[str, Any]) -> None:
    predicted = sample["prediction"]
    assert abs(row["latitude"] - predicted["latitude"]) <= DEGREES
    assert abs(row["longitude"] - predicted["longitude"]) <= DEGREES
    assert row["uncertainty_m"] == pytest.approx(predicted["uncertainty_m"], rel=UNCERTAINTY)


def test_a_trained_model_predicts_outside_the_platform_without_torch(
    server: tuple[httpx.Client, dict[str, str]], tmp_path: Path
) -> None:
    client, env = server
    data = tmp_path / "data"
    made = subprocess.run(
        [*HEIMDALL, "dataset", "make", str(data), *MAKE],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert made.returncode == 0, made.stdout + made.stderr
    config = tiny_config(
        epochs=1,
        model_architecture="resnet18",
        validation_split=0.25,
        dataset={"kind": "files", "path": str(data)},
    )
    created = client.post(f"{API}/jobs", json={"job_name": "leaves", "config": config})
    assert created.status_code == 201, created.text
    job_id = created.json()["id"]
    assert wait_status(client, job_id, ("completed", "failed"), 180)["status"] == "completed"

    path = tmp_path / "leaves.heimdall"
    exported = heimdall(env, "export", job_id, "-o", str(path), "--num-samples", "10")
    assert exported.returncode == 0, exported.stdout + exported.stderr
    assert str(path) in exported.stdout and "torch-imported=False" in exported.stderr
    bundle = read_bundle(path)
    assert bundle["model"]["architecture"] == "resnet18"
    files = bundle["provenance"]["dataset"]["files"]
    for name in ("inputs.npy", "positions.npy", "receivers.json"):
        assert files[name] == hashlib.sha256((data / name).read_bytes()).hexdigest()

    samples = bundle["sample_predictions"]
    assert len(samples) == 10
    rows = predictions(env, path, data)
    assert len(rows) == 48
    positions = np.load(data / "positions.npy")
    for sample in samples:
        row = rows[sample["dataset_index"]]
        assert_reproduced(sample, row)
        assert row["truth"] == {
            "latitude": positions[row["index"]][0],
            "longitude": positions[row["index"]][1],
        }
        assert row["error_m"] == pytest.approx(sample["error_m"], abs=0.5)

    shape = bundle["model"]["input_shape"][1:]
    stacked = np.stack(
        [
            np.frombuffer(base64.b64decode(s["input_base64"]), dtype="<f4").reshape(shape)
            for s in samples
        ]
    )
    np.save(tmp_path / "inputs.npy", stacked)
    for sample, row in zip(samples, predictions(env, path, tmp_path / "inputs.npy"), strict=True):
        assert_reproduced(sample, row)
        assert "truth" not in row

    unknown = heimdall(env, "export", "0" * 32, "-o", str(tmp_path / "none.heimdall"))
    assert unknown.returncode == 1 and "error 404" in unknown.stderr
    assert not (tmp_path / "none.heimdall").exists()


def test_predict_refuses_an_altered_bundle(tmp_path: Path) -> None:
    bundle = tmp_path / "altered.heimdall"
    digest = "0" * 64
    bundle.write_text(
        json.dumps(
            {
                "format_version": "1.0.0",
                "integrity": {"onnx_sha256": digest, "bundle_sha256": "f" * 64},
            },
            separators=(",", ":"),
        )
    )
    np.save(tmp_path / "x.npy", np.zeros((1, 5, 16, 16), dtype=np.float32))
    done = heimdall(dict(os.environ), "predict", str(bundle), str(tmp_path / "x.npy"))
    assert done.returncode == 1
    assert "sha256" in done.stdout + done.stderr
