"""A completed job's model as ONNX, checked against PyTorch, with what its bundle needs.

When a job completes, the trainer writes beside `model.pt` (in `<artifacts>/<job_id>/`):

- `model.onnx`: the `Localiser` that model.pt holds, exported by `torch.onnx` at opset
  OPSET. Input `inputs`: float32 `[batch, R, M, F]`, maps as the dataset stores them
  (services/trainer/dataset.py); output `outputs`: float32 `[batch, 4]`, the normalised
  (lat, lon) and their log-variances (services/trainer/model.py).
- `export.json`: the manifest the api builds the `.heimdall` bundle from (DESIGN §8): the
  ONNX file's sha256; its shapes and opset read from the graph; the model's parameter
  count; the exporter and its parity with PyTorch; the normalisation and receivers; sample
  predictions from the validation split; the dataset's parameters or file hashes; versions.
- `export-error.json` (`error`, `error_type`, `failed_at`) instead when no export matched:
  the job completes all the same, and the api's export answers 409 with that reason.

The ONNX file is written before the manifest, and both before `Completed` is recorded, so
a job that reads as completed has its export (or its error) in place.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnx
import onnxruntime as ort
import torch
from numpy.typing import NDArray
from torch import nn

from services.trainer.checkpoints import load_model, sha256_of
from services.trainer.dataset import (
    INPUTS_FILE,
    POSITIONS_FILE,
    RECEIVERS_FILE,
    RFData,
    split_indices,
)
from services.trainer.loop import Geo, haversine_m
from services.trainer.model import LOG_VAR_RANGE, split_output
from shared.config import FilesDataset, JobConfig

log = logging.getLogger(__name__)
Exporter = Literal["torchscript", "dynamo"]
Array = NDArray[np.float32]

ONNX_FILE, MANIFEST_FILE, ERROR_FILE = "model.onnx", "export.json", "export-error.json"
MANIFEST_VERSION = 1
OPSET = 18
INPUT, OUTPUT = "inputs", "outputs"
# TorchScript first: on convnext_atto and resnet18 both match PyTorch to under 1e-6, and it
# exports ten times faster (0.3 s against 4 s); dynamo is the fallback when it fails.
EXPORTERS: tuple[Exporter, ...] = ("torchscript", "dynamo")
# The largest |ONNX - PyTorch| allowed on any raw output (normalised coordinates and
# log-variances): 1e-4 of the region's half-size is about 15 m on the default receivers.
TOLERANCE = 1e-4
PARITY_SAMPLES, SAMPLE_PREDICTIONS, BATCH = 64, 10, 16


class ExportError(RuntimeError):
    """No exporter gave an ONNX model whose outputs match PyTorch's within TOLERANCE."""


def export_at_completion(
    model_path: Path, data: RFData, config: JobConfig
) -> dict[str, Any] | None:
    """`export_model`, except that a failure is logged and written to ERROR_FILE, never
    raised: a job completes whether or not its model could be exported. Returns the
    manifest, or None after a failure."""
    try:
        return export_model(model_path, data, config, EXPORTERS)
    except Exception as error:
        log.exception("ONNX export of %s failed; the job completes without one", model_path)
        _record_failure(model_path.parent, error)
        return None


def export_model(
    model_path: Path, data: RFData, config: JobConfig, exporters: Sequence[Exporter] = EXPORTERS
) -> dict[str, Any]:
    """Export model.pt's model with the first of `exporters` whose onnxruntime outputs
    match PyTorch's within TOLERANCE on up to PARITY_SAMPLES validation inputs of `data`
    (training inputs when the job has no validation split); write ONNX_FILE, then
    MANIFEST_FILE, atomically beside model.pt and return the manifest.

    Raises ExportError naming each exporter's failure or difference (nothing is written),
    CheckpointError when model.pt cannot be read.
    """
    started = time.perf_counter()
    model, meta = load_model(model_path)
    split, indices = _reference(data, config)
    inputs = data.inputs[indices[:PARITY_SAMPLES]]
    with torch.no_grad():
        expected, torch_ms = _batched(lambda x: model(torch.from_numpy(x)).numpy(), inputs)
    match = _first_match(model, inputs, expected, exporters)
    manifest = {
        "manifest_version": MANIFEST_VERSION,
        **_onnx_facts(match),
        "model_file": {"file": model_path.name, "sha256": sha256_of(model_path)},
        "parameters_count": sum(p.numel() for p in model.parameters()),
        "metrics": meta.get("metrics", {}),  # of the epoch whose weights model.pt holds
        "normalization": {
            "centre": list(data.centre),
            "scale": list(data.scale),
            "log_variance_range": list(LOG_VAR_RANGE),
        },
        "receivers": data.sites(),
        "parity": {"split": split, **_parity(expected, torch_ms, match, data)},
        "samples": _samples(match.outputs, data, indices, split),
        "dataset": _dataset(config),
        "versions": _versions(),
        "exported_at": datetime.now(UTC).isoformat(),
    }
    manifest["export_seconds"] = time.perf_counter() - started
    _write_export(model_path.parent, match.onnx_bytes, manifest)
    return manifest


def _reference(data: RFData, config: JobConfig) -> tuple[str, NDArray[np.int64]]:
    """The validation indices the job held out (as `job._splits` drew them), else training."""
    train, val = split_indices(len(data.positions), config.validation_split, config.seed)
    return ("validation", val) if len(val) else ("train", train)


@dataclass(frozen=True)
class _Match:
    """The first export that matched PyTorch: its bytes, outputs and speed on the inputs."""

    exporter: Exporter
    onnx_bytes: bytes
    outputs: Array
    ms_per_sample: float
    rejected: list[str]


def _first_match(
    model: nn.Module, inputs: Array, expected: Array, exporters: Sequence[Exporter]
) -> _Match:
    rejected: list[str] = []
    for exporter in exporters:
        try:
            onnx_bytes = _onnx_bytes(model, inputs, exporter)
            got, ms = _onnx_outputs(onnx_bytes, inputs)
        except Exception as error:  # exporters fail in many ways; the next one may not
            rejected.append(f"{exporter}: {type(error).__name__}: {error}"[:1000])
            continue
        difference = float(np.abs(got - expected).max())
        if difference <= TOLERANCE:
            return _Match(exporter, onnx_bytes, got, ms, rejected)
        rejected.append(f"{exporter}: max difference {difference:.3g} > {TOLERANCE:g}")
    raise ExportError(f"no ONNX export matches PyTorch: {'; '.join(rejected)}")


def _onnx_bytes(model: nn.Module, inputs: Array, exporter: Exporter) -> bytes:
    """The model as ONNX with a dynamic batch; the maps' size is fixed, as in training."""
    example = torch.from_numpy(inputs[:1]).repeat(2, 1, 1, 1)  # torch.export specialises 1
    with warnings.catch_warnings():  # the TorchScript exporter's deprecation and tracer notes
        warnings.simplefilter("ignore")
        if exporter == "torchscript":
            batch = {INPUT: {0: "batch"}, OUTPUT: {0: "batch"}}
            with tempfile.TemporaryDirectory() as scratch:
                path = Path(scratch) / ONNX_FILE
                torch.onnx.export(
                    model, (example,), path, input_names=[INPUT], output_names=[OUTPUT],
                    opset_version=OPSET, dynamo=False, dynamic_axes=batch,
                )  # fmt: skip
                return path.read_bytes()
        dim = torch.export.Dim("batch", min=1, max=1 << 16)
        program = torch.onnx.export(
            model, (example,), input_names=[INPUT], output_names=[OUTPUT],
            opset_version=OPSET, dynamo=True, dynamic_shapes=({0: dim},), verbose=False,
        )  # fmt: skip
        assert program is not None
        proto: onnx.ModelProto = program.model_proto
        return bytes(proto.SerializeToString())


def _onnx_outputs(onnx_bytes: bytes, inputs: Array) -> tuple[Array, float]:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(onnx_bytes, options, providers=["CPUExecutionProvider"])
    return _batched(lambda x: session.run([OUTPUT], {INPUT: x})[0], inputs)


def _batched(run: Callable[[Array], Array], inputs: Array) -> tuple[Array, float]:
    """`run` over BATCH-sized slices after one warm-up; also milliseconds per sample."""
    run(inputs[:BATCH])
    started = time.perf_counter()
    out = np.concatenate([run(inputs[i : i + BATCH]) for i in range(0, len(inputs), BATCH)])
    return out, (time.perf_counter() - started) * 1000 / len(inputs)


def _parity(expected: Array, torch_ms: float, match: _Match, data: RFData) -> dict[str, Any]:
    """How far onnxruntime is from PyTorch: raw outputs, and predicted positions in metres;
    the time each took a sample, in milliseconds, in batches of BATCH on this host."""
    geo = Geo(data.centre, data.scale)
    where = [geo.degrees(split_output(torch.from_numpy(o))[0]) for o in (match.outputs, expected)]
    return {
        "samples": len(expected),
        "tolerance_abs": TOLERANCE,
        "max_abs_diff": float(np.abs(match.outputs - expected).max()),
        "max_position_diff_m": float(haversine_m(*where).max()),
        "onnxruntime_ms_per_sample": match.ms_per_sample,
        "pytorch_ms_per_sample": torch_ms,
    }


def _onnx_facts(match: _Match) -> dict[str, Any]:
    """The file's hash and exporter; names, shapes (a dynamic dimension by its name) and
    opset as the checked graph states them."""

    def dims(value: onnx.ValueInfoProto) -> list[int | str]:
        return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]

    graph = onnx.load_from_string(match.onnx_bytes)
    onnx.checker.check_model(graph)
    (inp,), (out,) = graph.graph.input, graph.graph.output
    opset = next(o.version for o in graph.opset_import if o.domain in ("", "ai.onnx"))
    return {
        "onnx": {
            "file": ONNX_FILE,
            "sha256": hashlib.sha256(match.onnx_bytes).hexdigest(),
            "bytes": len(match.onnx_bytes),
            "exporter": match.exporter,
            "rejected": match.rejected,
        },
        "input_name": inp.name,
        "output_name": out.name,
        "input_shape": dims(inp),
        "output_shape": dims(out),
        "onnx_opset": opset,
    }


def _samples(
    outputs: Array, data: RFData, indices: NDArray[np.int64], split: str
) -> list[dict[str, Any]]:
    """The first SAMPLE_PREDICTIONS reference samples as the ONNX model predicts them:
    degrees, 1-sigma radius and great-circle error in metres, as validation computes them."""
    count = min(SAMPLE_PREDICTIONS, len(indices))
    geo, rows = Geo(data.centre, data.scale), indices[:count]
    mean, log_var = split_output(torch.from_numpy(outputs[:count]))
    predicted, sigma = geo.degrees(mean), geo.sigma_radius_m(mean, log_var)
    error = haversine_m(predicted, torch.from_numpy(data.positions[rows]))
    return [
        {
            "dataset_index": int(index),
            "split": split,
            "input_base64": _base64(data.inputs[index]),
            "ground_truth": _point(data.positions[index].tolist()),
            "prediction": {**_point(predicted[i].tolist()), "uncertainty_m": float(sigma[i])},
            "error_m": float(error[i]),
        }
        for i, index in enumerate(rows.tolist())
    ]


def _point(lat_lon: list[float]) -> dict[str, float]:
    return {"latitude": lat_lon[0], "longitude": lat_lon[1]}


def _base64(array: Array) -> str:
    return base64.b64encode(np.ascontiguousarray(array, dtype="<f4").tobytes()).decode()


def _dataset(config: JobConfig) -> dict[str, Any]:
    """A synthetic dataset by its parameters, a files dataset by its files' sha256."""
    cfg = config.dataset
    if isinstance(cfg, FilesDataset):
        names = (INPUTS_FILE, POSITIONS_FILE, RECEIVERS_FILE)
        files = {name: sha256_of(Path(cfg.path) / name) for name in names}
        return {"kind": "files", "path": cfg.path, "files": files}
    return {"kind": "synthetic", "parameters": cfg.model_dump(mode="json")}


def _versions() -> dict[str, str]:
    try:
        heimdall = metadata.version("heimdall-training")
    except metadata.PackageNotFoundError:
        heimdall = "unknown"
    return {
        "heimdall": heimdall,
        "torch": torch.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": ort.__version__,
    }


def _write_export(directory: Path, onnx_bytes: bytes, manifest: dict[str, Any]) -> None:
    _atomic_write(directory / ONNX_FILE, onnx_bytes)
    _atomic_write(directory / MANIFEST_FILE, _json(manifest))
    (directory / ERROR_FILE).unlink(missing_ok=True)


def _record_failure(directory: Path, error: Exception) -> None:
    """Stale files of an earlier attempt go first, so only the error remains."""
    try:
        (directory / MANIFEST_FILE).unlink(missing_ok=True)
        (directory / ONNX_FILE).unlink(missing_ok=True)
        failure = {
            "error": str(error)[:4000],
            "error_type": type(error).__name__,
            "failed_at": datetime.now(UTC).isoformat(),
        }
        _atomic_write(directory / ERROR_FILE, _json(failure))
    except OSError:
        log.exception("could not record the export failure in %s", directory)


def _json(value: dict[str, Any]) -> bytes:
    return (json.dumps(value, indent=1, allow_nan=False) + "\n").encode()


def _atomic_write(path: Path, data: bytes) -> None:
    """Temp file beside `path`, fsync, rename over it, fsync the directory."""
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(name, path)
    except BaseException:
        Path(name).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
