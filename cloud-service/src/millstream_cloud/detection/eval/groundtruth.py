"""Injected faults against the anomalies raised: what the demo and its benchmark report,
and the demo's detection settings they run with.

The agent's simulator writes each fault it injects as one JSON line (``device``, ``fault``,
``metrics``, ``start``, ``end``; ``millstream-agent simulate --ground-truth FILE``). A fault
is *found* when an anomaly names its device and one of its metrics between its start and
``slack_s`` after its end (a spike lasts one reading; the detectors' smoothing reports a
step a little later); an anomaly that no fault covers is *stray*.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from ...model import Anomaly, Reading
    from ..engine import EngineSettings

SLACK_S = 60.0
# The demo's detection settings, as its cloud config says them (scripts/demo.py; a test
# holds the two together). With the fleet's past sent first (the default), the live
# defaults. Without it (``--history 0``): judged after 2 minutes, learning from every
# reading (its minutes at 1 Hz, not the days the 10-s intervals are for).
DEMO_ENGINE: dict[str, Any] = {"warmup": 120, "streaming": {"resolution_s": 0.0}}
DEMO_ENGINE_WITH_HISTORY: dict[str, Any] = {}
# How long after its start a fault of each type may take to be found (else 10 s): the
# device model reports a level shift or overheating once its averaged residual crosses
# the bar, a median 5 minutes in (4-11 over the demo benchmark's 24 shifts,
# docs/detection.md), a 1-sigma drift after 46-114.
SETTLE_S: dict[str, float] = {"shift": 600.0, "overheat": 600.0, "drift": 7200.0}


def demo_settings(history: bool = False) -> EngineSettings:
    from ..engine import settings_from_mapping

    return settings_from_mapping(DEMO_ENGINE_WITH_HISTORY if history else DEMO_ENGINE)


class Machine(Protocol):
    """A simulated machine as the agent's simulator is one (``SimulatedCollector``): the
    cloud package does not import the agent, so the demo's fleet comes in built."""

    device: str
    ground_truth: list[dict[str, Any]]

    def collect(self, now: float) -> Iterable[Any]: ...  # samples: .metric, .ts, .value

    def past(self, now: float) -> Iterable[Any]: ...  # the same, healthy (no fault)


def run_demo_fleet(
    machines: Sequence[Machine],
    t0: float,
    seconds: int,
    history_s: float = 0.0,
    history_step: float = 10.0,
) -> tuple[list[Anomaly], list[dict[str, Any]]]:
    """The anomalies the engine, with the demo's settings, raises on a fleet read every
    second from ``t0`` for ``seconds``, scored as the cloud scores the demo's stored
    groups (about 5 s of the fleet each); and the faults the machines injected. With
    ``history_s``, the fleet's healthy past (a reading every ``history_step`` seconds up
    to ``t0``) comes first, as ``simulate --history`` sends it; its anomalies count too."""
    from ..engine import DetectionEngine

    engine = DetectionEngine(demo_settings(history=history_s > 0))
    found: list[Anomaly] = []
    batch: list[Reading] = []
    steps = int(history_s / history_step)
    for k in range(steps):
        for m in machines:
            batch += _readings(m, m.past(t0 - (steps - k) * history_step))
        if len(batch) >= 5000:
            found += engine.observe(batch)
            batch = []
    for k in range(seconds):
        for m in machines:
            batch += _readings(m, m.collect(t0 + k))
        if k % 5 == 4:
            found += engine.observe(batch)
            batch = []
    found += engine.observe(batch) + engine.flush()
    return found, [g for m in machines for g in m.ground_truth]


def _readings(m: Machine, samples: Iterable[Any]) -> list[Reading]:
    """A machine's samples as the cloud stores them."""
    from ...model import Reading

    return [Reading(m.device, "demo-plant", s.metric, int(s.ts * 1e9), s.value) for s in samples]


@dataclass(frozen=True, slots=True)
class Raised:
    """An anomaly as the comparison needs it: where, which metrics it names, when."""

    device: str
    metrics: frozenset[str]
    time_s: float


def raised(a: Anomaly) -> Raised:
    """An engine's anomaly: its metric, or a device model's strongest contribution."""
    names = {a.metric} if a.metric else set()
    if a.contributions:
        names.add(a.contributions[0].metric)
    return Raised(a.device, frozenset(names), a.time_ns / 1e9)


def timestamp(stamp: object) -> float:
    """Seconds since the epoch of an RFC 3339 time (``Z`` or an offset)."""
    return datetime.fromisoformat(str(stamp).replace("Z", "+00:00")).timestamp()


def during(fault: Mapping[str, Any], a: Raised, slack_s: float = SLACK_S) -> bool:
    """``a`` raised on the fault's device while it lasted (or within ``slack_s`` after)."""
    return (
        a.device == fault["device"]
        and timestamp(fault["start"]) <= a.time_s <= timestamp(fault["end"]) + slack_s
    )


def covers(fault: Mapping[str, Any], a: Raised, slack_s: float = SLACK_S) -> bool:
    """``a`` found the fault: raised during it, naming one of its metrics."""
    return not a.metrics.isdisjoint(fault["metrics"]) and during(fault, a, slack_s)


def compare(
    faults: Sequence[Mapping[str, Any]],
    raised: Sequence[Raised],
    slack_s: float = SLACK_S,
    judged_before_s: float | None = None,
    settle_s: Mapping[str, float] | None = None,
) -> dict[str, Any]:
    """Faults found and missed by type (``{"spike": {"found": 3, "of": 7}}``), the
    indexes of the anomalies no fault covers (``stray``), and of those the ones raised on
    a device while one of its faults lasted but naming another metric (``misnamed``: a
    fault seen and named wrong, not a false alarm). A fault that began after
    ``judged_before_s`` (less ``settle_s`` of its type) and has no anomaly yet is counted
    as ``recent``, not missed: the readings that show it may not have reached the
    detectors, or not for long enough."""
    by_type: dict[str, dict[str, int]] = {}
    recent = 0
    settle = settle_s or {}
    for f in faults:
        found = any(covers(f, a, slack_s) for a in raised)
        if (
            not found
            and judged_before_s is not None
            and timestamp(f["start"]) > judged_before_s - settle.get(str(f["fault"]), 0.0)
        ):
            recent += 1
            continue
        row = by_type.setdefault(str(f["fault"]), {"found": 0, "of": 0})
        row["of"] += 1
        row["found"] += found
    stray = [i for i, a in enumerate(raised) if not any(covers(f, a, slack_s) for f in faults)]
    misnamed = [
        i for i in stray if raised[i].metrics and any(during(f, raised[i], slack_s) for f in faults)
    ]
    return {"faults": by_type, "stray": stray, "misnamed": misnamed, "recent": recent}


def read_faults(path: Path) -> list[dict[str, Any]]:
    """The faults of a ground-truth JSONL file; a line cut short by a writer still at
    work (the demo reads it while the fleet runs) is left out. No file: none yet."""
    if not path.exists():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and {"device", "fault", "metrics", "start", "end"} <= set(row):
            out.append(row)
    return out


def from_api(rows: Iterable[Mapping[str, Any]]) -> list[Raised]:
    """``GET /api/v1/anomalies`` rows: a per-metric anomaly names its metric, a device
    model's its strongest contribution."""
    out = []
    for r in rows:
        names = {str(r["metric"])} if r.get("metric") else set()
        contributions = r.get("contributions") or []
        if contributions and contributions[0].get("metric"):
            names.add(str(contributions[0]["metric"]))
        out.append(Raised(str(r["device"]), frozenset(names), timestamp(r["time"])))
    return out


def summary_lines(result: Mapping[str, Any], raised: int, history: bool = False) -> list[str]:
    """The demo's closing report, in words (``history``: the fleet sent its past first,
    so its device models were trained when the faults came)."""
    faults, recent = result["faults"], result.get("recent", 0)
    when = "in the last minutes" if history else "in the last seconds"
    later = f" ({recent} more injected {when}, not judged yet)" if recent else ""
    if not faults:
        return [f"no fault injected yet{later}; anomalies {raised}"]
    total = sum(r["of"] for r in faults.values())
    kinds = ", ".join(f"{k} {r['of']}" for k, r in sorted(faults.items()))
    found = ", ".join(f"{k} {r['found']} of {r['of']}" for k, r in sorted(faults.items()))
    stray, misnamed = len(result["stray"]), len(result.get("misnamed", ()))
    named_wrong = (
        f" ({misnamed} of them during a fault of the same device, named on another metric)"
        if misnamed
        else ""
    )
    lines = [
        f"injected faults  {total} ({kinds}){later}",
        f"found            {found}",
        f"anomalies        {raised}: {raised - stray} during an injected fault, "
        f"{stray} outside one{named_wrong}",
    ]
    if history and any(r["found"] < r["of"] for r in faults.values()):
        lines.append(
            "(a modelled device's single-reading spike is left to the burst check, and a "
            "small shift can take longer than its settling time: docs/detection.md, Limits)"
        )
    elif any(r["found"] < r["of"] for r in faults.values()):
        lines.append(
            "(a metric is judged after its warm-up, and a young metric's spike is often "
            "within what it has seen: docs/detection.md, Limits)"
        )
    return lines
