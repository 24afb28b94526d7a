"""Every dashboard validates against Grafana's published schemas, panel by panel."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from tests.grafana.support import DASHBOARD_DIR, DATASOURCE_UID, GRAFANA_CONTRACTS, dashboards

PANEL_SCHEMAS = {
    "timeseries": "timeseries",
    "stat": "stat",
    "table": "table",
    "state-timeline": "statetimeline",
}


def _schema() -> dict[str, Any]:
    return json.loads((GRAFANA_CONTRACTS / "dashboard.jsonschema.json").read_text())


def _errors(schema: dict[str, Any], instance: Any) -> list[str]:
    v = jsonschema.Draft7Validator(schema)
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in v.iter_errors(instance)]


def test_there_are_three_dashboards_with_stable_uids() -> None:
    uids = {d["uid"] for _, d in dashboards()}
    assert uids == {"millstream-fleet", "millstream-device", "millstream-anomalies"}


@pytest.mark.parametrize("path", sorted(DASHBOARD_DIR.glob("*.json")), ids=lambda p: p.stem)
def test_dashboard_validates(path: Path) -> None:
    dash = json.loads(path.read_text())
    schema = _schema()
    assert _errors(schema, dash) == []
    defs = schema["definitions"]
    for panel in dash["panels"]:
        ref = "RowPanel" if panel["type"] == "row" else "Panel"
        assert _errors({"$ref": f"#/definitions/{ref}", "definitions": defs}, panel) == [], panel[
            "title"
        ]
        if panel["type"] == "row":
            continue
        plugin = PANEL_SCHEMAS.get(panel["type"])
        assert plugin, f"no contract schema for panel type {panel['type']}"
        pschema = json.loads(
            (GRAFANA_CONTRACTS / "panels" / f"{plugin}.jsonschema.json").read_text()
        )
        pdefs = pschema["definitions"]
        assert (
            _errors({"$ref": "#/definitions/Options", "definitions": pdefs}, panel["options"]) == []
        ), panel["title"]
        custom = panel.get("fieldConfig", {}).get("defaults", {}).get("custom")
        if custom is not None and "FieldConfig" in pdefs:
            assert (
                _errors({"$ref": "#/definitions/FieldConfig", "definitions": pdefs}, custom) == []
            ), panel["title"]


@pytest.mark.parametrize("path", sorted(DASHBOARD_DIR.glob("*.json")), ids=lambda p: p.stem)
def test_every_query_uses_the_millstream_datasource(path: Path) -> None:
    dash = json.loads(path.read_text())
    panels = [p for p in dash["panels"] if p["type"] != "row"]
    refs = [p["datasource"] for p in panels]
    refs += [t["datasource"] for p in panels for t in p["targets"]]
    refs += [v["datasource"] for v in dash["templating"]["list"] if v["type"] == "query"]
    refs += [a["datasource"] for a in dash["annotations"]["list"] if not a.get("builtIn")]
    assert refs
    assert all(r == {"type": "influxdb", "uid": DATASOURCE_UID} for r in refs)
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
