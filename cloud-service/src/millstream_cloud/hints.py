"""What a configuration error tells its reader besides "wrong": the key it was likely
meant for, and which key it is about.

Shared by the cloud's settings, its alert rules and its detection rules, so that a typo
is answered the same way wherever it is made (as Telegraf and Alertmanager name the
unknown field and, here, the field it resembles).
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


def likely_meant(key: str, known: Iterable[str]) -> str | None:
    """The known key spelt most like ``key`` (a typo's intended key), if one is close."""
    close = difflib.get_close_matches(key, list(known), n=1, cutoff=0.75)
    return close[0] if close else None


class KeyedValueError(ValueError):
    """A setting's problem that knows the key it is about (``path``, below the block
    checked), so that whoever reports it can place it at that key, and its line in a
    file, without reading the message text. The message reads ``{prefix}key: problem``
    (the prefix says where the block is, with its separator: ``"detection settings: "``,
    ``"detection.rules[0].streaming."``)."""

    def __init__(self, path: tuple[str, ...], problem: str, prefix: str = "") -> None:
        super().__init__(f"{prefix}{'.'.join(path)}: {problem}" if path else f"{prefix}{problem}")
        self.path = path
        self.problem = problem
