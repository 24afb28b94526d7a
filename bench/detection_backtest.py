"""Cost of a backtest (``POST /api/v1/devices/{id}/detection/backtest``) on stored history.

Stores three days of one simulated device (4 metrics, one reading every 10 s, one
injected fault) in an embedded store, then backtests all of it with the default
settings: reading the span back from the store plus replaying it through a fresh engine,
the per-device model training after 12 h as it does live. Reports wall seconds and
microseconds per reading, read and replay apart. Writes bench/results/detection_backtest.json.
Run from the repository root.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from _common import write_result

from millstream_cloud.detection import backtest as bt
from millstream_cloud.detection.engine import EngineSettings
from millstream_cloud.detection.eval.sim import SimConfig, simulate
from millstream_cloud.settings import EmbeddedSettings
from millstream_cloud.storage.embedded import EmbeddedStorage

ROOT = Path(__file__).resolve().parents[1]
HOURS = 72.0

if __name__ == "__main__":
    fleet = simulate(SimConfig(seed=0, devices=1, hours=HOURS, faults=("drift",)))
    device = fleet.faults[0].device
    with tempfile.TemporaryDirectory() as tmp:
        store = EmbeddedStorage(Path(tmp) / "store", EmbeddedSettings())
        for batch in fleet.batches(every=60):
            store.write_readings(batch)
        start, end = int(fleet.times_ns[0]), int(fleet.times_ns[-1]) + 1
        t0 = time.perf_counter()
        readings = bt.stored_readings(store, device, "sim", start, end, 10_000_000)
        read_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        raised = bt.replay(readings, EngineSettings(), (), lambda _d: None)
        replay_s = time.perf_counter() - t0
        req = bt.BacktestRequest(
            device, "sim", None, start, end, start, EngineSettings(), (), 600 * 10**9, 10**7
        )
        t0 = time.perf_counter()
        answer = bt.backtest(store, req)
        total_s = time.perf_counter() - t0
        store.close()
    n = len(readings)
    result = {
        "hours": HOURS,
        "metrics": len({r.metric for r in readings}),
        "readings": n,
        "read_s": round(read_s, 2),
        "replay_s": round(replay_s, 2),
        "backtest_s": round(total_s, 2),
        "us_per_reading": round(1e6 * total_s / n, 1),
        "anomalies": len(raised),
        "answer_anomalies": len(answer["anomalies"]),
    }
    print(
        f"{n:,} readings ({HOURS:.0f} h, {result['metrics']} metrics at 10 s): read {read_s:.2f} s, "
        f"replay {replay_s:.2f} s, whole backtest {total_s:.2f} s = "
        f"{result['us_per_reading']} us/reading; {len(raised)} anomalies"
    )
    write_result(result, ROOT / "bench" / "results" / "detection_backtest.json")
