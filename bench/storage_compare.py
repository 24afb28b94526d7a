"""The embedded store and InfluxDB 1.x side by side, in one run, on the same data.

Issue 5's storage benchmark: 1,000 devices x 5 metrics x 1,000 timestamps (5 million
readings) written in 5,000-reading batches (one batch = one timestamp of the fleet), then
"one metric of one device over 1 hour in 1-minute buckets (mean)" asked for random devices,
metrics and windows. Targets: the embedded store writes at least as fast as InfluxDB 1.x
and answers that query at least as fast.

Every write is durable when it returns: the embedded store fsyncs each batch (its default,
``synchronous: full``); InfluxDB fsyncs its WAL per write request (``wal-fsync-delay 0s``,
its default). InfluxDB is Debian's influxd, started on a free port with a temporary config
(tests/support/influxdb.py) and stopped at the end.

Figures for InfluxDB, both reported:
* ``through_backend``: our InfluxDB backend (line protocol encoded in Python, api v1);
* ``server_only``: pre-encoded bodies POSTed to /write, the server's own rate.

    python bench/storage_compare.py [--quick] [--out bench/results/storage_compare.json]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import urllib3  # noqa: E402

from millstream_cloud.model import Reading  # noqa: E402
from millstream_cloud.settings import EmbeddedSettings, InfluxDBSettings  # noqa: E402
from millstream_cloud.storage.base import (  # noqa: E402
    TELEMETRY,
    SeriesQuery,
    Storage,
    readings_to_points,
)
from millstream_cloud.storage.embedded import EmbeddedStorage  # noqa: E402
from millstream_cloud.storage.influxdb import InfluxDBStorage, line_protocol_batches  # noqa: E402
from tests.support.influxdb import influxdb_available, influxdb_server  # noqa: E402

S = 1_000_000_000
METRICS = ["temp", "rpm", "vibration", "pressure", "current"]


def make_batches(devices: int, timestamps: int, step_s: int, t0: int) -> list[list[Reading]]:
    rnd = random.Random(42)
    names = [f"dev-{i:05d}" for i in range(devices)]
    kinds = [("press", "plant-a"), ("lathe", "plant-b")]
    batches = []
    for k in range(timestamps):
        t = t0 + k * step_s * S
        batches.append(
            [
                Reading(d, kinds[i % 2][1], m, t, round(rnd.gauss(50.0, 10.0), 3))
                for i, d in enumerate(names)
                for m in METRICS
            ]
        )
    return batches


def percentile(values: list[float], p: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, round(p / 100 * (len(values) - 1)))]


def write_all(store: Storage, batches: list[list[Reading]]) -> dict[str, float]:
    lat = []
    t_start = time.perf_counter()
    for b in batches:
        t = time.perf_counter()
        store.write_readings(b)
        lat.append(time.perf_counter() - t)
    elapsed = time.perf_counter() - t_start
    n = sum(len(b) for b in batches)
    return {
        "points": n,
        "seconds": round(elapsed, 3),
        "points_per_s": round(n / elapsed),
        "batch_p50_ms": round(percentile(lat, 50) * 1e3, 2),
        "batch_p99_ms": round(percentile(lat, 99) * 1e3, 2),
    }


def query_all(
    store: Storage, devices: int, t0: int, span_s: int, n: int, seed: int = 7
) -> dict[str, float]:
    rnd = random.Random(seed)
    lat = []
    buckets = []
    for i in range(n + 20):
        device = f"dev-{rnd.randrange(devices):05d}"
        metric = rnd.choice(METRICS)
        start = t0 + rnd.randrange(0, max(1, span_s - 3600)) * S
        q = SeriesQuery(TELEMETRY, [metric], {"device": device}, start, start + 3600 * S,
                        60 * S, "mean")  # fmt: skip
        t = time.perf_counter()
        out = store.query(q)
        dt = time.perf_counter() - t
        if i >= 20:  # warm-up excluded
            lat.append(dt)
            buckets.append(len(out[0].points) if out else 0)
    return {
        "queries": n,
        "p50_ms": round(percentile(lat, 50) * 1e3, 3),
        "p99_ms": round(percentile(lat, 99) * 1e3, 3),
        "mean_ms": round(statistics.fmean(lat) * 1e3, 3),
        "buckets_per_answer": round(statistics.fmean(buckets), 1),
    }


def bench_embedded(batches: list[list[Reading]], args: argparse.Namespace, t0: int, span: int,
                   work: Path) -> dict[str, Any]:  # fmt: skip
    settings = EmbeddedSettings()
    store = EmbeddedStorage(work / "embedded", settings)
    try:
        write = write_all(store, batches)
        print(f"embedded  write: {write['points_per_s']:>9,} points/s  ({write['seconds']} s)")
        t = time.perf_counter()
        store.flush()
        compact_s = time.perf_counter() - t
        print(f"embedded  compaction backlog after the last write: {compact_s:.2f} s")
        q = query_all(store, args.devices, t0, span, args.queries)
        print(f"embedded  1h/1m mean: p50 {q['p50_ms']} ms, p99 {q['p99_ms']} ms")
        size = sum(f.stat().st_size for f in (work / "embedded").iterdir())
    finally:
        store.close()
    return {
        "write": write,
        "compaction_backlog_s": round(compact_s, 2),
        "compactions": store.compactions,
        "query_1h_1m_mean": q,
        "disk_bytes": size,
        "settings": settings.model_dump(),
    }


def bench_influxdb(batches: list[list[Reading]], args: argparse.Namespace, t0: int, span: int,
                   work: Path) -> dict[str, Any]:  # fmt: skip
    server = influxdb_server(work / "influxdb").start()
    try:
        settings = InfluxDBSettings(url=server.url, api="v1", database="bench",
                                    spool_dir=str(work / "spool"), timeout_s=60)  # fmt: skip
        store = InfluxDBStorage(settings)
        try:
            write = write_all(store, batches)
            assert store.spooled_points == 0 and store.rejected_points == 0
            print(f"influxdb  write through the backend: {write['points_per_s']:>9,} points/s")
            q = query_all(store, args.devices, t0, span, args.queries)
            print(f"influxdb  1h/1m mean: p50 {q['p50_ms']} ms, p99 {q['p99_ms']} ms")
        finally:
            store.close()
        # the server alone: bodies encoded beforehand, one POST per 5,000-point batch
        bodies = [b for batch in batches for b in line_protocol_batches(readings_to_points(batch, {}), args.batch)]  # fmt: skip
        http = urllib3.PoolManager(timeout=60, retries=False)
        http.request("POST", f"{server.url}/query", fields={"q": "CREATE DATABASE bench2"})
        t = time.perf_counter()
        for body, _ in bodies:
            r = http.request("POST", f"{server.url}/write?db=bench2", body=body)
            assert r.status == 204, r.data
        elapsed = time.perf_counter() - t
        n = sum(k for _, k in bodies)
        raw = {"points": n, "seconds": round(elapsed, 3), "points_per_s": round(n / elapsed)}
        print(f"influxdb  write, server only:         {raw['points_per_s']:>9,} points/s")
        size = sum(f.stat().st_size for f in (work / "influxdb").rglob("*") if f.is_file())
    finally:
        server.stop()
    return {
        "write_through_backend": write,
        "write_server_only": raw,
        "query_1h_1m_mean": q,
        "disk_bytes_both_databases": size,
        "version": "Debian influxdb 1.6.7 (influxd version)",
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--devices", type=int, default=1000)
    ap.add_argument("--timestamps", type=int, default=1000)
    ap.add_argument("--step-s", type=int, default=10, help="seconds between timestamps")
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--batch", type=int, default=5000, help="points per InfluxDB request")
    ap.add_argument("--quick", action="store_true", help="1,000 devices x 100 timestamps")
    ap.add_argument("--skip-influxdb", action="store_true")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "storage_compare.json"))
    args = ap.parse_args()
    if args.quick:
        args.timestamps, args.queries = 100, 300
    span = args.timestamps * args.step_s
    # recent data, so that nothing is near retention; an hour boundary to start
    t0 = (time.time_ns() - (span + 3600) * S) // (3600 * S) * 3600 * S
    print(f"generating {args.devices} devices x {len(METRICS)} metrics x {args.timestamps} "
          f"timestamps ({args.devices * len(METRICS) * args.timestamps:,} readings)")  # fmt: skip
    batches = make_batches(args.devices, args.timestamps, args.step_s, t0)
    # the harness's millions of Reading objects must not make the stores pay for full
    # garbage collections (both stores would see multi-millisecond pauses in p99)
    gc.collect()
    gc.freeze()
    work = Path(tempfile.mkdtemp(prefix="storage-bench-"))
    result: dict[str, Any] = {
        "benchmark": "storage_compare",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
            "loadavg_at_start": [round(x, 2) for x in os.getloadavg()],
        },
        "data": {
            "devices": args.devices,
            "metrics": len(METRICS),
            "timestamps": args.timestamps,
            "step_s": args.step_s,
            "readings": sum(len(b) for b in batches),
            "batch_readings": len(batches[0]),
        },
        "query": "one metric of one device, 1 hour, 1-minute buckets, mean; random windows",
    }
    try:
        result["embedded"] = bench_embedded(batches, args, t0, span, work)
        if not args.skip_influxdb:
            if not influxdb_available():
                print("influxd not installed: InfluxDB skipped")
            else:
                result["influxdb"] = bench_influxdb(batches, args, t0, span, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result["machine"]["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    if "influxdb" in result:
        e, i = result["embedded"], result["influxdb"]
        result["verdict"] = {
            "write_ratio_vs_influxdb_server_only": round(
                e["write"]["points_per_s"] / i["write_server_only"]["points_per_s"], 2
            ),
            "query_p50_ratio_influxdb_over_embedded": round(
                i["query_1h_1m_mean"]["p50_ms"] / e["query_1h_1m_mean"]["p50_ms"], 1
            ),
            "write_target_met": e["write"]["points_per_s"]
            >= max(
                i["write_server_only"]["points_per_s"], i["write_through_backend"]["points_per_s"]
            ),
            "query_target_met": e["query_1h_1m_mean"]["p50_ms"] <= i["query_1h_1m_mean"]["p50_ms"],
        }
        print(json.dumps(result["verdict"], indent=2))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
