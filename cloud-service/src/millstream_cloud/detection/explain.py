"""Plain-words explanations an ops engineer can read from an alert."""

from __future__ import annotations

import math
from collections.abc import Sequence

from ..model import Contribution


def describe(c: Contribution, context: str = "its usual level") -> str:
    """``bearing_temp_c 4.2\u03c3 above its usual level (62.1, expected 55.3)``."""
    value, expected = numbers(c.value, c.expected)
    if c.sigma == float("inf") or c.sigma == float("-inf"):
        return f"{c.metric} at {value}, expected about {expected}"
    way = "above" if c.sigma >= 0 else "below"
    if (c.value - c.expected) * c.sigma < 0:
        # The sigma is an average's (the device model's: 30 minutes of residuals) and the
        # reading is on the other side now: "7.0 sigma below ... (57.77, expected 56.63)" read
        # as a contradiction (2 of 480 quoted pairs in the benchmarks' stored results).
        return (
            f"{c.metric} {abs(c.sigma):.1f}\u03c3 {way} {context} on average"
            f" (now {value}, expected {expected})"
        )
    return f"{c.metric} {abs(c.sigma):.1f}\u03c3 {way} {context} ({value}, expected {expected})"


def numbers(value: float, expected: float) -> tuple[str, str]:
    """A reading and its expected value to four significant digits, or to as many decimals
    as show their difference to two: a motor's speed 1.7 rpm off its 1520 read "1521,
    expected 1520" at four digits, "1521.3, expected 1519.6" here."""
    a, b = f"{value:.4g}", f"{expected:.4g}"
    diff = abs(value - expected)
    if not (math.isfinite(value) and math.isfinite(expected)) or diff == 0.0:
        return a, b
    decimals = 1 - math.floor(math.log10(diff))  # two significant digits of the difference
    shown = 3 - math.floor(math.log10(max(abs(value), abs(expected))))  # what .4g shows
    if decimals <= shown or decimals > 6:
        return a, b
    return f"{value:.{decimals}f}", f"{expected:.{decimals}f}"


def explain(
    contributions: Sequence[Contribution], context: str = "its usual level", limit: int = 3
) -> str:
    """The top ``limit`` contributions, strongest first, joined into one sentence."""
    ranked = sorted(contributions, key=lambda c: abs(c.sigma), reverse=True)[:limit]
    if not ranked:
        return "unusual behaviour, no single metric stands out"
    return "; ".join(describe(c, context) for c in ranked)
