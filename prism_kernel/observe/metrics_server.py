"""The HTTP server of /metrics, /healthz and /readyz (docs/design/metrics.md).

A stdlib ThreadingHTTPServer in a daemon thread. It only reads: the
registry of a `Metrics` and its health()/readiness() verdicts; nothing here
can make the daemon's loop wait.
"""

from __future__ import annotations

import gzip
import ipaddress
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlparse

from prism_kernel.errors import PrismError

if TYPE_CHECKING:
    from prism_kernel.observe.metrics import Metrics

# Loopback only unless the operator exposes it; why 7450: docs/design/metrics.md.
DEFAULT_METRICS_ADDRESS = "127.0.0.1"
DEFAULT_METRICS_PORT = 7450

TEXT = "text/plain; charset=utf-8"


class MetricsServerError(PrismError):
    """The metrics HTTP server cannot listen where it was told to."""


def format_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class _Handler(BaseHTTPRequestHandler):
    metrics: Metrics  # set on the per-server subclass
    server_version = "prism-kernel"
    timeout = 10  # a client that sends nothing cannot hold a thread for long
    protocol_version = "HTTP/1.0"

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        url = urlparse(self.path)
        if url.path == "/metrics":
            self._metrics(parse_qs(url.query))
        elif url.path == "/healthz":
            self._verdict(*self.metrics.health())
        elif url.path == "/readyz":
            self._verdict(*self.metrics.readiness())
        elif url.path == "/":
            self._reply(200, b"prism-kernel: /metrics /healthz /readyz\n", TEXT)
        else:
            self._reply(404, b"not found: try /metrics, /healthz or /readyz\n", TEXT)

    def _metrics(self, params: dict[str, list[str]]) -> None:
        # Imported here: doctor reads this module's default port without prometheus_client.
        from prometheus_client.exposition import choose_encoder, gzip_accepted

        encoder, content_type = choose_encoder(self.headers.get("Accept"))
        registry: Any = self.metrics.registry
        if "name[]" in params:
            registry = registry.restricted_registry(params["name[]"])
        try:
            body = encoder(registry)
        except Exception as e:  # noqa: BLE001 - report, keep serving
            self._reply(500, f"error collecting metrics: {e}\n".encode(), TEXT)
            return
        headers = {}
        if gzip_accepted(self.headers.get("Accept-Encoding")):
            body = gzip.compress(body)
            headers["Content-Encoding"] = "gzip"
        self._reply(200, body, content_type, headers)

    def _verdict(self, ok: bool, reason: str) -> None:
        self._reply(200 if ok else 503, (reason + "\n").encode(), TEXT)

    def _reply(self, code: int, body: bytes, content_type: str, headers: dict[str, str] | None = None) -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        """No access log: a scrape every few seconds is not an event."""


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True  # a restarted daemon rebinds at once (TIME_WAIT)


class MetricsServer:
    """/metrics, /healthz and /readyz over HTTP, in a daemon thread."""

    def __init__(self, metrics: Metrics, address: str = DEFAULT_METRICS_ADDRESS,
                 port: int = DEFAULT_METRICS_PORT, poll_interval: float = 0.5):
        self.metrics = metrics
        self.host = address
        self.port = port
        self.poll_interval = poll_interval  # how soon stop() is noticed
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def address(self) -> str:
        """host:port actually bound (the real port when asked for port 0)."""
        port = self._server.server_address[1] if self._server else self.port
        return format_address(self.host, port)

    def start(self) -> None:
        if self._server is not None:
            return
        try:
            ip = ipaddress.ip_address(self.host)
        except ValueError:
            raise MetricsServerError(
                f"metrics address {self.host!r} is not an IP address (use 127.0.0.1, ::1, 0.0.0.0 or ::)") from None
        handler = type("MetricsHandler", (_Handler,), {"metrics": self.metrics})
        family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
        server_cls = type("MetricsHTTPServer", (_Server,), {"address_family": family})
        try:
            self._server = server_cls((self.host, self.port), handler)
        except OSError as e:
            raise MetricsServerError(
                f"cannot serve metrics on {format_address(self.host, self.port)}: "
                f"{e.strerror or e} (set metrics.port / --metrics-port to a free port, "
                f"or metrics.enabled: false)") from None
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": self.poll_interval},
                                        name="prism-kernel-metrics", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        server, thread = self._server, self._thread
        self._server = self._thread = None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        if thread is not None:
            thread.join(timeout=5)
