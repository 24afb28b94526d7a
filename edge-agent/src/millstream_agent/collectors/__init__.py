"""Collectors, registered by name. Optional ones load lazily so their extras stay optional."""

from __future__ import annotations

import importlib

from millstream_agent.collectors.base import Collector, CollectorError, Sample

# type name -> (module, pip extra that provides its dependencies)
_KNOWN: dict[str, tuple] = {
    "simulated": ("millstream_agent.collectors.simulated", None),
    "host": ("millstream_agent.collectors.host", "host"),
    "modbus": ("millstream_agent.collectors.modbus", "modbus"),
    "opcua": ("millstream_agent.collectors.opcua", "opcua"),
}

_REGISTRY: dict[str, type[Collector]] = {}


def register(cls: type[Collector]) -> type[Collector]:
    """Class decorator: one line makes a collector exist under ``cls.type_name``."""
    _REGISTRY[cls.type_name] = cls
    return cls


def known_types() -> list:
    return sorted(_KNOWN)


def collector_class(type_name: str) -> type[Collector]:
    """The collector class for ``type_name``, importing its module on first use."""
    if type_name not in _REGISTRY:
        if type_name not in _KNOWN:
            raise ValueError(
                f"unknown collector type {type_name!r}; known: {', '.join(known_types())}"
            )
        module, extra = _KNOWN[type_name]
        try:
            importlib.import_module(module)
        except ImportError as exc:
            hint = f" (install it with: pip install 'millstream-agent[{extra}]')" if extra else ""
            raise ValueError(
                f"collector {type_name!r} needs a missing package: {exc.name}{hint}"
            ) from exc
    return _REGISTRY[type_name]


__all__ = ["Collector", "CollectorError", "Sample", "collector_class", "known_types", "register"]
