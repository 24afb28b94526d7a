"""A small, deterministic fleet history written identically to InfluxDB 1.x and to a backend.

Two sites, three devices of two kinds, two hours at 10 s: telemetry (one field per
metric), a device that drops out for 20 minutes, the fleet measurements the dashboards
read (``devices`` every 30 s, ``ingest`` every 10 s per worker), anomalies (one of them
multivariate, without a ``metric`` tag) and alert notifications.
"""

from __future__ import annotations

import math

from millstream_cloud.storage.base import Point

T0_NS = 1_709_251_200 * 10**9  # 2024-03-01T00:00:00Z
STEP_NS = 10 * 10**9
DURATION_NS = 2 * 3600 * 10**9
S = 10**9

DEVICES = {  # device -> (site, kind, metrics)
    "press-01": ("plant-a", "press", ("temperature", "pressure", "vibration")),
    "press-02": ("plant-a", "press", ("temperature", "pressure", "vibration")),
    "lathe-01": ("plant-b", "lathe", ("temperature", "spindle_speed")),
}
OFFLINE = ("press-02", T0_NS + 40 * 60 * S, T0_NS + 60 * 60 * S)  # no data in [start, end)

# a query window like Grafana's: not aligned to anything
FROM_MS = (T0_NS + 10 * 60 * S) // 10**6 + 123
TO_MS = (T0_NS + 110 * 60 * S) // 10**6 + 456


def _online(device: str, t: int) -> bool:
    return not (device == OFFLINE[0] and OFFLINE[1] <= t < OFFLINE[2])


def fleet_points() -> list[Point]:
    pts: list[Point] = []
    for n, t in enumerate(range(T0_NS, T0_NS + DURATION_NS, STEP_NS)):
        for k, (device, (site, kind, metrics)) in enumerate(DEVICES.items()):
            if _online(device, t):
                for j, metric in enumerate(metrics):
                    base = {"temperature": 60.0, "pressure": 180.0, "vibration": 2.5,
                            "spindle_speed": 1500.0}[metric]  # fmt: skip
                    v = base * (1 + 0.1 * math.sin(n / (17 + 3 * j) + k)) + ((n * 7 + k) % 5) * 0.01
                    pts.append(Point("telemetry", {"site": site, "device": device, "kind": kind},
                                     {metric: round(v, 4)}, t))  # fmt: skip
            if t % (30 * S) == 0:
                on = _online(device, t)
                pts.append(Point("devices", {"site": site, "device": device, "kind": kind},
                                 {"online": int(on), "offline": int(not on)}, t))  # fmt: skip
        for w, instance in enumerate(("worker-1", "worker-2")):
            readings = 40 + (n + w) % 7
            pts.append(Point("ingest", {"instance": instance},
                             {"readings": readings, "rate": readings / 10.0, "rejected": n % 3,
                              "duplicates": (n + w) % 2}, t))  # fmt: skip
    detectors = ("zscore", "isoforest")
    for i in range(24):
        device = list(DEVICES)[i % 3]
        site, _, metrics = DEVICES[device]
        t = T0_NS + (5 + i * 4.7).__int__() * 60 * S + i * 1_234_567
        tags = {"site": site, "device": device, "detector": detectors[i % 2]}
        if i % 7 != 3:  # every seventh is a whole-device (multivariate) anomaly: no metric
            tags["metric"] = metrics[(i // 3) % len(metrics)]
        pts.append(Point("anomalies", tags,
                         {"score": round(3 + (i % 5) * 0.75, 3), "likelihood": round(0.9 + (i % 9) / 100, 4),
                          "explanation": f"{tags.get('metric', 'device')} {2 + i % 4} sigma \"high\""}, t))  # fmt: skip
    verdicts = ("confirmed", "false_alarm", "expected")
    anomalies = [p for p in pts if p.measurement == "anomalies"]
    for i, a in enumerate(anomalies[::3]):  # an operator judged every third anomaly
        pts.append(Point("anomaly_feedback", dict(a.tags),
                         {"verdict": verdicts[i % 3], "comment": f"checked \"{i}\"", "author": "ana"}, a.time_ns))  # fmt: skip
    for i in range(10):
        device = list(DEVICES)[i % 3]
        site = DEVICES[device][0]
        for state, dt in (("firing", 0), ("resolved", 7 * 60 * S)):
            t = T0_NS + (12 + i * 10) * 60 * S + dt
            pts.append(Point("alerts", {"alertname": ("HighTemperature", "DeviceOffline")[i % 2], "site": site,
                                        "device": device, "severity": ("warning", "critical")[i % 2],
                                        "state": state},
                             {"value": 70.0 + i, "summary": f"{device} at {70 + i} C"}, t))  # fmt: skip
    for i, device in enumerate(DEVICES):  # one fault per device that no detector raised
        t = T0_NS + (41 + 13 * i) * 60 * S + 9_876
        tags = {"site": DEVICES[device][0], "device": device, "metric": DEVICES[device][2][0]}
        pts.append(
            Point(
                "missed_faults",
                tags,
                {
                    "end_ns": t + 600 * S,
                    "end_ms": (t + 600 * S) // 1_000_000,
                    "comment": "seal leak",
                    "author": "ana",
                },
                t,
            )
        )
    for i, device in enumerate(DEVICES):  # one detection re-baseline per device
        t = T0_NS + (30 + 17 * i) * 60 * S + 4_321
        pts.append(Point("detection_events", {"site": DEVICES[device][0], "device": device, "event": "relearn"},
                         {"explanation": "detection re-baselined", "metric_detectors": 2 + i}, t))  # fmt: skip
        # and one maintenance window: a span (end_ms), drawn as a region
        t = T0_NS + (50 + 11 * i) * 60 * S
        pts.append(Point("detection_events", {"site": DEVICES[device][0], "device": device, "event": "maintenance"},
                         {"explanation": "maintenance until ...", "end_ms": t // 1_000_000 + 7_200_000}, t))  # fmt: skip
    return pts
