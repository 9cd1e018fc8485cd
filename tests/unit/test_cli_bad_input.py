"""Every CLI subcommand that reads a file or an argument refuses bad input in one line, exit 2."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from typer.testing import CliRunner, Result

from heimdall_cli import main
from heimdall_cli.client import ApiClient, ApiError

runner = CliRunner()
JOB_ID = "6c50db5f-26ee-545e-a192-ac50bd44642e"


@pytest.fixture(autouse=True)
def no_api(monkeypatch: pytest.MonkeyPatch) -> None:
    """Bad input is refused before anything is sent."""

    def unreachable(*_: Any, **__: Any) -> Any:
        raise AssertionError("the api was called")

    for name in ("submit", "jobs", "job", "command", "events"):
        monkeypatch.setattr(ApiClient, name, unreachable)
    monkeypatch.setattr(main, "_watch", unreachable)


def run(*args: str) -> Result:
    return runner.invoke(main.app, list(args))


def refused(result: Result, *words: str) -> str:
    """Exit 2 with one line on stderr naming the problem, and no traceback."""
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("heimdall: "), result.output
    assert not result.stdout, result.stdout
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


# Files: submit and train read a YAML or JSON job config.

BAD_FILES = [
    pytest.param("job.yaml", b"", "empty", id="empty"),
    pytest.param("job.yaml", b"# nothing here\n", "empty", id="only a comment"),
    pytest.param("job.yaml", b"- epochs: 3\n", "list", id="a list"),
    pytest.param("job.yaml", b"epochs\n", "str", id="a scalar"),
    pytest.param("job.yaml", b"epochs: [1\n", "line 2", id="broken YAML"),
    pytest.param("job.yaml", b"epochs:\n\t- 1\n", "line 2", id="broken YAML, a tab"),
    pytest.param("job.yaml", b"? [a, b]\n: 1\n", "unhashable", id="broken YAML, a list key"),
    pytest.param("job.json", b'{"epochs": ', "line 1", id="broken JSON"),
    pytest.param("job.json", b"[1, 2]", "list", id="a JSON list"),
    pytest.param("job.yaml", b"epochs: \xff\xfe\n", "UTF-8", id="not UTF-8"),
]


@pytest.mark.parametrize("command", ["submit", "train"])
@pytest.mark.parametrize(("name", "content", "reason"), BAD_FILES)
def test_a_bad_config_file_is_refused(
    tmp_path: Path, command: str, name: str, content: bytes, reason: str
) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    refused(run(command, str(path)), str(path), reason)


@pytest.mark.parametrize("command", ["submit", "train"])
def test_a_missing_file_or_a_directory_is_refused(tmp_path: Path, command: str) -> None:
    refused(run(command, str(tmp_path / "nope.yaml")), "nope.yaml", "no such file")
    refused(run(command, str(tmp_path)), "directory")
    refused(run(command, ""), "directory")  # typer reads "" as the path "."


@pytest.mark.parametrize(
    ("content", "words"),
    [
        ("config: 5\n", ("config", "mapping")),
        ("config: [1]\n", ("config", "mapping")),
        ("learning_rate: .nan\n", ("learning_rate", "nan")),
        ("seed: 2024-01-01\n", ("seed", "date")),
        ("pretrained_path: !!binary aGk=\n", ("pretrained_path", "bytes")),
        ('model_architecture: "\\ud800"\n', ("model_architecture", "surrogate")),
        ("dataset: {1: 2}\n", ("dataset", "key 1")),
    ],
)
def test_a_config_json_cannot_carry_is_refused_before_sending(
    tmp_path: Path, content: str, words: tuple[str, ...]
) -> None:
    path = tmp_path / "job.yaml"
    path.write_text(content)
    refused(run("submit", str(path)), *words)


def test_the_apis_422_is_one_line_and_exit_2(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    detail = [
        {"loc": ["body", "config", "epochs"], "msg": "Input should be greater than 0"},
        {"loc": ["body", "job_name"], "msg": "String should have at least 1 character"},
    ]

    def unprocessable(*_: Any, **__: Any) -> Any:
        raise ApiError(422, detail)

    monkeypatch.setattr(ApiClient, "submit", unprocessable)
    path = tmp_path / "job.yaml"
    path.write_text("epochs: 0\n")
    line = refused(run("submit", str(path), "--name", ""), "config.epochs", "job_name")
    assert "greater than 0" in line


def test_an_invalid_config_for_train_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "job.yaml"
    path.write_text("epochs: 0\nbatch_size: many\n")
    refused(run("train", str(path)), "epochs", "batch_size")


def test_train_refuses_a_torchrun_group_in_one_line(tmp_path: Path) -> None:
    path = tmp_path / "job.yaml"
    path.write_text("devices: 2\nbatch_size: 16\naccelerator: cpu\n")
    refused(run("train", str(path)), "devices x nodes = 2", "heimdall up")


def test_train_refuses_a_missing_checkpoint_and_a_file_for_artifacts(tmp_path: Path) -> None:
    path = tmp_path / "job.yaml"
    path.write_text("epochs: 1\n")
    refused(run("train", str(path), "--resume", str(tmp_path / "gone.pt")), "gone.pt")
    refused(run("train", str(path), "--artifacts", str(path)), "not a directory")


# Arguments: job ids, a status, a limit, a dataset's path and sizes.

BAD_JOB_IDS = ["", "42", "../events", f"{JOB_ID}\n", "x" * 300]


@pytest.mark.parametrize("command", ["pause", "resume", "cancel", "watch", "audit"])
@pytest.mark.parametrize(
    "job_id", BAD_JOB_IDS, ids=["empty", "a number", "a path", "a newline", "long"]
)
def test_a_bad_job_id_is_refused(command: str, job_id: str) -> None:
    refused(run(command, job_id), "job id")


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (("--status", "bogus"), ("--status", "bogus", "queued")),
        (("--status", "Running"), ("--status",)),
        (("--limit", "0"), ("--limit", "1 to 500")),
    ],
)
def test_jobs_refuses_bad_filters(args: tuple[str, ...], words: tuple[str, ...]) -> None:
    refused(run("jobs", *args), *words)


def test_a_limit_the_api_refuses_is_one_line_and_exit_2(monkeypatch: pytest.MonkeyPatch) -> None:
    detail = [{"loc": ["query", "limit"], "msg": "Input should be less than or equal to 500"}]

    def unprocessable(*_: Any, **__: Any) -> Any:
        raise ApiError(422, detail)

    monkeypatch.setattr(ApiClient, "jobs", unprocessable)
    refused(run("jobs", "--limit", "501"), "limit: Input should be less than or equal to 500")


@pytest.mark.parametrize("command", [("jobs", "--limit"), ("dataset", "make", "d", "--samples")])
def test_a_number_that_is_not_one_is_typers_usage_error(command: tuple[str, ...]) -> None:
    result = run(*command, "ten")
    assert result.exit_code == 2 and "'ten' is not a valid int" in result.output


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (("--samples", "0"), ("--samples", "16")),
        (("--receivers", "9"), ("--receivers", "7")),
        (("--n-mels", "-1"), ("--n-mels",)),
        (("--frames", "100000"), ("--frames",)),
        (("--seed", "-1"), ("--seed",)),
    ],
)
def test_dataset_make_refuses_sizes_out_of_range(
    tmp_path: Path, args: tuple[str, ...], words: tuple[str, ...]
) -> None:
    refused(run("dataset", "make", str(tmp_path / "d"), *args), *words)
    assert not (tmp_path / "d").exists()


def test_dataset_make_refuses_an_empty_path_or_a_file(tmp_path: Path) -> None:
    refused(run("dataset", "make", ""), "empty")
    taken = tmp_path / "taken"
    taken.write_text("x")
    refused(run("dataset", "make", str(taken)), "not a directory")


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA sees a device here")
def test_a_gpu_trainer_where_cuda_sees_no_device_refuses_to_start(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """It would take every GPU job from its queue only to find it cannot run them."""
    monkeypatch.setenv("HEIMDALL_TRAINER_KIND", "gpu")
    monkeypatch.setenv("HEIMDALL_DATA_DIR", str(tmp_path))
    result = run("trainer")
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert "HEIMDALL_TRAINER_KIND=gpu, but CUDA sees no device" in result.output
    assert not list(tmp_path.iterdir())  # refused before it made a store
