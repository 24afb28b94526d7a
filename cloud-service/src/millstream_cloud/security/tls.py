"""TLS client contexts for the cloud's own MQTT connections (subscriber, MQTT notifier)."""

from __future__ import annotations

import ssl
from typing import Any


class _HostnameContext(ssl.SSLContext):
    """Checks the broker certificate against a fixed name instead of the host connected to.

    paho passes the URL's host as ``server_hostname``; a broker reached by IP address or
    through a tunnel often holds a certificate for another name (``mqtt.tls.server_hostname``).
    """

    override: str | None = None

    def wrap_socket(self, sock: Any, *args: Any, **kwargs: Any) -> Any:
        if self.override:
            kwargs["server_hostname"] = self.override
        return super().wrap_socket(sock, *args, **kwargs)


def client_context(
    ca: str | None = None,
    cert: str | None = None,
    key: str | None = None,
    server_hostname: str | None = None,
) -> ssl.SSLContext:
    """Verifying client context: ``ca`` or the system CAs, TLS 1.2 or newer, an optional
    client certificate for mutual TLS, an optional name to verify the broker against."""
    ctx = _HostnameContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = True
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if ca:
        ctx.load_verify_locations(cafile=ca)
    else:
        ctx.load_default_certs()
    if cert:
        ctx.load_cert_chain(cert, key or None)
    ctx.override = server_hostname
    return ctx
