"""A tiny blocking HTTP(S) client for tests: one request, one fresh connection."""

from __future__ import annotations

import http.client
import json
import ssl
from dataclasses import dataclass, field


@dataclass
class Response:
    status: int
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""

    @property
    def text(self) -> str:
        return self.body.decode(errors="replace")

    def json(self):
        return json.loads(self.body)

    @property
    def backend(self) -> str | None:
        return self.headers.get("x-backend")


def request(host: str, port: int, path: str = "/whoami", *,
            ssl_context: ssl.SSLContext | None = None, timeout: float = 2.0,
            method: str = "GET", source_address: tuple[str, int] | None = None) -> Response:
    """Send one request over a new connection (HTTPS when `ssl_context` is given).
    Raises OSError subclasses (ConnectionRefusedError, TimeoutError, ...) as is."""
    host = host.strip("[]")
    if ssl_context is not None:
        conn = http.client.HTTPSConnection(host, port, context=ssl_context, timeout=timeout,
                                           source_address=source_address)
    else:
        conn = http.client.HTTPConnection(host, port, timeout=timeout,
                                          source_address=source_address)
    try:
        conn.request(method, path)
        r = conn.getresponse()
        body = r.read()
        return Response(r.status, {k.lower(): v for k, v in r.getheaders()}, body)
    finally:
        conn.close()
