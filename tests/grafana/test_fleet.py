"""The fleet measurements feed the fleet dashboard's device and ingest panels."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from millstream_cloud.grafana.engine import QueryEngine
from millstream_cloud.grafana.fleet import FleetWriter
from millstream_cloud.metrics import ServiceMetrics
from millstream_cloud.storage.embedded import EmbeddedStorage
from tests.grafana.support import dashboards, substitute

S = 10**9
T0 = 1_709_251_200 * S


@dataclass
class FakeDevice:
    id: str
    site: str
    kind: str | None
    online: bool


class FakeRegistry:
    def __init__(self) -> None:
        self.devices = [
            FakeDevice("press-01", "plant-a", "press", True),
            FakeDevice("press-02", "plant-a", "press", True),
            FakeDevice("lathe-01", "plant-b", None, True),
        ]

    def all(self) -> list[FakeDevice]:
        return list(self.devices)


def test_fleet_panels_show_what_the_writer_wrote(tmp_path: Path) -> None:
    store = EmbeddedStorage(tmp_path / "store")
    registry, metrics = FakeRegistry(), ServiceMetrics()
    now = [T0 + 3 * S]
    writer = FleetWriter(store, registry, metrics, "worker-1", clock=lambda: now[0])
    for step in range(60):  # ten minutes, a tick every 10 s
        metrics.readings_stored.inc(50)
        if step == 30:
            registry.devices[1].online = False
        writer.tick()
        now[0] += 10 * S
    panels = {p["title"]: p for _, d in dashboards() for p in d["panels"] if p["type"] != "row"}
    engine = QueryEngine(store, now_ns=lambda: now[0])

    def run(title: str, site: str = "(plant-a|plant-b)") -> list[list[object]]:
        q = substitute(panels[title]["targets"][0]["query"], {"site": site},
                       T0 // 10**6, now[0] // 10**6, "1m")  # fmt: skip
        result = engine.execute(q, db="millstream", epoch="ms")["results"][0]
        return [row for s in result["series"] for row in s["values"]]

    assert run("Devices online")[-1][1] == 2
    assert run("Devices offline")[-1][1] == 1
    assert run("Devices online", site="plant-b")[-1][1] == 1
    rate = run("Ingest rate")
    assert rate[-1][1] == 5.0  # 50 readings per 10 s
    status = {tuple(r) for r in run("Device status")}
    assert status
    store.close()
