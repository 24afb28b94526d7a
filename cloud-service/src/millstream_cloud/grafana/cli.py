"""``millstream-cloud grafana provision``: datasource, folder and dashboards into a Grafana."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from millstream_cloud.grafana.provisioner import (
    DATASOURCE_UID,
    DEFAULT_DASHBOARD_DIR,
    FOLDER_TITLE,
    FOLDER_UID,
    DatasourceSpec,
    Provisioner,
    load_dashboards,
)


def add_parser(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    grafana = subparsers.add_parser("grafana", help="provision Grafana (datasource, dashboards)")
    sub = grafana.add_subparsers(dest="grafana_command", metavar="ACTION")
    sub.required = True
    p = sub.add_parser(
        "provision",
        help="create or update the datasource, folder and dashboards (idempotent)",
        description="Bring a Grafana to the state dashboards/ describes. A second run makes "
        "no change. Exit status 0 on success, 1 on an error.",
    )
    p.add_argument("--url", default=os.environ.get("GRAFANA_URL", "http://127.0.0.1:3000"),
                   help="Grafana base URL (env GRAFANA_URL; default %(default)s)")  # fmt: skip
    p.add_argument("--token", default=os.environ.get("GRAFANA_TOKEN"),
                   help="service account token, or user:password (env GRAFANA_TOKEN)")  # fmt: skip
    p.add_argument("--datasource-url", default="http://millstream:8000",
                   help="what Grafana queries: Millstream's API (it answers /query) or an "
                   "InfluxDB 1.x/2.x v1-compatible URL (default %(default)s)")  # fmt: skip
    p.add_argument("--datasource-token", default=os.environ.get("MILLSTREAM_DATASOURCE_TOKEN"),
                   help="sent by Grafana as 'Authorization: Token ...' (InfluxDB 2.x)")  # fmt: skip
    p.add_argument("--datasource-uid", default=DATASOURCE_UID, help="default %(default)s")
    p.add_argument(
        "--database", default="millstream", help="InfluxQL database (default %(default)s)"
    )
    p.add_argument("--folder-uid", default=FOLDER_UID, help="default %(default)s")
    p.add_argument("--folder-title", default=FOLDER_TITLE, help="default %(default)s")
    p.add_argument("--dashboards", type=Path, default=DEFAULT_DASHBOARD_DIR,
                   help="directory of dashboard JSON files (default: the repository's dashboards/)")  # fmt: skip
    p.set_defaults(func=run_provision)


def run_provision(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        dashboards = load_dashboards(args.dashboards)
        spec = DatasourceSpec(url=args.datasource_url, database=args.database,
                              uid=args.datasource_uid, token=args.datasource_token)  # fmt: skip
        report = Provisioner.connect(args.url, args.token).provision(
            spec, dashboards, folder_uid=args.folder_uid, folder_title=args.folder_title
        )
    except Exception as exc:
        print(f"grafana provision failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    print(report.summary())
    return 0
