"""Every example in docs/collectors.md is a valid config, and every option is documented."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from millstream_agent.collectors import collector_class, known_types

DOC = Path(__file__).resolve().parents[3] / "docs" / "collectors.md"


def examples() -> list[dict[str, Any]]:
    blocks = re.findall(r"```yaml\n(.*?)```", DOC.read_text(), flags=re.S)
    found = []
    for block in blocks:
        for entry in yaml.safe_load(block)["collectors"]:
            found.append(entry)
    return found


@pytest.mark.parametrize("entry", examples(), ids=lambda e: f"{e['type']}-{e['name']}")
def test_documented_example_is_accepted(entry: dict[str, Any]) -> None:
    try:
        cls = collector_class(entry["type"])
    except ValueError as exc:  # an optional extra that is not installed
        pytest.skip(str(exc))
    collector = cls(entry["name"], entry.get("options") or {})
    collector.close()


def test_every_collector_has_examples_and_every_option_a_row() -> None:
    text = DOC.read_text()
    assert {e["type"] for e in examples()} == set(known_types())
    for type_name in known_types():
        try:
            cls = collector_class(type_name)
        except ValueError:
            continue
        section = text.split(f"\n## {type_name}\n", 1)[1].split("\n## ", 1)[0]
        for option in cls.options_spec:
            assert f"`{option}`" in section, f"{type_name}: option {option} is not documented"
