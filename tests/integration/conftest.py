"""Integration fixtures: a TCP hop to RabbitMQ that a test cuts to fake an outage."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tests.faults import Proxy

RABBIT_URL = os.environ.get("HEIMDALL_TEST_BROKER_URL", "amqp://guest:guest@127.0.0.1:5672/")


@pytest.fixture
def rabbit_proxy() -> Iterator[Proxy]:
    """An open proxy to the test RabbitMQ; closed after the test."""
    proxy = Proxy(RABBIT_URL, 5672).open()
    yield proxy
    proxy.close()
