"""Generic webhook: POST Alertmanager's JSON payload (version 4) to a URL."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

from pydantic import Field

from millstream_cloud.alerts.notifiers.base import (
    DeliveryError,
    Notification,
    Notifier,
    NotifierConfig,
    register,
)


class WebhookConfig(NotifierConfig):
    url: str = Field(..., pattern=r"^https?://", description="http(s) URL to POST to")
    headers: dict[str, str] = Field(default_factory=dict, description="extra request headers")
    bearer_token: str | None = Field(None, description="sent as Authorization: Bearer")
    timeout_s: float | None = Field(None, gt=0)


def post_json(url: str, body: object, headers: dict[str, str], timeout: float) -> int:
    data = json.dumps(body).encode()
    req = urllib.request.Request(
        url, data=data, method="POST", headers={"Content-Type": "application/json", **headers}
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            resp.read()
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        # 4xx other than 429 will fail the same way again; 5xx and 429 may pass later.
        retry = exc.code >= 500 or exc.code == 429
        raise DeliveryError(f"{url}: HTTP {exc.code}", retry=retry) from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise DeliveryError(f"{url}: {reason}") from None


@register("webhook")
class WebhookNotifier(Notifier):
    Config = WebhookConfig
    config: WebhookConfig

    def notify(self, notification: Notification) -> None:
        headers = dict(self.config.headers)
        if self.config.bearer_token:
            headers["Authorization"] = f"Bearer {self.config.bearer_token}"
        post_json(
            self.config.url,
            notification.webhook_payload(),
            headers,
            self.config.timeout_s or self.context.timeout_s,
        )
