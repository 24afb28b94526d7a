"""Reading published -> queryable through the API: latency p50/p99 under load.

Issue 5's latency benchmark. A real Mosquitto and one ``millstream-cloud serve`` worker
(embedded store, durable writes, manual acks). A load process publishes telemetry (40
readings per message, QoS 1) at half the sustained rate measured by
bench/ingest_throughput.py (its JSON, or ``--rate``). Meanwhile a probe device publishes
one message at a time and polls ``GET /api/v1/devices/probe/latest`` until that message's
timestamp is there: the time from publish to that answer is one sample.

    python bench/ingest_latency.py [--rate READINGS_PER_S] [--duration 20]
        [--out bench/results/ingest_latency.json]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import httpx  # noqa: E402
from ingest_throughput import READINGS_PER_MESSAGE, _client, make_messages  # noqa: E402

from bench._common import write_result  # noqa: E402
from tests.support.servers import free_port, mosquitto_server  # noqa: E402

NS = 1_000_000_000


def load(port: int, rate_msgs: float, duration: float, devices: int, out: Any) -> None:
    """Publish at a steady ``rate_msgs`` messages/s for ``duration`` seconds."""
    n = int(rate_msgs * duration)
    messages = make_messages(n, devices, prefix="millstream/v1/load")
    c = _client("latency-load", port)
    c.loop_start()
    t0 = time.perf_counter()
    infos = []
    for k, (t, p) in enumerate(messages):
        due = t0 + k / rate_msgs
        delay = due - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        infos.append(c.publish(t, p, qos=1))
    for info in infos:
        info.wait_for_publish(60)
    out.put({"published": len(infos), "seconds": time.perf_counter() - t0})
    c.disconnect()
    c.loop_stop()


def _ts(t: int) -> str:
    secs, frac = divmod(t, NS)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(secs)) + f".{frac // 1000:06d}Z"


def probe(port: int, api: str, duration: float) -> list[float]:
    c = _client("latency-probe", port)
    c.loop_start()
    http = httpx.Client(base_url=api, timeout=10)
    samples = []
    seq = 0
    end = time.monotonic() + duration
    while time.monotonic() < end:
        t = time.time_ns() - NS
        readings = [
            {"ts": _ts(t + i * 1000), "metric": f"m{i % 10}", "value": float(i)}
            for i in range(READINGS_PER_MESSAGE)
        ]
        body = json.dumps({"v": 1, "device": "probe", "seq": seq, "readings": readings})
        want = _ts(t + 39 * 1000)  # the newest reading of metric m9
        t0 = time.perf_counter()
        c.publish("millstream/v1/bench/probe/telemetry", body, qos=1)
        while time.perf_counter() - t0 < 10:
            r = http.get("/api/v1/devices/probe/latest")
            if r.status_code == 200 and r.json()["metrics"].get("m9", {}).get("time") == want:
                samples.append(time.perf_counter() - t0)
                break
            time.sleep(0.002)
        seq += 1
        time.sleep(0.05)
    c.disconnect()
    c.loop_stop()
    return samples


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rate", type=float, help="load in readings/s (default: half of sustained)")
    ap.add_argument("--duration", type=float, default=20.0)
    ap.add_argument("--devices", type=int, default=100)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "ingest_latency.json"))
    args = ap.parse_args()
    sustained = None
    tp = ROOT / "bench" / "results" / "ingest_throughput.json"
    if tp.exists():
        sustained = json.loads(tp.read_text())["ingest_1_worker"]["readings_per_s"]
    rate = args.rate or (sustained / 2 if sustained else 50_000.0)
    work = Path(tempfile.mkdtemp(prefix="ingest-latency-"))
    broker = mosquitto_server(work / "mosquitto").start()
    api_port = free_port()
    log = open(work / "cloud.log", "wb")  # noqa: SIM115
    cloud = subprocess.Popen(
        [sys.executable, "-m", "millstream_cloud.cli", "serve",
         "--broker", f"mqtt://127.0.0.1:{broker.port}", "--data-dir", str(work / "data"),
         "--port", str(api_port), "--client-id", "latency-cloud"],
        stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ), start_new_session=True,
    )  # fmt: skip
    api = f"http://127.0.0.1:{api_port}"
    try:
        deadline = time.time() + 60
        while True:
            try:
                if httpx.get(api + "/readyz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.time() > deadline:
                raise RuntimeError("cloud not ready")
            time.sleep(0.1)
        ctx = mp.get_context("spawn")
        q = ctx.Queue()
        loader = ctx.Process(
            target=load,
            args=(broker.port, rate / READINGS_PER_MESSAGE, args.duration, args.devices, q),
        )
        loader.start()
        time.sleep(1.0)  # the load is running before the first probe
        samples = probe(broker.port, api, args.duration - 2)
        loaded = q.get(timeout=120)
        loader.join(30)
    finally:
        cloud.send_signal(signal.SIGTERM)
        try:
            cloud.wait(30)
        except subprocess.TimeoutExpired:
            cloud.kill()
        broker.stop()
        shutil.rmtree(work, ignore_errors=True)
    samples.sort()

    def pct(p: float) -> float:
        return round(samples[min(len(samples) - 1, int(p * len(samples)))] * 1000, 1)

    result = {
        "benchmark": "ingest_latency",
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "load_readings_per_s": round(rate),
        "load_achieved_readings_per_s": round(
            loaded["published"] * READINGS_PER_MESSAGE / loaded["seconds"]
        ),
        "sustained_readings_per_s_from": str(tp.relative_to(ROOT)) if sustained else None,
        "samples": len(samples),
        "latency_ms": {
            "p50": pct(0.50),
            "p90": pct(0.90),
            "p99": pct(0.99),
            "max": round(samples[-1] * 1000, 1),
            "mean": round(statistics.fmean(samples) * 1000, 1),
        },
        "target_p99_ms": 1000,
        "met": pct(0.99) < 1000,
    }
    write_result(result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
