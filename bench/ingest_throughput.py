"""End-to-end ingest throughput through a real Mosquitto, beside the raw paho QoS 1 pipe.

Issue 5's ingest benchmark. In one run, through one broker with the project's config
(tests/support/servers.py: ``max_inflight_messages 1000``, persistence on):

* ``raw_pipe``: one paho-mqtt publisher process at QoS 1 -> Mosquitto -> one paho-mqtt
  subscriber process (QoS 1, auto-ack) that does nothing with the messages;
* ``ingest_1_worker`` / ``ingest_2_workers``: the same publisher -> Mosquitto ->
  ``millstream-cloud serve`` processes (shared subscription, persistent session, manual
  acks after the durable write, embedded store), same data dir for both workers.

Messages are telemetry batches of 40 readings (10 metrics x 4 timestamps), QoS 1, from
``--devices`` devices. Ingest readings/s = readings / (last stored - first published):
everything acknowledged to the broker only after the storage write returned.
A pipeline profile (decode, Reading construction, storage write, per message) is measured
in-process at the end.

    python bench/ingest_throughput.py [--messages 20000] [--quick]
        [--out bench/results/ingest_throughput.json]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402
import paho.mqtt.client as mqtt  # noqa: E402

from bench._common import write_result  # noqa: E402
from tests.support.servers import free_port, mosquitto_server  # noqa: E402

NS = 1_000_000_000
READINGS_PER_MESSAGE = 40


def _ts(t: int) -> str:
    secs, frac = divmod(t, NS)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(secs)) + f".{frac // 1_000_000:03d}Z"


def make_messages(
    n: int, devices: int, prefix: str = "millstream/v1/bench"
) -> list[tuple[str, bytes]]:
    """``n`` telemetry messages, round-robin over devices, seq growing per device."""
    t0 = time.time_ns() - 3 * 86400 * NS
    out = []
    for k in range(n):
        d, seq = k % devices, k // devices
        dev = f"dev-{d:04d}"
        t = t0 + seq * NS
        readings = [
            {"ts": _ts(t + (i // 10) * 250_000_000), "metric": f"metric_{i % 10}",
             "value": round(20.0 + (seq * 7 + i) % 97 * 0.37, 3)}
            for i in range(READINGS_PER_MESSAGE)
        ]  # fmt: skip
        body = {"v": 1, "device": dev, "seq": seq, "readings": readings}
        out.append((f"{prefix}/{dev}/telemetry", json.dumps(body, separators=(",", ":")).encode()))
    return out


def _client(client_id: str, port: int) -> mqtt.Client:
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
    c.max_inflight_messages_set(1000)
    c.max_queued_messages_set(0)
    c.connect("127.0.0.1", port)
    return c


def publisher(port: int, messages: list[tuple[str, bytes]], out: Any, client_id: str) -> None:
    c = _client(client_id, port)
    c.loop_start()
    t0 = time.time()
    infos = [c.publish(t, p, qos=1) for t, p in messages]
    for info in infos:
        info.wait_for_publish(120)
    t1 = time.time()
    c.disconnect()
    c.loop_stop()
    out.put({"start": t0, "end": t1, "published": len(infos)})


def raw_subscriber(port: int, expect: int, out: Any, ready: Any) -> None:
    state = {"n": 0, "first": 0.0, "last": 0.0}

    def on_message(client: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
        now = time.time()
        if state["n"] == 0:
            state["first"] = now
        state["n"] += 1
        state["last"] = now

    c = _client("raw-sub", port)
    c.on_message = on_message
    c.subscribe("raw/#", qos=1)
    c.loop_start()
    time.sleep(0.5)
    ready.set()
    deadline = time.time() + 300
    while state["n"] < expect and time.time() < deadline:
        time.sleep(0.02)
    c.disconnect()
    c.loop_stop()
    out.put(dict(state))


def run_raw(port: int, messages: list[tuple[str, bytes]]) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    q_sub, q_pub, ready = ctx.Queue(), ctx.Queue(), ctx.Event()
    raw = [("raw/" + t, p) for t, p in messages]
    sub = ctx.Process(target=raw_subscriber, args=(port, len(raw), q_sub, ready))
    sub.start()
    ready.wait(30)
    pub = ctx.Process(target=publisher, args=(port, raw, q_pub, "raw-pub"))
    pub.start()
    p = q_pub.get(timeout=300)
    s = q_sub.get(timeout=300)
    pub.join(10)
    sub.join(10)
    elapsed = s["last"] - p["start"]
    return {
        "messages": s["n"],
        "seconds": round(elapsed, 3),
        "messages_per_s": round(s["n"] / elapsed),
        "readings_per_s_equivalent": round(s["n"] * READINGS_PER_MESSAGE / elapsed),
        "publisher_messages_per_s": round(p["published"] / (p["end"] - p["start"])),
    }


def _stored(url: str) -> float:
    for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
        if line.startswith("millstream_ingest_readings_stored_total "):
            return float(line.split()[-1])
    return 0.0


def _metric(url: str, name: str) -> float:
    text = httpx.get(url + "/metrics", timeout=5).text
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(name + " ") or line.startswith(name + "{")
    )


def run_ingest(
    port: int,
    messages: list[tuple[str, bytes]],
    workers: int,
    work: Path,
    tag: str,
    detection: bool = True,
) -> dict[str, Any]:
    data = work / f"data-{tag}"
    procs, urls = [], []
    env = {
        **os.environ,
        "MILLSTREAM_MQTT__SHARED_GROUP": f"bench-{tag}",
        "MILLSTREAM_DETECTION__ENABLED": "true" if detection else "false",
    }
    for w in range(workers):
        if workers > 1:
            # The embedded store takes one writer process: each worker gets its own store,
            # the registry (sequence state, duplicates) stays shared in the data dir.
            env = {**env, "MILLSTREAM_STORAGE__EMBEDDED__PATH": str(data / f"embedded-{w}")}
        api = free_port()
        log = open(work / f"cloud-{tag}-{w}.log", "wb")  # noqa: SIM115
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "millstream_cloud.cli", "serve",
                 "--broker", f"mqtt://127.0.0.1:{port}", "--data-dir", str(data),
                 "--port", str(api), "--client-id", f"bench-{tag}-{w}"],
                stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
            )
        )  # fmt: skip
        urls.append(f"http://127.0.0.1:{api}")
    try:
        for url in urls:
            deadline = time.time() + 60
            while True:
                try:
                    if httpx.get(url + "/readyz", timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.time() > deadline:
                    raise RuntimeError(f"worker at {url} not ready")
                time.sleep(0.1)
        expect = len(messages) * READINGS_PER_MESSAGE
        ctx = mp.get_context("spawn")
        q_pub = ctx.Queue()
        pub = ctx.Process(target=publisher, args=(port, messages, q_pub, f"pub-{tag}"))
        pub.start()
        per_worker = [0.0] * workers
        done_at = None
        deadline = time.time() + 600
        while time.time() < deadline:
            per_worker = [_stored(u) for u in urls]
            if sum(per_worker) >= expect:
                done_at = time.time()
                break
            time.sleep(0.1)
        p = q_pub.get(timeout=300)
        pub.join(10)
        if done_at is None:
            raise RuntimeError(f"only {sum(per_worker)} of {expect} readings stored")
        elapsed = done_at - p["start"]
        caught_up_s = _detection_catch_up(urls) if detection else None
        scored = sum(_metric(u, "millstream_detection_scored_readings_total") for u in urls)
        skipped = sum(_metric(u, "millstream_detection_skipped_readings_total") for u in urls)
        deferred = sum(_metric(u, "millstream_detection_deferred_readings_total") for u in urls)
        return {
            "workers": workers,
            "detection": detection,
            "detection_scored_readings": int(scored),
            "detection_skipped_readings": int(skipped),
            # Set aside in the store while the detection queue was full, and read back
            # from it; seconds from the last reading stored until the detectors had
            # scored everything (None: detection off, or not within 600 s).
            "detection_deferred_readings": int(deferred),
            "detection_caught_up_s": caught_up_s,
            "messages": len(messages),
            "readings": int(sum(per_worker)),
            "readings_per_worker": [int(x) for x in per_worker],
            "seconds": round(elapsed, 3),
            "readings_per_s": round(sum(per_worker) / elapsed),
            "messages_per_s": round(len(messages) / elapsed),
            "publisher_messages_per_s": round(p["published"] / (p["end"] - p["start"])),
        }
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()


def _detection_catch_up(urls: list[str], timeout_s: float = 600.0) -> float | None:
    """Seconds until no worker has readings queued for or set aside from its detectors."""
    t0 = time.time()
    time.sleep(0.5)  # the last group's hook has run
    while time.time() - t0 < timeout_s:
        waiting = sum(
            _metric(u, "millstream_detection_queued_readings")
            + _metric(u, "millstream_detection_behind_devices")
            for u in urls
        )
        if waiting == 0:
            return round(time.time() - t0, 1)
        time.sleep(0.5)
    return None


def profile_pipeline(messages: list[tuple[str, bytes]], work: Path) -> dict[str, Any]:
    """Per-message cost of each pipeline stage, in-process (no MQTT, detection off: it
    runs on its own thread in the service and is measured by bench/detection_cost.py)."""
    from millstream_cloud.ingest.decode import decode_telemetry
    from millstream_cloud.ingest.pipeline import Message
    from millstream_cloud.services import Services
    from millstream_cloud.settings import load_settings

    sample = messages
    now = time.time_ns()
    t0 = time.perf_counter()
    batches = [decode_telemetry(t, p, now) for t, p in sample]
    decode_us = (time.perf_counter() - t0) / len(sample) * 1e6
    svc = Services.build(
        load_settings(
            overrides={"data_dir": str(work / "profile"), "detection": {"enabled": False}}
        ),
        with_subscriber=False,
    )
    try:
        readings = [r for b in batches for r in b.readings]
        t0 = time.perf_counter()
        for i in range(0, len(readings), 20_000):
            svc.storage.write_readings(readings[i : i + 20_000])
        store_us = (time.perf_counter() - t0) / len(sample) * 1e6
    finally:
        svc.stop()
    svc = Services.build(
        load_settings(
            overrides={"data_dir": str(work / "profile2"), "detection": {"enabled": False}}
        ),
        with_subscriber=False,
    )
    try:
        msgs = [Message(t, p, now) for t, p in sample]
        t0 = time.perf_counter()
        for i in range(0, len(msgs), 500):
            svc.pipeline.process(msgs[i : i + 500])
        total_us = (time.perf_counter() - t0) / len(sample) * 1e6
    finally:
        svc.stop()
    return {
        "us_per_message": {
            "decode_validate_build_readings": round(decode_us, 1),
            "storage_write": round(store_us, 1),
            "whole_pipeline_process": round(total_us, 1),
            "registry_dead_letters_and_rest": round(total_us - decode_us - store_us, 1),
        },
        "pipeline_readings_per_s_in_process": round(READINGS_PER_MESSAGE * 1e6 / total_us),
    }


def _settings() -> dict[str, Any]:
    from millstream_cloud.settings import load_settings

    s = load_settings()
    return {
        "mqtt.receive_maximum": s.mqtt.receive_maximum,
        "mqtt.ack_batch": s.mqtt.ack_batch,
        "ingest.write_max_delay_s": s.ingest.write_max_delay_s,
        "storage.embedded.synchronous": s.storage.embedded.synchronous,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--messages", type=int, default=20_000)
    ap.add_argument("--devices", type=int, default=100)
    ap.add_argument("--quick", action="store_true", help="5,000 messages")
    ap.add_argument(
        "--repeat", type=int, default=3, help="runs of each case; the median run is reported"
    )
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "ingest_throughput.json"))
    args = ap.parse_args()
    n = 5_000 if args.quick else args.messages
    work = Path(tempfile.mkdtemp(prefix="ingest-bench-"))
    broker = mosquitto_server(work / "mosquitto").start()
    try:
        messages = make_messages(n, args.devices)
        all_runs: dict[str, list[dict[str, Any]]] = {"raw": [], "w1": [], "w1off": [], "w2": []}
        for r in range(args.repeat):
            # interleaved, so load from elsewhere on the machine hits every case alike
            print(f"run {r + 1}: raw pipe, {n} messages ...", file=sys.stderr)
            all_runs["raw"].append(run_raw(broker.port, messages))
            for workers in (1, 2):
                print(f"run {r + 1}: ingest, {workers} worker(s) ...", file=sys.stderr)
                tag = f"w{workers}"
                all_runs[tag].append(run_ingest(broker.port, messages, workers, work, f"{tag}r{r}"))
            print(f"run {r + 1}: ingest, 1 worker, detection off ...", file=sys.stderr)
            all_runs["w1off"].append(
                run_ingest(broker.port, messages, 1, work, f"w1offr{r}", detection=False)
            )
            print(json.dumps({k: v[-1] for k, v in all_runs.items()}), file=sys.stderr)

        def median(runs: list[dict[str, Any]]) -> dict[str, Any]:
            return sorted(runs, key=lambda x: x["messages_per_s"])[len(runs) // 2]

        raw = median(all_runs["raw"])
        runs = [median(all_runs["w1"]), median(all_runs["w2"])]
        profile = profile_pipeline(messages[:5000], work)
    finally:
        broker.stop()
        shutil.rmtree(work, ignore_errors=True)
    one = runs[0]
    result = {
        "benchmark": "ingest_throughput",
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "readings_per_message": READINGS_PER_MESSAGE,
        "devices": args.devices,
        "qos": 1,
        "raw_pipe": raw,
        "ingest_1_worker": one,
        "ingest_2_workers": runs[1],
        # Detection runs on its own thread behind a bounded queue: when it cannot keep up,
        # batches skip detection (counted) instead of slowing ingest.
        "ingest_1_worker_detection_off": median(all_runs["w1off"]),
        "ratio_1_worker_to_raw_messages": round(one["messages_per_s"] / raw["messages_per_s"], 3),
        "targets": {
            "ratio_to_raw_at_least": 0.5,
            "readings_per_s_at_least": 100_000,
            "met_ratio": one["messages_per_s"] >= 0.5 * raw["messages_per_s"],
            "met_rate": one["readings_per_s"] >= 100_000,
        },
        "profile": profile,
        "runs": {
            "raw_pipe_messages_per_s": [x["messages_per_s"] for x in all_runs["raw"]],
            "ingest_1_worker_readings_per_s": [x["readings_per_s"] for x in all_runs["w1"]],
            "ingest_2_workers_readings_per_s": [x["readings_per_s"] for x in all_runs["w2"]],
        },
        "load_average_at_end": os.getloadavg(),
        "settings": _settings(),
    }
    write_result(result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
