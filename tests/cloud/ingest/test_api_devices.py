"""Device list filters and cursor pagination, device detail, dead-letter listing (in-process)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from millstream_cloud.app import create_app
from millstream_cloud.ingest.pipeline import Message
from millstream_cloud.registry import DeviceRegistry
from millstream_cloud.services import Services
from millstream_cloud.settings import load_settings
from tests.cloud.ingest.conftest import NS, batch, telemetry_topic


@pytest.fixture
def client(tmp_path: Path):
    settings = load_settings(overrides={"data_dir": str(tmp_path), "api": {"page_size": 3}})
    services = Services.build(settings, with_subscriber=False)
    now = time.time_ns()
    msgs = [
        Message(
            telemetry_topic(f"d{i}", "north" if i % 2 else "south"),
            batch(f"d{i}", 0, now - NS),
            now,
        )
        for i in range(7)
    ]
    msgs.append(
        Message("millstream/v1/south/d0/status", b'{"v":1,"device":"d0","state":"offline"}', now)
    )
    msgs.append(Message(telemetry_topic("d1", "north"), b"[]", now))
    services.pipeline.process(msgs)
    with TestClient(create_app(settings, services=services, start=False)) as c:
        yield c


def test_list_paginates_by_cursor_and_filters(client):
    ids, cursor = [], None
    while True:
        page = client.get("/api/v1/devices", params={"cursor": cursor} if cursor else {}).json()
        assert len(page["devices"]) <= 3
        ids += [d["id"] for d in page["devices"]]
        cursor = page["next"]
        if cursor is None:
            break
    assert ids == [f"d{i}" for i in range(7)]
    north = client.get("/api/v1/devices", params={"site": "north", "limit": 100}).json()
    assert [d["id"] for d in north["devices"]] == ["d1", "d3", "d5"] and north["next"] is None
    offline = client.get("/api/v1/devices", params={"online": "false"}).json()["devices"]
    assert [d["id"] for d in offline] == ["d0"]
    assert set(offline[0]) == {"id", "site", "online", "last_seen"}


def test_detail_latest_telemetry_and_dead_letters(client):
    dev = client.get("/api/v1/devices/d2").json()
    assert dev["metrics"] == ["m0", "m1", "m2", "m3"] and dev["sequence"]["last"] == 0
    assert client.get("/api/v1/devices/nobody").status_code == 404
    latest = client.get("/api/v1/devices/d2/latest").json()
    assert set(latest["metrics"]) == {"m0", "m1", "m2", "m3"}
    tel = client.get(
        "/api/v1/devices/d2/telemetry",
        params={"metric": ["m0", "m1"], "agg": "count", "every": "1h"},
    ).json()
    assert [sum(p["value"] for p in s["points"]) for s in tel] == [10, 10]
    dl = client.get("/api/v1/dead-letters").json()["dead_letters"]
    assert [d["reason"] for d in dl] == ["schema"] and dl[0]["payload"] == "[]"
    # A cursor no page ever gave (past what SQLite's integer holds) is refused, not a 500.
    bad = client.get("/api/v1/dead-letters", params={"cursor": 2**63})
    assert bad.status_code == 422 and "cursor" in bad.text


@pytest.mark.skipif(
    not os.environ.get("MILLSTREAM_TEST_POSTGRES_URL"),
    reason="MILLSTREAM_TEST_POSTGRES_URL not set",
)
def test_postgres_registry_sequence_state(tmp_path: Path) -> None:
    pytest.importorskip("psycopg")
    url = os.environ["MILLSTREAM_TEST_POSTGRES_URL"]
    a, b = DeviceRegistry(tmp_path / "unused.db", url), DeviceRegistry(tmp_path / "unused.db", url)
    dev_id = f"pg-{time.time_ns()}"
    with a.transaction() as txn:
        dev = txn.ensure(dev_id, "site", 1)
        assert txn.check_seq(dev, 0)[0] == "new"
    with b.transaction() as txn:
        dev = txn.get(dev_id)
        assert dev is not None and txn.check_seq(dev, 0)[0] == "duplicate"
        assert txn.check_seq(dev, 3) == ("new", 2)
    got = a.get(dev_id)
    assert got is not None and got.last_seq == 3 and got.missing == {1, 2} and got.duplicates == 1
    assert dev_id in [d.id for d in a.page(site="site")]
