"""Backends under test: every conformance test runs against each of them.

* ``embedded``: the embedded store, queries answered from its memtable (recent writes);
* ``embedded-compacted``: the same, compacted into chunks after every write;
* ``influxdb-v1``: the InfluxDB backend against Debian's real InfluxDB 1.x (``/write``).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from millstream_cloud.settings import EmbeddedSettings, InfluxDBSettings
from millstream_cloud.storage.base import Storage
from millstream_cloud.storage.embedded import EmbeddedStorage
from tests.support.influxdb import InfluxDBServer, influxdb_available, influxdb_server

_db_names = itertools.count(1)


@dataclass
class Backend:
    name: str
    store: Storage

    def settle(self) -> None:
        """Make the backend reach its steady state for reads (compaction for one variant)."""
        if self.name == "embedded-compacted":
            assert isinstance(self.store, EmbeddedStorage)
            self.store.flush()


@pytest.fixture(scope="session")
def influxdb(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InfluxDBServer]:
    """One real InfluxDB 1.x for the session (each test gets its own database)."""
    if not influxdb_available():
        pytest.skip("influxd not installed (apt-get install influxdb)")
    server = influxdb_server(tmp_path_factory.mktemp("influxdb")).start()
    try:
        yield server
    finally:
        server.stop()


def influx_settings(server: InfluxDBServer, tmp: Path, **kw: Any) -> InfluxDBSettings:
    values: dict[str, Any] = {
        "url": server.url,
        "api": "v1",
        "database": f"test{next(_db_names)}",
        "spool_dir": str(tmp / "spool"),
        "retry_initial_s": 0.2,
        "retry_max_s": 1.0,
        "timeout_s": 5.0,
    }
    values.update(kw)
    return InfluxDBSettings(**values)


@pytest.fixture(params=["embedded", "embedded-compacted", "influxdb-v1"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    name = request.param
    store: Storage
    if name.startswith("embedded"):
        store = EmbeddedStorage(tmp_path / "embedded", EmbeddedSettings())
    else:
        from millstream_cloud.storage.influxdb import InfluxDBStorage

        server = request.getfixturevalue("influxdb")
        store = InfluxDBStorage(influx_settings(server, tmp_path))
    try:
        yield Backend(name, store)
    finally:
        store.close()
