"""`heimdall export` and `heimdall predict`: a completed job's `.heimdall` bundle, and the
positions its ONNX model predicts, by onnxruntime alone (nothing here imports torch).

A bundle is one JSON document (docs/heimdall-bundle-1.0.0.schema.json, DESIGN §8). Its
`integrity.onnx_sha256` is the sha256 of the ONNX bytes; its `integrity.bundle_sha256` is
the sha256 of the file's own bytes with the 64 hex digits of that value written as zeros.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import os
import re
import tempfile
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import typer
from numpy.typing import NDArray
from rich.console import Console
from rich.table import Table

from heimdall_cli.client import (
    PREFIX,
    UNREACHABLE,
    ApiClient,
    ApiError,
    ApiUnreachableError,
    error_of,
)
from shared.settings import Settings

Bundle = dict[str, Any]
FORMAT_MAJOR = "1."
METRES_PER_DEGREE = 6_371_008.8 * math.pi / 180  # as services/trainer/loop.py
_FIELD = re.compile(rb'"bundle_sha256":"([0-9a-f]{64})"')
console = Console()


class BundleError(ValueError):
    """Not a bundle of a format this reads, or one whose bytes were altered."""


def read_bundle(path: Path) -> Bundle:
    """The bundle at `path`, once its format version (1.x) and both sha256s check out.

    Raises BundleError naming what is wrong, OSError when the file cannot be read.
    """
    raw = path.read_bytes()
    sealed = _FIELD.findall(raw)
    if len(sealed) != 1:
        raise BundleError(f"{path}: no single integrity.bundle_sha256; not a .heimdall bundle")
    hole = raw.replace(b'"bundle_sha256":"' + sealed[0], b'"bundle_sha256":"' + b"0" * 64)
    if hashlib.sha256(hole).hexdigest() != sealed[0].decode():
        raise BundleError(f"{path}: its bytes do not match its bundle_sha256: altered or damaged")
    bundle: Bundle = json.loads(raw)
    version = str(bundle.get("format_version", ""))
    if not version.startswith(FORMAT_MAJOR):
        raise BundleError(f"{path}: format version {version!r}; this reads 1.x")
    onnx = base64.b64decode(bundle["model"]["onnx_model_base64"], validate=True)
    if hashlib.sha256(onnx).hexdigest() != bundle["integrity"]["onnx_sha256"]:
        raise BundleError(f"{path}: the ONNX model does not match its onnx_sha256")
    return bundle


def export(
    job_id: str,
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="default: the name the api gives")
    ] = None,
    config: Annotated[bool, typer.Option(help="include the training config")] = True,
    metrics: Annotated[bool, typer.Option(help="include the final metrics")] = True,
    normalization: Annotated[bool, typer.Option(help="include the normalisation")] = True,
    samples: Annotated[bool, typer.Option(help="include sample predictions")] = True,
    provenance: Annotated[bool, typer.Option(help="include the provenance")] = True,
    num_samples: Annotated[int, typer.Option(min=1, max=10)] = 10,
) -> None:
    """Download a completed job's .heimdall bundle and check its sha256."""
    parts = {"config": config, "metrics": metrics, "normalization": normalization}
    parts |= {"samples": samples, "provenance": provenance}
    params: dict[str, Any] = {f"include_{k}": str(v).lower() for k, v in parts.items()}
    params["num_samples"] = num_samples
    try:
        path, bundle = download_bundle(ApiClient(Settings(), timeout=300.0), job_id, params, output)
    except ApiError as error:
        typer.echo(f"heimdall: error {error.status}: {error.message}", err=True)
        raise typer.Exit(1) from None
    except ApiUnreachableError as error:
        typer.echo(f"heimdall: {error}", err=True)
        raise typer.Exit(UNREACHABLE) from None
    except (BundleError, OSError) as error:
        typer.echo(f"heimdall: {error}", err=True)
        raise typer.Exit(1) from None
    size = path.stat().st_size / 1e6
    console.print(f"wrote {path} ({size:.1f} MB, sha256 {bundle['integrity']['bundle_sha256']})")


def download_bundle(
    client: ApiClient, job_id: str, params: dict[str, Any], output: Path | None
) -> tuple[Path, Bundle]:
    """Stream `GET /jobs/{id}/export` to `output` (or the name the api gives, here); the
    file appears only once it is complete and its sha256s check out. Returns its path and
    the bundle. ApiError on 4xx/5xx, ApiUnreachableError without an answer,
    BundleError for a damaged download."""
    url = f"{PREFIX}/jobs/{job_id}/export"
    with client.reaching(), client.http.stream("GET", url, params=params) as response:
        if response.status_code >= 400:
            response.read()
            raise error_of(response)
        named = re.search(r'filename="([^"/\\]+)"', response.headers.get("content-disposition", ""))
        target = output or Path(named.group(1) if named else f"{job_id}.heimdall")
        fd, name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as file:
                for chunk in response.iter_bytes():
                    file.write(chunk)
            bundle = read_bundle(Path(name))
            os.replace(name, target)
        finally:
            Path(name).unlink(missing_ok=True)
    return target, bundle


def predict(
    bundle: Annotated[Path, typer.Argument(dir_okay=False, help="a .heimdall bundle")],
    inputs: Annotated[
        Path, typer.Argument(help="a dataset directory (heimdall dataset make) or a .npy")
    ],
    as_json: Annotated[bool, typer.Option("--json", help="one JSON document")] = False,
) -> None:
    """Predict transmitter positions (degrees) and their uncertainty (metres) with a bundle."""
    try:
        document = read_bundle(bundle)
        maps, truth = load_inputs(inputs, document)
        rows = predictions(document, maps, truth)
    except BundleError as error:
        typer.echo(f"heimdall: {error}", err=True)
        raise typer.Exit(1) from None
    except (OSError, ValueError) as error:
        typer.echo(f"heimdall: {error}", err=True)
        raise typer.Exit(2) from None
    if as_json:
        about = {"path": str(bundle), "bundle_sha256": document["integrity"]["bundle_sha256"]}
        typer.echo(json.dumps({"bundle": about, "predictions": rows}))
    else:
        _table(rows)


Maps = NDArray[np.float32]


def load_inputs(path: Path, bundle: Bundle) -> tuple[Maps, NDArray[np.float64] | None]:
    """Maps `[N, R, M, F]` of the bundle's input shape, with the true (lat, lon) degrees
    when `path` is a dataset directory in the documented on-disk format
    (services/trainer/dataset.py; its receivers must be the model's, in order), or a `.npy`
    of `[N, R, M, F]` or `[R, M, F]` float maps. ValueError naming what does not fit."""
    if path.is_dir():
        from services.trainer.dataset import read_dataset  # numpy only: no torch

        data = read_dataset(path)
        wanted = [r["name"] for r in bundle["model"].get("receivers", [])]
        if wanted and list(data.receiver_names) != wanted:
            raise ValueError(f"{path}: receivers {list(data.receiver_names)}, model's {wanted}")
        maps, truth = data.inputs, data.positions
    else:
        maps, truth = np.load(path, allow_pickle=False), None
        maps = maps[None] if maps.ndim == 3 else maps
    shape = [int(d) for d in bundle["model"]["input_shape"][1:]]
    if maps.ndim != 4 or list(maps.shape[1:]) != shape or maps.dtype.kind != "f":
        raise ValueError(f"{path}: maps of shape {list(maps.shape)}, the model takes [N, *{shape}]")
    return np.ascontiguousarray(maps, dtype=np.float32), truth


def predictions(
    bundle: Bundle, maps: Maps, truth: NDArray[np.float64] | None, batch: int = 64
) -> list[dict[str, Any]]:
    """Per sample: latitude and longitude in degrees, the 1-sigma radius in metres and,
    with the truth, the great-circle error in metres (as the trainer computes them)."""
    stats = bundle.get("normalization_stats")
    if stats is None:
        raise BundleError("the bundle was exported without normalization_stats; export it with")
    import onnxruntime as ort  # here, so that `heimdall` starts without loading it

    onnx = base64.b64decode(bundle["model"]["onnx_model_base64"])
    session = ort.InferenceSession(onnx, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    out = np.concatenate(
        [session.run(None, {name: maps[i : i + batch]})[0] for i in range(0, len(maps), batch)]
    )
    degrees, radius = _positions(out, stats)
    rows: list[dict[str, Any]] = []
    for i, ((lat, lon), sigma) in enumerate(zip(degrees.tolist(), radius.tolist(), strict=True)):
        rows.append({"index": i, "latitude": lat, "longitude": lon, "uncertainty_m": sigma})
    if truth is not None:
        from services.trainer.dataset import haversine_m

        for row, real, error in zip(rows, truth.tolist(), haversine_m(degrees, truth), strict=True):
            row.update(truth={"latitude": real[0], "longitude": real[1]}, error_m=float(error))
    return rows


def _positions(
    out: NDArray[np.float32], stats: dict[str, Any]
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Degrees `[N, 2]` and 1-sigma radii `[N]` from outputs `[N, 4]`, as `Geo` does."""
    centre, scale = np.asarray(stats["centre"]), np.asarray(stats["scale"])
    low, high = stats["log_variance_range"]
    degrees = out[:, :2].astype(np.float64) * scale + centre
    log_var = np.clip(out[:, 2:4], low, high).astype(np.float64)
    sigma_m = np.exp(0.5 * log_var) * scale * METRES_PER_DEGREE
    east = sigma_m[:, 1] * np.cos(np.radians(np.clip(degrees[:, 0], -90.0, 90.0)))
    radius: NDArray[np.float64] = np.sqrt(sigma_m[:, 0] ** 2 + east**2)
    return degrees, radius


def _table(rows: list[dict[str, Any]]) -> None:
    truth = bool(rows) and "truth" in rows[0]
    table = Table("#", "latitude", "longitude", "uncertainty m", *(("error m",) if truth else ()))
    for row in rows:
        cells = [str(row["index"]), f"{row['latitude']:.5f}", f"{row['longitude']:.5f}"]
        cells.append(f"{row['uncertainty_m']:.0f}")
        table.add_row(*cells, *((f"{row['error_m']:.0f}",) if truth else ()))
    console.print(table)
