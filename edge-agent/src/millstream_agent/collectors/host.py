"""The machine the agent runs on (a Raspberry Pi, usually): CPU, memory, disk, network,
temperature (psutil).

Counters (disk and network bytes) are turned into rates per second between two
collects, so the first collect has no rates. Whatever the platform cannot tell (no
temperature sensor in a VM or a container, no load average on Windows) is skipped
quietly: a missing sensor is not an error on a host, it is a property of the host.
"""

from __future__ import annotations

import logging
import os
import re
import time
from typing import Any, Callable, Optional

import psutil

from millstream_agent.collectors import register
from millstream_agent.collectors._options import check_keys, get_bool, get_str
from millstream_agent.collectors.base import Collector, Sample

log = logging.getLogger(__name__)

# The Pi firmware's throttling flags (Raspberry Pi OS kernels 5.x+): bit 0 under-voltage
# now, 1 frequency capped, 2 throttled, 3 soft temperature limit; bits 16-19 the same
# "since boot". A weak power supply is the most common fault of a Pi in the field.
THROTTLED_PATH = "/sys/devices/platform/soc/soc:firmware/get_throttled"

# Sensor chips in the order we prefer them: the Pi's SoC, then the usual x86 ones.
_TEMPERATURE_CHIPS = ("cpu_thermal", "cpu-thermal", "coretemp", "k10temp", "zenpower", "acpitz")


def _label(path: str) -> str:
    """A metric-safe label for a mount point: / -> root, /var/lib -> var_lib."""
    cleaned = re.sub(r"[^A-Za-z0-9]+", "_", path).strip("_")
    return cleaned or "root"


@register
class HostCollector(Collector):
    """CPU, memory, disk, network and temperature of the agent's own machine."""

    type_name = "host"
    options_spec = {
        "prefix": (str, "host.", "put before every metric name"),
        "cpu": (bool, True, "cpu_percent, load1/5/15, uptime"),
        "memory": (bool, True, "memory_percent, memory_available, swap_percent"),
        "disk": (bool, True, "disk_percent and disk_free per path, read/write bytes per second"),
        "disk_paths": (list, ["/"], "mount points to report (the Pi's SD card is /)"),
        "network": (bool, True, "rx/tx bytes per second, errors and drops per second"),
        "interfaces": (list, [], "interfaces to sum; empty: every one except loopback"),
        "temperature": (bool, True, "cpu_temperature and a Pi's throttling, where available"),
    }

    def __init__(self, name: str, options: dict[str, Any]) -> None:
        super().__init__(name, options)
        check_keys(options, self.options_spec)
        self.prefix = get_str(options, "prefix", "host.") or ""
        self.enabled = {
            key: get_bool(options, key, True)
            for key in ("cpu", "memory", "disk", "network", "temperature")
        }
        paths = options.get("disk_paths", ["/"])
        if not isinstance(paths, list) or not all(isinstance(p, str) and p for p in paths):
            raise ValueError(f"disk_paths: expected a list of mount points, got {paths!r}")
        self.disk_paths = paths
        interfaces = options.get("interfaces", [])
        if not isinstance(interfaces, list) or not all(isinstance(i, str) for i in interfaces):
            raise ValueError(f"interfaces: expected a list of interface names, got {interfaces!r}")
        self.interfaces = interfaces
        self._previous: dict[str, tuple] = {}  # counter name -> (monotonic time, values)
        self._skipped: set = set()

    def start(self) -> None:
        # psutil measures CPU use between two calls; the first one only sets the mark.
        psutil.cpu_percent(interval=None)

    def collect(self, now: float) -> list[Sample]:
        out: list[Sample] = []
        p = self.prefix

        def add(metric: str, value: Optional[float], unit: Optional[str]) -> None:
            if value is not None:
                out.append(Sample(now, p + metric, round(float(value), 3), unit))

        parts: list[tuple[str, Callable[[Callable[..., None]], None]]] = [
            ("cpu", self._cpu),
            ("memory", self._memory),
            ("disk", self._disk),
            ("network", self._network),
            ("temperature", self._temperature),
        ]
        for key, part in parts:
            if not self.enabled[key]:
                continue
            try:
                part(add)
            except (OSError, AttributeError, NotImplementedError) as exc:
                self._skip(key, exc)
        return out

    def _skip(self, what: str, exc: BaseException) -> None:
        if what not in self._skipped:
            self._skipped.add(what)
            log.info("host %s: %s not available here (%s); skipped", self.name, what, exc)

    def _rates(self, key: str, values: tuple) -> Optional[list[float]]:
        """Per-second rates of counters since the previous collect (None the first time)."""
        t = time.monotonic()
        previous = self._previous.get(key)
        self._previous[key] = (t, values)
        if previous is None:
            return None
        dt = t - previous[0]
        deltas = [a - b for a, b in zip(values, previous[1])]
        if dt <= 0 or any(d < 0 for d in deltas):  # counters reset (interface re-created)
            return None
        return [d / dt for d in deltas]

    def _cpu(self, add: Callable[..., None]) -> None:
        add("cpu_percent", psutil.cpu_percent(interval=None), "%")
        if hasattr(os, "getloadavg"):
            load1, load5, load15 = os.getloadavg()
            add("load1", load1, None)
            add("load5", load5, None)
            add("load15", load15, None)
        add("uptime", time.time() - psutil.boot_time(), "s")

    def _memory(self, add: Callable[..., None]) -> None:
        memory = psutil.virtual_memory()
        add("memory_percent", memory.percent, "%")
        add("memory_available", memory.available, "B")
        try:
            add("swap_percent", psutil.swap_memory().percent, "%")
        except (OSError, RuntimeError) as exc:
            self._skip("swap", exc)

    def _disk(self, add: Callable[..., None]) -> None:
        single = len(self.disk_paths) == 1
        for path in self.disk_paths:
            try:
                usage = psutil.disk_usage(path)
            except OSError as exc:
                self._skip(f"disk {path}", exc)
                continue
            suffix = "" if single else "." + _label(path)
            add("disk_percent" + suffix, usage.percent, "%")
            add("disk_free" + suffix, usage.free, "B")
        counters = psutil.disk_io_counters(perdisk=False)
        if counters is None:  # no block devices visible (some containers)
            return
        rates = self._rates("disk", (counters.read_bytes, counters.write_bytes))
        if rates is not None:
            add("disk_read_bytes_per_s", rates[0], "B/s")
            add("disk_write_bytes_per_s", rates[1], "B/s")

    def _network(self, add: Callable[..., None]) -> None:
        per_nic = psutil.net_io_counters(pernic=True)
        names = self.interfaces or [n for n in per_nic if n != "lo" and not n.startswith("lo")]
        totals = [0, 0, 0, 0]
        for nic in names:
            c = per_nic.get(nic)
            if c is None:
                self._skip(f"interface {nic}", OSError("no such interface"))
                continue
            totals[0] += c.bytes_recv
            totals[1] += c.bytes_sent
            totals[2] += c.errin + c.errout
            totals[3] += c.dropin + c.dropout
        rates = self._rates("net:" + ",".join(names), tuple(totals))
        if rates is not None:
            add("net_rx_bytes_per_s", rates[0], "B/s")
            add("net_tx_bytes_per_s", rates[1], "B/s")
            add("net_errors_per_s", rates[2], "1/s")
            add("net_drops_per_s", rates[3], "1/s")

    def _temperature(self, add: Callable[..., None]) -> None:
        sensors: dict = getattr(psutil, "sensors_temperatures", dict)()  # absent on some platforms
        if not sensors:
            self._skip("temperature", NotImplementedError("no temperature sensors"))
        for chip in (*_TEMPERATURE_CHIPS, *sorted(sensors)):
            readings = sensors.get(chip)
            if readings:
                add("cpu_temperature", readings[0].current, "degC")
                break
        self._throttled(add)

    def _throttled(self, add: Callable[..., None]) -> None:
        try:
            with open(THROTTLED_PATH) as f:
                flags = int(f.read().strip(), 16)
        except (OSError, ValueError):
            return  # not a Raspberry Pi
        add("throttled", flags & 0xF, None)
        add("under_voltage_since_boot", (flags >> 16) & 1, None)
