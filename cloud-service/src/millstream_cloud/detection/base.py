"""The small contracts every detector follows, and the registry that names them.

Streaming detectors follow River: ``learn_one(x)`` updates, ``score_one(x)`` scores without
learning, a higher score is more anomalous. Batch detectors follow scikit-learn: parameters
in ``__init__``, ``fit(X)`` learns, ``score_samples(X)`` returns one score per row (higher is
more anomalous here, unlike scikit-learn's sign convention). Every detector can give its
state as plain JSON-able data and be rebuilt from it, so detectors survive restarts.
"""

from __future__ import annotations

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
