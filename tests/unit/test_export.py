"""The ONNX export a trainer writes beside model.pt when a job completes."""

from __future__ import annotations

import base64
import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import Tensor, nn

from services.trainer import export
from services.trainer.checkpoints import load_model
from services.trainer.control import NullHooks, Outcome
from services.trainer.dataset import RFData, load_dataset, split_indices
from services.trainer.job import MODEL_FILE, run_training
from shared.config import JobConfig
from tests.unit.trainer.configs import tiny_config

ARCHITECTURES = ("convnext_atto", "resnet18")


def one_epoch(architecture: str) -> JobConfig:
    """One epoch of 3 steps on 64 samples of 16x16 maps: 16 validation samples."""
    dataset = {"kind": "synthetic", "samples": 64, "n_mels": 16, "frames": 16, "seed": 11}
    return tiny_config(epochs=1, model_architecture=architecture, dropout_rate=0.0, dataset=dataset)


@dataclass(frozen=True)
class Trained:
    config: JobConfig
    workdir: Path
    outcome: Outcome

    @property
    def model(self) -> Path:
        return self.workdir / MODEL_FILE

    def manifest(self) -> dict[str, object]:
        loaded: dict[str, object] = json.loads((self.workdir / export.MANIFEST_FILE).read_text())
        return loaded


@pytest.fixture(scope="module", params=ARCHITECTURES)
def trained(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Trained:
    config = one_epoch(request.param)
    workdir = tmp_path_factory.mktemp(request.param)
    return Trained(config, workdir, run_training(config, workdir, NullHooks()))


def validation(config: JobConfig) -> tuple[RFData, np.ndarray]:
    data = load_dataset(config.dataset)
    _, val = split_indices(len(data.positions), config.validation_split, config.seed)
    return data, val


def test_completion_writes_an_onnx_model_beside_model_pt(trained: Trained) -> None:
    assert trained.outcome.kind == "completed"
    onnx_bytes = (trained.workdir / export.ONNX_FILE).read_bytes()
    manifest = trained.manifest()
    assert manifest["manifest_version"] == export.MANIFEST_VERSION
    onnx_part = manifest["onnx"]
    assert isinstance(onnx_part, dict)
    assert onnx_part["sha256"] == hashlib.sha256(onnx_bytes).hexdigest()
    assert onnx_part["bytes"] == len(onnx_bytes)
    model_sha = hashlib.sha256(trained.model.read_bytes()).hexdigest()
    assert manifest["model_file"] == {"file": MODEL_FILE, "sha256": model_sha}
    assert not (trained.workdir / export.ERROR_FILE).exists()


def test_shapes_opset_and_parameters_come_from_the_graph_and_the_model(trained: Trained) -> None:
    graph = onnx.load_from_string((trained.workdir / export.ONNX_FILE).read_bytes())
    onnx.checker.check_model(graph)
    manifest = trained.manifest()
    dims = [d.dim_param or d.dim_value for d in graph.graph.input[0].type.tensor_type.shape.dim]
    assert manifest["input_shape"] == dims == ["batch", 7, 16, 16]
    assert manifest["output_shape"] == ["batch", 4]
    opset = next(o.version for o in graph.opset_import if o.domain in ("", "ai.onnx"))
    assert manifest["onnx_opset"] == opset
    model, _ = load_model(trained.model)
    assert manifest["parameters_count"] == sum(p.numel() for p in model.parameters())


def test_onnxruntime_matches_pytorch_within_the_stated_tolerance(trained: Trained) -> None:
    parity = trained.manifest()["parity"]
    assert isinstance(parity, dict)
    assert parity["tolerance_abs"] == export.TOLERANCE
    assert 0 <= parity["max_abs_diff"] <= export.TOLERANCE
    assert parity["split"] == "validation" and parity["samples"] == 16
    # And again here, independently, on every validation input.
    data, val = validation(trained.config)
    inputs = data.inputs[val]
    model, _ = load_model(trained.model)
    with torch.no_grad():
        expected = model(torch.from_numpy(inputs)).numpy()
    session = ort.InferenceSession(
        str(trained.workdir / export.ONNX_FILE), providers=["CPUExecutionProvider"]
    )
    got = session.run(None, {"inputs": inputs})[0]
    assert np.abs(got - expected).max() <= export.TOLERANCE


def test_sample_predictions_come_from_the_validation_split(trained: Trained) -> None:
    samples = trained.manifest()["samples"]
    assert isinstance(samples, list) and len(samples) == export.SAMPLE_PREDICTIONS
    data, val = validation(trained.config)
    for sample in samples:
        index = sample["dataset_index"]
        assert index in val and sample["split"] == "validation"
        raw = base64.b64decode(sample["input_base64"])
        np.testing.assert_array_equal(
            np.frombuffer(raw, dtype="<f4").reshape(7, 16, 16), data.inputs[index]
        )
        truth = sample["ground_truth"]
        assert [truth["latitude"], truth["longitude"]] == data.positions[index].tolist()
        assert sample["prediction"]["uncertainty_m"] > 0 and sample["error_m"] >= 0


def test_the_dataset_and_versions_are_recorded(trained: Trained) -> None:
    manifest = trained.manifest()
    assert manifest["dataset"] == {
        "kind": "synthetic",
        "parameters": trained.config.dataset.model_dump(mode="json"),
    }
    versions = manifest["versions"]
    assert isinstance(versions, dict)
    assert versions["torch"] == torch.__version__ and versions["onnxruntime"] == ort.__version__
    assert versions["heimdall"]
    normalisation = manifest["normalization"]
    assert isinstance(normalisation, dict)
    data, _ = validation(trained.config)
    assert normalisation["centre"] == list(data.centre)
    assert normalisation["scale"] == list(data.scale)


@pytest.fixture
def copied(trained: Trained, tmp_path: Path) -> Path:
    """The trained model.pt alone in a fresh directory."""
    shutil.copy(trained.model, tmp_path / MODEL_FILE)
    return tmp_path / MODEL_FILE


@pytest.mark.parametrize("trained", ["convnext_atto"], indirect=True)
def test_the_dynamo_exporter_matches_pytorch_too(trained: Trained, copied: Path) -> None:
    data = load_dataset(trained.config.dataset)
    manifest = export.export_model(copied, data, trained.config, exporters=("dynamo",))
    assert manifest["onnx"]["exporter"] == "dynamo"
    assert manifest["parity"]["max_abs_diff"] <= export.TOLERANCE
    assert manifest["input_shape"] == ["batch", 7, 16, 16]


class Drifting(nn.Module):
    """Eager outputs as the model's; exported graphs add 0.01: an exporter that got it wrong."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.inner(x)
        if torch._C._get_tracing_state() or torch.compiler.is_exporting():
            out = out + 0.01
        return out


def drifting_load(path: Path) -> tuple[nn.Module, dict[str, object]]:
    model, meta = load_model(path)
    return Drifting(model).eval(), meta


@pytest.mark.parametrize("trained", ["resnet18"], indirect=True)
def test_an_export_that_differs_from_pytorch_is_refused(
    trained: Trained, copied: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(export, "load_model", drifting_load)
    data = load_dataset(trained.config.dataset)
    with pytest.raises(export.ExportError, match=r"torchscript: max difference 0\.01"):
        export.export_model(copied, data, trained.config, exporters=("torchscript",))
    assert not (copied.parent / export.ONNX_FILE).exists()
    assert not (copied.parent / export.MANIFEST_FILE).exists()


def test_a_failed_export_still_completes_the_job_and_says_why(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refused(*_: object) -> None:
        raise export.ExportError("torchscript: max difference 0.01 > 0.0001")

    monkeypatch.setattr(export, "export_model", refused)
    outcome = run_training(one_epoch("convnext_atto"), tmp_path, NullHooks())
    assert outcome.kind == "completed" and (tmp_path / MODEL_FILE).is_file()
    error = json.loads((tmp_path / export.ERROR_FILE).read_text())
    assert error["error_type"] == "ExportError" and "max difference" in error["error"]
    assert not (tmp_path / export.MANIFEST_FILE).exists()
    assert not (tmp_path / export.ONNX_FILE).exists()


@pytest.mark.parametrize("trained", ["convnext_atto"], indirect=True)
def test_a_later_successful_export_clears_an_earlier_failure(
    trained: Trained, copied: Path
) -> None:
    (copied.parent / export.ERROR_FILE).write_text('{"error": "old"}')
    data = load_dataset(trained.config.dataset)
    assert export.export_at_completion(copied, data, trained.config) is not None
    assert not (copied.parent / export.ERROR_FILE).exists()
    assert (copied.parent / export.MANIFEST_FILE).is_file()
