"""JobConfig (DESIGN §4): ranges enforced, unknown fields and models refused, by name."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from shared.config import FilesDataset, JobConfig, SyntheticDataset

# (field, a value just outside its range) — each must be refused naming the field
OUT_OF_RANGE: list[tuple[str, Any]] = [
    ("epochs", 0),
    ("epochs", 5001),
    ("epochs", -3),
    ("batch_size", 0),
    ("batch_size", 1025),
    ("learning_rate", 0),
    ("learning_rate", -0.1),
    ("learning_rate", float("nan")),
    ("learning_rate", float("inf")),
    ("max_grad_norm", float("inf")),
    ("accuracy_radius_m", float("inf")),
    ("weight_decay", float("nan")),
    ("weight_decay", -1e-9),
    ("dropout_rate", -0.01),
    ("dropout_rate", 0.91),
    ("validation_split", -0.1),
    ("validation_split", 0.51),
    ("warmup_epochs", -1),
    ("early_stop_patience", -1),
    ("max_grad_norm", 0),
    ("devices", 0),
    ("seed", -1),
    ("max_attempts", 0),
    ("accuracy_radius_m", 0),
    ("lr_scheduler", "linear"),
    ("lr_scheduler", "Cosine"),
    ("accelerator", "tpu"),
    ("precision", "fp8"),
    ("precision", "16"),
    ("epochs", "many"),
    ("pretrained", "maybe"),
    # strict types: a string or float where an integer belongs is refused, not coerced
    ("epochs", "10"),
    ("epochs", 10.0),
    ("batch_size", True),
    ("learning_rate", "0.1"),
    ("pretrained", 1),
]

# (field, values at the edges of its range) — each must be accepted
EDGES: list[tuple[str, list[Any]]] = [
    ("epochs", [1, 5000]),
    ("batch_size", [1, 1024]),
    ("learning_rate", [1e-9, 1.0]),
    ("weight_decay", [0, 0.5]),
    ("dropout_rate", [0, 0.9]),
    ("validation_split", [0, 0.5]),
    ("lr_scheduler", ["cosine", "step", "plateau", "none"]),
    ("accelerator", ["auto", "cpu", "gpu"]),
    ("precision", ["bf16", "fp16", "fp32"]),
    ("max_grad_norm", [None, 0.5]),
    ("model_architecture", ["convnext_large", "convnext_atto", "resnet18"]),
]


def locations(error: ValidationError) -> list[tuple[int | str, ...]]:
    return [tuple(e["loc"]) for e in error.errors()]


@pytest.mark.parametrize(("field", "value"), OUT_OF_RANGE)
def test_out_of_range_is_refused_naming_the_field(field: str, value: Any) -> None:
    with pytest.raises(ValidationError) as raised:
        JobConfig.model_validate({field: value})
    assert locations(raised.value) == [(field,)]


@pytest.mark.parametrize(("field", "values"), EDGES)
def test_edges_of_each_range_are_accepted(field: str, values: list[Any]) -> None:
    for value in values:
        assert getattr(JobConfig.model_validate({field: value}), field) == value


def test_defaults_are_a_valid_small_job() -> None:
    config = JobConfig()
    assert (config.epochs, config.batch_size, config.model_architecture) == (
        10,
        32,
        "convnext_atto",
    )
    assert isinstance(config.dataset, SyntheticDataset)
    assert not config.pretrained


@pytest.mark.parametrize(
    ("dataset", "loc"),
    [
        ({"kind": "synthetic", "samples": 15}, ("dataset", "synthetic", "samples")),
        ({"samples": 2_000_000}, ("dataset", "synthetic", "samples")),
        ({"receivers": 0}, ("dataset", "synthetic", "receivers")),
        ({"receivers": 8}, ("dataset", "synthetic", "receivers")),
        ({"n_mels": 7}, ("dataset", "synthetic", "n_mels")),
        ({"frames": 1025}, ("dataset", "synthetic", "frames")),
        ({"seed": -1}, ("dataset", "synthetic", "seed")),
        ({"kind": "files", "path": ""}, ("dataset", "files", "path")),
        ({"kind": "files"}, ("dataset", "files", "path")),
        ({"kind": "s3", "path": "x"}, ("dataset",)),
    ],
)
def test_dataset_fields_are_checked(dataset: dict[str, Any], loc: tuple[str, ...]) -> None:
    with pytest.raises(ValidationError) as raised:
        JobConfig.model_validate({"dataset": dataset})
    assert locations(raised.value) == [loc]


def test_a_dataset_without_kind_is_synthetic() -> None:
    config = JobConfig.model_validate({"dataset": {"samples": 64, "receivers": 3}})
    assert isinstance(config.dataset, SyntheticDataset)
    assert (config.dataset.kind, config.dataset.samples, config.dataset.receivers) == (
        "synthetic",
        64,
        3,
    )


def test_a_files_dataset_keeps_its_path() -> None:
    config = JobConfig.model_validate({"dataset": {"kind": "files", "path": "/data/x"}})
    assert isinstance(config.dataset, FilesDataset)
    assert config.dataset.path == "/data/x"
    dumped = config.model_dump(mode="json")
    assert dumped["dataset"] == {"kind": "files", "path": "/data/x"}
    assert JobConfig.model_validate(dumped) == config


def test_unknown_model_is_refused_with_suggestions() -> None:
    with pytest.raises(ValidationError) as raised:
        JobConfig(model_architecture="convnext_tny")
    (error,) = raised.value.errors()
    assert error["loc"] == ("model_architecture",)
    assert "unknown model 'convnext_tny'" in error["msg"]
    assert "did you mean" in error["msg"] and "convnext_tiny" in error["msg"]


def test_unknown_model_with_nothing_close_has_no_suggestion() -> None:
    with pytest.raises(ValidationError) as raised:
        JobConfig(model_architecture="zzzzqqqqxxxx")
    assert "did you mean" not in raised.value.errors()[0]["msg"]


@pytest.mark.parametrize(
    ("fields", "loc"),
    [
        ({"epoch": 3}, ("epoch",)),
        ({"optimizer": "sgd"}, ("optimizer",)),
        ({"dataset": {"kind": "synthetic", "bogus": 1}}, ("dataset", "synthetic", "bogus")),
        ({"dataset": {"kind": "files", "path": "/x", "n": 1}}, ("dataset", "files", "n")),
    ],
)
def test_unknown_fields_are_refused(fields: dict[str, Any], loc: tuple[str, ...]) -> None:
    with pytest.raises(ValidationError) as raised:
        JobConfig.model_validate(fields)
    assert locations(raised.value) == [loc]
    assert raised.value.errors()[0]["type"] == "extra_forbidden"


def test_pretrained_without_a_local_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="nothing is downloaded"):
        JobConfig(pretrained=True)
    missing = tmp_path / "missing.pth"
    with pytest.raises(ValidationError, match="is not a file"):
        JobConfig(pretrained=True, pretrained_path=str(missing))
    with pytest.raises(ValidationError, match="is not a file"):
        JobConfig(pretrained=True, pretrained_path=str(tmp_path))


def test_pretrained_with_a_local_file_is_accepted(tmp_path: Path) -> None:
    weights = tmp_path / "w.pth"
    weights.write_bytes(b"\0")
    config = JobConfig(pretrained=True, pretrained_path=str(weights))
    assert config.pretrained and config.pretrained_path == str(weights)


def test_config_is_frozen_and_round_trips_through_json() -> None:
    config = JobConfig(epochs=7, dataset=SyntheticDataset(samples=32))
    with pytest.raises(ValidationError):
        config.epochs = 8  # type: ignore[misc]
    assert JobConfig.model_validate_json(config.model_dump_json()) == config
