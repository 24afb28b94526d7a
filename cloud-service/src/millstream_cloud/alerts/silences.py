"""Silences: mute alerts matching label matchers between two times, with author and comment.

A silence is ``pending`` before it starts, ``active`` while it mutes, ``expired`` after
it ends; expiring one early sets its end to now. Kept in the alert store.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from millstream_cloud.alerts.labels import Matcher, match_all, parse_matchers
from millstream_cloud.alerts.store import AlertStore


class SilenceError(ValueError):
    def __init__(self, field: str, message: str) -> None:
        self.field = field
        super().__init__(f"{field}: {message}")


@dataclass
class Silence:
    id: str
    matchers: list[Matcher]
    starts_at: int
    ends_at: int
    created_by: str
    comment: str
    updated_at: int

    def state(self, now: int) -> str:
        if now < self.starts_at:
            return "pending"
        return "active" if now < self.ends_at else "expired"

    def to_row(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "matchers": [m.to_dict() for m in self.matchers],
            "starts_at": self.starts_at,
            "ends_at": self.ends_at,
            "created_by": self.created_by,
            "comment": self.comment,
            "updated_at": self.updated_at,
        }


class Silences:
    def __init__(self, store: AlertStore) -> None:
        self.store = store
        self._lock = threading.Lock()
        self._by_id: dict[str, Silence] = {}
        for row in store.load_silences():
            self._by_id[row["id"]] = Silence(
                row["id"],
                parse_matchers(row["matchers"]),
                row["starts_at"],
                row["ends_at"],
                row["created_by"],
                row["comment"],
                row["updated_at"],
            )

    def create(
        self,
        matchers: list[Any],
        starts_at: int,
        ends_at: int,
        created_by: str,
        comment: str,
        now: int,
        silence_id: str | None = None,
    ) -> Silence:
        if not matchers:
            raise SilenceError("matchers", "at least one matcher is required")
        try:
            parsed = parse_matchers(matchers)
        except (ValueError, KeyError) as exc:
            raise SilenceError("matchers", str(exc)) from None
        if all(m.matches({}) for m in parsed):
            raise SilenceError(
                "matchers", "would match every alert; at least one matcher must need a label value"
            )
        if not created_by.strip():
            raise SilenceError("createdBy", "who creates the silence is required")
        if not comment.strip():
            raise SilenceError("comment", "say why the alerts are silenced")
        if ends_at <= starts_at:
            raise SilenceError("endsAt", "must be after startsAt")
        if ends_at <= now:
            raise SilenceError("endsAt", "is in the past")
        with self._lock:
            if silence_id is not None and silence_id in self._by_id:
                # Alertmanager's update: the old silence is expired, a new one replaces it.
                self._expire(silence_id, now)
            s = Silence(str(uuid.uuid4()), parsed, starts_at, ends_at, created_by, comment, now)
            self._by_id[s.id] = s
            self.store.save_silence(s.to_row())
            return s

    def _expire(self, silence_id: str, now: int) -> Silence:
        s = self._by_id[silence_id]
        if s.state(now) == "expired":
            return s
        s.ends_at = max(now, s.starts_at)
        if s.starts_at > now:
            s.starts_at = now
            s.ends_at = now
        s.updated_at = now
        self.store.save_silence(s.to_row())
        return s

    def expire(self, silence_id: str, now: int) -> Silence:
        with self._lock:
            if silence_id not in self._by_id:
                raise KeyError(silence_id)
            return self._expire(silence_id, now)

    def get(self, silence_id: str) -> Silence | None:
        return self._by_id.get(silence_id)

    def all(self) -> list[Silence]:
        with self._lock:
            return sorted(self._by_id.values(), key=lambda s: (s.starts_at, s.id))

    def muting(self, labels: Mapping[str, str], now: int) -> list[str]:
        """Ids of the active silences that mute an alert with these labels."""
        with self._lock:
            return [
                s.id
                for s in self._by_id.values()
                if s.starts_at <= now < s.ends_at and match_all(s.matchers, labels)
            ]

    def gc(self, older_than: int) -> None:
        """Forget silences that ended before ``older_than``."""
        with self._lock:
            for sid in [s.id for s in self._by_id.values() if s.ends_at < older_than]:
                del self._by_id[sid]
            self.store.delete_silences_before(older_than)
