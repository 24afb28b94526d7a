"""Time intervals: Alertmanager's recurring spans of the week, month and year.

A route may name intervals in ``mute_time_intervals`` (no notification while one holds:
nights, weekends, a plant's Sunday shutdown) or ``active_time_intervals`` (notifications
only while one holds: the day shift's pager). An interval holds when every field it gives
matches the time in its ``location``; a named interval holds when any of its intervals
does. Field syntax as ``alertmanager.yml``: ``times`` of ``start_time``/``end_time``
(``HH:MM``, the end excluded, ``24:00`` allowed), ``weekdays`` (``monday:friday``),
``days_of_month`` (``1:7``, ``-1`` the last day), ``months`` (``january:march`` or
``1:3``), ``years`` (``2026:2027``).
"""

from __future__ import annotations

import calendar
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

WEEKDAYS = [d.lower() for d in calendar.day_name]  # monday .. sunday, as datetime.weekday()
MONTHS = [m.lower() for m in calendar.month_name][1:]  # january .. december

Span = tuple[int, int]  # inclusive bounds


@dataclass(frozen=True, slots=True)
class TimeInterval:
    times: tuple[Span, ...] = ()  # minutes of the day, start included, end excluded
    weekdays: tuple[Span, ...] = ()  # 0 = monday
    days_of_month: tuple[Span, ...] = ()  # negative: from the month's end
    months: tuple[Span, ...] = ()  # 1 = january
    years: tuple[Span, ...] = ()
    location: str = "UTC"

    def holds(self, now_ns: int) -> bool:
        t = datetime.fromtimestamp(now_ns // 1_000_000_000, ZoneInfo(self.location))
        minute = t.hour * 60 + t.minute
        if self.times and not any(a <= minute < b for a, b in self.times):
            return False
        if self.weekdays and not _within(t.weekday(), self.weekdays):
            return False
        if self.months and not _within(t.month, self.months):
            return False
        if self.years and not _within(t.year, self.years):
            return False
        if self.days_of_month:
            last = calendar.monthrange(t.year, t.month)[1]
            spans = [(_day(a, last), _day(b, last)) for a, b in self.days_of_month]
            if not _within(t.day, spans):
                return False
        return True


def _within(value: int, spans: Sequence[Span]) -> bool:
    return any(a <= value <= b for a, b in spans)


def _day(d: int, last: int) -> int:
    """A day of the month, a negative one counted from ``last`` (-1 the last day)."""
    return d if d > 0 else last + 1 + d


def holding(
    names: Sequence[str], intervals: Mapping[str, Sequence[TimeInterval]], now_ns: int
) -> str | None:
    """The first of ``names`` whose intervals hold at ``now_ns``, if any."""
    for name in names:
        if any(i.holds(now_ns) for i in intervals.get(name, ())):
            return name
    return None


def parse_times(ranges: Sequence[Mapping[str, str]]) -> tuple[Span, ...]:
    out = []
    for i, r in enumerate(ranges):
        start, end = (
            _clock(r.get("start_time"), i, "start_time"),
            _clock(r.get("end_time"), i, "end_time"),
        )
        if end <= start:
            raise ValueError(
                f"times[{i}]: end_time {r.get('end_time')} is not after start_time "
                f"{r.get('start_time')} (split a span over midnight in two)"
            )
        out.append((start, end))
    return tuple(out)


def _clock(text: str | None, i: int, key: str) -> int:
    parts = (text or "").split(":")
    if len(parts) == 2 and all(p.isdigit() and len(p) == 2 for p in parts):
        h, m = int(parts[0]), int(parts[1])
        if (h < 24 and m < 60) or (h, m) == (24, 0):
            return h * 60 + m
    raise ValueError(f"times[{i}].{key}: {text!r} is not a time of day HH:MM (00:00 to 24:00)")


def parse_spans(
    field: str, items: Sequence[str], names: Sequence[str] = (), lo: int = 1, hi: int = 9999
) -> tuple[Span, ...]:
    """``a`` or ``a:b`` items, each a number in [lo, hi] or one of ``names`` (1-based,
    or 0-based for weekdays); for days of the month a negative number counts from the end."""
    out = []
    for item in items:
        ends = str(item).lower().split(":")
        if len(ends) > 2:
            raise ValueError(f"{field}: {item!r} is not a value or a range a:b")
        a, b = (_value(field, e, names, lo, hi) for e in (ends[0], ends[-1]))
        # (A day range may run from a day to one counted from the end: 1:-1 is all.)
        if (field != "days_of_month" or (a > 0) == (b > 0)) and a > b:
            raise ValueError(f"{field}: {item!r} ends before it begins")
        out.append((a, b))
    return tuple(out)


def _value(field: str, text: str, names: Sequence[str], lo: int, hi: int) -> int:
    text = text.strip()
    if text in names:
        return names.index(text) + (0 if field == "weekdays" else 1)
    allowed = " or ".join(
        x for x in (f"{names[0]} .. {names[-1]}" if names else "", f"{lo} .. {hi}") if x
    )
    if field == "days_of_month":
        allowed += " or -31 .. -1"
    if field == "weekdays":  # by name only, as Alertmanager
        allowed = f"{names[0]} .. {names[-1]}"
    else:
        try:
            v = int(text)
        except ValueError:
            v = None
        if v is not None and (lo <= v <= hi or (field == "days_of_month" and -31 <= v <= -1)):
            return v
    raise ValueError(f"{field}: {text!r} is not one of {allowed}")


def parse_location(location: str) -> str:
    try:
        ZoneInfo(location)
    except (ZoneInfoNotFoundError, ValueError, OSError):
        raise ValueError(
            f"location: {location!r} is not a time zone (an IANA name: Europe/Berlin, UTC)"
        ) from None
    return location


def parse_interval(raw: Mapping[str, object]) -> TimeInterval:
    """A time interval from its settings (``TimeIntervalConfig`` fields), or ValueError
    naming the field at fault."""

    def items(key: str) -> list[str]:
        v = raw.get(key) or []
        return [str(x) for x in v] if isinstance(v, list) else [str(v)]

    times = raw.get("times") or []
    return TimeInterval(
        times=parse_times(times if isinstance(times, list) else []),
        weekdays=parse_spans("weekdays", items("weekdays"), WEEKDAYS),
        days_of_month=parse_spans("days_of_month", items("days_of_month"), lo=1, hi=31),
        months=parse_spans("months", items("months"), MONTHS, lo=1, hi=12),
        years=parse_spans("years", items("years"), lo=1, hi=9999),
        location=parse_location(str(raw.get("location") or "UTC")),
    )
