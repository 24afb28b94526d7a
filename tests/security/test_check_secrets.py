"""scripts/check_secrets.py: the repository holds no secret, and the check finds real ones.

Every "secret" below is generated at run time, so none is ever committed.
"""

from __future__ import annotations

import importlib.util
import secrets
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "check_secrets.py"


def load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("check_secrets", SCRIPT)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules["check_secrets"] = module
    spec.loader.exec_module(module)
    return module


check = load()


def test_the_repository_has_no_secrets() -> None:
    found = check.scan(REPO)
    assert not found, "\n".join(map(str, found))


def pem_key() -> str:
    key = ec.generate_private_key(ec.SECP256R1())
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    ).decode()


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    (tmp_path / ".gitignore").write_text(".env\nignored/\n")
    return tmp_path


def kinds(root: Path) -> dict[str, str]:
    return {f.path: f.kind for f in check.scan(root)}


def test_finds_keys_tokens_and_passwords(repo: Path) -> None:
    (repo / "server.key").write_text(pem_key())
    (repo / "notes.md").write_text(f"use token ms_{secrets.token_urlsafe(32)} for grafana\n")
    (repo / "settings.yaml").write_text(f"mqtt:\n  password: {secrets.token_hex(12)}\n")
    (repo / "deploy.env").write_text(f"INFLUXDB_ADMIN_PASSWORD={secrets.token_hex(16)}\n")
    (repo / "client.py").write_text(
        f'BROKER = "mqtts://press:{secrets.token_hex(8)}@broker:8883"\n'
    )
    (repo / "influx.txt").write_text(secrets.token_urlsafe(64)[:86] + "==\n")
    found = kinds(repo)
    assert found == {
        "server.key": "private key",
        "notes.md": "millstream API token",
        "settings.yaml": "hard-coded password",
        "deploy.env": "hard-coded INFLUXDB_ADMIN_PASSWORD",
        "client.py": "URL with password",
        "influx.txt": "InfluxDB token",
    }
    assert check.main([str(repo)]) == 1


def test_placeholders_references_and_allowed_lines_pass(repo: Path) -> None:
    (repo / ".env.example").write_text(
        "INFLUXDB_ADMIN_PASSWORD=change-me\nGRAFANA_ADMIN_PASSWORD=${GRAFANA_PASSWORD}\n"
    )
    (repo / "compose.yml").write_text(
        "services:\n  x:\n    environment:\n      TOKEN_FILE: /run/secrets/token\n"
        "      PASSWORD: ${INFLUXDB_V1_PASSWORD:?set it}\n    volumes:\n      - secrets:/secrets\n"
    )
    (repo / "settings.py").write_text(
        'password: str | None = Field(None, description="prefer MILLSTREAM_MQTT__PASSWORD")\n'
        'token = os.environ["MILLSTREAM_TOKEN"]\n'
    )
    (repo / "doc.md").write_text(
        f"example: ms_{secrets.token_urlsafe(32)}  <!-- secret-scan: allow (docs sample) -->\n"
    )
    (repo / "datasource.yaml").write_text("secureJsonData:\n  password: $__file{/run/pw}\n")
    (repo / "init.sh").write_text(
        'token="$(influx auth create --json | sed -n \'s/.*"token": *"\\([^"]*\\)".*/\\1/p\')"\n'
        'export INFLUXDB_TOKEN="$$(cat /run/influxdb/token)"  # read-only token: Grafana only\n'
    )
    assert kinds(repo) == {}
    assert check.main([str(repo)]) == 0


def test_git_ignored_files_are_not_scanned_but_new_files_are(repo: Path) -> None:
    (repo / ".env").write_text(f"API_TOKEN=ms_{secrets.token_urlsafe(32)}\n")
    (repo / "ignored").mkdir()
    (repo / "ignored" / "ca.key").write_text(pem_key())
    assert kinds(repo) == {}
    (repo / "oops.pem").write_text(pem_key())  # untracked, not ignored: caught before `git add`
    assert kinds(repo) == {"oops.pem": "private key"}


def test_script_runs_standalone() -> None:
    done = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
