"""API token store and the per-device rate limiter."""

from __future__ import annotations

import sqlite3
import stat
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from millstream_cloud.security.limits import DeviceLimiter, DeviceRateLimiter, LimitSettings
from millstream_cloud.security.tokens import TokenError, TokenStore, hash_token, scope_allows


def test_tokens_are_stored_hashed_and_verified(tmp_path: Path) -> None:
    store = TokenStore(tmp_path / "t.sqlite3")
    info, token = store.create("grafana", "read")
    assert token.startswith("ms_") and len(token) > 40
    assert store.verify(token) == info
    assert store.verify(token + "x") is None
    assert store.verify("") is None
    raw = (tmp_path / "t.sqlite3").read_bytes()
    assert token.encode() not in raw
    rows = sqlite3.connect(tmp_path / "t.sqlite3").execute("SELECT token_hash FROM api_tokens")
    assert [r[0] for r in rows] == [hash_token(token)]
    assert stat.S_IMODE((tmp_path / "t.sqlite3").stat().st_mode) == 0o600


def test_revoke_by_name_or_id_and_reuse_the_name(tmp_path: Path) -> None:
    store = TokenStore(tmp_path / "t.sqlite3")
    _, token_a = store.create("ops", "admin")
    with pytest.raises(TokenError, match="exists"):
        store.create("ops", "read")
    store.revoke("ops")
    assert store.verify(token_a) is None
    b, token_b = store.create("ops", "write")
    store.revoke(str(b.id))
    assert store.verify(token_b) is None
    assert not store.has_active_tokens()
    assert [t.name for t in store.list(include_revoked=True)] == ["ops", "ops"]
    with pytest.raises(TokenError, match="no active token"):
        store.revoke("ops")


def test_revocation_is_seen_by_another_store_on_the_same_file(tmp_path: Path) -> None:
    api = TokenStore(tmp_path / "t.sqlite3")
    cli = TokenStore(tmp_path / "t.sqlite3")
    _, token = cli.create("x", "read")
    assert api.verify(token) is not None
    cli.revoke("x")
    assert api.verify(token) is None


def test_expired_tokens_are_refused(tmp_path: Path) -> None:
    store = TokenStore(tmp_path / "t.sqlite3")
    _, token = store.create("brief", "read", expires_days=-1)
    assert store.verify(token) is None
    assert not store.has_active_tokens()


def test_unknown_scope_is_refused(tmp_path: Path) -> None:
    with pytest.raises(TokenError, match="unknown scope"):
        TokenStore(tmp_path / "t.sqlite3").create("x", "root")


def test_scopes_are_ordered() -> None:
    assert scope_allows("admin", "read") and scope_allows("write", "write")
    assert not scope_allows("read", "write") and not scope_allows("write", "admin")


def test_rate_limiter_allows_burst_then_rate() -> None:
    rl = DeviceRateLimiter(rate=10, burst=5)
    assert all(rl.allow("d", 0.0) for _ in range(5))
    assert not rl.allow("d", 0.0)
    assert rl.allow("other", 0.0)  # devices do not share a bucket
    assert rl.allow("d", 0.1)  # one token back after 1/rate seconds
    assert not rl.allow("d", 0.1)
    assert not rl.allow("d", 0.05)  # a clock going backwards refills nothing


@settings(max_examples=300, deadline=None)
@given(
    rate=st.floats(0.5, 1000),
    burst=st.floats(1, 500),
    steps=st.lists(st.floats(0, 2), min_size=1, max_size=200),
)
def test_rate_limiter_never_exceeds_burst_plus_rate_times_time(
    rate: float, burst: float, steps: list[float]
) -> None:
    rl = DeviceRateLimiter(rate=rate, burst=burst)
    now = 0.0
    allowed = 0
    for dt in steps:
        now += dt
        for _ in range(3):
            allowed += rl.allow("d", now)
    assert allowed <= burst + rate * now + 1e-6


def test_rate_limiter_memory_is_bounded() -> None:
    rl = DeviceRateLimiter(rate=1, max_devices=100)
    for i in range(1000):
        rl.allow(f"forged-{i}", float(i))
    assert len(rl) == 100


def test_device_limiter_reasons_and_counts() -> None:
    lim = DeviceLimiter(LimitSettings(max_messages_per_second=1, burst=2, max_payload_bytes=100))
    assert lim.check("d", 50, 0.0) is None
    assert lim.check("d", 500, 0.0) == "oversize"
    assert lim.check("d", 50, 0.0) is None
    assert lim.check("d", 50, 0.0) == "rate_limited"
    assert lim.refused == {"rate_limited": 1, "oversize": 1}
