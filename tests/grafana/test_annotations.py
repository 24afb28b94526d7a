"""Alerts and anomalies become Grafana annotations, in requests Grafana's API describes."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from millstream_cloud.alerts.notifiers.base import (
    AlertSnapshot,
    DeliveryError,
    Notification,
    NotifierContext,
    notifier_types,
)
from millstream_cloud.grafana.notifier import (
    AnomalyAnnotator,
    GrafanaNotifier,
    GrafanaNotifierConfig,
)
from millstream_cloud.model import Anomaly
from tests.grafana.contract_server import ContractServer
from tests.support.servers import free_port

MS = 1_000_000
T = 1_709_251_200_000 * MS


@pytest.fixture
def grafana() -> Iterator[ContractServer]:
    with ContractServer() as server:
        yield server


def _notification() -> Notification:
    labels = {
        "alertname": "HighTemperature",
        "site": "plant-a",
        "device": "press-01",
        "severity": "warning",
    }
    return Notification(
        receiver="grafana",
        group_key='{}:{alertname="HighTemperature"}',
        group_labels={"alertname": "HighTemperature"},
        alerts=[
            AlertSnapshot("f1", "firing", labels, {"summary": "press-01 at 82 C"}, T, None),
            AlertSnapshot(
                "f2",
                "resolved",
                {**labels, "device": "press-02"},
                {"summary": "press-02 back to 61 C"},
                T,
                T + 600_000 * MS,
            ),
        ],
    )


def test_the_grafana_notifier_posts_one_annotation_per_alert(
    grafana: ContractServer, tmp_path: Path
) -> None:
    assert notifier_types()["grafana"] is GrafanaNotifier
    config = GrafanaNotifierConfig(url=grafana.url, token="glsa_x")
    GrafanaNotifier(config, NotifierContext(tmp_path)).notify(_notification())
    assert grafana.errors == []
    firing, resolved = grafana.state.annotations
    assert firing["time"] == T // MS and "timeEnd" not in firing
    assert "device:press-01" in firing["tags"] and "state:firing" in firing["tags"]
    assert resolved["timeEnd"] == (T + 600_000 * MS) // MS
    assert resolved["text"].startswith("[RESOLVED] HighTemperature")


def test_a_grafana_that_is_down_is_a_retryable_delivery_error(tmp_path: Path) -> None:
    config = GrafanaNotifierConfig(
        url=f"http://127.0.0.1:{free_port()}", token="glsa_x", timeout_s=1
    )
    with pytest.raises(DeliveryError) as exc:
        GrafanaNotifier(config, NotifierContext(tmp_path)).notify(_notification())
    assert exc.value.retry


def test_anomalies_are_annotated_and_failures_never_raise(grafana: ContractServer) -> None:
    anomaly = Anomaly("press-01", "plant-a", T, "zscore", 4.2, 0.997, "temperature", "4.2 sigma")
    annotator = AnomalyAnnotator(grafana.url, "glsa_x")
    assert annotator.annotate(anomaly) is not None
    assert grafana.errors == [] and annotator.posted == 1
    down = AnomalyAnnotator(f"http://127.0.0.1:{free_port()}", "glsa_x", timeout_s=1)
    assert down.annotate(anomaly) is None and down.failed == 1
