"""docs/troubleshooting.md quotes the agent's log lines: each quoted fragment must still be
what the code writes, or the page sends a reader looking for a line that never comes."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PAGE = (ROOT / "docs" / "troubleshooting.md").read_text()
SOURCE = "\n".join(
    p.read_text() for p in (ROOT / "edge-agent" / "src" / "millstream_agent").rglob("*.py")
)

# Fragments of the quoted lines without their variable parts.
FRAGMENTS = [
    "connection refused: ",
    "TLS: broker certificate not trusted (",
    "; check mqtt.tls.ca",
    "TLS handshake failed: ",
    "broker refused the connection: ",
    " (check mqtt.username, ",
    "cannot connect to ",
    "no CONNACK from ",
    " within the timeout",
    ": dropped the ",
    " oldest readings (",
    " dropped in total)",
    "older than max_age ",
    "over max_bytes ",
    ": cannot store ",
    " is unreadable (",
    "; moving it to ",
    " is before the minimum valid time: readings are ",
    "collector ",
    " recovered",
    " has not returned for ",
    ": no longer telling systemd's watchdog the agent is alive",
    "config/desired revision ",
    " rejected: ",
    " readings queued",
    ", oldest ",
    "expected an integer",
]


@pytest.mark.parametrize("fragment", FRAGMENTS)
def test_a_quoted_log_line_is_what_the_agent_writes(fragment: str) -> None:
    assert fragment in PAGE, f"not quoted on the page: {fragment!r}"
    code = fragment.replace("(", "").replace(")", "").strip()
    assert fragment in SOURCE or code in SOURCE, f"the agent no longer writes {fragment!r}"
