"""Replay of a one-hour backlog: 36,000 readings (10 metrics at 1 Hz) after an outage.

The agent's on-disk queue is filled with an hour of simulated readings (timestamps over
the last hour, as if the broker had been away that long), then the broker is up and the
agent starts with the sample configuration (queue.replay_rate 5000 readings/s, fsync
full) while its collector keeps producing live readings. A subscriber checks that the
backlog arrives complete and in order, and that live readings follow without a gap.
Target (issue 4): drained in <= 30 s, in order, live continues.

    python bench/agent_replay.py
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench._common import sample_config  # noqa: E402
from millstream_agent import protocol  # noqa: E402
from millstream_agent.collectors import collector_class  # noqa: E402
from millstream_agent.queue import SqliteQueue  # noqa: E402
from tests.support.servers import mosquitto_server  # noqa: E402

BACKLOG_SECONDS = 3600
METRICS = 10


def prefill(path: Path, end: float) -> int:
    queue = SqliteQueue(str(path), fsync="normal")
    collector = collector_class("simulated")(
        "machine", {"kind": "motor", "metrics": METRICS, "seed": 1}
    )
    n = 0
    for i in range(BACKLOG_SECONDS):
        ts = end - BACKLOG_SECONDS + i
        texts = protocol.readings_json(collector.collect(ts))
        queue.append(texts, now=ts)
        n += len(texts)
    queue.close()
    return n


def main() -> int:
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument(
        "--replay-rate",
        type=int,
        default=None,
        help="override queue.replay_rate (readings/s, 0 = unlimited); default: sample config",
    )
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="agent-replay-"))
    broker = mosquitto_server(work / "mosquitto").start()
    url = f"mqtt://127.0.0.1:{broker.port}"
    cut = time.time()
    backlog = prefill(work / "queue.db", cut)

    lock = threading.Lock()
    received: list[tuple[float, dict]] = []

    def on_message(client, userdata, msg):  # type: ignore[no-untyped-def]
        if msg.topic.endswith("/telemetry"):
            with lock:
                received.append((time.monotonic(), json.loads(msg.payload)))

    sub = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="bench-replay-sub")
    sub.on_message = on_message
    sub.max_inflight_messages_set(1000)
    sub.connect("127.0.0.1", broker.port)
    sub.subscribe("millstream/v1/+/+/telemetry", qos=1)
    sub.loop_start()
    time.sleep(0.5)

    sample = sample_config(url, work / "queue.db")
    if args.replay_rate is not None:
        sample = sample.replace("replay_rate: 5000", f"replay_rate: {args.replay_rate}")
    (work / "agent.yaml").write_text(sample)
    log = open(work / "agent.log", "wb")  # noqa: SIM115
    started = time.monotonic()
    agent = subprocess.Popen(
        [sys.executable, "-m", "millstream_agent.cli", "run", "-c", str(work / "agent.yaml")],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:

        def backlog_done() -> int:
            with lock:
                return sum(
                    1
                    for _, m in received
                    for r in m["readings"]
                    if r["ts"] < protocol.format_ts(cut) and not r["metric"].startswith("agent.")
                )

        deadline = started + 120
        while backlog_done() < backlog and time.monotonic() < deadline:
            time.sleep(0.05)
        drained_at = time.monotonic()
        time.sleep(5.0)  # live readings keep flowing after the backlog
    finally:
        agent.terminate()
        agent.wait(timeout=20)
        sub.loop_stop()
        broker.stop()

    with lock:
        messages = [m for _, m in received]
        first_at = received[0][0] if received else started
    seqs = []
    seen = set()
    for m in messages:
        if m["seq"] not in seen:
            seen.add(m["seq"])
            seqs.append(m["seq"])
    in_order = seqs == sorted(seqs) and seqs == list(range(seqs[0], seqs[0] + len(seqs)))
    readings = [r for m in messages for r in m["readings"] if not r["metric"].startswith("agent.")]
    stamps = [r["ts"] for r in readings]
    live = [r for r in readings if r["ts"] >= protocol.format_ts(cut)]
    got_backlog = len(readings) - len(live)
    result = {
        "benchmark": "agent_replay",
        "command": "python bench/agent_replay.py"
        + (f" --replay-rate {args.replay_rate}" if args.replay_rate is not None else ""),
        "replay_rate": 5000 if args.replay_rate is None else args.replay_rate,
        "backlog_readings": backlog,
        "backlog_received": got_backlog,
        "drain_seconds_from_first_message": round(drained_at - first_at, 2),
        "drain_seconds_from_agent_start": round(drained_at - started, 2),
        "readings_per_second": round(backlog / max(1e-9, drained_at - first_at)),
        "messages": len(seqs),
        "in_order": in_order and stamps == sorted(stamps),
        "live_readings_received": len(live),
        "target_seconds": 30,
    }
    result["pass"] = (
        got_backlog == backlog
        and result["in_order"]
        and result["drain_seconds_from_agent_start"] <= 30
        and len(live) > 0
    )
    name = "agent_replay" if args.replay_rate is None else f"agent_replay_rate{args.replay_rate}"
    out = ROOT / "bench" / "results" / f"{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0 if result["pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
