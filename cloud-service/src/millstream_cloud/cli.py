"""``millstream-cloud``: one entry point, one sub-command per module that registers itself."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from millstream_cloud import __version__

DESCRIPTION = (
    "Millstream cloud service: ingest machine telemetry from MQTT, store it, detect "
    "anomalies, raise alerts and provision Grafana; and the tools around it (settings "
    "check, evaluation on NAB, SKAB and the simulator, certificates, device identities, "
    "API tokens)."
)

# Each module exposes ``add_parser(subparsers)`` which registers its sub-command(s) and
# sets ``func(args) -> int`` as the parser default. A module that is not installed yet
# (optional feature) is skipped so the rest of the CLI still works.
COMMAND_MODULES: tuple[str, ...] = (
    "millstream_cloud.serve",
    "millstream_cloud.alerts.cli",
    "millstream_cloud.detection.eval.cli",
    "millstream_cloud.grafana.cli",
    "millstream_cloud.security.cli",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="millstream-cloud", description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"millstream-cloud {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name and name.startswith(exc.name):
                continue  # that feature's module is not part of this build
            raise
        module.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
