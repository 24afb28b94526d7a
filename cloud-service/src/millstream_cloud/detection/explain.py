"""Plain-words explanations an ops engineer can read from an alert."""

from __future__ import annotations

from collections.abc import Sequence

from ..model import Contribution


def describe(c: Contribution, context: str = "its usual level") -> str:
    """``bearing_temp_c 4.2\u03c3 above its usual level (62.1, expected 55.3)``."""
    if c.sigma == float("inf") or c.sigma == float("-inf"):
        return f"{c.metric} at {c.value:.4g}, expected about {c.expected:.4g}"
    way = "above" if c.sigma >= 0 else "below"
    return (
        f"{c.metric} {abs(c.sigma):.1f}\u03c3 {way} {context} "
        f"({c.value:.4g}, expected {c.expected:.4g})"
    )


def explain(
    contributions: Sequence[Contribution], context: str = "its usual level", limit: int = 3
) -> str:
    """The top ``limit`` contributions, strongest first, joined into one sentence."""
    ranked = sorted(contributions, key=lambda c: abs(c.sigma), reverse=True)[:limit]
    if not ranked:
        return "unusual behaviour, no single metric stands out"
    return "; ".join(describe(c, context) for c in ranked)
