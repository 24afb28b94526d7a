"""Chat services (Slack, Teams, Matrix, Telegram, ntfy, Discord, ...) through apprise URLs."""

from __future__ import annotations

from typing import Any

from pydantic import Field

from millstream_cloud.alerts.notifiers.base import (
    DeliveryError,
    Notification,
    Notifier,
    NotifierConfig,
    NotifierContext,
    register,
)


class AppriseConfig(NotifierConfig):
    urls: list[str] = Field(
        ..., min_length=1, description="apprise URLs, e.g. slack://..., msteams://..., ntfy://..."
    )


@register("apprise")
class AppriseNotifier(Notifier):
    Config = AppriseConfig
    config: AppriseConfig

    def __init__(self, config: AppriseConfig, context: NotifierContext) -> None:
        super().__init__(config, context)
        self._apprise: Any = None

    def _client(self) -> Any:
        if self._apprise is None:
            try:
                import apprise
            except ImportError:
                raise DeliveryError(
                    "apprise is not installed (pip install apprise)", retry=False
                ) from None
            client = apprise.Apprise()
            for url in self.config.urls:
                if not client.add(url):
                    raise DeliveryError(f"apprise cannot use URL {url!r}", retry=False)
            self._apprise = client
        return self._apprise

    def notify(self, notification: Notification) -> None:
        ok = self._client().notify(title=notification.title(), body=notification.text())
        if not ok:
            raise DeliveryError("apprise: at least one service did not accept the message")
