"""Provision Grafana from code: the datasource, a folder and the dashboards, idempotently.

Everything is addressed by a stable uid. Each object is read first and written only when
it is missing or differs from what the code says, so a second run makes no write at all
(``ProvisionReport.writes`` is empty). Anomalies and alerts become Grafana annotations
through :meth:`Provisioner.annotate`, which the live path can call.

Grafana's HTTP API is spoken through grafana-client (the maintained fork of grafana-api).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from grafana_client import GrafanaApi
from grafana_client.client import GrafanaClientError

from millstream_cloud.model import Anomaly

log = logging.getLogger("millstream.grafana.provisioner")

DATASOURCE_UID = "millstream-influxdb"
DATASOURCE_NAME = "Millstream"
DATABASE = "millstream"
FOLDER_UID = "millstream"
FOLDER_TITLE = "Millstream"
# dashboards/ at the repository root (a source checkout); installs pass --dashboards
DEFAULT_DASHBOARD_DIR = Path(__file__).resolve().parents[4] / "dashboards"
# Keys Grafana adds or bumps on save; they do not make a dashboard different.
_VOLATILE_DASHBOARD_KEYS = ("id", "version")


@dataclass
class DatasourceSpec:
    """The InfluxDB (InfluxQL) datasource Grafana uses for the dashboards.

    ``url`` is Millstream's own API (it answers ``/query``) or an InfluxDB: 1.x, or 2.x
    through its v1-compatible endpoint with a DBRP mapping for ``millstream``. ``token``
    is sent as ``Authorization: Token ...`` (InfluxDB 2.x, or Millstream with API tokens).
    """

    url: str = "http://millstream:8000"
    database: str = DATABASE
    uid: str = DATASOURCE_UID
    name: str = DATASOURCE_NAME
    http_mode: str = "POST"
    token: str | None = None
    is_default: bool = False

    def body(self) -> dict[str, Any]:
        json_data: dict[str, Any] = {
            "version": "InfluxQL",
            "dbName": self.database,
            "httpMode": self.http_mode,
        }
        body: dict[str, Any] = {
            "uid": self.uid,
            "name": self.name,
            "type": "influxdb",
            "access": "proxy",
            "url": self.url,
            "database": self.database,
            "basicAuth": False,
            "isDefault": self.is_default,
            "jsonData": json_data,
        }
        if self.token:
            json_data["httpHeaderName1"] = "Authorization"
            body["secureJsonData"] = {"httpHeaderValue1": f"Token {self.token}"}
        return body


@dataclass
class ProvisionReport:
    """What a run did: every write (method, path) and what was already up to date."""

    writes: list[tuple[str, str]] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)

    def summary(self) -> str:
        if not self.writes:
            return f"nothing to do: {len(self.unchanged)} objects up to date"
        return "; ".join(f"{m} {p}" for m, p in self.writes)


def load_dashboards(directory: Path | str = DEFAULT_DASHBOARD_DIR) -> list[dict[str, Any]]:
    """The dashboards as code, one JSON file each, sorted by file name."""
    paths = sorted(Path(directory).glob("*.json"))
    if not paths:
        raise FileNotFoundError(f"no dashboard JSON files in {directory}")
    dashboards = []
    for path in paths:
        dash = json.loads(path.read_text())
        if not dash.get("uid"):
            raise ValueError(f"{path}: a provisioned dashboard needs a stable uid")
        dashboards.append(dash)
    return dashboards


def _subset_differs(wanted: Any, actual: Any) -> bool:
    """True when ``actual`` lacks or changes something of ``wanted`` (extra keys are fine)."""
    if isinstance(wanted, Mapping):
        if not isinstance(actual, Mapping):
            return True
        return any(_subset_differs(v, actual.get(k)) for k, v in wanted.items())
    return bool(wanted != actual)


def _not_found(exc: GrafanaClientError) -> bool:
    return getattr(exc, "status_code", None) == 404


class Provisioner:
    """Brings a Grafana to the state the code describes, through its HTTP API."""

    def __init__(self, api: GrafanaApi) -> None:
        self.api = api

    @classmethod
    def connect(cls, url: str, token: str | None = None, timeout: float = 10.0) -> Provisioner:
        """``url`` like ``http://grafana:3000``; ``token``: a service account token
        (or ``user:password`` for basic auth)."""
        credential: Any = token
        if token and ":" in token and not token.startswith("glsa_"):
            user, _, pw = token.partition(":")
            credential = (user, pw)
        return cls(GrafanaApi.from_url(url, credential=credential, timeout=timeout))

    # -- reads
    def _get(self, path: str) -> dict[str, Any] | None:
        try:
            result = self.api.client.GET(path)
        except GrafanaClientError as exc:
            if _not_found(exc):
                return None
            raise
        return result if isinstance(result, dict) else None

    # -- the whole run
    def provision(
        self,
        datasource: DatasourceSpec | None = None,
        dashboards: Iterable[dict[str, Any]] | None = None,
        folder_uid: str = FOLDER_UID,
        folder_title: str = FOLDER_TITLE,
    ) -> ProvisionReport:
        report = ProvisionReport()
        self.ensure_datasource(datasource or DatasourceSpec(), report)
        self.ensure_folder(folder_uid, folder_title, report)
        for dash in dashboards if dashboards is not None else load_dashboards():
            self.ensure_dashboard(dash, folder_uid, report)
        log.info("grafana provisioned: %s", report.summary())
        return report

    def ensure_datasource(self, spec: DatasourceSpec, report: ProvisionReport) -> None:
        wanted = spec.body()
        existing = self._get(f"/datasources/uid/{spec.uid}")
        if existing is None:
            self.api.client.POST("/datasources", json=wanted)
            report.writes.append(("POST", "/datasources"))
            return
        # secrets are never returned by Grafana: compare the rest, and only say so
        comparable = {k: v for k, v in wanted.items() if k != "secureJsonData"}
        if _subset_differs(comparable, existing):
            self.api.client.PUT(f"/datasources/uid/{spec.uid}", json=wanted)
            report.writes.append(("PUT", f"/datasources/uid/{spec.uid}"))
        else:
            report.unchanged.append(f"datasource {spec.uid}")

    def ensure_folder(self, uid: str, title: str, report: ProvisionReport) -> None:
        existing = self._get(f"/folders/{uid}")
        if existing is None:
            self.api.client.POST("/folders", json={"uid": uid, "title": title})
            report.writes.append(("POST", "/folders"))
        elif existing.get("title") != title:
            body = {"title": title, "version": existing.get("version", 0), "overwrite": True}
            self.api.client.PUT(f"/folders/{uid}", json=body)
            report.writes.append(("PUT", f"/folders/{uid}"))
        else:
            report.unchanged.append(f"folder {uid}")

    def ensure_dashboard(
        self, dash: dict[str, Any], folder_uid: str, report: ProvisionReport
    ) -> None:
        uid = dash["uid"]
        wanted = {k: v for k, v in dash.items() if k not in _VOLATILE_DASHBOARD_KEYS}
        existing = self._get(f"/dashboards/uid/{uid}")
        if existing is not None:
            stored = {
                k: v
                for k, v in (existing.get("dashboard") or {}).items()
                if k not in _VOLATILE_DASHBOARD_KEYS
            }
            in_folder = (existing.get("meta") or {}).get("folderUid") == folder_uid
            if stored == wanted and in_folder:
                report.unchanged.append(f"dashboard {uid}")
                return
        # no "id": Grafana matches the uid (overwrite) or creates the dashboard
        body = {
            "dashboard": wanted,
            "folderUid": folder_uid,
            "overwrite": True,
            "message": "provisioned by millstream-cloud grafana provision",
        }
        self.api.dashboard.update_dashboard(body)
        report.writes.append(("POST", "/dashboards/db"))

    # -- annotations
    def annotate(
        self,
        text: str,
        time_ms: int,
        tags: Iterable[str] = (),
        time_end_ms: int | None = None,
        dashboard_uid: str | None = None,
        panel_id: int | None = None,
    ) -> int | None:
        """Post one annotation (organisation-wide unless a dashboard is given)."""
        body: dict[str, Any] = {"time": int(time_ms), "text": text, "tags": list(tags)}
        # grafana-client's add_annotation() sends nulls for what is not given; Grafana's
        # API description does not allow them, so the body is built here without them.
        if time_end_ms is not None:
            body["timeEnd"] = int(time_end_ms)
        if dashboard_uid is not None:
            body["dashboardUID"] = dashboard_uid
        if panel_id is not None:
            body["panelId"] = panel_id
        result = self.api.client.POST("/annotations", json=body)
        return result.get("id") if isinstance(result, dict) else None

    def annotate_anomaly(self, anomaly: Anomaly) -> int | None:
        """An anomaly as an annotation tagged with its site, device, metric and detector."""
        tags = ["millstream", "anomaly", f"site:{anomaly.site}", f"device:{anomaly.device}",
                f"detector:{anomaly.detector}"]  # fmt: skip
        if anomaly.metric:
            tags.append(f"metric:{anomaly.metric}")
        what = anomaly.metric or "device"
        text = (
            f"Anomaly on {anomaly.device} ({what}): score {anomaly.score:.2f}, "
            f"likelihood {anomaly.likelihood:.3f}"
        )
        if anomaly.explanation:
            text += f". {anomaly.explanation}"
        return self.annotate(text, anomaly.time_ns // 1_000_000, tags)

    def annotate_alert(
        self,
        alertname: str,
        state: str,
        labels: Mapping[str, str],
        summary: str,
        starts_ms: int,
        ends_ms: int | None = None,
    ) -> int | None:
        """An alert notification (firing or resolved) as an annotation; a resolved alert
        spans its firing period."""
        tags = ["millstream", "alert", f"alertname:{alertname}", f"state:{state}"]
        tags += [f"{k}:{v}" for k, v in sorted(labels.items()) if k != "alertname"]
        return self.annotate(f"[{state.upper()}] {alertname}: {summary}", starts_ms, tags, ends_ms)
