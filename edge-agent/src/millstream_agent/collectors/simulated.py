"""A simulated machine: realistic signals for demos, tests and detector evaluation.

Each metric is a base level plus a daily cycle, a load factor and Gaussian noise, drawn
from a seeded generator so a run can be reproduced.
"""

from __future__ import annotations

import math
import random
from typing import Any, Dict, List, Tuple

from millstream_agent.collectors import register
from millstream_agent.collectors.base import Collector, Sample

# metric -> (base level, daily amplitude, load sensitivity, noise sd, unit)
MACHINE_METRICS: Dict[str, List[Tuple[str, float, float, float, float, str]]] = {
    "motor": [
        ("bearing_vibration", 2.0, 0.1, 0.8, 0.05, "mm/s"),
        ("winding_temperature", 65.0, 3.0, 15.0, 0.3, "degC"),
        ("current", 12.0, 0.5, 6.0, 0.1, "A"),
        ("speed", 1480.0, 2.0, -10.0, 1.0, "rpm"),
        ("voltage", 400.0, 1.0, -2.0, 0.5, "V"),
        ("power", 7.5, 0.3, 4.0, 0.05, "kW"),
        ("ambient_temperature", 24.0, 4.0, 0.5, 0.2, "degC"),
        ("housing_temperature", 45.0, 2.0, 8.0, 0.2, "degC"),
        ("axial_vibration", 1.2, 0.05, 0.5, 0.03, "mm/s"),
        ("power_factor", 0.86, 0.01, 0.05, 0.003, ""),
    ],
}


@register
class SimulatedCollector(Collector):
    """A simulated machine of a given ``kind`` producing ``metrics`` signals."""

    type_name = "simulated"
    options_spec = {
        "kind": (str, "motor", "machine kind: motor, pump or compressor"),
        "metrics": (int, 10, "how many of the kind's metrics to produce"),
        "seed": (int, 0, "random seed; the same seed gives the same signals"),
    }

    def __init__(self, name: str, options: Dict[str, Any]) -> None:
        super().__init__(name, options)
        kind = str(options.get("kind", "motor"))
        table = MACHINE_METRICS.get(kind, MACHINE_METRICS["motor"])
        count = int(options.get("metrics", 10))
        self._metrics = [table[i % len(table)] for i in range(count)]
        self._names = [
            m[0] if i < len(table) else f"{m[0]}_{i // len(table)}"
            for i, m in enumerate(self._metrics)
        ]
        self._rng = random.Random(int(options.get("seed", 0)))
        self._load = 0.7

    def collect(self, now: float) -> List[Sample]:
        day = 2 * math.pi * ((now % 86400.0) / 86400.0)
        self._load = min(1.0, max(0.2, self._load + self._rng.gauss(0, 0.01)))
        samples = []
        for name, (_, base, amp, load_k, noise, unit) in zip(self._names, self._metrics):
            value = base + amp * math.sin(day) + load_k * (self._load - 0.7)
            value += self._rng.gauss(0, noise)
            samples.append(Sample(now, name, round(value, 4), unit or None))
        return samples
