"""A completed job's model leaves the platform: its weights and its `.heimdall` bundle (§8).

Both are read from the shared artifacts location (`settings.artifacts`,
HEIMDALL_ARTIFACTS_DIR), never from a trainer's disk: the model path a job recorded is
taken from its `<job_id>/` directory on and resolved under the api's own root, and
anything that resolves outside `<root>/<job_id>/` is refused. The bundle
(docs/heimdall-bundle-1.0.0.schema.json) is assembled from what the trainer wrote beside
model.pt when the job completed (services/trainer/export.py) and streamed: the api never
holds the ONNX model in memory and imports neither torch nor onnx.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import lru_cache
from importlib import metadata
from pathlib import Path, PurePosixPath
from typing import Annotated, Any, BinaryIO
from uuid import UUID, uuid4

from fastapi import APIRouter, Depends, Header, HTTPException, Query, Response
from fastapi.responses import FileResponse, StreamingResponse
from pydantic import BaseModel, Field

from services.api.auth import ClientDep, current_client
from services.api.deps import ContextDep, JobIdDep, read_after, require_database
from services.api.errors import RETRY_AFTER_SECONDS
from services.api.schemas import ERROR_RESPONSES
from shared.application import TrainingJobs, event_data
from shared.domainmodel import COMPLETED, TrainingJob, TrainingJobError, job_kind
from shared.readmodel.shapes import JobView
from shared.store import JobNotifications
from shared.views import job_json, job_row

router = APIRouter(
    prefix="/api/v1/training",
    tags=["models"],
    responses=ERROR_RESPONSES,
    dependencies=[Depends(current_client), Depends(require_database), Depends(read_after)],
)
# What the trainer writes beside model.pt (services/trainer/export.py names them too).
MANIFEST_FILE, ERROR_FILE, MANIFEST_VERSION = "export.json", "export-error.json", 1
FORMAT_VERSION, MODEL_VERSION = "1.0.0", "1.0.0"  # one model per job, so always 1.0.0
CHUNK = 3 << 16  # a multiple of 3 bytes: base64 chunks then concatenate
_ONNX = "\x00onnx-model-base64\x00"  # stands for the base64 text until it is streamed
_HOLE = '"bundle_sha256":"' + "0" * 64 + '"'
OUTPUTS = (
    "[batch, 4]: normalised latitude, longitude, then their log-variances;"
    " see normalization_stats for degrees and metres"
)


class ModelUnavailableError(TrainingJobError):
    """A completed job whose model or export cannot be served as it stands (409)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, COMPLETED)


class BundleParts(BaseModel):
    """What a bundle holds besides its metadata, model and integrity."""

    include_config: bool = True
    include_metrics: bool = True
    include_normalization: bool = True
    include_samples: bool = True
    include_provenance: bool = True
    num_samples: int = Field(10, ge=1, le=10, description="sample predictions, 1 to 10")


@router.get(
    "/jobs/{job_id}/model",
    response_class=FileResponse,
    responses={
        200: {"content": {"application/octet-stream": {}}, "description": "model.pt"},
        304: {"description": "If-None-Match names this model's sha256"},
    },
)
def download_model(
    job_id: JobIdDep,
    context: ContextDep,
    if_none_match: Annotated[str | None, Header(max_length=1000)] = None,
) -> Response:
    """The final weights of a completed job (`model.pt`), with its sha256 as ETag."""
    job = completed_job(context.jobs, context.reads.get_job(str(job_id)), job_id)
    path = model_file(context.settings.artifacts, job)
    etag = f'"{sha256_of(path)}"'
    tags = {tag.strip().removeprefix("W/") for tag in (if_none_match or "").split(",")}
    if etag in tags or "*" in tags:
        return Response(status_code=304, headers={"ETag": etag})
    headers = {"ETag": etag, "Content-Disposition": _attachment(job, ".pt")}
    return FileResponse(path, media_type="application/octet-stream", headers=headers)


@router.get(
    "/jobs/{job_id}/export",
    response_class=StreamingResponse,
    responses={200: {"content": {"application/json": {}}, "description": "the bundle"}},
)
def export_bundle(
    job_id: JobIdDep, context: ContextDep, client: ClientDep, parts: Annotated[BundleParts, Query()]
) -> StreamingResponse:
    """The job's `.heimdall` bundle: its ONNX model and what Heimdall needs to run it."""
    job = completed_job(context.jobs, context.reads.get_job(str(job_id)), job_id)
    path = model_file(context.settings.artifacts, job)
    manifest = read_manifest(path, job_id)
    completed = completed_event(context.jobs, job_id)
    document = bundle_document(job, completed, manifest, parts, created_by=client.name)
    beside = path.parent / _plain_name(manifest["onnx"]["file"])
    onnx = shared_file(artifact_path(context.settings.artifacts, job.id, str(beside)), job.id)
    body, size = stream(document, onnx.open("rb"), manifest["onnx"]["sha256"])
    headers = {"Content-Length": str(size), "Content-Disposition": _attachment(job, ".heimdall")}
    return StreamingResponse(body, media_type="application/json", headers=headers)


def completed_job(jobs: TrainingJobs, row: dict[str, Any] | None, job_id: UUID) -> JobView:
    """The job's read row (or, not projected yet, its state in the store); 404 when there
    is no such job, 409 with its status when it has not completed."""
    job = JobView(**job_json(row or job_row(jobs.get_job(job_id), position=0)))
    if job.status != COMPLETED:
        message = f"job {job_id} has not completed (it is {job.status}): it has no final model"
        raise TrainingJobError(message, job.status)
    return job


def model_file(root: Path, job: JobView) -> Path:
    """The job's model under `root`; 409 when its path is outside it, 503 when missing."""
    return shared_file(artifact_path(root, job.id, job.model_path), job.id)


def shared_file(path: Path, job_id: str) -> Path:
    """`path` if it is a file; else 503: the api does not see what the trainers wrote."""
    if not path.is_file():
        detail = (
            f"the {path.name} of job {job_id} is not under HEIMDALL_ARTIFACTS_DIR on the api's"
            " host: it must be the location every trainer writes to (a shared volume)"
        )
        raise HTTPException(503, detail, headers={"Retry-After": RETRY_AFTER_SECONDS})
    return path


def artifact_path(root: Path, job_id: str, stored: str | None) -> Path:
    """`stored`, a trainer's path to a file of job `job_id` (`.../<job_id>/model.pt`), as
    the same file under `root/<job_id>/`, resolved. ModelUnavailableError when `stored`
    has no `<job_id>` directory or resolves outside it (`..`, a symbolic link out)."""
    parts = PurePosixPath(stored or "").parts
    refused = ModelUnavailableError(
        f"job {job_id} recorded its model at {stored!r}, outside the artifacts location"
        f" (<HEIMDALL_ARTIFACTS_DIR>/{job_id}/): refused"
    )
    if job_id not in parts[:-1]:
        raise refused
    base = (root / job_id).resolve()
    path = base.joinpath(*parts[len(parts) - parts[::-1].index(job_id) :]).resolve()
    if not path.is_relative_to(base) or path == base:
        raise refused
    return path


def sha256_of(path: Path) -> str:
    """The file's sha256, computed once per (path, size, modification time)."""
    stat = path.stat()
    return _sha256(str(path), stat.st_size, stat.st_mtime_ns)


@lru_cache(maxsize=256)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def read_manifest(model: Path, job_id: UUID) -> dict[str, Any]:
    """What the trainer wrote at completion beside `model`; 409 naming why when there is
    no usable export (it failed, it never ran, or it is of another model.pt)."""
    directory = model.parent
    if not (directory / MANIFEST_FILE).is_file():
        if (directory / ERROR_FILE).is_file():
            reason = json.loads((directory / ERROR_FILE).read_text()).get("error", "unknown")
            raise ModelUnavailableError(
                f"job {job_id} completed, but its ONNX export failed at completion: {reason}"
            )
        raise ModelUnavailableError(f"job {job_id} completed with no ONNX export of its model")
    manifest: dict[str, Any] = json.loads((directory / MANIFEST_FILE).read_text())
    if manifest.get("manifest_version") != MANIFEST_VERSION:
        raise ModelUnavailableError(f"job {job_id}: export written by another Heimdall version")
    if manifest["model_file"]["sha256"] != sha256_of(model):
        raise ModelUnavailableError(f"job {job_id}: the export was made from another model.pt")
    return manifest


@dataclass(frozen=True)
class CompletedEvent:
    position: int
    timestamp: str
    actor: str
    data: dict[str, Any]


def completed_event(jobs: TrainingJobs, job_id: UUID, page: int = 500) -> CompletedEvent:
    """The job's `Completed` event and its store position (read without decoding others)."""
    recorder = jobs.recorder
    assert isinstance(recorder, JobNotifications)
    after = 0
    while found := recorder.select_stream_notifications(job_id, after, page):
        for notification in found:
            if job_kind(notification.topic) == "Completed":
                event = jobs.mapper.to_domain_event(notification)
                assert isinstance(event, TrainingJob.Event)
                actor, moment = str(getattr(event, "actor", "")), event.timestamp.isoformat()
                return CompletedEvent(notification.id, moment, actor, event_data(event))
        after = found[-1].id
    raise ModelUnavailableError(f"job {job_id} has no Completed event in the store")


def bundle_document(
    job: JobView,
    completed: CompletedEvent,
    manifest: dict[str, Any],
    parts: BundleParts,
    created_by: str,
) -> dict[str, Any]:
    """The bundle with `_ONNX` for the model's base64 and zeros for its own sha256."""
    document: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "bundle_metadata": {
            "bundle_id": str(uuid4()),
            "created_at": datetime.now(UTC).isoformat(),
            "created_by": created_by,
            "description": job.description
            or f"{job.job_name}: a {job.model_architecture}"
            " transmitter localiser trained by Heimdall",
            "heimdall_version": _version(),
        },
        "model": _model(job, manifest),
        "integrity": {"onnx_sha256": manifest["onnx"]["sha256"], "bundle_sha256": "0" * 64},
    }
    if parts.include_config:
        document["training_config"] = job.config
    if parts.include_metrics:
        # The metrics of the epoch the weights come from (the best one); a manifest written
        # before it said so has only the last epoch's, from `Completed`.
        shipped = manifest.get("metrics") or completed.data.get("final_metrics", {})
        best = {k: completed.data.get(k) for k in ("best_epoch", "best_val_loss")}
        metrics = {**shipped, **best}
        document["performance_metrics"] = {k: _number(v) for k, v in metrics.items()}
    if parts.include_normalization:
        document["normalization_stats"] = _normalisation(manifest["normalization"])
    if parts.include_samples:
        document["sample_predictions"] = manifest["samples"][: parts.num_samples]
    if parts.include_provenance:
        document["provenance"] = _provenance(job, completed, manifest, parts.include_config)
    return document


def _model(job: JobView, manifest: dict[str, Any]) -> dict[str, Any]:
    facts = ("input_name", "output_name", "input_shape", "output_shape", "parameters_count")
    return {
        "model_id": job.id,
        "model_name": job.job_name,
        "version": MODEL_VERSION,
        "architecture": job.model_architecture,
        "framework": "pytorch",
        "framework_version": manifest["versions"]["torch"],
        "exporter": f"torch.onnx ({manifest['onnx']['exporter']})",
        "onnx_opset": manifest["onnx_opset"],
        "onnx_model_base64": _ONNX,
        **{name: manifest[name] for name in facts},
        "outputs": OUTPUTS,
        "receivers": manifest["receivers"],
        "parity": manifest["parity"],
    }


def _normalisation(stats: dict[str, Any]) -> dict[str, Any]:
    return {
        "coordinates": ["latitude", "longitude"],
        **stats,
        "formula": "degrees = outputs[:, 0:2] * scale + centre; variance (degrees^2) ="
        " exp(clip(outputs[:, 2:4], *log_variance_range)) * scale^2",
        "uncertainty_m": "1-sigma radius: sqrt(sigma_lat_m^2 + sigma_lon_m^2), a degree of"
        " latitude being 111195 m and of longitude 111195 m * cos(latitude)",
        "inputs": "per receiver an [n_mels, frames] map in dB above its noise floor, / 20",
    }


def _provenance(
    job: JobView, completed: CompletedEvent, manifest: dict[str, Any], with_config: bool
) -> dict[str, Any]:
    config = json.dumps(job.config, sort_keys=True, separators=(",", ":")).encode()
    return {
        "job_id": job.id,
        "job_name": job.job_name,
        "completed_position": completed.position,
        "completed_at": completed.timestamp,
        "trained_by": completed.actor,
        **({"config": job.config} if with_config else {}),
        "config_sha256": hashlib.sha256(config).hexdigest(),
        "dataset": manifest["dataset"],
        "model_sha256": manifest["model_file"]["sha256"],
        "exported_at": manifest["exported_at"],
        "heimdall_version": manifest["versions"]["heimdall"],
        "versions": manifest["versions"],
    }


def stream(
    document: dict[str, Any], onnx: BinaryIO, onnx_sha256: str
) -> tuple[Iterator[bytes], int]:
    """The bundle's bytes as served and their length. `bundle_sha256` is the sha256 of those
    bytes with its own 64 hex digits as zeros: a first pass over the ONNX file hashes
    them (and checks the file against `onnx_sha256`), the second sends them."""
    text = json.dumps(document, sort_keys=True, separators=(",", ":"), allow_nan=False)
    head, tail = (part.encode() for part in text.split(json.dumps(_ONNX)))
    head, tail = head + b'"', b'"' + tail
    assert (head + tail).count(_HOLE.encode()) == 1, "bundle_sha256 must appear once"
    digest, raw, size = hashlib.sha256(head), hashlib.sha256(), 0
    while chunk := onnx.read(CHUNK):
        raw.update(chunk)
        digest.update(base64.b64encode(chunk))
        size += len(chunk)
    digest.update(tail)
    if raw.hexdigest() != onnx_sha256:
        onnx.close()
        raise ModelUnavailableError("the ONNX file does not match the sha256 its export recorded")
    sealed = _HOLE.replace("0" * 64, digest.hexdigest()).encode()
    head, tail = (part.replace(_HOLE.encode(), sealed, 1) for part in (head, tail))

    def body() -> Iterator[bytes]:
        with onnx:
            yield head
            onnx.seek(0)
            while chunk := onnx.read(CHUNK):
                yield base64.b64encode(chunk)
            yield tail

    return body(), len(head) + 4 * math.ceil(size / 3) + len(tail)


def _number(value: Any) -> Any:
    """JSON has no NaN or infinities: they become null."""
    return None if isinstance(value, float) and not math.isfinite(value) else value


def _plain_name(name: str) -> str:
    if name != PurePosixPath(name).name or name in ("", ".", ".."):
        raise ModelUnavailableError(f"the export names {name!r} as its ONNX file: refused")
    return name


def _attachment(job: JobView, suffix: str) -> str:
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", job.job_name).strip("-.")[:80] or "job"
    return f'attachment; filename="{name}-{job.id[:8]}{suffix}"'


def _version() -> str:
    try:
        return metadata.version("heimdall-training")
    except metadata.PackageNotFoundError:
        return "unknown"
