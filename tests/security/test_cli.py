"""``millstream-cloud pki|devices|tokens`` end to end through the argument parser."""

from __future__ import annotations

import argparse
import json
import stat
from pathlib import Path

import pytest
import yaml

from millstream_cloud.security import cli as security_cli
from millstream_cloud.security.tokens import TokenStore


def run(argv: list[str]) -> int:
    from millstream_cloud import cli

    if "millstream_cloud.security.cli" in cli.COMMAND_MODULES:
        return cli.main(argv)
    parser = argparse.ArgumentParser(prog="millstream-cloud")
    security_cli.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return int(args.func(args))


def test_security_commands_are_wired_into_the_cloud_cli() -> None:
    from millstream_cloud import cli

    if "millstream_cloud.security.cli" not in cli.COMMAND_MODULES:
        pytest.skip("add millstream_cloud.security.cli to COMMAND_MODULES (docs/security.md)")
    help_text = cli.build_parser().format_help()
    for command in ("pki", "devices", "tokens"):
        assert command in help_text


def test_provision_a_device_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = ["--data-dir", str(tmp_path / "data")]
    assert run(["pki", "init", *d]) == 0
    assert run(["pki", "server-cert", *d, "--dns", "mosquitto", "--ip", "127.0.0.1"]) == 0
    assert run(["pki", "client-cert", "millstream-cloud", *d]) == 0
    out = tmp_path / "device"
    assert (
        run(
            [
                "devices",
                "add",
                "plant1/press-01",
                *d,
                "--broker-host",
                "broker.lan",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    config = yaml.safe_load((out / "agent.yaml").read_text())
    assert config["device"] == {"id": "press-01", "site": "plant1", "kind": "motor"}
    assert config["mqtt"]["broker"] == "mqtts://broker.lan:8883"
    assert config["mqtt"]["tls"]["server_hostname"] == "broker.lan"
    assert config["collectors"][0]["type"] == "simulated"
    assert stat.S_IMODE((out / "press-01.key").stat().st_mode) == 0o600
    assert (out / "ca.crt").exists() and (out / "press-01.crt").exists()
    acl = (tmp_path / "data" / "broker" / "acl").read_text()
    assert "user press-01" in acl and "millstream/v1/plant1/press-01/telemetry" in acl

    capsys.readouterr()
    assert run(["devices", "list", *d, "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [x["device"] for x in listed["devices"]] == ["press-01"]
    # The same id again (any site) is refused: ids are unique across sites.
    assert run(["devices", "add", "plant2/press-01", *d]) == 2
    assert run(["devices", "revoke", "press-01", *d]) == 0
    assert "press-01" not in (tmp_path / "data" / "broker" / "acl").read_text()
    capsys.readouterr()
    assert run(["pki", "status", *d, "--all", "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    states = {c["name"]: c["state"] for c in status["certificates"]}
    assert states["press-01"] == "revoked" and states["millstream-cloud"] == "valid"
    assert status["crl_next_update"]


def test_bad_device_reference(tmp_path: Path) -> None:
    assert run(["pki", "init", "--data-dir", str(tmp_path)]) == 0
    assert run(["devices", "add", "no-site", "--data-dir", str(tmp_path)]) == 2
    assert run(["devices", "add", "s/../x", "--data-dir", str(tmp_path)]) == 2


def test_tokens_commands(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = ["--data-dir", str(tmp_path)]
    assert run(["tokens", "create", "--scope", "read", "--name", "grafana", *d]) == 0
    token = capsys.readouterr().out.strip()
    assert token.startswith("ms_")
    store = TokenStore(tmp_path / "security" / "tokens.sqlite3")
    assert store.verify(token) is not None
    assert run(["tokens", "list", *d]) == 0
    listing = capsys.readouterr().out
    assert "grafana" in listing and token not in listing
    assert run(["tokens", "revoke", "grafana", *d]) == 0
    assert store.verify(token) is None
    assert run(["tokens", "revoke", "grafana", *d]) == 2


def test_rendered_agent_config_is_accepted_by_the_agent(tmp_path: Path) -> None:
    agent_config = pytest.importorskip(
        "millstream_agent.config", reason="millstream_agent.config not on this branch yet"
    )
    d = ["--data-dir", str(tmp_path / "data")]
    assert run(["pki", "init", *d]) == 0
    out = tmp_path / "device"
    assert run(["devices", "add", "plant1/press-01", *d, "--out", str(out)]) == 0
    loaded = agent_config.load_config(str(out / "agent.yaml"), env={})
    assert loaded["device"]["id"] == "press-01"
    assert loaded["mqtt"]["tls"]["cert"] == "/etc/millstream/press-01.crt"


def test_the_cloud_cli_says_what_it_is_and_its_version(capsys: pytest.CaptureFixture[str]) -> None:
    from millstream_cloud import __version__, cli

    assert "cloud service" in cli.build_parser().format_help()
    with pytest.raises(SystemExit) as done:
        cli.main(["--version"])
    assert done.value.code == 0
    assert capsys.readouterr().out.strip() == f"millstream-cloud {__version__}"
