"""Log file: one JSON line per notification (the webhook payload). The demo's default."""

from __future__ import annotations

import json
import threading
from pathlib import Path

from pydantic import Field

from millstream_cloud.alerts.notifiers.base import (
    DeliveryError,
    Notification,
    Notifier,
    NotifierConfig,
    NotifierContext,
    register,
)


class LogfileConfig(NotifierConfig):
    path: str = Field("alerts.log", description="relative paths are under the data directory")


@register("logfile")
class LogfileNotifier(Notifier):
    Config = LogfileConfig
    config: LogfileConfig

    def __init__(self, config: LogfileConfig, context: NotifierContext) -> None:
        super().__init__(config, context)
        path = Path(config.path)
        self.path = path if path.is_absolute() else Path(context.data_dir) / path
        self._lock = threading.Lock()

    def notify(self, notification: Notification) -> None:
        line = json.dumps(notification.webhook_payload(), sort_keys=True)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self._lock, open(self.path, "a", encoding="utf-8") as f:
                f.write(line + "\n")
        except OSError as exc:
            raise DeliveryError(f"{self.path}: {exc.strerror}") from None
