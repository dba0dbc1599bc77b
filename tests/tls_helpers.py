"""A real TLS client for tests of the mutual-TLS servers (registry, console)."""

from __future__ import annotations

import http.client
import ssl
from pathlib import Path

from tests.limits import SOCKET_S

# what a client without an acceptable certificate gets from a CERT_REQUIRED server
REFUSED = (ssl.SSLError, ConnectionResetError, http.client.RemoteDisconnected)


def tls_context(ca: Path, cert: Path | None = None, key: Path | None = None) -> ssl.SSLContext:
    """Trust `ca`; present `cert`/`key` as the client certificate when given."""
    context = ssl.create_default_context(cafile=str(ca))
    if cert is not None:
        context.load_cert_chain(str(cert), str(key))
    return context


def https_get(port: int, context: ssl.SSLContext, path: str) -> tuple[int, bytes]:
    """GET https://localhost:`port``path`; (status, body)."""
    conn = http.client.HTTPSConnection("localhost", port, context=context, timeout=SOCKET_S)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()
