"""The one interface every collector implements.

A collector turns one source (a simulated machine, the host, a Modbus device, an OPC UA
server) into samples. The agent calls :meth:`Collector.collect` every ``interval``
seconds; a collector that receives data by subscription buffers it and hands it over on
the next call. Collectors never publish, queue or retry: the agent's core does that.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Any, ClassVar, Optional


@dataclass(frozen=True)
class Sample:
    """One value read from a source, timestamped when it was read (UTC epoch seconds)."""

    ts: float
    metric: str
    value: float
    unit: Optional[str] = None
    quality: str = "good"


class CollectorError(Exception):
    """A collector could not read its source; the agent logs it and tries again later."""


class Collector(abc.ABC):
    """Base class of collectors. Subclasses set ``type_name`` and register with the registry.

    ``options`` is the collector's own config block (validated by :meth:`validate`
    before construction so a bad config is refused at start with the key named).
    """

    type_name: ClassVar[str]
    # Option name -> (type, default, one-line doc); used for validation and sample-config.
    options_spec: ClassVar[dict[str, Any]] = {}

    def __init__(self, name: str, options: dict[str, Any]) -> None:
        self.name = name
        self.options = options

    @abc.abstractmethod
    def collect(self, now: float) -> list[Sample]:
        """Read the source once; ``now`` is the agent's clock (epoch seconds)."""

    def start(self) -> None:  # noqa: B027 - optional hook
        """Open connections or subscriptions; called once before the first collect."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections; called once at shutdown."""
