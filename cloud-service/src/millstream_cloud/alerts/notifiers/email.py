"""E-mail through an SMTP server (smtplib): one message per notification."""

from __future__ import annotations

import os
import smtplib
import ssl
from email.message import EmailMessage

from pydantic import Field

from millstream_cloud.alerts.notifiers.base import (
    DeliveryError,
    Notification,
    Notifier,
    NotifierConfig,
    register,
)


class EmailConfig(NotifierConfig):
    send_resolved: bool = False  # Alertmanager's default for e-mail
    to: list[str] = Field(..., min_length=1, description="recipients")
    from_: str = Field(..., alias="from", description="sender address")
    smarthost: str = Field(..., description="SMTP server as host:port")
    starttls: bool = Field(False, description="upgrade the connection with STARTTLS")
    tls: bool = Field(False, description="implicit TLS (SMTPS, usually port 465)")
    username: str | None = None
    password_env: str | None = Field(
        None, description="environment variable holding the SMTP password"
    )
    subject: str | None = Field(None, description="default: [FIRING:n] alertname (group)")
    timeout_s: float | None = Field(None, gt=0)


@register("email")
class EmailNotifier(Notifier):
    Config = EmailConfig
    config: EmailConfig

    def notify(self, notification: Notification) -> None:
        c = self.config
        host, _, port_text = c.smarthost.rpartition(":")
        if not host:
            raise DeliveryError(f"smarthost {c.smarthost!r} must be host:port", retry=False)
        msg = EmailMessage()
        msg["From"] = c.from_
        msg["To"] = ", ".join(c.to)
        msg["Subject"] = c.subject or notification.title()
        msg["X-Millstream-Group-Key"] = notification.group_key
        msg.set_content(notification.text())
        timeout = c.timeout_s or self.context.timeout_s
        try:
            cls = smtplib.SMTP_SSL if c.tls else smtplib.SMTP
            with cls(host, int(port_text), timeout=timeout) as smtp:
                if c.starttls and not c.tls:
                    smtp.starttls(context=ssl.create_default_context())
                if c.username:
                    smtp.login(c.username, os.environ.get(c.password_env or "", ""))
                smtp.send_message(msg)
        except smtplib.SMTPAuthenticationError as exc:
            raise DeliveryError(
                f"{c.smarthost}: authentication failed: {exc}", retry=False
            ) from None
        except (smtplib.SMTPException, OSError) as exc:
            raise DeliveryError(f"{c.smarthost}: {exc}") from None
