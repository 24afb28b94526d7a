#!/usr/bin/env python3
"""What TLS with client certificates costs on Mosquitto, measured on this machine.

Starts two local Mosquitto brokers, one plain and one configured exactly as Millstream
generates it (TLS listener, client certificates with CN = username, ACL, CRL), and
measures for each:

* connections per second: connect, TLS handshake (ECDSA P-256), CONNACK, disconnect;
* QoS 1 throughput: one device publishes N messages of SIZE bytes (about a 40-reading
  telemetry batch), one cloud subscriber receives them; messages/s end to end.

Usage: python deploy/scripts/bench_broker_tls.py [--messages 20000] [--size 2000]
Prints one JSON object. docs/deploy.md quotes its figures.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from millstream_cloud.security.acl import render_mosquitto_conf  # noqa: E402
from millstream_cloud.security.devices import DeviceProvisioner, SecurityPaths  # noqa: E402
from tests.support.servers import ServerProcess, find_binary, free_port  # noqa: E402


def client(port: int, name: str, tls: tuple[str, str, str] | None) -> mqtt.Client:
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"{name}-{time.monotonic_ns()}")
    c.max_inflight_messages_set(1000)
    if tls:
        ca, cert, key = tls
        c.tls_set(ca_certs=ca, certfile=cert, keyfile=key, cert_reqs=ssl.CERT_REQUIRED)
    return c


def _connect_packet(client_id: str) -> bytes:
    cid = client_id.encode()
    body = b"\x00\x04MQTT\x04\x02\x00\x3c" + len(cid).to_bytes(2, "big") + cid
    return bytes([0x10, len(body)]) + body


def connect_rate(port: int, tls: tuple[str, str, str] | None, n: int) -> float:
    """Raw sockets (no client library overhead): TCP, TLS handshake, CONNECT, CONNACK."""
    ctx = None
    if tls:
        ca, cert, key = tls
        ctx = ssl.create_default_context(cafile=ca)
        ctx.load_cert_chain(cert, key)
    start = time.perf_counter()
    for i in range(n):
        raw = socket.create_connection(("127.0.0.1", port), timeout=10)
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock = ctx.wrap_socket(raw, server_hostname="localhost") if ctx else raw
        sock.sendall(_connect_packet(f"bench-{i}"))
        ack = sock.recv(4)
        if not ack.startswith(b"\x20") or ack[3:4] != b"\x00":
            raise RuntimeError(f"no CONNACK: {ack!r}")
        sock.sendall(b"\xe0\x00")  # DISCONNECT
        sock.close()
    return n / (time.perf_counter() - start)


def throughput(
    port: int,
    pub_tls: tuple[str, str, str] | None,
    sub_tls: tuple[str, str, str] | None,
    topic: str,
    n: int,
    size: int,
) -> float:
    got = 0
    all_in = threading.Event()
    ready = threading.Event()

    def on_message(*_: object) -> None:
        nonlocal got
        got += 1
        if got >= n:
            all_in.set()

    sub = client(port, "millstream-cloud", sub_tls)
    sub.on_message = on_message
    sub.on_subscribe = lambda *a: ready.set()
    sub.on_connect = lambda c, *a: c.subscribe("millstream/v1/#", 1)
    sub.connect("127.0.0.1", port)
    sub.loop_start()
    if not ready.wait(10):
        raise RuntimeError("subscriber not ready")
    pub = client(port, "dev", pub_tls)
    pub.connect("127.0.0.1", port)
    pub.loop_start()
    payload = os.urandom(size // 2).hex().encode()
    start = time.perf_counter()
    for _ in range(n):
        pub.publish(topic, payload, qos=1)
    if not all_in.wait(300):
        raise RuntimeError(f"only {got} of {n} messages arrived")
    rate = n / (time.perf_counter() - start)
    for c in (pub, sub):
        c.disconnect()
        c.loop_stop()
    return rate


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--messages", type=int, default=20_000)
    ap.add_argument("--size", type=int, default=2_000)
    ap.add_argument("--connections", type=int, default=200)
    args = ap.parse_args()
    binary = find_binary("mosquitto")
    if binary is None:
        print("mosquitto not installed", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        prov = DeviceProvisioner(SecurityPaths(tmp / "data"))
        prov.pki.init()
        prov.pki.server_cert(["localhost"], ["127.0.0.1"])
        prov.pki.client_cert("millstream-cloud", kind="client")
        prov.add("s1", "dev1")
        acl = prov.write_acl()
        pki = prov.pki
        crt, key = pki.server_paths()
        tls_port, plain_port = free_port(), free_port()
        conf_tls = render_mosquitto_conf(
            port=tls_port, bind="127.0.0.1", cafile=str(pki.ca_cert_path), certfile=str(crt),
            keyfile=str(key), crlfile=str(pki.crl_path), acl_file=str(acl),
        )  # fmt: skip
        if os.geteuid() == 0:
            conf_tls = "user root\n" + conf_tls
        conf_plain = (
            ("user root\n" if os.geteuid() == 0 else "")
            + f"listener {plain_port} 127.0.0.1\nallow_anonymous true\n"
            "max_inflight_messages 1000\nmax_queued_messages 100000\npersistence false\n"
        )
        servers = []
        for name, conf, port in (("tls", conf_tls, tls_port), ("plain", conf_plain, plain_port)):
            (tmp / f"{name}.conf").write_text(conf)
            servers.append(
                ServerProcess(
                    [binary, "-c", str(tmp / f"{name}.conf")], port, tmp, tmp / f"{name}.log"
                ).start()
            )
        try:
            ca = str(pki.ca_cert_path)
            dev = (ca, *map(str, pki.client_paths("dev1")))
            cloud = (ca, *map(str, pki.client_paths("millstream-cloud")))
            topic = "millstream/v1/s1/dev1/telemetry"
            result = {
                "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
                "mosquitto": subprocess.run(
                    [binary, "-h"], capture_output=True, text=True
                ).stdout.splitlines()[0],
                "messages": args.messages,
                "payload_bytes": args.size,
                "plain": {
                    "connects_per_s": round(connect_rate(plain_port, None, args.connections), 1),
                    "qos1_msgs_per_s": round(
                        throughput(plain_port, None, None, topic, args.messages, args.size)
                    ),
                },
                "tls_client_certs": {
                    "connects_per_s": round(connect_rate(tls_port, dev, args.connections), 1),  # type: ignore[arg-type]
                    "qos1_msgs_per_s": round(
                        throughput(tls_port, dev, cloud, topic, args.messages, args.size)  # type: ignore[arg-type]
                    ),
                },
            }
        finally:
            for s in servers:
                s.stop()
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
