#!/usr/bin/env python3
"""`make demo`: a broker, the cloud service and a simulated fleet, on embedded defaults.

Starts Mosquitto on a free loopback port (a temp config that raises the in-flight
window), `millstream-cloud serve` on 127.0.0.1:PORT with its data in var/demo/, and
`millstream-agent simulate` for the fleet, which first sends 12 hours of its healthy past
(`--history`) so the detectors have learned each machine before the first injected fault.
Prints the URLs, then a one-line summary every few seconds. Stops everything cleanly after --duration seconds of serving (0: until
Ctrl-C) and leaves no process behind.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
VAR = ROOT / "var" / "demo"

MOSQUITTO_CONF = """\
listener {port} 127.0.0.1
allow_anonymous true
persistence false
# The cloud acknowledges in groups after storing; Mosquitto's default of 20 in-flight
# QoS 1 messages per client would throttle it (docs/cloud.md).
max_inflight_messages 1000
max_queued_messages 100000
log_dest file {log}
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_in_use(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def find_mosquitto() -> str | None:
    return shutil.which("mosquitto") or next(
        (p for p in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto") if Path(p).exists()), None
    )


EMBEDDED_LIMITS = """\
demo: Mosquitto is not installed, so the demo runs an embedded in-process MQTT broker
      (amqtt). Its limits: MQTT 3.1.1 only (no shared subscriptions, so one cloud worker),
      no TLS or ACLs, nothing persisted across restarts, and roughly 800 QoS 1 messages/s
      on these machines: enough for the demo fleet, not for production or benchmarks.
      Install Mosquitto (apt-get install mosquitto) for the real thing."""


def embedded_broker_available() -> bool:
    try:
        import amqtt.broker  # noqa: F401
    except ImportError:
        return False
    return True


def start_embedded_broker(port: int) -> None:
    """Run an amqtt broker on a daemon thread of this process (it dies with the demo)."""
    import asyncio
    import threading

    from amqtt.broker import Broker

    config = {
        "listeners": {"default": {"type": "tcp", "bind": f"127.0.0.1:{port}"}},
        "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
    }
    loop = asyncio.new_event_loop()
    started = threading.Event()

    def run() -> None:
        asyncio.set_event_loop(loop)
        broker = Broker(config, loop=loop)
        loop.run_until_complete(broker.start())
        started.set()
        loop.run_forever()

    threading.Thread(target=run, name="embedded-broker", daemon=True).start()
    if not started.wait(15) or not port_in_use(port):
        raise RuntimeError("the embedded broker did not start")


DEMO_CLOUD_CONFIG = """\
# Settings of the demo's cloud service (everything else: documented defaults).
detection:
  engine:
    # Start judging after 2 minutes of data instead of 12, so the demo's injected
    # faults are scored within its first minutes (docs/detection.md).
    warmup: 120
    streaming:
      # Learn from every reading (1 Hz here), not one value per 10 s: the demo runs for
      # minutes, not the days the 10-s intervals are for.
      resolution_s: 0
"""


# ... with the fleet's past sent first (the default): the live defaults.
DEMO_CLOUD_CONFIG_WITH_HISTORY = """\
# Settings of the demo's cloud service: the documented defaults. The fleet sends its past
# first (12 hours by default), so each machine's device model is trained before the first
# fault, as on a plant where the cloud has run for a day (docs/detection.md).
detection:
  engine: {}
"""

# The fleet's past, sent first (`simulate --history`): 12 h at one reading every 10 s, at
# most HISTORY_RATE readings a second; the device models train on 12 h of rows.
HISTORY_STEP_S = 10.0
HISTORY_RATE = 4000.0
# With the past: faults the device models find in minutes (a stuck sensor, a level shift,
# an overheating); without: those the young per-metric detectors catch.
FAULT_TYPES = {True: "stuck,shift,overheat", False: "stuck,spike"}
# A device model trains on 12 h of rows (mv_train_rows 4320 at 10 s): a shorter past
# leaves the per-metric detectors in charge, and the faults for them.
DEVICE_MODEL_AFTER_S = 12 * 3600


def write_cloud_config(var: Path, history: bool) -> Path:
    path = var / "cloud.yaml"
    path.write_text(DEMO_CLOUD_CONFIG_WITH_HISTORY if history else DEMO_CLOUD_CONFIG)
    return path


def seconds(text: str, flag: str) -> float:
    """A duration flag in seconds (``12h``, ``90m``, ``0``); ValueError naming ``flag``."""
    from millstream_agent.collectors._options import parse_duration

    return parse_duration(text, flag)


def first_fault_after(history_s: float, devices: int) -> str:
    """Quiet time before the first live fault: detection judges after its warm-up (2
    minutes without a past), and with one the fleet's past must be sent and scored first
    (3,000-4,000 readings a second on these 2-core machines), plus 2 minutes."""
    if history_s <= 0:
        return "150s"
    readings = devices * 10 * history_s / HISTORY_STEP_S
    return f"{150 + 1.5 * readings / HISTORY_RATE:.0f}s"


# About how long after its onset a fault is found in the demo (the device model's median
# delays are 4-5 minutes: bench/detection_demo.py, docs/detection.md).
FOUND_WITHIN_S = 300


def duration_note(duration_s: float, first_fault_s: float) -> str:
    """What to tell a user whose ``--duration`` stops the demo before it can show a fault
    found ("" when it can, or when it runs until Ctrl-C): a 5-minute demo with its past
    ended before its first fault and printed "no fault injected yet", which read as a
    demo that does nothing."""
    if not duration_s or duration_s >= first_fault_s + FOUND_WITHIN_S:
        return ""
    enough = math.ceil((first_fault_s + FOUND_WITHIN_S) / 60) * 60
    if duration_s <= first_fault_s:
        what = f"ends before the first fault is injected (at {first_fault_s:.0f} s)"
    else:
        what = (
            f"stops {duration_s - first_fault_s:.0f} s after the first fault is injected"
            f" (at {first_fault_s:.0f} s), before most can be found"
        )
    return (
        f"demo: DURATION={duration_s:g} {what}; DURATION={enough} or more shows faults"
        " found (0: until Ctrl-C)"
    )


def http_json(url: str, timeout: float = 2.0) -> object:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return json.loads(resp.read())


def http_text(url: str, timeout: float = 2.0) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return str(resp.read().decode())


def metric_sum(text: str, name: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and not line.startswith("#"):
            m = re.match(rf"^{re.escape(name)}(\{{[^}}]*\}})?\s+(\S+)$", line)
            if m:
                total += float(m.group(2))
    return total


class Stack:
    def __init__(self) -> None:
        self.procs: list[tuple[str, subprocess.Popen[bytes]]] = []

    def start(self, name: str, argv: list[str], log: Path, **kw: object) -> subprocess.Popen[bytes]:
        out = open(log, "ab")  # noqa: SIM115 - kept open by the child
        proc = subprocess.Popen(
            argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, **kw
        )  # type: ignore[call-overload]
        out.close()
        self.procs.append((name, proc))
        return proc

    def stop(self) -> None:
        # Reverse order: agents first (they flush and say goodbye), then cloud, then broker.
        for name, proc in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    print(f"demo: {name} did not stop in 20 s; killing it", file=sys.stderr)
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
        self.procs.clear()


def wait_http(url: str, proc: subprocess.Popen[bytes], timeout: float, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(
                f"exited with {proc.returncode}; see {log}:\n{log.read_text()[-2000:]}"
            )
        try:
            http_json(url, timeout=1)
            return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"{url} did not answer in {timeout:.0f} s; see {log}")


def summary(api: str, last: tuple[float, float] | None) -> tuple[str, tuple[float, float]]:
    devices = http_json(f"{api}/api/v1/devices?limit=100000")
    assert isinstance(devices, dict)
    online = sum(1 for d in devices["devices"] if d["online"])
    metrics = http_text(f"{api}/metrics")
    stored = metric_sum(metrics, "millstream_ingest_readings_stored_total")
    rejected = metric_sum(metrics, "millstream_ingest_rejected_messages_total")
    anomalies = metric_sum(metrics, "millstream_anomalies_total")
    alerts = metric_sum(metrics, "millstream_alerts_firing")
    judged = sum(
        metric_sum(metrics, f"millstream_detection_{n}_readings_total")
        for n in ("scored", "skipped", "failed")
    )
    now = time.monotonic()
    rate = (stored - last[1]) / (now - last[0]) if last and now > last[0] else 0.0
    line = (
        f"{time.strftime('%H:%M:%S')}  devices online {online}/{len(devices['devices'])}  "
        f"readings stored {int(stored):,}  {rate:,.0f}/s  rejected {int(rejected)}  "
        f"anomalies {int(anomalies)}  alerts firing {int(alerts)}"
    )
    return line + detection_note(stored, judged), (now, stored)


LEARNING_NOTE_OVER = 1000  # readings stored and not yet judged, before the line says so


def detection_note(stored: float, judged: float) -> str:
    """The summary line's note while the fleet's past is still being learned: how many
    stored readings the detectors have not judged yet (none when they keep up)."""
    behind = int(stored - judged)
    return (
        f"  detection learning ({behind:,} readings behind)" if behind > LEARNING_NOTE_OVER else ""
    )


JUDGED_AFTER_S = 10.0  # a fault younger than this may not have reached the detectors


def report(api: str, faults_path: Path, history: bool) -> list[str]:
    """What detection found, against the faults the fleet injected (its ground truth)."""
    # Imported here: the detection package (NumPy, scikit-learn) is slow to import, and
    # the demo's first lines should not wait for it.
    from millstream_cloud.detection.eval import groundtruth

    rows = http_json(f"{api}/api/v1/anomalies?limit=10000", timeout=10.0)
    assert isinstance(rows, dict)
    raised = groundtruth.from_api(rows["anomalies"])
    result = groundtruth.compare(
        groundtruth.read_faults(faults_path),
        raised,
        judged_before_s=time.time() - JUDGED_AFTER_S,
        settle_s=groundtruth.SETTLE_S,
    )
    lines = groundtruth.summary_lines(result, len(raised), history=history)
    if rows["anomalies"]:
        lines.append("latest anomalies:")
    for r in rows["anomalies"][:5]:  # newest first
        where = f"{r['device']} {r['metric'] or '(device)'}"
        lines.append(f"  {r['time'][11:19]}  {where}: {r['explanation']}")
    return lines


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--devices", type=int, default=int(os.environ.get("DEVICES", 10)))
    ap.add_argument("--duration", type=float, default=float(os.environ.get("DURATION", 0)))
    ap.add_argument("--port", type=int, default=int(os.environ.get("PORT", 8000)))
    ap.add_argument("--interval", type=float, default=5.0, help="seconds between summary lines")
    ap.add_argument(
        "--fault-rate",
        type=float,
        default=20.0,
        help="injected faults per device per hour (after --fault-start-after); 0: none",
    )
    ap.add_argument(
        "--fault-types",
        default=None,
        help="fault types to inject, comma-separated (default: stuck,shift,overheat with "
        "--history, stuck,spike without; docs/detection.md says which detector finds which)",
    )
    ap.add_argument(
        "--fault-start-after",
        default=None,
        help="quiet time before the first fault (default: once the fleet's past is learned, "
        "150 s without one)",
    )
    ap.add_argument(
        "--embedded-broker",
        action="store_true",
        help="use the in-process broker (amqtt) even when Mosquitto is installed",
    )
    ap.add_argument(
        "--history",
        default=os.environ.get("HISTORY", "12h"),
        help="each machine first sends this much of its healthy past, back-dated, so the "
        "detectors have learned the fleet before its first fault (default 12h; 0: none)",
    )
    ap.add_argument("--workdir", type=Path, default=VAR, help="state and logs (cleared first)")
    args = ap.parse_args()
    var = args.workdir
    try:
        history_s = seconds(args.history, "--history")
    except ValueError as exc:
        print(f"demo: {exc}", file=sys.stderr)
        return 2
    with_history = history_s > 0
    fault_types = args.fault_types or FAULT_TYPES[history_s >= DEVICE_MODEL_AFTER_S]
    fault_start_after = args.fault_start_after or first_fault_after(history_s, args.devices)
    try:
        first_fault_s = seconds(fault_start_after, "--fault-start-after")
    except ValueError as exc:
        print(f"demo: {exc}", file=sys.stderr)
        return 2

    if port_in_use(args.port):
        print(f"demo: port {args.port} is in use; run `make demo PORT=8001`", file=sys.stderr)
        return 2
    mosquitto = None if args.embedded_broker else find_mosquitto()
    if mosquitto is None and not embedded_broker_available():
        print(
            "demo: Mosquitto is not installed and the embedded broker (amqtt) is not either. "
            "`make demo` installs Mosquitto when run as root; otherwise run "
            "`sudo apt-get install mosquitto`, or `pip install amqtt` for the embedded mode.",
            file=sys.stderr,
        )
        return 2

    shutil.rmtree(var, ignore_errors=True)
    var.mkdir(parents=True)
    stack = Stack()
    stopping = {"signal": False}

    def on_signal(signum: int, frame: object) -> None:
        stopping["signal"] = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    try:
        broker_port = free_port()
        broker_url = f"mqtt://127.0.0.1:{broker_port}"
        env = {**os.environ, "MILLSTREAM_DEMO": "1"}
        if mosquitto is not None:
            conf = var / "mosquitto.conf"
            conf.write_text(MOSQUITTO_CONF.format(port=broker_port, log=var / "mosquitto.log"))
            broker = stack.start("mosquitto", [mosquitto, "-c", str(conf)], var / "mosquitto.out")
            deadline = time.monotonic() + 10
            while not port_in_use(broker_port):
                if broker.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"mosquitto did not start; see {var / 'mosquitto.log'}")
                time.sleep(0.1)
            broker_name = "Mosquitto"
        else:
            start_embedded_broker(broker_port)
            # amqtt speaks MQTT 3.1.1 only: no shared subscriptions, no session expiry.
            env["MILLSTREAM_MQTT__PROTOCOL"] = "3.1.1"
            env["MILLSTREAM_MQTT__SHARED_GROUP"] = ""
            broker_name = "embedded broker"
            print(EMBEDDED_LIMITS, flush=True)

        api = f"http://127.0.0.1:{args.port}"
        cloud_log = var / "cloud.log"
        if os.environ.get("WEBHOOK"):
            env["MILLSTREAM_ALERTS__WEBHOOK"] = os.environ["WEBHOOK"]
        cloud = stack.start(
            "cloud",
            [
                str(BIN / "millstream-cloud"),
                "serve",
                "--broker",
                broker_url,
                "--port",
                str(args.port),
                "--data-dir",
                str(var / "cloud"),
                "--config",
                str(write_cloud_config(var, with_history)),
            ],
            cloud_log,
            env=env,
        )
        wait_http(f"{api}/healthz", cloud, 60, cloud_log)
        fleet_log = var / "agents.log"
        stack.start(
            "agents",
            [
                str(BIN / "millstream-agent"),
                "simulate",
                "--devices",
                str(args.devices),
                "--rate",
                "1",
                "--metrics",
                "10",
                "--broker",
                broker_url,
                "--site",
                "demo-plant",
                "--queue-dir",
                str(var / "agents"),
                # Faults come sooner than in a real plant, so the demo has something to show:
                # the first ones once detection has learned the fleet (its past, or its
                # warm-up without one), of the types the detectors then in charge catch in
                # minutes (FAULT_TYPES: a 1-sigma drift takes an hour).
                "--fault-rate",
                str(args.fault_rate),
                "--fault-types",
                fault_types,
                "--fault-start-after",
                fault_start_after,
                "--ground-truth",
                str(var / "faults.jsonl"),
                "--history",
                f"{history_s:g}",
                "--history-step",
                f"{HISTORY_STEP_S:g}",
                "--history-rate",
                f"{HISTORY_RATE:g}",
            ],
            fleet_log,
        )
        print(
            f"Millstream demo: {args.devices} simulated machines -> {broker_name} {broker_url} -> cloud"
        )
        print(f"  API          {api}/api/v1/devices")
        print(f"  API docs     {api}/docs")
        print(f"  metrics      {api}/metrics")
        print(
            f"  Grafana      point an InfluxDB datasource (InfluxQL, database millstream) at {api}"
        )
        if with_history:
            readings = int(args.devices * 10 * history_s / HISTORY_STEP_S)
            print(
                f"  history      each machine first sends {history_s / 3600:g} h of its healthy"
                f" past ({readings:,} readings, about {readings / HISTORY_RATE:.0f} s), so"
                " detection has learned the fleet before its first fault"
            )
        print(
            f"  faults       {fault_types} from {fault_start_after} on, listed in"
            f" {var / 'faults.jsonl'}"
        )
        print(
            f"  alerts       {api}/api/v1/alerts (also written to {var / 'cloud' / 'alerts.log'})"
        )
        print(f"  logs         {var}/")
        print(
            "  stop         Ctrl-C"
            + (f" (or after {args.duration:.0f} s)" if args.duration else "")
        )
        note = duration_note(args.duration, first_fault_s)
        if note:
            print(note)
        sys.stdout.flush()
        started = time.monotonic()
        last: tuple[float, float] | None = None
        next_line = started + min(args.interval, 2.0)
        while not stopping["signal"]:
            now = time.monotonic()
            if args.duration and now - started >= args.duration:
                break
            for name, proc in stack.procs:
                if proc.poll() is not None:
                    raise RuntimeError(f"{name} exited unexpectedly ({proc.returncode}); see {var}")
            if now >= next_line:
                try:
                    line, last = summary(api, last)
                    print(line, flush=True)
                except OSError as exc:
                    print(f"{time.strftime('%H:%M:%S')}  (API not answering: {exc})", flush=True)
                next_line = now + args.interval
            time.sleep(0.2)
        try:
            lines = report(api, var / "faults.jsonl", with_history)
            print(f"demo: what detection found (faults injected: {var / 'faults.jsonl'})")
            print("\n".join(f"  {line}" for line in lines), flush=True)
        except OSError as exc:
            print(f"demo: no report (API not answering: {exc})", flush=True)
        print("demo: stopping ...", flush=True)
        return 0
    except RuntimeError as exc:
        print(f"demo: {exc}", file=sys.stderr)
        return 1
    finally:
        stack.stop()
        print("demo: stopped; nothing left running.", flush=True)


if __name__ == "__main__":
    sys.exit(main())
