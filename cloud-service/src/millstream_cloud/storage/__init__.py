"""Storage backends behind one interface (``base.Storage``), chosen by ``storage.backend``."""

from __future__ import annotations

from millstream_cloud.settings import Settings
from millstream_cloud.storage.base import Storage, backend_class


def open_storage(settings: Settings) -> Storage:
    """Open the configured backend; importing a backend's module registers it."""
    name = settings.storage.backend
    if name == "embedded":
        from millstream_cloud.storage.embedded import EmbeddedStorage

        return EmbeddedStorage.from_settings(settings)
    if name == "influxdb":
        import importlib

        importlib.import_module("millstream_cloud.storage.influxdb")  # registers the backend
    cls = backend_class(name)
    return cls.from_settings(settings)  # type: ignore[attr-defined]
