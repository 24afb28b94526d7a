"""/metrics is valid Prometheus exposition (promtool) and a real Prometheus scrapes it."""

from __future__ import annotations

import shutil
import subprocess
import time

import httpx
import pytest

from tests.cloud.ingest.conftest import NS, batch, telemetry_topic, wait_until
from tests.support.servers import ServerProcess, find_binary, free_port

EXPECTED = (
    "millstream_ingest_readings_stored_total",
    "millstream_ingest_readings_per_second",
    "millstream_ingest_lag_seconds",
    "millstream_ingest_queue_depth",
    "millstream_ingest_queue_capacity",
    "millstream_ingest_unacked_messages",
    "millstream_ingest_rejected_messages_total",
    "millstream_ingest_duplicate_messages_total",
    "millstream_ingest_sequence_gaps_total",
    "millstream_store_write_seconds_bucket",
    "millstream_broker_connected",
    "millstream_broker_disconnects_total",
    "millstream_devices_online",
)


def test_metrics_pass_promtool_and_prometheus_scrapes_them(make_cloud, publisher, tmp_path):
    promtool = find_binary("promtool")
    prometheus = find_binary("prometheus")
    if promtool is None or prometheus is None:
        pytest.skip("Debian package prometheus not installed (make test installs it)")
    cloud = make_cloud()
    t0 = time.time_ns() - 60 * NS
    for seq in (0, 0, 2):  # a duplicate and a gap, so those series have samples
        publisher.publish(telemetry_topic("m-1"), batch("m-1", seq, t0 + seq * NS))
    publisher.publish(telemetry_topic("m-2"), b"not json")
    publisher.flush()
    wait_until(lambda: cloud.metric("millstream_ingest_readings_stored_total") == 80)
    text = cloud.metrics_text()
    for name in EXPECTED:
        assert name in text, name
    check = subprocess.run(
        [promtool, "check", "metrics"], input=text.encode(), capture_output=True, timeout=30
    )
    assert check.returncode == 0, check.stdout.decode() + check.stderr.decode()

    port = free_port()
    work = tmp_path / "prometheus"
    (work / "data").mkdir(parents=True)
    (work / "prometheus.yml").write_text(
        "global:\n  scrape_interval: 1s\n"
        "scrape_configs:\n"
        "  - job_name: millstream\n"
        f"    static_configs: [{{targets: ['127.0.0.1:{cloud.port}']}}]\n"
    )
    server = ServerProcess(
        [
            prometheus,
            f"--config.file={work / 'prometheus.yml'}",
            f"--storage.tsdb.path={work / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        port,
        work,
        work / "prometheus.log",
    ).start()
    try:
        api = f"http://127.0.0.1:{port}/api/v1"

        def stored_seen() -> bool:
            r = httpx.get(
                f"{api}/query", params={"query": "millstream_ingest_readings_stored_total"}
            )
            res = r.json()["data"]["result"]
            return bool(res) and float(res[0]["value"][1]) == 80

        wait_until(stored_seen, 60, 0.5, "Prometheus to scrape the stored-readings counter")
        targets = httpx.get(f"{api}/targets").json()["data"]["activeTargets"]
        assert [t["health"] for t in targets] == ["up"]
        dup = httpx.get(
            f"{api}/query", params={"query": "millstream_ingest_duplicate_messages_total"}
        ).json()["data"]["result"]
        assert float(dup[0]["value"][1]) == 1
    finally:
        server.stop()
        shutil.rmtree(work / "data", ignore_errors=True)
