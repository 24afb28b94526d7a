"""Notifiers, one module each, registered by name; a receiver lists them as
``<name>_configs`` (``webhook_configs``, ``email_configs``, ...) as Alertmanager does."""

from millstream_cloud.alerts.notifiers import (  # noqa: F401 - importing registers them
    alertmanager,
    apprise,
    email,
    logfile,
    mqtt,
    webhook,
)
from millstream_cloud.alerts.notifiers.base import (
    NOTIFIERS,
    AlertSnapshot,
    DeliveryError,
    Notification,
    Notifier,
    NotifierConfig,
    NotifierContext,
    register,
)

__all__ = [
    "NOTIFIERS",
    "AlertSnapshot",
    "DeliveryError",
    "Notification",
    "Notifier",
    "NotifierConfig",
    "NotifierContext",
    "register",
]
