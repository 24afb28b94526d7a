"""The provisioner against a loopback server that validates requests with Grafana's API
description, and (opt-in) against a real Grafana."""

from __future__ import annotations

import copy
import os
import uuid
from collections.abc import Iterator

import pytest

from millstream_cloud.grafana.provisioner import (
    DATASOURCE_UID,
    FOLDER_UID,
    DatasourceSpec,
    Provisioner,
    load_dashboards,
)
from millstream_cloud.model import Anomaly
from tests.grafana.contract_server import ContractServer

TOKEN = "glsa_test_token"


@pytest.fixture
def grafana() -> Iterator[ContractServer]:
    with ContractServer() as server:
        yield server


def test_first_run_creates_everything_with_valid_requests(grafana: ContractServer) -> None:
    report = Provisioner.connect(grafana.url, TOKEN).provision(
        DatasourceSpec(url="http://millstream:8000")
    )
    assert grafana.errors == []
    assert all(r.status == 200 for r in grafana.writes)
    assert [(r.method, r.path) for r in grafana.writes] == [
        ("POST", "/api/datasources"),
        ("POST", "/api/folders"),
        ("POST", "/api/dashboards/db"),
        ("POST", "/api/dashboards/db"),
        ("POST", "/api/dashboards/db"),
    ]
    assert len(report.writes) == 5
    ds = grafana.state.datasources[DATASOURCE_UID]
    assert ds["type"] == "influxdb" and ds["url"] == "http://millstream:8000"
    assert ds["jsonData"]["version"] == "InfluxQL" and ds["jsonData"]["dbName"] == "millstream"
    assert set(grafana.state.dashboards) == {d["uid"] for d in load_dashboards()}
    assert all(d["meta"]["folderUid"] == FOLDER_UID for d in grafana.state.dashboards.values())
    # every request carried the token
    assert all(r.errors == [] for r in grafana.requests)


def test_second_run_writes_nothing(grafana: ContractServer) -> None:
    prov = Provisioner.connect(grafana.url, TOKEN)
    prov.provision(DatasourceSpec(token="influx-token"))
    before = len(grafana.writes)
    report = prov.provision(DatasourceSpec(token="influx-token"))
    assert report.writes == []
    assert len(grafana.writes) == before
    assert grafana.errors == []
    assert len(report.unchanged) == 5


def test_a_changed_dashboard_is_written_again_and_only_it(grafana: ContractServer) -> None:
    prov = Provisioner.connect(grafana.url, TOKEN)
    dashboards = load_dashboards()
    prov.provision(dashboards=dashboards)
    changed = copy.deepcopy(dashboards)
    changed[0]["title"] += " (edited)"
    report = prov.provision(dashboards=changed)
    assert report.writes == [("POST", "/dashboards/db")]
    uid = changed[0]["uid"]
    assert grafana.state.dashboards[uid]["dashboard"]["version"] == 2
    assert grafana.errors == []


def test_annotations_are_valid_requests(grafana: ContractServer) -> None:
    prov = Provisioner.connect(grafana.url, TOKEN)
    anomaly = Anomaly(device="press-01", site="plant-a", time_ns=1_709_251_200_000_000_000,
                      detector="zscore", score=4.2, likelihood=0.997, metric="temperature",
                      explanation="temperature 4.2 sigma above normal")  # fmt: skip
    assert prov.annotate_anomaly(anomaly) is not None
    prov.annotate_alert("HighTemperature", "resolved", {"site": "plant-a", "device": "press-01"},
                        "press-01 at 82 C", 1_709_251_200_000, 1_709_251_800_000)  # fmt: skip
    assert grafana.errors == []
    first, second = grafana.state.annotations
    assert first["time"] == 1_709_251_200_000 and "device:press-01" in first["tags"]
    assert "metric:temperature" in first["tags"]
    assert second["timeEnd"] == 1_709_251_800_000 and "state:resolved" in second["tags"]


def test_the_contract_server_rejects_what_grafana_would_not_describe(
    grafana: ContractServer,
) -> None:
    # proof that the checks bite: nulls for integers (what add_annotation() sends) and no auth
    prov = Provisioner.connect(grafana.url, TOKEN)
    try:
        prov.api.annotations.add_annotation(time_from=1, text="x")
    except Exception:
        pass
    assert grafana.errors, "a null panelId must fail the API description"
    bare = Provisioner.connect(grafana.url, None)
    try:
        bare.api.client.GET("/health")
    except Exception:
        pass
    assert any("Security" in e for e in grafana.errors)


@pytest.mark.live
@pytest.mark.skipif(
    not os.environ.get("MILLSTREAM_TEST_GRAFANA_URL"), reason="MILLSTREAM_TEST_GRAFANA_URL not set"
)
def test_live_grafana() -> None:
    url = os.environ["MILLSTREAM_TEST_GRAFANA_URL"]
    token = os.environ.get("MILLSTREAM_TEST_GRAFANA_TOKEN")
    prov = Provisioner.connect(url, token)
    suffix = uuid.uuid4().hex[:8]
    spec = DatasourceSpec(
        url="http://127.0.0.1:8000", uid=f"ms-test-{suffix}", name=f"Millstream test {suffix}"
    )
    dashboards = [{**d, "uid": f"{d['uid'][:30]}-{suffix}", "panels": [
        {**p, "datasource": {"type": "influxdb", "uid": spec.uid}} for p in d["panels"]
    ]} for d in load_dashboards()]  # fmt: skip
    folder = f"ms-test-{suffix}"
    first = prov.provision(
        spec, dashboards, folder_uid=folder, folder_title=f"Millstream test {suffix}"
    )
    assert len(first.writes) == 2 + len(dashboards)
    second = prov.provision(
        spec, dashboards, folder_uid=folder, folder_title=f"Millstream test {suffix}"
    )
    assert second.writes == [], second.summary()
    assert prov.annotate("millstream live test", 1_709_251_200_000, ["millstream-test"]) is not None


def test_cli_provision_twice(grafana: ContractServer, capsys: pytest.CaptureFixture[str]) -> None:
    import argparse

    from millstream_cloud.grafana import cli

    parser = argparse.ArgumentParser()
    cli.add_parser(parser.add_subparsers(dest="command"))
    argv = ["grafana", "provision", "--url", grafana.url, "--token", TOKEN]
    args = parser.parse_args(argv)
    assert args.func(args) == 0
    assert args.func(parser.parse_args(argv)) == 0
    assert "nothing to do" in capsys.readouterr().out
    assert grafana.errors == []
    bad = parser.parse_args(["grafana", "provision", "--url", "http://127.0.0.1:9", "--token", "x"])
    assert bad.func(bad) == 1
