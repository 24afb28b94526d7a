"""Fixtures shared by the whole suite."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.servers import ServerProcess, mosquitto_server

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DIR = REPO_ROOT.parent / "shared"
PROTOCOL_FIXTURES = REPO_ROOT / "tests" / "fixtures" / "protocol"
SCHEMA_DIR = REPO_ROOT / "docs" / "schemas"


@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[ServerProcess]:
    """A real Mosquitto on a free loopback port, stopped by PID at teardown."""
    server = mosquitto_server(tmp_path / "mosquitto").start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def broker_url(mosquitto: ServerProcess) -> str:
    return f"mqtt://127.0.0.1:{mosquitto.port}"
