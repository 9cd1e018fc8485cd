"""docker-compose.yml is valid and runs every service the way DESIGN.md §7 describes."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
SERVICES = {"postgres", "rabbitmq", "api", "projector", "trainer-1", "trainer-2"}
TRAINERS = ("trainer-1", "trainer-2")
# The api listens on 0.0.0.0 in its container, so the file takes keys from the environment.
KEYS = "frontend:0123456789abcdef01234567:operator"
ENV = {**os.environ, "HEIMDALL_API_KEYS": KEYS}


@pytest.fixture(scope="module")
def config() -> dict[str, Any]:
    """The file as docker-compose resolves it (anchors and merges applied)."""
    binary = shutil.which("docker-compose")
    if binary is None:
        pytest.skip("docker-compose is not installed (apt-get install docker-compose)")
    done = subprocess.run(
        [binary, "-f", str(COMPOSE), "config"], capture_output=True, text=True, timeout=60, env=ENV
    )
    assert done.returncode == 0, done.stderr
    resolved: dict[str, Any] = yaml.safe_load(done.stdout)
    return resolved


def test_the_file_is_valid_for_docker_compose() -> None:
    binary = shutil.which("docker-compose")
    if binary is None:
        pytest.skip("docker-compose is not installed (apt-get install docker-compose)")
    done = subprocess.run(
        [binary, "-f", str(COMPOSE), "config", "-q"],
        capture_output=True,
        text=True,
        timeout=60,
        env=ENV,
    )
    assert done.returncode == 0, done.stderr


def test_the_api_needs_keys_from_the_environment() -> None:
    binary = shutil.which("docker-compose")
    if binary is None:
        pytest.skip("docker-compose is not installed (apt-get install docker-compose)")
    env = {k: v for k, v in os.environ.items() if k != "HEIMDALL_API_KEYS"}
    done = subprocess.run(
        [binary, "-f", str(COMPOSE), "config", "-q"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert done.returncode != 0 and "set HEIMDALL_API_KEYS" in done.stderr
    raw = yaml.safe_load(COMPOSE.read_text())["services"]["api"]["environment"]
    assert raw["HEIMDALL_API_KEYS"].startswith("${HEIMDALL_API_KEYS:?"), "a key in the repo"


def test_keys_reach_only_the_api_and_metrics_ports_the_others(config: dict[str, Any]) -> None:
    services = config["services"]
    assert services["api"]["environment"]["HEIMDALL_API_KEYS"] == KEYS
    for name in ("projector", *TRAINERS):
        env = services[name]["environment"]
        assert "HEIMDALL_API_KEYS" not in env
        assert (env["HEIMDALL_METRICS_HOST"], env["HEIMDALL_METRICS_PORT"]) == ("0.0.0.0", "9100")


def test_every_service_is_there(config: dict[str, Any]) -> None:
    assert set(config["services"]) == SERVICES


def test_the_services_run_heimdall_against_postgres_and_rabbitmq(config: dict[str, Any]) -> None:
    services = config["services"]
    for name, command in [("api", "api"), ("projector", "projector")] + [
        (t, "trainer") for t in TRAINERS
    ]:
        service = services[name]
        assert service["command"] == [command]
        env = service["environment"]
        assert env["HEIMDALL_DATABASE_URL"].startswith("postgresql://heimdall:heimdall@postgres")
        assert env["HEIMDALL_BROKER_URL"] == "amqp://guest:guest@rabbitmq:5672/"
        assert env["HEIMDALL_API_HOST"] == "0.0.0.0"
        assert set(service["depends_on"]) == {"postgres", "rabbitmq"}
        assert {d["condition"] for d in service["depends_on"].values()} == {"service_healthy"}


def test_the_backends_and_the_api_have_health_checks(config: dict[str, Any]) -> None:
    services = config["services"]
    assert "pg_isready" in " ".join(services["postgres"]["healthcheck"]["test"])
    assert "rabbitmq-diagnostics" in services["rabbitmq"]["healthcheck"]["test"]
    assert "http://localhost:8001/health" in " ".join(services["api"]["healthcheck"]["test"])
    assert services["postgres"]["image"] == "postgres:15"
    assert services["rabbitmq"]["image"] == "rabbitmq:3-management"
    assert {"published": 15672, "target": 15672} in services["rabbitmq"]["ports"]
    assert {"published": 8001, "target": 8001} in services["api"]["ports"]


def test_each_trainer_gets_its_own_gpu_and_all_share_one_artifacts_volume(
    config: dict[str, Any],
) -> None:
    volumes, gpus = set(), []
    for name in TRAINERS:
        trainer = config["services"][name]
        (device,) = trainer["deploy"]["resources"]["reservations"]["devices"]
        assert (device["driver"], device["capabilities"]) == ("nvidia", ["gpu"])
        assert "count" not in device, "count: 1 lets both trainers take the same GPU"
        gpus += device["device_ids"]
        artifacts = trainer["environment"]["HEIMDALL_ARTIFACTS_DIR"]
        volumes |= {v.split(":")[0] for v in trainer["volumes"] if f":{artifacts}" in v}
    assert gpus == ["0", "1"]
    assert len(volumes) == 1 and volumes <= set(config["volumes"])


def test_every_service_has_a_health_check(config: dict[str, Any]) -> None:
    services = config["services"]
    assert all("healthcheck" in service for service in services.values()), [
        name for name, service in services.items() if "healthcheck" not in service
    ]
    for name in ("projector", *TRAINERS):
        test = " ".join(services[name]["healthcheck"]["test"])
        port = services[name]["environment"]["HEIMDALL_METRICS_PORT"]
        assert "urllib" in test and f"http://localhost:{port}/metrics" in test, (name, test)
