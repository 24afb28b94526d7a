"""``millstream-agent``: run, check-config, sample-config, simulate."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Optional

from millstream_agent import __version__

EXIT_CONFIG = 2


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        stream=sys.stderr,
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
    )


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="millstream-agent",
        description="Millstream edge agent: collect machine telemetry, buffer it on disk, "
        "publish it over MQTT.",
    )
    p.add_argument("--version", action="version", version=f"millstream-agent {__version__}")
    p.add_argument("--log-level", default=os.environ.get("MILLSTREAM_LOG_LEVEL", "info"))
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="run the agent with a YAML configuration file")
    r.add_argument("-c", "--config", required=True, help="YAML configuration file")

    c = sub.add_parser("check-config", help="validate a configuration file and exit (2 if invalid)")
    c.add_argument("file")

    s = sub.add_parser("sample-config", help="print a complete, documented configuration")
    s.add_argument("--broker", default="mqtt://127.0.0.1:1883", help="broker URL to put in it")
    s.add_argument("--queue-path", default=None, help="queue file to put in it")
    s.add_argument("--device-id", default="press-01", help="device id to put in it")
    s.add_argument("--site", default="plant-a", help="site to put in it")

    m = sub.add_parser("simulate", help="many simulated devices, each its own MQTT session")
    m.add_argument("--devices", type=int, default=1, help="number of devices (default 1)")
    m.add_argument("--rate", type=float, default=1.0, help="collections per second per device")
    m.add_argument("--metrics", type=int, default=10, help="metrics per device (default 10)")
    m.add_argument("--duration", type=float, default=0.0, help="seconds; 0 = until SIGINT/SIGTERM")
    m.add_argument("--broker", default="mqtt://127.0.0.1:1883", help="mqtt://HOST:PORT or mqtts://")
    m.add_argument("--site", default="sim", help="site name in the topics (default sim)")
    m.add_argument(
        "--prefix",
        default=None,
        help="device id prefix: ids are PREFIX-0001...; default 'sim' on site sim, else the site",
    )
    m.add_argument("--kind", default="motor", help="machine kind of the simulated collector")
    m.add_argument("--seed", type=int, default=1, help="random seed (device i gets its own)")
    m.add_argument(
        "--faults",
        choices=("auto", "none"),
        default=None,
        help="fault injection of the simulated machines (default: the collector's, auto)",
    )
    m.add_argument("--fault-rate", type=float, default=None, help="faults per device per hour")
    m.add_argument(
        "--fault-types",
        default=None,
        help="comma-separated fault types to draw from, e.g. stuck,spike (default: all)",
    )
    m.add_argument(
        "--fault-start-after",
        default=None,
        help="quiet time before the first fault, e.g. 150s or 5m (default: the collector's, 5m)",
    )
    m.add_argument("--ground-truth", default=None, help="append fault intervals to this JSONL")
    m.add_argument(
        "--history",
        default="0",
        help="send this much of each machine's healthy past first, back-dated (e.g. 12h); "
        "default 0, none",
    )
    m.add_argument(
        "--history-step",
        type=float,
        default=10.0,
        help="seconds between the past's readings (default 10)",
    )
    m.add_argument(
        "--history-rate",
        type=float,
        default=4000.0,
        help="readings/s the fleet sends its past at, at most (default 4000; 0: no limit)",
    )
    m.add_argument("--queue-dir", default=None, help="on-disk queues here (default: in memory)")
    m.add_argument(
        "--queue-max-bytes",
        default="8MB",
        help="per-device queue bound (oldest dropped first), e.g. 8MB; default 8MB",
    )
    m.add_argument("--batch-size", type=int, default=100, help="max readings per message")
    m.add_argument("--batch-delay", type=float, default=1.0, help="max seconds a reading waits")
    m.add_argument("--max-inflight", type=int, default=20, help="messages awaiting PUBACK/device")
    m.add_argument("--drain-timeout", type=float, default=30.0, help="max seconds to wait for acks")
    m.add_argument("--connect-spread", type=float, default=1.0, help="spread connects over S s")
    m.add_argument("--reconnect-max", type=float, default=10.0, help="max reconnect backoff, s")
    m.add_argument("--username", default=os.environ.get("MILLSTREAM_MQTT_USERNAME"))
    m.add_argument("--password", default=None, help="prefer MILLSTREAM_MQTT_PASSWORD")
    m.add_argument("--ca", default=None, help="CA file for mqtts://")
    m.add_argument("--cert", default=None, help="client certificate (mutual TLS)")
    m.add_argument("--key", default=None, help="client key (mutual TLS)")
    m.add_argument("--server-hostname", default=None, help="expected name in broker certificate")
    return p


def main(argv: Optional[list[str]] = None) -> int:
    args = _parser().parse_args(argv)
    _setup_logging(args.log_level)
    if args.command == "simulate":
        return _simulate(args)
    if args.command == "sample-config":
        from millstream_agent.config import sample_config
        from millstream_agent.protocol import ID_PATTERN

        for flag, value in (("--device-id", args.device_id), ("--site", args.site)):
            if not ID_PATTERN.match(value):
                sys.stderr.write(f"{flag}: expected {ID_PATTERN.pattern}, got {value!r}\n")
                return EXIT_CONFIG
        sys.stdout.write(
            sample_config(
                broker=args.broker,
                queue_path=args.queue_path,
                device_id=args.device_id,
                site=args.site,
            )
        )
        return 0
    if args.command == "check-config":
        from millstream_agent.config import ConfigError, load_config

        try:
            load_config(args.file)
        except ConfigError as exc:
            sys.stderr.write(str(exc) + "\n")
            return EXIT_CONFIG
        sys.stdout.write(f"{args.file}: OK\n")
        return 0
    if args.command == "run":
        from millstream_agent.agent import run_agent
        from millstream_agent.config import ConfigError, load_config

        try:
            config = load_config(args.config)
        except ConfigError as exc:
            sys.stderr.write(str(exc) + "\nrefusing to start\n")
            return EXIT_CONFIG
        return run_agent(config)
    return 1  # pragma: no cover - argparse rejects unknown commands


def _simulate(args: argparse.Namespace) -> int:
    from millstream_agent.session import BrokerURLError, parse_broker_url
    from millstream_agent.simulate import SimOptions, run

    try:
        parse_broker_url(args.broker)
    except BrokerURLError as exc:
        sys.stderr.write(f"--broker: {exc}\n")
        return EXIT_CONFIG
    if args.devices < 1 or args.metrics < 1 or args.rate < 0:
        sys.stderr.write("--devices and --metrics must be >= 1, --rate >= 0\n")
        return EXIT_CONFIG
    from millstream_agent.config import Invalid, parse_size

    try:
        queue_max_bytes = parse_size(args.queue_max_bytes)
    except Invalid as exc:
        sys.stderr.write(f"--queue-max-bytes: expected {exc}\n")
        return EXIT_CONFIG
    from millstream_agent.collectors._options import parse_duration

    try:
        history = parse_duration(args.history, "--history")
    except ValueError as exc:
        sys.stderr.write(f"{exc}\n")
        return EXIT_CONFIG
    if history < 0 or args.history_step <= 0 or args.history_rate < 0:
        sys.stderr.write("--history must be >= 0, --history-step > 0, --history-rate >= 0\n")
        return EXIT_CONFIG
    opts = SimOptions(
        history=history,
        history_step=args.history_step,
        history_rate=args.history_rate,
        queue_max_bytes=queue_max_bytes,
        devices=args.devices,
        rate=args.rate,
        metrics=args.metrics,
        duration=args.duration,
        broker=args.broker,
        site=args.site,
        prefix=args.prefix,
        kind=args.kind,
        seed=args.seed,
        queue_dir=args.queue_dir,
        batch_size=args.batch_size,
        batch_delay=args.batch_delay,
        max_inflight=args.max_inflight,
        drain_timeout=args.drain_timeout,
        connect_spread=args.connect_spread,
        reconnect_max=args.reconnect_max,
        username=args.username,
        password=args.password or os.environ.get("MILLSTREAM_MQTT_PASSWORD"),
        ca=args.ca,
        cert=args.cert,
        key=args.key,
        server_hostname=args.server_hostname,
        faults=args.faults,
        fault_rate=args.fault_rate,
        fault_types=args.fault_types.split(",") if args.fault_types else None,
        fault_start_after=args.fault_start_after,
        ground_truth=args.ground_truth,
    )
    return run(opts)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
