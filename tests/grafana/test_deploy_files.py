"""The file-based provisioning for the compose stack agrees with the dashboards."""

from __future__ import annotations

import yaml

from tests.grafana.support import DATASOURCE_UID, REPO_ROOT, dashboards

PROVISIONING = REPO_ROOT / "deploy" / "grafana" / "provisioning"


def test_datasource_file() -> None:
    doc = yaml.safe_load((PROVISIONING / "datasources" / "millstream.yaml").read_text())
    (ds,) = doc["datasources"]
    assert ds["uid"] == DATASOURCE_UID and ds["type"] == "influxdb"
    assert ds["jsonData"]["version"] == "InfluxQL" and ds["jsonData"]["dbName"] == "millstream"
    assert ds["secureJsonData"]["httpHeaderValue1"].startswith("Token ${")


def test_dashboard_provider_file() -> None:
    doc = yaml.safe_load((PROVISIONING / "dashboards" / "millstream.yaml").read_text())
    (provider,) = doc["providers"]
    assert provider["type"] == "file" and provider["folderUid"] == "millstream"
    assert list(dashboards())
