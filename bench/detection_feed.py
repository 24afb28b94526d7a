"""What the detecting worker's own subscription (``detection.feed: all``) costs and carries.

1. CPU per message of ``DetectionFeed.take`` (decode, limits, registry lookup, duplicate
   check; 40 readings a message), without a broker; and of a message a sharded worker
   passes over (``detection.shards``: another shard's device, not decoded).
2. Through a real Mosquitto: a publisher sends ``--messages`` telemetry messages (QoS 1,
   40 readings each, over ``--devices`` devices) and the feed hands them to a sink that
   only counts (detection itself is ``bench/detection_cost.py``): messages and readings
   a second from the first publish to the last reading handed on.

    python bench/detection_feed.py [--messages 20000] [--devices 100]
        [--out bench/results/detection_feed.json]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from ingest_throughput import READINGS_PER_MESSAGE, _client, make_messages  # noqa: E402

from bench._common import write_result  # noqa: E402
from millstream_cloud.ingest.decode import Limits  # noqa: E402
from millstream_cloud.ingest.feed import DetectionFeed  # noqa: E402
from millstream_cloud.metrics import ServiceMetrics  # noqa: E402
from millstream_cloud.model import Reading  # noqa: E402
from millstream_cloud.registry import DeviceRegistry  # noqa: E402
from millstream_cloud.settings import IngestSettings, MQTTSettings  # noqa: E402
from tests.support.servers import free_port, mosquitto_server  # noqa: E402


class Counted:
    def __init__(self) -> None:
        self.readings = 0
        self.done = threading.Event()
        self.expect = 0

    def __call__(self, readings: Sequence[Reading]) -> None:
        self.readings += len(readings)
        if self.readings >= self.expect:
            self.done.set()


def _feed(
    broker: str, registry: DeviceRegistry, sink: Counted, owns: Callable[[str], bool] | None = None
) -> DetectionFeed:
    ingest = IngestSettings(rate_limit_per_device=None)
    return DetectionFeed(
        MQTTSettings(broker=broker, client_id="bench"),
        ingest,
        Limits.of(ingest),
        registry,
        sink,
        ServiceMetrics(),
        owns=owns,
    )


def take_cost(
    messages: list[tuple[str, bytes]],
    registry: DeviceRegistry,
    owns: Callable[[str], bool] | None = None,
) -> float:
    feed = _feed("mqtt://127.0.0.1:1", registry, Counted(), owns)
    now = time.time_ns()
    t0 = time.process_time()
    for topic, payload in messages:
        feed.take(topic, payload, now)
    return (time.process_time() - t0) / len(messages) * 1e6


def through_broker(messages: list[tuple[str, bytes]], registry: DeviceRegistry, tmp: Path) -> dict:
    port = free_port()
    server = mosquitto_server(tmp / "mosquitto", port).start()
    try:
        sink = Counted()
        sink.expect = len(messages) * READINGS_PER_MESSAGE
        feed = _feed(f"mqtt://127.0.0.1:{port}", registry, sink)
        feed.start()
        if not feed.connected.wait(10):
            raise RuntimeError("the feed did not subscribe")
        pub = _client("bench-publisher", port)
        pub.loop_start()
        t0 = time.perf_counter()
        infos = [pub.publish(topic, payload, qos=1) for topic, payload in messages]
        for info in infos:
            info.wait_for_publish(60)
        published_s = time.perf_counter() - t0
        finished = sink.done.wait(120)
        elapsed = time.perf_counter() - t0
        pub.disconnect()
        pub.loop_stop()
        feed.stop()
        if not finished:
            raise RuntimeError(f"only {sink.readings} of {sink.expect} readings came through")
        return {
            "messages": len(messages),
            "publish_s": round(published_s, 2),
            "elapsed_s": round(elapsed, 2),
            "messages_per_s": round(len(messages) / elapsed),
            "readings_per_s": round(sink.readings / elapsed),
        }
    finally:
        server.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--messages", type=int, default=20_000)
    ap.add_argument("--devices", type=int, default=100)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "detection_feed.json"))
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        registry = DeviceRegistry(Path(tmp) / "registry.db")
        try:
            us = take_cost(make_messages(args.messages, args.devices, "millstream/v1/b1"), registry)
            # Every message another shard's: what a worker of N shards pays for the
            # (N-1)/N of the fleet's messages that are not its own.
            elsewhere = take_cost(
                make_messages(args.messages, args.devices, "millstream/v1/b3"),
                registry,
                owns=lambda device: False,
            )
            broker = through_broker(
                make_messages(args.messages, args.devices, "millstream/v1/b2"), registry, Path(tmp)
            )
        finally:
            registry.close()
    write_result(
        {
            "readings_per_message": READINGS_PER_MESSAGE,
            "devices": args.devices,
            "take_us_per_message": round(us, 1),
            "take_us_per_reading": round(us / READINGS_PER_MESSAGE, 2),
            "take_us_per_message_other_shard": round(elsewhere, 2),
            "through_mosquitto": broker,
        },
        args.out,
    )


if __name__ == "__main__":
    main()
