"""``millstream-cloud alerts check-rules FILE...``: validate rule files, name every bad field."""

from __future__ import annotations

import argparse
import sys

from millstream_cloud.alerts.rules import RuleError, load_rule_files


def run_check_rules(args: argparse.Namespace) -> int:
    status = 0
    for path in args.files:
        try:
            rules = load_rule_files([path])
        except RuleError as exc:
            print(f"invalid:\n{exc}", file=sys.stderr)
            status = 2
            continue
        kinds: dict[str, int] = {}
        for rule, _ in rules.values():
            kinds[rule.type] = kinds.get(rule.type, 0) + 1
        summary = ", ".join(f"{n} {k}" for k, n in sorted(kinds.items())) or "no rules"
        print(f"{path}: OK ({summary})")
    return status


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("alerts", help="alerting tools")
    alerts_sub = p.add_subparsers(dest="alerts_command", metavar="COMMAND")
    alerts_sub.required = True
    c = alerts_sub.add_parser("check-rules", help="validate alert rule files and exit")
    c.add_argument("files", nargs="+", help="YAML rule files ('default': the packaged set)")
    c.set_defaults(func=run_check_rules)
