"""The per-device rate limiter plugged into the real ingest pipeline: a flooding device's
excess messages are dead-lettered with a reason and counted; its neighbours are untouched.
(The pipeline takes any object with ``allow(device, now) -> bool``.)"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from millstream_cloud.security.limits import DeviceRateLimiter


@pytest.fixture
def services(tmp_path: Path) -> Iterator[Any]:
    services_mod = pytest.importorskip("millstream_cloud.services")
    from millstream_cloud.settings import load_settings

    svc = services_mod.Services.build(
        load_settings(overrides={"data_dir": str(tmp_path / "data")}, environ={}),
        with_subscriber=False,
    )
    yield svc
    svc.stop()


def message(device: str, seq: int) -> Any:
    from millstream_cloud.ingest.pipeline import Message

    payload = {
        "v": 1,
        "device": device,
        "seq": seq,
        "readings": [{"ts": "2026-01-01T00:00:00Z", "metric": "current", "value": float(seq)}],
    }
    return Message(
        f"millstream/v1/s1/{device}/telemetry", json.dumps(payload).encode(), time.time_ns()
    )


def test_flooding_device_is_rate_limited_and_dead_lettered(services: Any) -> None:
    pipeline = services.pipeline
    pipeline.limiter = DeviceRateLimiter(rate=0.001, burst=5)  # no refill during the test
    flood = [message("flooder", seq) for seq in range(20)]
    calm = [message("calm", seq) for seq in range(3)]
    pipeline.process(flood + calm)
    limited = services.dead_letters.list(limit=100, reason="rate_limited")
    assert len(limited) == 15
    assert {d.topic for d in limited} == {"millstream/v1/s1/flooder/telemetry"}
    assert all("rate limit" in d.error for d in limited)
    # Everything else went through: 5 (the burst) from the flooder, all 3 from its neighbour.
    assert len(services.dead_letters.list(limit=100)) == 15
    assert pipeline.stored_total == 5 + 3
