"""The small contracts every detector follows, and the registry that names them.

Streaming detectors follow River: ``learn_one(x)`` updates, ``score_one(x)`` scores without
learning, a higher score is more anomalous. Batch detectors follow scikit-learn: parameters
in ``__init__``, ``fit(X)`` learns, ``score_samples(X)`` returns one score per row (higher is
more anomalous here, unlike scikit-learn's sign convention). Every detector can give its
state as plain JSON-able data and be rebuilt from it, so detectors survive restarts.
"""

from __future__ import annotations

import base64
from collections.abc import Callable
from typing import Any, Protocol, TypeVar, runtime_checkable

import numpy as np


@runtime_checkable
class StreamingDetector(Protocol):
    """A per-metric detector that sees one value at a time."""

    def learn_one(self, x: float) -> None: ...

    def score_one(self, x: float) -> float: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state(self, state: dict[str, Any]) -> None: ...


@runtime_checkable
class BatchDetector(Protocol):
    """A multivariate detector fitted on a block of normal rows."""

    def fit(self, X: np.ndarray) -> BatchDetector: ...

    def score_samples(self, X: np.ndarray) -> np.ndarray: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state(self, state: dict[str, Any]) -> None: ...


def pack_floats(values: np.ndarray) -> dict[str, str]:
    """Floats as JSON-able state, exactly and compactly: little-endian float64, base64
    (about 11 bytes a value, against about 19 for a JSON list of their decimal forms)."""
    raw = np.ascontiguousarray(values, dtype="<f8").tobytes()
    return {"f64": base64.b64encode(raw).decode("ascii")}


def unpack_floats(data: Any) -> np.ndarray:
    """The floats of :func:`pack_floats`, or of a plain list (states saved before it)."""
    if isinstance(data, dict):
        return np.frombuffer(base64.b64decode(data["f64"]), dtype="<f8").astype(float)
    return np.asarray(data, dtype=float)


T = TypeVar("T")
_REGISTRY: dict[str, Callable[..., Any]] = {}


def register(name: str) -> Callable[[T], T]:
    """Class decorator: make a detector constructible by ``create(name, **params)``."""

    def deco(cls: T) -> T:
        if name in _REGISTRY:
            raise ValueError(f"detector name {name!r} registered twice")
        _REGISTRY[name] = cls  # type: ignore[assignment]
        return cls

    return deco


def create(name: str, **params: Any) -> Any:
    """Build a registered detector; the error lists the names that exist."""
    try:
        factory = _REGISTRY[name]
    except KeyError:
        raise KeyError(
            f"unknown detector {name!r}; known: {', '.join(sorted(_REGISTRY))}"
        ) from None
    return factory(**params)


def registered() -> list[str]:
    return sorted(_REGISTRY)
