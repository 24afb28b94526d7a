"""Time from an anomalous reading's arrival to the webhook receiving its notification.

Issue 7's alert latency benchmark, with ``group_wait: 0s``. Two paths, both measured:

* ``mqtt_end_to_end``: a telemetry message published to a real Mosquitto (started on a
  free port), received by the cloud's subscriber, decoded and stored by the real ingest
  pipeline, evaluated by the alert service (a pipeline hook), routed and POSTed to an
  HTTP webhook server running in this process. Clock starts just before publishing.
* ``observe_path``: the same reading handed straight to ``AlertService.observe_readings``
  (what the pipeline hook calls): the alerting part alone.

Each sample is a new device crossing a threshold, so each is a new alert group flushed at
once. Meanwhile a background fleet (``--fleet`` devices, 10 normal readings each per
second) keeps the ingest path busy. Target: p99 < 2 s.

    python bench/alerts_latency.py [--samples 200] [--fleet 200] [--out bench/results/alerts_latency.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import paho.mqtt.client as mqtt  # noqa: E402
import yaml  # noqa: E402

from bench._common import write_result  # noqa: E402
from millstream_cloud.alerts.service import AlertService  # noqa: E402
from millstream_cloud.alerts.settings import AlertSettings  # noqa: E402
from millstream_cloud.model import Reading  # noqa: E402
from millstream_cloud.protocol import format_ts  # noqa: E402
from millstream_cloud.services import Services  # noqa: E402
from millstream_cloud.settings import load_settings  # noqa: E402
from tests.support.servers import mosquitto_server  # noqa: E402

TARGET_P99_S = 2.0
RULE = {
    "name": "BenchOverTemperature",
    "type": "threshold",
    "metric": "temp",
    "threshold": 80,
    "clear": 70,
    "labels": {"severity": "critical"},
}


class Receiver:
    """The webhook: records the arrival time of each alert, by device."""

    def __init__(self) -> None:
        self.arrivals: dict[str, float] = {}
        self.cond = threading.Condition()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                now = time.perf_counter()
                for alert in json.loads(body)["alerts"]:
                    with outer.cond:
                        outer.arrivals.setdefault(alert["labels"]["device"], now)
                        outer.cond.notify_all()
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()

    def wait(self, device: str, timeout: float = 10.0) -> float | None:
        deadline = time.monotonic() + timeout
        with self.cond:
            while device not in self.arrivals:
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self.cond.wait(left)
            return self.arrivals[device]

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def alert_settings(rules_file: Path, url: str) -> AlertSettings:
    rules_file.write_text(yaml.safe_dump({"rules": [RULE]}))
    return AlertSettings.model_validate(
        {
            "rule_files": [str(rules_file)],
            "route": {
                "receiver": "bench",
                "group_by": ["alertname", "device"],
                "group_wait": "0s",
                "group_interval": "5m",
                "repeat_interval": "4h",
            },
            "receivers": [{"name": "bench", "webhook_configs": [{"url": url}]}],
            "inhibit_rules": [],
        }
    )


def summary(samples: list[float], lost: int) -> dict[str, Any]:
    s = sorted(samples)

    def pct(p: float) -> float:
        return s[min(len(s) - 1, max(0, round(p / 100 * len(s) + 0.5) - 1))]

    return {
        "samples": len(s),
        "lost": lost,
        "p50_s": round(pct(50), 6),
        "p90_s": round(pct(90), 6),
        "p99_s": round(pct(99), 6),
        "max_s": round(s[-1], 6),
        "mean_s": round(statistics.fmean(s), 6),
    }


def bench_observe(work: Path, samples: int) -> dict[str, Any]:
    receiver = Receiver()
    svc = AlertService(alert_settings(work / "rules-o.yaml", receiver.url), work / "observe")
    lat, lost = [], 0
    try:
        for i in range(samples):
            device = f"obs-{i:05d}"
            t0 = time.perf_counter()
            svc.observe_readings([Reading(device, "plant-a", "temp", time.time_ns(), 95.0)])
            got = receiver.wait(device)
            if got is None:
                lost += 1
            else:
                lat.append(got - t0)
    finally:
        svc.stop()
        receiver.stop()
    return summary(lat, lost)


class Fleet:
    """Normal traffic: each device publishes 10 readings below the threshold every second."""

    def __init__(self, port: int, devices: int) -> None:
        self.devices = devices
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="bench-fleet")
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        self.stop_event = threading.Event()
        self.sent = 0
        self.thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> Fleet:
        self.thread.start()
        return self

    def _run(self) -> None:
        seq = 0
        while not self.stop_event.is_set():
            t0 = time.monotonic()
            seq += 1
            ts = format_ts(time.time_ns())
            for d in range(self.devices):
                device = f"fleet-{d:04d}"
                body = {
                    "v": 1,
                    "device": device,
                    "seq": seq,
                    "readings": [
                        {"ts": ts, "metric": m, "value": 40.0 + d % 7}
                        for m in (
                            "temp",
                            "vib",
                            "rpm",
                            "current",
                            "voltage",
                            "power",
                            "flow",
                            "pressure",
                            "torque",
                            "humidity",
                        )
                    ],
                }
                self.client.publish(
                    f"millstream/v1/plant-b/{device}/telemetry", json.dumps(body), qos=1
                )
                self.sent += 10
            self.stop_event.wait(max(0.0, 1.0 - (time.monotonic() - t0)))

    def stop(self) -> None:
        self.stop_event.set()
        self.thread.join(5)
        self.client.loop_stop()
        self.client.disconnect()


def bench_mqtt(work: Path, samples: int, fleet_size: int) -> dict[str, Any]:
    broker = mosquitto_server(work / "mosquitto", persistence=False).start()
    receiver = Receiver()
    services = None
    svc = None
    pub = None
    fleet = None
    lat, lost = [], 0
    try:
        settings = load_settings(
            overrides={
                "data_dir": str(work / "cloud"),
                "mqtt": {"broker": f"mqtt://127.0.0.1:{broker.port}", "client_id": "bench-cloud"},
            },
            environ={},
        )
        services = Services.build(settings, with_subscriber=True)
        svc = AlertService(
            alert_settings(work / "rules-m.yaml", receiver.url),
            settings.data_path,
            devices=services.registry.all,
            metrics_registry=services.metrics.registry,
        )
        services.pipeline.hooks.append(svc.observe_readings)
        services.start()
        assert services.subscriber is not None
        if not services.subscriber.connected.wait(10):
            raise RuntimeError("the cloud subscriber did not connect to Mosquitto")
        time.sleep(0.3)  # let the subscription settle
        pub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="bench-device")
        pub.connect("127.0.0.1", broker.port)
        pub.loop_start()
        if fleet_size:
            fleet = Fleet(broker.port, fleet_size).start()
            time.sleep(2.0)  # let the fleet's devices appear and traffic settle
        started = time.monotonic()
        for i in range(samples):
            device = f"dev-{i:05d}"
            body = {
                "v": 1,
                "device": device,
                "seq": 1,
                "readings": [{"ts": format_ts(time.time_ns()), "metric": "temp", "value": 95.0}],
            }
            payload = json.dumps(body)
            t0 = time.perf_counter()
            pub.publish(f"millstream/v1/plant-a/{device}/telemetry", payload, qos=1)
            got = receiver.wait(device)
            if got is None:
                lost += 1
            else:
                lat.append(got - t0)
        elapsed = time.monotonic() - started
    finally:
        if fleet is not None:
            fleet.stop()
        if pub is not None:
            pub.loop_stop()
            pub.disconnect()
        if services is not None:
            services.stop()
        if svc is not None:
            svc.stop()
        receiver.stop()
        broker.stop()
    out = summary(lat, lost)
    out["background_fleet"] = {
        "devices": fleet_size,
        "readings_per_s": round(fleet.sent / (elapsed + 2.0), 1) if fleet else 0,
    }
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samples", type=int, default=200)
    parser.add_argument("--fleet", type=int, default=200, help="background devices (0: none)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "alerts_latency.json"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="millstream-alerts-bench-") as tmp:
        work = Path(tmp)
        observe = bench_observe(work, args.samples)
        end_to_end = bench_mqtt(work, args.samples, args.fleet)
    result = {
        "benchmark": "alerts_latency",
        "description": "reading arrival -> webhook received, group_wait 0s, one new alert group per sample",
        "target_p99_s": TARGET_P99_S,
        "mqtt_end_to_end": end_to_end,
        "observe_path": observe,
        "pass": end_to_end["p99_s"] < TARGET_P99_S
        and observe["p99_s"] < TARGET_P99_S
        and end_to_end["lost"] == 0
        and observe["lost"] == 0,
        "machine": {"python": platform.python_version(), "platform": platform.platform()},
        "when": format_ts(time.time_ns()),
    }
    write_result(result, args.out)
    return 0 if result["pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
