"""GET /jobs/{id}/model and GET /jobs/{id}/export (DESIGN §4, §8) on the embedded default."""

from __future__ import annotations

import base64
import hashlib
import json
import shutil
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonschema_rs
import onnx
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from heimdall_cli.bundle import BundleError, read_bundle
from services.api.app import create_app
from services.api.deps import ApiContext
from services.api.routes import models
from services.runtime import build_api
from services.trainer import export
from services.trainer.checkpoints import load_model
from services.trainer.control import NullHooks
from services.trainer.job import MODEL_FILE, run_training
from shared.settings import Settings
from tests.unit.trainer.configs import tiny_config

API = "/api/v1/training"
WORKER = "trainer-a"
SCHEMA = json.loads(
    (Path(__file__).parents[2] / "docs" / "heimdall-bundle-1.0.0.schema.json").read_text()
)
DATASET = {"kind": "synthetic", "samples": 64, "n_mels": 16, "frames": 16, "seed": 11}
CONFIG = tiny_config(epochs=1, dropout_rate=0.0, dataset=DATASET)


def with_models(app: FastAPI) -> FastAPI:
    """The app with the models router, until create_app includes it itself."""
    if not any(getattr(r, "path", "").endswith("/export") for r in app.routes):
        app.include_router(models.router)
    return app


@dataclass
class Platform:
    client: TestClient
    context: ApiContext
    settings: Settings

    @property
    def root(self) -> Path:
        return self.settings.artifacts

    def submit(self) -> str:
        body = {"job_name": f"job-{uuid.uuid4().hex[:8]}", "config": CONFIG.model_dump()}
        response = self.client.post(f"{API}/jobs", json=body)
        assert response.status_code == 201, response.text
        return str(response.json()["id"])

    def complete(self, job_id: str, model_uri: str, metrics: dict[str, Any]) -> None:
        """What a trainer records: the claim, then `Completed` naming the model."""
        jobs, key = self.context.jobs, uuid.UUID(job_id)
        attempt = jobs.claim(key, WORKER, "cpu (fp32)", 48, 16).attempt
        jobs.complete(key, WORKER, attempt, metrics, 1, metrics.get("val_loss"), model_uri)
        self.wait(job_id, "completed")

    def wait(self, job_id: str, status: str) -> dict[str, Any]:
        deadline = time.monotonic() + 10
        while True:
            job: dict[str, Any] = self.client.get(f"{API}/jobs/{job_id}").json()["job"]
            if job["status"] == status:
                return job
            assert time.monotonic() < deadline, job
            time.sleep(0.01)


@dataclass(frozen=True)
class Completed:
    job_id: str
    workdir: Path
    metrics: dict[str, Any]


@pytest.fixture(scope="module")
def platform(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Platform]:
    settings = Settings(data_dir=tmp_path_factory.mktemp("var"), poll_seconds=0.05, _env_file=None)
    context, background = build_api(settings, with_projector=True)
    with TestClient(with_models(create_app(context, background))) as client:
        yield Platform(client, context, settings)


@pytest.fixture(scope="module")
def completed(platform: Platform) -> Completed:
    """A convnext_atto job trained for real into the shared artifacts location."""
    job_id = platform.submit()
    workdir = platform.root / job_id
    outcome = run_training(CONFIG, workdir, NullHooks())
    assert outcome.model_uri is not None
    platform.complete(job_id, outcome.model_uri, dict(outcome.final_metrics))
    return Completed(job_id, workdir, dict(outcome.final_metrics))


def another_host(platform: Platform, completed: Completed) -> str:
    """A completed job whose trainer saw the shared location mounted elsewhere."""
    job_id = platform.submit()
    shutil.copytree(completed.workdir, platform.root / job_id)
    platform.complete(job_id, f"/mnt/trainer-b/artifacts/{job_id}/model.pt", completed.metrics)
    return job_id


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_the_model_streams_with_its_sha256_as_etag(
    platform: Platform, completed: Completed
) -> None:
    response = platform.client.get(f"{API}/jobs/{completed.job_id}/model")
    assert response.status_code == 200, response.text
    weights = (completed.workdir / MODEL_FILE).read_bytes()
    assert response.content == weights
    assert response.headers["etag"] == f'"{sha256(weights)}"'
    assert response.headers["content-type"] == "application/octet-stream"
    disposition = response.headers["content-disposition"]
    assert disposition.startswith("attachment;") and 'filename="job-' in disposition
    assert disposition.endswith(f'-{completed.job_id[:8]}.pt"')


def test_an_unchanged_model_is_not_sent_again(platform: Platform, completed: Completed) -> None:
    url = f"{API}/jobs/{completed.job_id}/model"
    etag = platform.client.get(url).headers["etag"]
    again = platform.client.get(url, headers={"If-None-Match": etag})
    assert again.status_code == 304 and again.content == b""
    assert again.headers["etag"] == etag


def test_the_model_is_read_from_the_shared_location_not_the_trainers_path(
    platform: Platform, completed: Completed
) -> None:
    job_id = another_host(platform, completed)
    response = platform.client.get(f"{API}/jobs/{job_id}/model")
    assert response.status_code == 200, response.text
    assert response.content == (completed.workdir / MODEL_FILE).read_bytes()
    assert platform.client.get(f"{API}/jobs/{job_id}/export").status_code == 200


@pytest.mark.parametrize("route", ["model", "export"])
@pytest.mark.parametrize("job_id", [str(uuid.uuid4()), "not-a-job"])
def test_an_unknown_job_is_404(platform: Platform, route: str, job_id: str) -> None:
    response = platform.client.get(f"{API}/jobs/{job_id}/{route}")
    assert response.status_code == 404
    assert response.json() == {"detail": f"job {job_id} not found"}


@pytest.mark.parametrize("route", ["model", "export"])
def test_a_job_that_has_not_completed_is_409_with_its_status(
    platform: Platform, route: str
) -> None:
    job_id = platform.submit()
    response = platform.client.get(f"{API}/jobs/{job_id}/{route}")
    assert response.status_code == 409
    assert response.json()["status"] == "queued"
    assert "not completed" in response.json()["detail"]
    platform.context.jobs.claim(uuid.UUID(job_id), WORKER, "cpu (fp32)", 48, 16)
    platform.wait(job_id, "running")
    assert platform.client.get(f"{API}/jobs/{job_id}/{route}").json()["status"] == "running"


@pytest.mark.parametrize("route", ["model", "export"])
@pytest.mark.parametrize("where", ["/etc/passwd", "{root}/{job}/../../escaped/model.pt", "link"])
def test_a_model_path_outside_the_artifacts_root_is_refused(
    platform: Platform, completed: Completed, route: str, where: str, tmp_path: Path
) -> None:
    job_id = platform.submit()
    if where == "link":  # the job's own directory, but a symlink out of the root
        (tmp_path / MODEL_FILE).write_bytes(b"secret")
        (platform.root / job_id).mkdir(parents=True)
        (platform.root / job_id / MODEL_FILE).symlink_to(tmp_path / MODEL_FILE)
        where = f"{platform.root}/{job_id}/{MODEL_FILE}"
    (platform.root.parent / "escaped").mkdir(exist_ok=True)
    shutil.copy(completed.workdir / MODEL_FILE, platform.root.parent / "escaped" / MODEL_FILE)
    platform.complete(job_id, where.format(root=platform.root, job=job_id), completed.metrics)
    response = platform.client.get(f"{API}/jobs/{job_id}/{route}")
    assert response.status_code == 409, response.text
    assert response.json()["status"] == "completed"
    assert "outside the artifacts location" in response.json()["detail"]


@pytest.mark.parametrize("route", ["model", "export"])
def test_a_model_missing_from_the_artifacts_location_is_503(
    platform: Platform, completed: Completed, route: str
) -> None:
    job_id = platform.submit()
    platform.complete(job_id, f"/elsewhere/{job_id}/model.pt", completed.metrics)
    response = platform.client.get(f"{API}/jobs/{job_id}/{route}")
    assert response.status_code == 503 and response.headers["retry-after"]
    assert "HEIMDALL_ARTIFACTS_DIR" in response.json()["detail"]


def export_of(platform: Platform, job_id: str, **params: Any) -> dict[str, Any]:
    response = platform.client.get(f"{API}/jobs/{job_id}/export", params=params)
    assert response.status_code == 200, response.text
    bundle: dict[str, Any] = response.json()
    return bundle


@pytest.fixture(scope="module")
def bundle(platform: Platform, completed: Completed) -> bytes:
    response = platform.client.get(f"{API}/jobs/{completed.job_id}/export")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/json"
    assert response.headers["content-length"] == str(len(response.content))
    disposition = response.headers["content-disposition"]
    assert disposition.endswith(f'-{completed.job_id[:8]}.heimdall"')
    return response.content


def test_the_schema_is_a_valid_2020_12_schema() -> None:
    assert SCHEMA["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert jsonschema_rs.meta.is_valid(SCHEMA)


def test_the_bundle_follows_the_1_0_0_schema(bundle: bytes) -> None:
    document = json.loads(bundle)
    errors = [str(e) for e in jsonschema_rs.validator_for(SCHEMA).iter_errors(document)]
    assert errors == []
    assert document["format_version"] == "1.0.0"
    assert 1 <= len(document["sample_predictions"]) <= 10


def test_the_schema_refuses_what_the_format_does_not_allow(bundle: bytes) -> None:
    validator = jsonschema_rs.validator_for(SCHEMA)
    document = json.loads(bundle)
    for broken in (
        {**document, "format_version": "2.0.0"},
        {**document, "sample_predictions": document["sample_predictions"] * 3},
        {**document, "model": {**document["model"], "onnx_opset": "18"}},
        {k: v for k, v in document.items() if k != "model"},
    ):
        assert not validator.is_valid(broken)


def test_the_onnx_model_and_its_description_come_from_the_exported_graph(
    bundle: bytes, completed: Completed
) -> None:
    model = json.loads(bundle)["model"]
    onnx_bytes = base64.b64decode(model["onnx_model_base64"])
    assert onnx_bytes == (completed.workdir / export.ONNX_FILE).read_bytes()
    graph = onnx.load_from_string(onnx_bytes)
    dims = [d.dim_param or d.dim_value for d in graph.graph.input[0].type.tensor_type.shape.dim]
    assert model["input_shape"] == dims
    out = [d.dim_param or d.dim_value for d in graph.graph.output[0].type.tensor_type.shape.dim]
    assert model["output_shape"] == out
    assert model["onnx_opset"] == graph.opset_import[0].version
    assert model["architecture"] == "convnext_atto" and model["framework"] == "pytorch"
    assert model["parity"]["max_abs_diff"] <= model["parity"]["tolerance_abs"]


def test_the_bundle_carries_the_sha256_of_its_onnx_bytes_and_of_itself(bundle: bytes) -> None:
    document = json.loads(bundle)
    integrity = document["integrity"]
    onnx_bytes = base64.b64decode(document["model"]["onnx_model_base64"])
    assert integrity["onnx_sha256"] == sha256(onnx_bytes)
    claimed = integrity["bundle_sha256"]
    hole = bundle.replace(
        f'"bundle_sha256":"{claimed}"'.encode(), b'"bundle_sha256":"' + b"0" * 64 + b'"'
    )
    assert hole != bundle and sha256(hole) == claimed


def test_the_cli_reader_refuses_an_altered_bundle(bundle: bytes, tmp_path: Path) -> None:
    path = tmp_path / "ok.heimdall"
    path.write_bytes(bundle)
    assert read_bundle(path)["format_version"] == "1.0.0"
    altered = tmp_path / "altered.heimdall"
    altered.write_bytes(bundle.replace(b'"format_version":"1.0.0"', b'"format_version":"1.0.1"'))
    with pytest.raises(BundleError, match="sha256"):
        read_bundle(altered)


def test_provenance_names_the_job_its_completed_event_and_its_data(
    platform: Platform, completed: Completed, bundle: bytes
) -> None:
    document = json.loads(bundle)
    provenance = document["provenance"]
    events = platform.client.get(f"{API}/jobs/{completed.job_id}/events").json()["events"]
    done = next(e for e in events if e["kind"] == "Completed")
    assert provenance["job_id"] == completed.job_id
    assert provenance["completed_position"] == done["position"]
    assert provenance["trained_by"] == WORKER
    assert provenance["config"] == document["training_config"] == CONFIG.model_dump(mode="json")
    parameters = CONFIG.dataset.model_dump(mode="json")
    assert provenance["dataset"] == {"kind": "synthetic", "parameters": parameters}
    assert provenance["heimdall_version"] == document["bundle_metadata"]["heimdall_version"]
    assert document["performance_metrics"]["val_loss"] == completed.metrics["val_loss"]
    assert document["bundle_metadata"]["created_by"] == "anonymous"


def test_the_bundles_metrics_are_those_of_the_weights_it_holds(
    platform: Platform, completed: Completed
) -> None:
    """model.pt holds the best epoch; a later, worse epoch was the job's last. The bundle
    described the last one (Completed's final_metrics) while shipping the best's weights."""
    job_id = platform.submit()
    shutil.copytree(completed.workdir, platform.root / job_id)
    last = {**completed.metrics, "epoch": 99, "val_loss": 123.0, "val_distance_p50_m": 1.0}
    platform.complete(job_id, str(platform.root / job_id / "model.pt"), last)
    _, meta = load_model(platform.root / job_id / "model.pt")
    response = platform.client.get(f"{API}/jobs/{job_id}/export")
    assert response.status_code == 200, response.text
    shipped = json.loads(response.content)["performance_metrics"]
    assert shipped["epoch"] == meta["metrics"]["epoch"] != 99
    assert shipped["val_loss"] == pytest.approx(meta["metrics"]["val_loss"])


def test_components_can_be_left_out(platform: Platform, completed: Completed) -> None:
    document = export_of(
        platform,
        completed.job_id,
        include_config="false",
        include_metrics="false",
        include_samples="false",
        include_normalization="false",
        include_provenance="false",
    )
    left = {"training_config", "performance_metrics", "sample_predictions"}
    left |= {"normalization_stats", "provenance"}
    assert not left & document.keys()
    assert jsonschema_rs.validator_for(SCHEMA).is_valid(document)
    assert document["model"]["onnx_model_base64"]


@pytest.mark.parametrize("count", [1, 3, 10])
def test_num_samples_chooses_how_many_predictions(
    platform: Platform, completed: Completed, count: int
) -> None:
    document = export_of(platform, completed.job_id, num_samples=count)
    assert len(document["sample_predictions"]) == count


@pytest.mark.parametrize("count", [0, 11, -1])
def test_num_samples_outside_1_to_10_is_422(
    platform: Platform, completed: Completed, count: int
) -> None:
    response = platform.client.get(
        f"{API}/jobs/{completed.job_id}/export", params={"num_samples": count}
    )
    assert response.status_code == 422


def copied_job(platform: Platform, completed: Completed) -> tuple[str, Path]:
    job_id = another_host(platform, completed)
    return job_id, platform.root / job_id


def test_an_export_that_failed_at_completion_is_409_with_the_reason(
    platform: Platform, completed: Completed
) -> None:
    job_id, workdir = copied_job(platform, completed)
    (workdir / export.MANIFEST_FILE).unlink()
    (workdir / export.ONNX_FILE).unlink()
    reason = {"error": "torchscript: max difference 0.01 > 0.0001", "error_type": "ExportError"}
    (workdir / export.ERROR_FILE).write_text(json.dumps(reason))
    response = platform.client.get(f"{API}/jobs/{job_id}/export")
    assert response.status_code == 409
    assert response.json()["status"] == "completed"
    assert "export failed" in response.json()["detail"]
    assert "max difference 0.01" in response.json()["detail"]
    assert platform.client.get(f"{API}/jobs/{job_id}/model").status_code == 200


def test_a_job_completed_without_an_export_is_409(platform: Platform, completed: Completed) -> None:
    job_id, workdir = copied_job(platform, completed)
    (workdir / export.MANIFEST_FILE).unlink()
    response = platform.client.get(f"{API}/jobs/{job_id}/export")
    assert response.status_code == 409 and "no ONNX export" in response.json()["detail"]


def test_an_onnx_file_that_does_not_match_its_manifest_is_refused(
    platform: Platform, completed: Completed
) -> None:
    job_id, workdir = copied_job(platform, completed)
    with (workdir / export.ONNX_FILE).open("ab") as file:
        file.write(b"\0")
    response = platform.client.get(f"{API}/jobs/{job_id}/export")
    assert response.status_code == 409 and "sha256" in response.json()["detail"]


def test_an_export_of_another_model_file_is_refused(
    platform: Platform, completed: Completed
) -> None:
    job_id, workdir = copied_job(platform, completed)
    with (workdir / MODEL_FILE).open("ab") as file:
        file.write(b"\0")
    response = platform.client.get(f"{API}/jobs/{job_id}/export")
    assert response.status_code == 409 and "model.pt" in response.json()["detail"]


def test_an_onnx_file_not_yet_in_the_shared_location_is_503(
    platform: Platform, completed: Completed
) -> None:
    job_id, workdir = copied_job(platform, completed)
    (workdir / export.ONNX_FILE).unlink()
    response = platform.client.get(f"{API}/jobs/{job_id}/export")
    assert response.status_code == 503 and response.headers["retry-after"]
    assert "model.onnx" in response.json()["detail"]


def test_the_api_reads_the_files_by_the_names_the_trainer_writes() -> None:
    assert (models.MANIFEST_FILE, models.ERROR_FILE) == (export.MANIFEST_FILE, export.ERROR_FILE)
    assert models.MANIFEST_VERSION == export.MANIFEST_VERSION


def test_an_onnx_file_linked_from_outside_the_jobs_folder_is_refused(
    platform: Platform, completed: Completed, tmp_path: Path
) -> None:
    job_id = another_host(platform, completed)
    onnx = platform.root / job_id / "model.onnx"
    outside = tmp_path / "model.onnx"
    shutil.copy(onnx, outside)  # the same bytes, so only where it lies is wrong
    onnx.unlink()
    onnx.symlink_to(outside)
    response = platform.client.get(f"{API}/jobs/{job_id}/export")
    assert response.status_code == 409, response.text
    assert "outside the artifacts location" in response.json()["detail"]
