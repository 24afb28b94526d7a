from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.cloud import API, cloud_server
from tests.support.servers import ServerProcess


@pytest.fixture
def cloud(tmp_path: Path, broker_url: str) -> Iterator[ServerProcess]:
    """`millstream-cloud serve` on a free port against the test broker."""
    server = cloud_server(tmp_path / "cloud", broker_url).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def api(cloud: ServerProcess) -> API:
    return API(cloud.port)
