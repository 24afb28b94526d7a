#!/usr/bin/env python3
"""Fail when a secret is about to enter the repository: private keys, tokens, passwords.

Usage: ``python scripts/check_secrets.py [ROOT]`` (``make check`` runs it). It scans every
file git would track: committed files and new ones that ``.gitignore`` does not exclude
(so a key is caught before ``git add``). Outside a git checkout it walks ROOT.

Findings print as ``path:line: kind`` with the value redacted; the exit status is 1.

What is not a secret:
* placeholders: ``change-me``, ``${VAR}`` / ``$VAR`` references, ``<...>``, ``example``,
  ``xxxx``, ``***``, a ``{template}``, ``null``/``None``/empty, values read from the environment, the name
  of an environment variable (``ALL_CAPS``), a file path (the secret lives in that file),
  shell or regex code (``$(...)``, backslashes); comments in config files;
* a line that carries ``secret-scan: allow`` (say why next to it);
* paths listed in ``ALLOWED_PATHS`` (none today: tests generate keys and tokens at run time).
"""

from __future__ import annotations

import argparse
import fnmatch
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

MAX_BYTES = 2_000_000
ALLOW_MARKER = "secret-scan: allow"
ALLOWED_PATHS: tuple[str, ...] = ()
SKIP_DIRS = {".git", ".venv", "venv", "node_modules", "__pycache__", ".mypy_cache", ".ruff_cache"}

# Written so that this file does not match itself.
_BEGIN = "-----BEGIN"
STRONG_PATTERNS: list[tuple[str, re.Pattern[str]]] = [
    ("private key", re.compile(_BEGIN + r" (?:[A-Z0-9]+ )*PRIVATE KEY-----")),
    ("millstream API token", re.compile(r"\bms_[A-Za-z0-9_-]{43}\b")),
    ("AWS access key", re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b")),
    ("GitHub token", re.compile(r"\bgh[pousr]_[A-Za-z0-9]{36,}\b")),
    ("Slack token", re.compile(r"\bxox[abprs]-[A-Za-z0-9-]{10,}\b")),
    ("Grafana service account token", re.compile(r"\bglsa_[A-Za-z0-9]{32}_[0-9a-f]{8}\b")),
    ("InfluxDB token", re.compile(r"(?<![A-Za-z0-9_-])[A-Za-z0-9_-]{86}==")),
    ("URL with password", re.compile(r"\b[a-z][a-z0-9+.-]*://[^/\s:@'\"]+:([^@\s/'\"$]{3,})@")),
]

# key = value in configuration files (YAML, .env, INI, TOML, JSON, Dockerfiles, shell).
ASSIGNMENT = re.compile(
    r"""(?ix)
    (?P<key>[A-Za-z0-9_.-]*(?:password|passwd|secret|token|api[_-]?key|private[_-]?key)
        [A-Za-z0-9_.-]*)
    ["']?\s*[:=]\s*
    (?P<value>"[^"]*"|'[^']*'|[^\s#,;]+)
    """
)
CONFIG_SUFFIXES = {
    ".yml",
    ".yaml",
    ".env",
    ".ini",
    ".cfg",
    ".conf",
    ".toml",
    ".json",
    ".properties",
    ".sh",
}
CONFIG_NAMES = {".env", "Dockerfile"}

PLACEHOLDER = re.compile(
    r"""(?ix)^(
        |change-?me.*|changeit|example.*|.*\bexample\b.*|xx+|\*+|\.\.\.+|<[^>]*>|.*\{.*\}.*
        |\$\{?[A-Za-z_][A-Za-z0-9_]*.*|\$__file\{.*\}|\$__env\{.*\}|%\(.*\)s
        |null|none|nil|true|false|required|optional|str|string|secret|password|token
        |redacted|placeholder|dummy|test|your[_-].*
    )$"""
)


@dataclass(frozen=True)
class Finding:
    path: str
    line: int
    kind: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.kind}"


def candidate_files(root: Path) -> list[Path]:
    try:
        out = subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            cwd=root,
            capture_output=True,
            check=True,
        ).stdout
        names = sorted({n for n in out.decode("utf-8", "surrogateescape").split("\0") if n})
        return [root / n for n in names if (root / n).is_file()]
    except (OSError, subprocess.CalledProcessError):
        found = []
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = [d for d in dirnames if d not in SKIP_DIRS]
            found += [Path(dirpath) / f for f in filenames]
        return sorted(found)


def is_config(path: Path) -> bool:
    name = path.name
    return (
        path.suffix.lower() in CONFIG_SUFFIXES
        or name in CONFIG_NAMES
        or name.startswith(".env")
        or name.endswith(".Dockerfile")
        or name.startswith("Dockerfile")
    )


REFERENCE = re.compile(r"^(?:[A-Z][A-Z0-9_]*|(?:\.{0,2}/)[^\s]*)$")  # ENV_NAME or a file path


# Code rather than a literal: command substitution, regex or glob syntax.
EXPRESSION = re.compile(r"\$\$?\(|\\|^[*(\[]")


def _placeholder(value: str) -> bool:
    v = value.strip().strip("\"'").strip()
    return (
        bool(PLACEHOLDER.match(v) or REFERENCE.match(v) or EXPRESSION.search(v))
        or len(v) < 8
        or v.startswith(("os.environ", "env("))
    )


def _strip_comment(line: str) -> str:
    """Config-file line without its trailing comment (``# ...``), for assignment checks."""
    stripped = line.lstrip()
    if stripped.startswith(("#", ";")):
        return ""
    cut = line.find(" #")
    return line if cut < 0 else line[:cut]


def scan_text(rel: str, text: str, config: bool) -> Iterator[Finding]:
    for number, line in enumerate(text.splitlines(), 1):
        if ALLOW_MARKER in line:
            continue
        for kind, pattern in STRONG_PATTERNS:
            m = pattern.search(line)
            if m and not (m.groups() and _placeholder(m.group(1))):
                yield Finding(rel, number, kind)
                break
        else:
            if config:
                for m in ASSIGNMENT.finditer(_strip_comment(line)):
                    if not _placeholder(m.group("value")):
                        yield Finding(rel, number, f"hard-coded {m.group('key')}")
                        break


def scan(root: Path) -> list[Finding]:
    findings: list[Finding] = []
    for path in candidate_files(root):
        rel = path.relative_to(root).as_posix()
        if any(fnmatch.fnmatch(rel, pat) for pat in ALLOWED_PATHS):
            continue
        try:
            if path.stat().st_size > MAX_BYTES:
                continue
            data = path.read_bytes()
        except OSError:
            continue
        if b"\0" in data[:8192]:
            continue  # binary
        findings += scan_text(rel, data.decode("utf-8", "replace"), is_config(path))
    return findings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("root", nargs="?", default=Path(__file__).resolve().parents[1], type=Path)
    args = parser.parse_args(argv)
    findings = scan(args.root.resolve())
    for f in findings:
        print(f, file=sys.stderr)
    if findings:
        print(
            f"check_secrets: {len(findings)} possible secret(s). Move them to the environment "
            f"or a git-ignored file; for a false positive add '{ALLOW_MARKER}' to the line.",
            file=sys.stderr,
        )
        return 1
    print("check_secrets: no secrets found")
    return 0


if __name__ == "__main__":
    sys.exit(main())
