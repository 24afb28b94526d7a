"""``millstream-cloud pki|devices|tokens``: certificates, device identities and API tokens.

Everything lives under the data directory (``--data-dir``; else the settings file's
``data_dir``; else ``$MILLSTREAM_DATA_DIR``; else ``./millstream-data``):
``pki/`` (CA, certificates, CRL), ``security/devices.json``, ``security/tokens.sqlite3``
and ``broker/acl``. Secrets go to files with mode 0600 or, for a new API token, to
stdout once; nothing secret is logged.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

from millstream_cloud.security.acl import DEFAULT_CLOUD_IDENTITY, render_mosquitto_conf
from millstream_cloud.security.auth import auth_settings
from millstream_cloud.security.devices import (
    DeviceProvisioner,
    ProvisioningError,
    SecurityPaths,
    parse_device_ref,
)
from millstream_cloud.security.pki import CLIENT_DAYS, PKI, SERVER_DAYS, PKIError, write_private
from millstream_cloud.security.tokens import SCOPES, TokenError, TokenStore

DEFAULT_DATA_DIR = "./millstream-data"


def _settings(args: argparse.Namespace) -> Any:
    if not getattr(args, "config", None):
        return None
    from millstream_cloud.settings import load_settings

    return load_settings(args.config)


def data_dir(args: argparse.Namespace) -> Path:
    if getattr(args, "data_dir", None):
        return Path(args.data_dir)
    settings = _settings(args)
    if settings is not None:
        return Path(settings.data_dir)
    return Path(os.environ.get("MILLSTREAM_DATA_DIR") or DEFAULT_DATA_DIR)


def _paths(args: argparse.Namespace) -> SecurityPaths:
    paths = SecurityPaths(data_dir(args))
    if getattr(args, "pki_dir", None):
        paths.pki_dir = Path(args.pki_dir)
    if getattr(args, "acl_file", None):
        paths.acl_file = Path(args.acl_file)
    return paths


def _tokens_path(args: argparse.Namespace) -> Path:
    if getattr(args, "tokens_file", None):
        return Path(args.tokens_file)
    settings = _settings(args)
    if settings is not None and not getattr(args, "data_dir", None):
        return auth_settings(settings).tokens_path
    return _paths(args).tokens_db


def _ca_key(args: argparse.Namespace) -> Path | None:
    return Path(args.ca_key) if getattr(args, "ca_key", None) else None


def _pki(args: argparse.Namespace) -> PKI:
    return PKI(_paths(args).pki_dir, ca_key=_ca_key(args))


def _provisioner(args: argparse.Namespace) -> DeviceProvisioner:
    return DeviceProvisioner(
        _paths(args), cloud_identities=(args.cloud_identity,), ca_key=_ca_key(args)
    )


def _broker_pid(args: argparse.Namespace) -> int | None:
    if getattr(args, "reload_pid", None):
        return int(args.reload_pid)
    pidfile = getattr(args, "reload_pidfile", None)
    if pidfile:
        return int(Path(pidfile).read_text().split()[0])
    return None


def _print(data: Any, as_json: bool, lines: list[str]) -> None:
    if as_json:
        print(json.dumps(data, indent=2))
    else:
        print("\n".join(lines))


# -- pki --------------------------------------------------------------------------------------
def cmd_pki_init(args: argparse.Namespace) -> int:
    pki = _pki(args)
    path = pki.init(common_name=args.cn, days=args.days, force=args.force)
    print(f"CA created: {path} (key {pki.ca_key_path}, mode 0600); empty CRL {pki.crl_path}")
    return 0


def cmd_pki_server(args: argparse.Namespace) -> int:
    pki = _pki(args)
    dns = args.dns or ["localhost"]
    ips = args.ip if args.ip is not None else ["127.0.0.1"]
    cert, key = pki.server_cert(dns, ips, name=args.name, days=args.days)
    print(f"server certificate {cert} (key {key}) for DNS {dns} IP {ips}")
    return 0


def cmd_pki_client(args: argparse.Namespace) -> int:
    pki = _pki(args)
    cert, key = pki.client_cert(args.name, kind=args.kind, days=args.days)
    print(f"client certificate {cert} (key {key}), CN={args.name}")
    return 0


def cmd_pki_status(args: argparse.Namespace) -> int:
    pki = _pki(args)
    if not pki.initialised:
        print(f"no CA in {pki.dir}: run `millstream-cloud pki init`", file=sys.stderr)
        return 1
    rows = pki.status(include_revoked=args.all)
    crl = pki.crl_next_update()
    lines = [f"{'NAME':<32} {'KIND':<7} {'EXPIRES':<21} {'DAYS':>5}  STATE"]
    lines += [
        f"{r.name:<32} {r.kind:<7} {r.not_after:<21} {r.days_left:>5}  {r.state}" for r in rows
    ]
    if crl is not None:
        lines.append(f"CRL next update: {crl:%Y-%m-%dT%H:%M:%SZ}")
    _print(
        {"certificates": [asdict(r) for r in rows], "crl_next_update": crl and crl.isoformat()},
        args.json,
        lines,
    )
    bad = any(r.state in ("expired", "expiring") for r in rows)
    return 3 if bad and args.check else 0


def cmd_pki_crl(args: argparse.Namespace) -> int:
    path = _pki(args).write_crl()
    print(f"CRL re-signed: {path}; reload the broker (SIGHUP) to use it")
    return 0


def cmd_pki_broker_config(args: argparse.Namespace) -> int:
    d = args.certs_dir.rstrip("/")
    text = render_mosquitto_conf(
        port=args.port,
        bind=args.bind,
        cafile=f"{d}/ca.crt",
        certfile=f"{d}/server.crt",
        keyfile=f"{d}/server.key",
        crlfile=f"{d}/crl.pem",
        acl_file=args.acl,
        persistence_dir=args.persistence_dir,
    )
    if args.out:
        Path(args.out).write_text(text)
    else:
        sys.stdout.write(text)
    return 0


# -- devices ----------------------------------------------------------------------------------
def cmd_devices_add(args: argparse.Namespace) -> int:
    site, device = parse_device_ref(args.ref)
    prov = _provisioner(args)
    done = prov.add(
        site,
        device,
        kind=args.kind,
        broker_host=args.broker_host,
        broker_port=args.broker_port,
        server_hostname=args.server_hostname,
        config_dir=args.config_dir,
        days=args.days,
    )
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "agent.yaml").write_text(done.agent_config)
        shutil.copyfile(done.ca, out / "ca.crt")
        shutil.copyfile(done.cert, out / f"{device}.crt")
        write_private(out / f"{device}.key", done.key.read_bytes())
        print(f"wrote {out}/agent.yaml, ca.crt, {device}.crt, {device}.key", file=sys.stderr)
    else:
        sys.stdout.write(done.agent_config)
        print(f"certificate {done.cert}, key {done.key}, CA {done.ca}", file=sys.stderr)
    pid = _broker_pid(args)
    if pid is not None:
        prov.reload_broker(pid)
    print(f"ACL updated: {prov.paths.acl_file}; reload the broker (SIGHUP)", file=sys.stderr)
    return 0


def cmd_devices_fleet(args: argparse.Namespace) -> int:
    prov = _provisioner(args)
    cert, key = prov.add_fleet(args.name, args.site, days=args.days)
    print(f"fleet identity {args.name} for site {args.site}: {cert} (key {key})")
    return 0


def cmd_devices_list(args: argparse.Namespace) -> int:
    prov = _provisioner(args)
    recs = prov.records() if args.all else prov.active()
    lines = [f"{'SITE/DEVICE':<40} {'KIND':<10} {'CREATED':<21} REVOKED"]
    lines += [
        f"{r.site + '/' + r.device:<40} {r.kind:<10} {r.created_at:<21} {r.revoked_at or '-'}"
        for r in recs
    ]
    _print({"devices": [asdict(r) for r in recs]}, args.json, lines)
    return 0


def cmd_devices_revoke(args: argparse.Namespace) -> int:
    prov = _provisioner(args)
    rec = prov.revoke(args.device, broker_pid=_broker_pid(args))
    reloaded = "broker reloaded" if _broker_pid(args) else "now reload the broker (SIGHUP)"
    print(
        f"revoked {rec.site}/{rec.device}: CRL {prov.pki.crl_path}, ACL {prov.paths.acl_file}; {reloaded}"
    )
    return 0


def cmd_devices_acl(args: argparse.Namespace) -> int:
    prov = _provisioner(args)
    path = prov.write_acl(Path(args.out) if args.out else None)
    print(f"ACL written: {path} ({len(prov.active())} devices)")
    return 0


# -- tokens -----------------------------------------------------------------------------------
def cmd_tokens_create(args: argparse.Namespace) -> int:
    store = TokenStore(_tokens_path(args))
    info, token = store.create(args.name, args.scope, args.expires_days)
    print(
        f"token {info.name!r} (id {info.id}, scope {info.scope}) created; it is shown once:",
        file=sys.stderr,
    )
    print(token)
    return 0


def cmd_tokens_list(args: argparse.Namespace) -> int:
    store = TokenStore(_tokens_path(args))
    rows = store.list(include_revoked=args.all)
    lines = [f"{'ID':>4} {'NAME':<24} {'SCOPE':<6} {'CREATED':<26} {'EXPIRES':<26} REVOKED"]
    lines += [
        f"{t.id:>4} {t.name:<24} {t.scope:<6} {t.created_at:<26} {t.expires_at or '-':<26} "
        f"{t.revoked_at or '-'}"
        for t in rows
    ]
    _print({"tokens": [asdict(t) for t in rows]}, args.json, lines)
    return 0


def cmd_tokens_revoke(args: argparse.Namespace) -> int:
    info = TokenStore(_tokens_path(args)).revoke(args.token)
    print(f"revoked token {info.name!r} (id {info.id}); the API refuses it from its next request")
    return 0


# -- parsers ----------------------------------------------------------------------------------
def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("-c", "--config", help="cloud settings file (for data_dir and token file)")
    p.add_argument("--data-dir", help=f"data directory (default {DEFAULT_DATA_DIR})")
    p.add_argument("--pki-dir", help="PKI directory (default <data-dir>/pki)")
    p.add_argument("--ca-key", help="CA private key file (default <pki-dir>/ca.key)")


def _device_common(p: argparse.ArgumentParser) -> None:
    _common(p)
    p.add_argument("--acl-file", help="broker ACL file to rewrite (default <data-dir>/broker/acl)")
    p.add_argument(
        "--cloud-identity",
        default=DEFAULT_CLOUD_IDENTITY,
        help=f"CN of the cloud service's client certificate (default {DEFAULT_CLOUD_IDENTITY})",
    )
    g = p.add_mutually_exclusive_group()
    g.add_argument("--reload-pid", type=int, help="send SIGHUP to this Mosquitto PID afterwards")
    g.add_argument("--reload-pidfile", help="send SIGHUP to the PID in this file afterwards")


def _wrap(func: Any) -> Any:
    def run(args: argparse.Namespace) -> int:
        try:
            return int(func(args))
        except (PKIError, ProvisioningError, TokenError) as exc:
            print(f"millstream-cloud: {exc}", file=sys.stderr)
            return 2

    return run


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    # pki
    pki = sub.add_parser("pki", help="private CA, server and client certificates, CRL")
    psub = pki.add_subparsers(dest="pki_command", metavar="ACTION")
    psub.required = True
    p = psub.add_parser("init", help="create the CA (and an empty CRL)")
    _common(p)
    p.add_argument("--cn", default="Millstream CA", help="CA common name")
    p.add_argument("--days", type=int, default=3650)
    p.add_argument("--force", action="store_true", help="replace an existing CA")
    p.set_defaults(func=_wrap(cmd_pki_init))
    p = psub.add_parser("server-cert", help="TLS certificate for the broker and API, with SANs")
    _common(p)
    p.add_argument("--dns", action="append", help="DNS name (repeat); default localhost")
    p.add_argument("--ip", action="append", help="IP address (repeat); default 127.0.0.1")
    p.add_argument("--name", default="server", help="file name (default server)")
    p.add_argument("--days", type=int, default=SERVER_DAYS)
    p.set_defaults(func=_wrap(cmd_pki_server))
    for name, kind, helptext in (
        ("device-cert", "device", "client certificate for a device (CN = device id)"),
        ("client-cert", "client", "client certificate for a service (e.g. millstream-cloud)"),
    ):
        p = psub.add_parser(name, help=helptext)
        _common(p)
        p.add_argument("name", metavar="NAME")
        p.add_argument("--days", type=int, default=CLIENT_DAYS)
        p.set_defaults(func=_wrap(cmd_pki_client), kind=kind)
    for name in ("status", "list"):
        p = psub.add_parser(name, help="certificates with expiry and state")
        _common(p)
        p.add_argument("--all", action="store_true", help="include revoked certificates")
        p.add_argument("--json", action="store_true")
        p.add_argument("--check", action="store_true", help="exit 3 if any is expiring/expired")
        p.set_defaults(func=_wrap(cmd_pki_status))
    p = psub.add_parser("crl", help="re-sign the CRL")
    _common(p)
    p.set_defaults(func=_wrap(cmd_pki_crl))
    p = psub.add_parser("broker-config", help="print a Mosquitto config: TLS listener + ACL")
    p.add_argument("--port", type=int, default=8883)
    p.add_argument("--bind", default="0.0.0.0")
    p.add_argument("--certs-dir", default="/mosquitto/certs", help="PKI dir as the broker sees it")
    p.add_argument("--acl", default="/mosquitto/config/acl", help="ACL file as the broker sees it")
    p.add_argument("--persistence-dir", default="/mosquitto/data")
    p.add_argument("--out", help="write here instead of stdout")
    p.set_defaults(func=_wrap(cmd_pki_broker_config))

    # devices
    dev = sub.add_parser("devices", help="provision and revoke device identities; broker ACL")
    dsub = dev.add_subparsers(dest="devices_command", metavar="ACTION")
    dsub.required = True
    p = dsub.add_parser("add", help="issue a device certificate and print its agent config")
    _device_common(p)
    p.add_argument("ref", metavar="SITE/DEVICE")
    p.add_argument("--kind", default="motor", help="machine kind (default motor)")
    p.add_argument("--broker-host", default="localhost", help="broker host the device dials")
    p.add_argument("--broker-port", type=int, default=8883)
    p.add_argument("--server-hostname", help="name to verify in the broker certificate")
    p.add_argument("--config-dir", default="/etc/millstream", help="paths on the device")
    p.add_argument("--out", help="write agent.yaml, ca.crt and the cert/key into this directory")
    p.add_argument("--days", type=int, default=CLIENT_DAYS)
    p.set_defaults(func=_wrap(cmd_devices_add))
    p = dsub.add_parser("add-fleet", help="one identity for every device of a site (simulator)")
    _device_common(p)
    p.add_argument("name", metavar="IDENTITY")
    p.add_argument("--site", required=True)
    p.add_argument("--days", type=int, default=CLIENT_DAYS)
    p.set_defaults(func=_wrap(cmd_devices_fleet))
    p = dsub.add_parser("list", help="provisioned devices")
    _device_common(p)
    p.add_argument("--all", action="store_true", help="include revoked devices")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_wrap(cmd_devices_list))
    p = dsub.add_parser("revoke", help="revoke a device: CRL + ACL, then reload the broker")
    _device_common(p)
    p.add_argument("device", metavar="DEVICE")
    p.set_defaults(func=_wrap(cmd_devices_revoke))
    p = dsub.add_parser("acl", help="rewrite the broker ACL from the device registry")
    _device_common(p)
    p.add_argument("--out", help="write here (default <data-dir>/broker/acl)")
    p.set_defaults(func=_wrap(cmd_devices_acl))

    # tokens
    tok = sub.add_parser("tokens", help="API tokens (scopes: read, write, admin)")
    tsub = tok.add_subparsers(dest="tokens_command", metavar="ACTION")
    tsub.required = True
    p = tsub.add_parser("create", help="create a token; it is printed once on stdout")
    _common(p)
    p.add_argument("--tokens-file", help="token database (default <data-dir>/security/...)")
    p.add_argument("--name", required=True)
    p.add_argument("--scope", required=True, choices=SCOPES)
    p.add_argument("--expires-days", type=float, help="expire after this many days")
    p.set_defaults(func=_wrap(cmd_tokens_create))
    p = tsub.add_parser("list", help="tokens (never their secret)")
    _common(p)
    p.add_argument("--tokens-file")
    p.add_argument("--all", action="store_true", help="include revoked tokens")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_wrap(cmd_tokens_list))
    p = tsub.add_parser("revoke", help="revoke a token by name or id")
    _common(p)
    p.add_argument("--tokens-file")
    p.add_argument("token", metavar="NAME_OR_ID")
    p.set_defaults(func=_wrap(cmd_tokens_revoke))
