"""The agent's side of the golden config/desired and command messages."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from millstream_agent.config import parse_yaml, sample_config, validate
from millstream_agent.remote import Remote, RemoteState
from tests.protocol_cases import Case, load_cases, schema_errors


def make_remote(tmp_path: Path) -> tuple[Remote, list[tuple[str, bytes, bool]], list[Any]]:
    text = sample_config(queue_path=str(tmp_path / "queue.db"))
    base = validate(parse_yaml(text, "sample"), "sample")
    published: list[tuple[str, bytes, bool]] = []
    applied: list[Any] = []
    remote = Remote(
        base,
        RemoteState(str(tmp_path / "remote-config.json")),
        applied.append,
        lambda channel, payload, retain: published.append((channel, payload, retain)),
        {"ping": lambda args: (True, {"pong": True})},
    )
    return remote, published, applied


@pytest.mark.parametrize("case", load_cases("config/desired"), ids=str)
def test_config_desired_golden_messages(case: Case, tmp_path: Path) -> None:
    remote, published, applied = make_remote(tmp_path)
    remote.on_message("config/desired", case.payload)
    (channel, payload, retain) = published[-1]
    report = json.loads(payload)
    assert channel == "config/reported" and retain
    assert schema_errors("config/reported", report) == []
    assert report["status"] == ("accepted" if case.expect == "accept" else "rejected")
    assert bool(applied) == (case.expect == "accept")


@pytest.mark.parametrize("case", load_cases("cmd"), ids=str)
def test_command_golden_messages(case: Case, tmp_path: Path) -> None:
    remote, published, _ = make_remote(tmp_path)
    name = case.topic.rsplit("/", 1)[-1]
    remote.on_message(f"cmd/{name}", case.payload)
    if case.expect == "reject":
        assert published == []  # no valid id: nobody to answer
        return
    (channel, payload, _) = published[-1]
    result = json.loads(payload)
    assert channel == f"cmd/{name}/result"
    assert schema_errors("cmd/result", result) == []
    assert result["ok"] is True and result["id"] == json.loads(case.payload)["id"]
