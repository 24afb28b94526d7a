"""API tokens with scopes, stored hashed in a small SQLite file.

A token is ``ms_`` followed by 43 URL-safe characters (32 random bytes). Only its SHA-256
is stored: a token has 256 bits of entropy, so a plain hash is enough (no salt or slow
KDF is needed, unlike for passwords) and lets the API find a token by its hash in one
index lookup. The plain token is shown once, at creation.

Scopes are ordered: ``admin`` includes ``write``, which includes ``read``.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import secrets
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

SCOPES = ("read", "write", "admin")
TOKEN_PREFIX = "ms_"


class TokenError(ValueError):
    """A token operation was refused; the message says why."""


def scope_allows(granted: str, needed: str) -> bool:
    """True when a token with scope ``granted`` may use a route that needs ``needed``."""
    return SCOPES.index(granted) >= SCOPES.index(needed)


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


@dataclass(frozen=True)
class TokenInfo:
    id: int
    name: str
    scope: str
    created_at: str
    expires_at: str | None
    revoked_at: str | None

    @property
    def active(self) -> bool:
        return self.revoked_at is None and not self.expired

    @property
    def expired(self) -> bool:
        if self.expires_at is None:
            return False
        return dt.datetime.fromisoformat(self.expires_at) <= dt.datetime.now(dt.timezone.utc)


_SCHEMA = """
CREATE TABLE IF NOT EXISTS api_tokens (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    name        TEXT NOT NULL,
    scope       TEXT NOT NULL CHECK (scope IN ('read', 'write', 'admin')),
    token_hash  TEXT NOT NULL UNIQUE,
    created_at  TEXT NOT NULL,
    expires_at  TEXT,
    revoked_at  TEXT
);
CREATE UNIQUE INDEX IF NOT EXISTS api_tokens_active_name
    ON api_tokens (name) WHERE revoked_at IS NULL;
"""

_COLUMNS = "id, name, scope, created_at, expires_at, revoked_at"


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc).replace(microsecond=0)


class TokenStore:
    """The token file of one installation. Safe to share between threads; the CLI and a
    running API may use the same file at once (SQLite locking), and a revocation takes
    effect on the API's next request."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._conn: sqlite3.Connection | None = None

    @contextmanager
    def _db(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            if self._conn is None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                new = not self.path.exists()
                conn = sqlite3.connect(self.path, check_same_thread=False, timeout=10)
                conn.executescript(_SCHEMA)
                if new:
                    self.path.chmod(0o600)
                self._conn = conn
            with self._conn:
                yield self._conn

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    def create(
        self, name: str, scope: str, expires_days: float | None = None
    ) -> tuple[TokenInfo, str]:
        """A new token; returns its record and the plain token (shown once, never stored)."""
        if scope not in SCOPES:
            raise TokenError(f"unknown scope {scope!r}: use one of {', '.join(SCOPES)}")
        if not name or len(name) > 64 or not name.isprintable():
            raise TokenError("a token name is 1-64 printable characters")
        token = TOKEN_PREFIX + secrets.token_urlsafe(32)
        created = _now()
        expires = (created + dt.timedelta(days=expires_days)).isoformat() if expires_days else None
        try:
            with self._db() as db:
                cur = db.execute(
                    "INSERT INTO api_tokens (name, scope, token_hash, created_at, expires_at)"
                    " VALUES (?, ?, ?, ?, ?)",
                    (name, scope, hash_token(token), created.isoformat(), expires),
                )
                token_id = int(cur.lastrowid or 0)
        except sqlite3.IntegrityError:
            raise TokenError(
                f"an active token named {name!r} exists: revoke it or choose another name"
            ) from None
        return TokenInfo(token_id, name, scope, created.isoformat(), expires, None), token

    def list(self, include_revoked: bool = False) -> list[TokenInfo]:
        query = f"SELECT {_COLUMNS} FROM api_tokens"
        if not include_revoked:
            query += " WHERE revoked_at IS NULL"
        with self._db() as db:
            return [TokenInfo(*row) for row in db.execute(query + " ORDER BY id")]

    def revoke(self, name_or_id: str) -> TokenInfo:
        """Revoke the active token with this name (or numeric id)."""
        with self._db() as db:
            row = db.execute(
                f"SELECT {_COLUMNS} FROM api_tokens WHERE revoked_at IS NULL"
                " AND (name = ? OR CAST(id AS TEXT) = ?)",
                (name_or_id, name_or_id),
            ).fetchone()
            if row is None:
                raise TokenError(f"no active token {name_or_id!r}")
            stamp = _now().isoformat()
            db.execute("UPDATE api_tokens SET revoked_at = ? WHERE id = ?", (stamp, row[0]))
        info = TokenInfo(*row)
        return TokenInfo(info.id, info.name, info.scope, info.created_at, info.expires_at, stamp)

    def verify(self, token: str) -> TokenInfo | None:
        """The token's record when it is known, not revoked and not expired; else None."""
        if not token.startswith(TOKEN_PREFIX) or len(token) > 128:
            return None
        with self._db() as db:
            row = db.execute(
                f"SELECT {_COLUMNS} FROM api_tokens WHERE token_hash = ?", (hash_token(token),)
            ).fetchone()
        if row is None:
            return None
        info = TokenInfo(*row)
        return info if info.active else None

    def has_active_tokens(self) -> bool:
        if not self.path.exists():
            return False
        now = _now().isoformat()
        with self._db() as db:
            row = db.execute(
                "SELECT 1 FROM api_tokens WHERE revoked_at IS NULL"
                " AND (expires_at IS NULL OR expires_at > ?) LIMIT 1",
                (now,),
            ).fetchone()
        return row is not None
