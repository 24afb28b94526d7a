"""The Pi's systemd unit, checked by systemd's own parser and against the agent it runs."""

from __future__ import annotations

import configparser
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

UNIT = Path(__file__).resolve().parents[2] / "deploy" / "systemd" / "millstream-agent.service"
INSTALLED = "/opt/millstream/venv/bin/millstream-agent"


def service_section() -> dict[str, str]:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string(UNIT.read_text())
    return dict(parser["Service"])


def test_systemd_reads_the_unit_without_a_complaint(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze not installed")
    # As installed, but running this checkout's agent (the Pi's path does not exist here).
    agent = Path(sys.executable).parent / "millstream-agent"
    unit = tmp_path / UNIT.name
    unit.write_text(UNIT.read_text().replace(INSTALLED, str(agent)))
    done = subprocess.run(
        [analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60
    )
    # An unknown key or a bad value is only a warning to systemd: any output is a failure.
    assert done.returncode == 0 and not (done.stdout + done.stderr).strip(), (
        done.stdout + done.stderr
    )


def test_the_unit_and_the_agent_agree(tmp_path: Path) -> None:
    service = service_section()
    # It waits for the agent's READY and restarts it when its watchdog goes unanswered.
    assert service["Type"] == "notify" and service["NotifyAccess"] == "main"
    assert int(service["WatchdogSec"]) >= 30
    # A configuration error is not restarted: the exit code the unit names is the one
    # check-config and run give for a bad file.
    bad = tmp_path / "agent.yaml"
    bad.write_text("mqtt:\n  qos: 3\n")
    done = subprocess.run(
        [sys.executable, "-m", "millstream_agent.cli", "check-config", str(bad)],
        capture_output=True,
        text=True,
    )
    assert str(done.returncode) == service["RestartPreventExitStatus"] == "2"
    assert service["ExecStartPre"].endswith("check-config /etc/millstream/agent.yaml")
