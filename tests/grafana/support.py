"""Shared helpers of the Grafana tests: dashboards, their queries, test data."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[2]
DASHBOARD_DIR = REPO_ROOT / "dashboards"
GRAFANA_CONTRACTS = REPO_ROOT.parent / "shared" / "contracts" / "grafana"
DATASOURCE_UID = "millstream-influxdb"


def dashboards() -> Iterator[tuple[str, dict[str, Any]]]:
    for path in sorted(DASHBOARD_DIR.glob("*.json")):
        yield path.stem, json.loads(path.read_text())


def dashboard_queries() -> list[tuple[str, str, str]]:
    """(dashboard, where, raw InfluxQL) for every panel target, variable and annotation."""
    out = []
    for name, dash in dashboards():
        for v in dash["templating"]["list"]:
            if v["type"] == "query":
                out.append((name, f"variable {v['name']}", v["query"]))
        for a in dash["annotations"]["list"]:
            if a.get("target", {}).get("query"):
                out.append((name, f"annotation {a['name']}", a["target"]["query"]))
        for p in dash["panels"]:
            for t in p.get("targets", []):
                out.append((name, f"panel {p['title']!r} {t['refId']}", t["query"]))
    return out


def substitute(
    query: str, variables: dict[str, str], from_ms: int, to_ms: int, interval: str
) -> str:
    """Expand Grafana's macros and variables the way its InfluxDB datasource does."""
    q = query.replace("$timeFilter", f"time >= {from_ms}ms and time <= {to_ms}ms")
    q = q.replace("$__interval", interval)
    for name in sorted(variables, key=len, reverse=True):
        q = q.replace(f"${name}", variables[name]).replace(f"${{{name}}}", variables[name])
    assert not re.search(r"\$[A-Za-z_]", q), f"unsubstituted variable in {q}"
    return q
