"""``millstream-cloud serve`` and ``millstream-cloud check-config``."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

from millstream_cloud.alerts.rules import RuleError
from millstream_cloud.settings import Settings, SettingsError, load_settings

log = logging.getLogger("millstream.serve")


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if getattr(args, "broker", None):
        out.setdefault("mqtt", {})["broker"] = args.broker
    if getattr(args, "client_id", None):
        out.setdefault("mqtt", {})["client_id"] = args.client_id
    if getattr(args, "host", None):
        out.setdefault("api", {})["host"] = args.host
    if getattr(args, "port", None) is not None:
        out.setdefault("api", {})["port"] = args.port
    if getattr(args, "insecure", False):
        out.setdefault("api", {})["insecure"] = True
    if getattr(args, "data_dir", None):
        out["data_dir"] = args.data_dir
    if getattr(args, "storage", None):
        out.setdefault("storage", {})["backend"] = args.storage
    return out


def settings_from_args(args: argparse.Namespace) -> Settings:
    return load_settings(getattr(args, "config", None), _overrides(args))


def run_serve(args: argparse.Namespace) -> int:
    try:
        settings = settings_from_args(args)
    except SettingsError as exc:
        print(f"millstream-cloud: bad settings:\n{exc}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=settings.log_level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    import uvicorn

    from millstream_cloud.app import create_app
    from millstream_cloud.security.auth import InsecureBindError

    try:
        app = create_app(settings)
    except InsecureBindError as exc:
        print(f"millstream-cloud: {exc}", file=sys.stderr)
        return 2
    except RuleError as exc:
        print(f"millstream-cloud: bad alert rules:\n{exc}", file=sys.stderr)
        return 2
    except RuntimeError as exc:  # e.g. a second ingest writer on one embedded store
        print(f"millstream-cloud: {exc}", file=sys.stderr)
        return 2
    log.info(
        "serving on http://%s:%d (docs at /docs), broker %s, storage %s in %s",
        settings.api.host,
        settings.api.port,
        settings.mqtt.broker,
        settings.storage.backend,
        settings.data_dir,
    )
    uvicorn.run(app, host=settings.api.host, port=settings.api.port, log_level="warning")
    return 0


def run_check_config(args: argparse.Namespace) -> int:
    try:
        settings = load_settings(args.file)
    except SettingsError as exc:
        print(f"invalid:\n{exc}", file=sys.stderr)
        return 2
    rules = len(settings.detection.rules)
    print(
        f"{args.file}: OK (storage {settings.storage.backend}, broker {settings.mqtt.broker}, "
        f"{rules} detection rule{'' if rules == 1 else 's'})"
    )
    return 0


def run_retire(args: argparse.Namespace) -> int:
    try:
        settings = settings_from_args(args)
    except SettingsError as exc:
        print(f"millstream-cloud: invalid settings:\n{exc}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    from millstream_cloud.ingest.feed import delete_session
    from millstream_cloud.services import Services

    try:
        services = Services.build(settings)
    except RuntimeError as exc:
        print(f"millstream-cloud: {exc}", file=sys.stderr)
        return 2
    assert services.subscriber is not None
    try:
        drained = services.subscriber.retire(idle_s=args.idle)
        # Its detection feed's session too, if it had one (detection.feed: all).
        feed_gone = delete_session(settings.mqtt)
    finally:
        services.subscriber = None  # retire() already disconnected
        services.stop()
    print(
        f"retired {settings.mqtt.client_id}: {drained} queued messages stored and acked, "
        "session deleted"
        + ("" if feed_gone else f"; could not delete {settings.mqtt.client_id}-detect's session")
    )
    return 0


def add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("-c", "--config", help="YAML settings file (see docs/cloud.md)")
    p.add_argument("--broker", help="MQTT broker URL, mqtt://HOST:PORT or mqtts://HOST:PORT")
    p.add_argument("--data-dir", help="where the service keeps its state")
    p.add_argument("--storage", help="storage backend: embedded or influxdb")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="run ingest and the HTTP API")
    add_common(p)
    p.add_argument("--host", help="API bind address (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="API port (default 8000)")
    p.add_argument("--client-id", help="MQTT client id; stable per worker (persistent session)")
    p.add_argument(
        "--insecure", action="store_true", help="allow a non-loopback bind without tokens"
    )
    p.set_defaults(func=run_serve)
    r = sub.add_parser(
        "retire",
        help="take a worker out of the shared group for good, after storing what the "
        "broker queued for it (stop that worker first)",
    )
    add_common(r)
    r.add_argument("--client-id", required=True, help="client id of the worker to retire")
    r.add_argument(
        "--idle", type=float, default=3.0, help="seconds without messages that mean drained"
    )
    r.set_defaults(func=run_retire)
    c = sub.add_parser("check-config", help="validate a settings file and exit")
    c.add_argument("file")
    c.set_defaults(func=run_check_config)
