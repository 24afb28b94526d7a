"""The golden messages of wire contract v1 and a strict schema check, shared by both sides' tests."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonschema

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures" / "protocol"
SCHEMAS = ROOT / "docs" / "schemas"

SCHEMA_FOR_CHANNEL = {
    "telemetry": "telemetry.schema.json",
    "status": "status.schema.json",
    "config/desired": "config.schema.json",
    "config/reported": "config.schema.json",
    "cmd": "command.schema.json",
    "cmd/result": "command.schema.json",
}


@dataclass(frozen=True)
class Case:
    file: str
    channel: str
    topic: str
    expect: str
    reason: str | None
    schema_valid: bool
    note: str

    @property
    def payload(self) -> bytes:
        return (FIXTURES / self.file).read_bytes()

    def __str__(self) -> str:
        return self.file


def load_cases(channel: str | None = None) -> list[Case]:
    manifest = json.loads((FIXTURES / "manifest.json").read_text())
    cases = [
        Case(
            c["file"],
            c["channel"],
            c["topic"],
            c["expect"],
            c.get("reason"),
            c["schema_valid"],
            c.get("note", ""),
        )
        for c in manifest["cases"]
    ]
    return [c for c in cases if channel is None or c.channel == channel]


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def strict_json(payload: bytes) -> Any:
    """JSON as RFC 8259 defines it: no NaN/Infinity, no number beyond a double."""
    value = json.loads(payload, parse_constant=_reject_constant)

    def walk(v: Any) -> None:
        if isinstance(v, float) and not math.isfinite(v):
            raise ValueError("number out of range")
        if isinstance(v, dict):
            for x in v.values():
                walk(x)
        elif isinstance(v, list):
            for x in v:
                walk(x)

    walk(value)
    return value


def schema_errors(channel: str, message: Any) -> list[str]:
    schema = json.loads((SCHEMAS / SCHEMA_FOR_CHANNEL[channel]).read_text())
    validator = jsonschema.Draft202012Validator(schema, format_checker=jsonschema.FormatChecker())
    return [e.message for e in validator.iter_errors(message)]


def is_schema_valid(channel: str, payload: bytes) -> bool:
    try:
        message = strict_json(payload)
    except ValueError:
        return False
    return not schema_errors(channel, message)
