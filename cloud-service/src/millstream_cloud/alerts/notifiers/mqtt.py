"""Publish each notification (the webhook JSON) to an MQTT topic, QoS 1 (paho-mqtt 2.x)."""

from __future__ import annotations

import json
import threading
import urllib.parse
from typing import Any

from pydantic import Field

from millstream_cloud.alerts.labels import render
from millstream_cloud.alerts.notifiers.base import (
    DeliveryError,
    Notification,
    Notifier,
    NotifierConfig,
    NotifierContext,
    register,
)
from millstream_cloud.security.tls import client_context


class MqttConfig(NotifierConfig):
    broker: str = Field(..., pattern=r"^mqtts?://", description="mqtt://host:port or mqtts://")
    topic: str = Field(
        "millstream/alerts/{receiver}",
        description="template: {receiver}, {status}, {alertname}, {site}",
    )
    qos: int = Field(1, ge=0, le=2)
    retain: bool = False
    client_id: str | None = None
    username: str | None = None
    password_env: str | None = Field(None, description="environment variable with the password")
    ca: str | None = Field(None, description="CA certificate (PEM) for mqtts://")


@register("mqtt")
class MqttNotifier(Notifier):
    Config = MqttConfig
    config: MqttConfig

    def __init__(self, config: MqttConfig, context: NotifierContext) -> None:
        super().__init__(config, context)
        self._client: Any = None
        self._lock = threading.Lock()

    def _connect(self) -> Any:
        import os

        import paho.mqtt.client as mqtt

        url = urllib.parse.urlsplit(self.config.broker)
        tls = url.scheme == "mqtts"
        client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=self.config.client_id or "",
            protocol=mqtt.MQTTv311,
        )
        if self.config.username:
            client.username_pw_set(
                self.config.username, os.environ.get(self.config.password_env or "", "")
            )
        if tls:
            client.tls_set_context(client_context(self.config.ca))
        connected = threading.Event()
        client.on_connect = lambda c, u, f, rc, p=None: connected.set()
        try:
            client.connect(url.hostname or "127.0.0.1", url.port or (8883 if tls else 1883))
        except OSError as exc:
            raise DeliveryError(f"{self.config.broker}: {exc}") from None
        client.loop_start()
        if not connected.wait(self.context.timeout_s):
            client.loop_stop()
            raise DeliveryError(f"{self.config.broker}: no CONNACK")
        return client

    def notify(self, notification: Notification) -> None:
        payload = notification.webhook_payload()
        topic = render(
            self.config.topic,
            {
                "receiver": notification.receiver,
                "status": notification.status,
                "alertname": notification.common_labels.get("alertname", ""),
                "site": notification.common_labels.get("site", ""),
            },
        )
        with self._lock:
            if self._client is None or not self._client.is_connected():
                self.close()
                self._client = self._connect()
            info = self._client.publish(
                topic, json.dumps(payload), qos=self.config.qos, retain=self.config.retain
            )
            try:
                info.wait_for_publish(self.context.timeout_s)
            except (RuntimeError, ValueError) as exc:
                raise DeliveryError(f"{self.config.broker}: publish failed: {exc}") from None
            if not info.is_published():
                raise DeliveryError(f"{self.config.broker}: publish not acknowledged")

    def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            try:
                client.disconnect()
            finally:
                client.loop_stop()
