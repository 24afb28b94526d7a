"""The rows a device model learns from: the latest complete rows of a device's metrics and,
for each, whether it was inside an anomaly (a retrain leaves those out).

A week of 10-s rows is 60,480 of them. Kept as Python lists of floats that is about 380 bytes
a row for a 10-metric device (23 MB a device); here they are one NumPy ring, 8 bytes a value,
grown as rows arrive so a young device holds only what it has seen.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from .base import pack_floats, unpack_floats


class RowWindow:
    """The latest ``maxlen`` rows (all of one width) and one flag per row, oldest first.

    A row of another width than those kept (a metric added, or one joining the model)
    starts the window afresh: rows that lack a metric cannot train a model that has it."""

    def __init__(self, maxlen: int) -> None:
        self.maxlen = max(1, int(maxlen))
        self.width = 0
        self._x = np.empty((0, 0))
        self._f = np.empty(0, dtype=bool)
        self._start = 0  # index of the oldest row in the ring
        self._n = 0

    def __len__(self) -> int:
        return self._n

    def __iter__(self) -> Iterator[np.ndarray]:
        return iter(self.values())

    def clear(self) -> None:
        self._x = np.empty((0, self.width))
        self._f = np.empty(0, dtype=bool)
        self._start = self._n = 0

    def _order(self) -> np.ndarray:
        return (self._start + np.arange(self._n)) % max(len(self._x), 1)

    def values(self) -> np.ndarray:
        """The rows, oldest first (a copy)."""
        return self._x[self._order()]

    def flags(self) -> np.ndarray:
        """Whether each row was inside an anomaly, oldest first (a copy)."""
        return self._f[self._order()]

    def last(self) -> list[float]:
        return [float(v) for v in self._x[(self._start + self._n - 1) % len(self._x)]]

    def _grow(self, need: int) -> None:
        """Room for ``need`` rows (at most ``maxlen``), the kept ones laid out from 0."""
        cap = min(self.maxlen, max(need, 2 * len(self._x), 64))
        x, f = np.empty((cap, self.width)), np.zeros(cap, dtype=bool)
        order = self._order()
        x[: self._n], f[: self._n] = self._x[order], self._f[order]
        self._x, self._f, self._start = x, f, 0

    def extend(
        self, rows: Sequence[Sequence[float]] | np.ndarray, flags: Sequence[bool] | np.ndarray
    ) -> None:
        """Add rows with their flags; the oldest go once there are ``maxlen``."""
        if not len(rows):
            return
        x = np.asarray(rows, dtype=float).reshape(len(rows), -1)
        f = np.asarray(flags, dtype=bool)
        if x.shape[1] != self.width:
            self.width = x.shape[1]
            self.clear()
        if len(x) > self.maxlen:
            x, f = x[-self.maxlen :], f[-self.maxlen :]
        if self._n + len(x) > len(self._x) and len(self._x) < self.maxlen:
            self._grow(self._n + len(x))
        cap = len(self._x)
        at = (self._start + self._n + np.arange(len(x))) % cap
        self._x[at], self._f[at] = x, f
        n = self._n + len(x)
        if n > cap:
            self._start = (self._start + n - cap) % cap
            n = cap
        self._n = n

    def resize(self, maxlen: int) -> None:
        """Keep ``maxlen`` rows from now on (the latest of those kept)."""
        x, f = self.values(), self.flags()
        self.maxlen = max(1, int(maxlen))
        self.clear()
        self.extend(x, f)

    def state_dict(self) -> dict[str, Any]:
        """The rows packed (:func:`pack_floats`, with their width) and the flags as runs of
        one value (``[value, count]``): a week of flags is a handful of runs."""
        x, f = self.values(), self.flags()
        starts = np.flatnonzero(np.r_[True, f[1:] != f[:-1]]) if len(f) else np.zeros(0, int)
        sizes = np.diff(np.r_[starts, len(f)])
        runs = [[int(f[a]), int(n)] for a, n in zip(starts, sizes, strict=True)]
        rows: Any = {"width": self.width, **pack_floats(x.ravel())} if self._n else []
        return {"rows": rows, "flags": {"runs": runs}}

    def load_state(self, rows: Any, flags: Any) -> None:
        """Rows and flags as :meth:`state_dict` writes them, or as saved before (rows as
        packed floats or lists, flags as a list of booleans)."""
        if isinstance(rows, dict):
            x = unpack_floats(rows).reshape(-1, int(rows["width"]))
        else:
            x = np.asarray([list(r) for r in rows], dtype=float)
        if isinstance(flags, dict):
            f = np.concatenate(
                [np.full(int(n), bool(v)) for v, n in flags["runs"]] or [np.zeros(0, bool)]
            )
        else:
            f = np.asarray([bool(v) for v in flags], dtype=bool)
        self.clear()
        if len(x):
            self.extend(x, f)
