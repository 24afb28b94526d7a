"""Option parsing shared by the collectors: durations, timestamps, typed lookups.

Every error is a ``ValueError`` whose message starts with the option's key, so the
agent can refuse to start and say which key is wrong.
"""

from __future__ import annotations

import calendar
import difflib
import re
import time
from typing import Any, Optional

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}
_RFC3339 = re.compile(
    r"^(\d{4})-(\d{2})-(\d{2})[Tt ](\d{2}):(\d{2}):(\d{2})(\.\d+)?(Z|z|[+-]\d{2}:\d{2})$"
)


def parse_duration(value: Any, key: str) -> float:
    """Seconds from a number or a string such as ``500ms``, ``30s``, ``10m``, ``1h``, ``1d``."""
    if isinstance(value, bool):
        raise ValueError(f"{key}: expected a duration such as 30s, 10m or 1h, got {value!r}")
    if isinstance(value, (int, float)):
        if value < 0:
            raise ValueError(f"{key}: a duration cannot be negative, got {value!r}")
        return float(value)
    if isinstance(value, str):
        match = _DURATION.match(value)
        if match:
            return float(match.group(1)) * _UNITS[match.group(2)]
    raise ValueError(f"{key}: expected a duration such as 30s, 10m or 1h, got {value!r}")


def parse_rfc3339(value: str, key: str) -> float:
    """Epoch seconds from an RFC 3339 timestamp with an explicit offset (``Z`` or ``+02:00``)."""
    match = _RFC3339.match(value.strip())
    if not match:
        raise ValueError(
            f"{key}: expected an RFC 3339 timestamp like 2026-01-31T08:00:00Z, got {value!r}"
        )
    year, month, day, hour, minute, second = (int(g) for g in match.groups()[:6])
    frac = float(match.group(7)) if match.group(7) else 0.0
    offset = 0
    zone = match.group(8)
    if zone not in ("Z", "z"):
        sign = 1 if zone[0] == "+" else -1
        offset = sign * (int(zone[1:3]) * 3600 + int(zone[4:6]) * 60)
    epoch = calendar.timegm((year, month, day, hour, minute, second, 0, 0, 0))
    return epoch + frac - offset


def format_rfc3339(ts: float) -> str:
    """Epoch seconds as RFC 3339 UTC with millisecond precision (the wire contract's format)."""
    ms = round(ts * 1000.0)
    secs, millis = divmod(ms, 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(secs)) + f".{millis:03d}Z"


def get_int(
    options: dict[str, Any],
    key: str,
    default: int,
    minimum: Optional[int] = None,
    maximum: Optional[int] = None,
    where: str = "",
) -> int:
    value = options.get(key, default)
    key = where + key
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{key}: expected an integer, got {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{key}: must be at least {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{key}: must be at most {maximum}, got {value}")
    return value


def get_float(
    options: dict[str, Any],
    key: str,
    default: float,
    minimum: Optional[float] = None,
    where: str = "",
) -> float:
    value = options.get(key, default)
    key = where + key
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{key}: expected a number, got {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{key}: must be at least {minimum}, got {value}")
    return float(value)


def get_str(
    options: dict[str, Any],
    key: str,
    default: Optional[str],
    choices: Optional[list[str]] = None,
    where: str = "",
) -> Optional[str]:
    value = options.get(key, default)
    key = where + key
    if value is None:
        return None
    if not isinstance(value, str):
        raise ValueError(f"{key}: expected a string, got {value!r}")
    if choices is not None and value not in choices:
        raise ValueError(f"{key}: expected one of {', '.join(choices)}, got {value!r}")
    return value


def get_bool(options: dict[str, Any], key: str, default: bool, where: str = "") -> bool:
    value = options.get(key, default)
    key = where + key
    if not isinstance(value, bool):
        raise ValueError(f"{key}: expected true or false, got {value!r}")
    return value


def did_you_mean(key: Any, known: list[str]) -> str:
    """`` (did you mean 'broker'?)`` for the known key spelt most like ``key``, else ''."""
    close = difflib.get_close_matches(str(key), known, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def check_keys(options: dict[str, Any], allowed: Any, where: str = "") -> None:
    """Refuse keys the collector does not know, naming the first one (typos fail loudly)."""
    for key in options:
        if key not in allowed:
            known = sorted(allowed)
            raise ValueError(
                f"{where}{key}: unknown option{did_you_mean(key, known)}; "
                f"known options: {', '.join(known)}"
            )
