"""The HTTP server of /metrics, /healthz and /readyz (docs/design/metrics.md).

It only reads: the registry of a `Metrics` and its health()/readiness()
verdicts; nothing here can make the daemon's loop wait. Nothing a client or
a neighbour does here can take the daemon down either: a metrics address
someone else holds is retried in the background (`start` never fails on
it), at most MAX_HANDLERS requests are served at once (more get a quick
503), and a request must arrive whole, small and within REQUEST_DEADLINE.
"""

from __future__ import annotations

import datetime as dt
import gzip
import io
import ipaddress
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import parse_qs, urlparse

from prism_kernel.errors import PrismError

if TYPE_CHECKING:
    from prism_kernel.observe.metrics import Metrics

# Loopback only unless the operator exposes it; why 7450: docs/design/metrics.md.
DEFAULT_METRICS_ADDRESS = "127.0.0.1"
DEFAULT_METRICS_PORT = 7450

# Requests served at once; a scrape takes milliseconds (its kernel read is
# shared, metrics_scrape.SharedRead), so a few cover Prometheus, an agent
# and a person with curl.
MAX_HANDLERS = 4
REQUEST_DEADLINE = 5.0  # seconds for the whole request (line and headers), not per read: no slowloris
MAX_REQUEST_BYTES = 16 * 1024  # a GET with its headers; more is answered 413
RESPONSE_TIMEOUT = 10.0  # seconds to send a response (sendall's timeout is its total duration)
# The bind of a held address is retried: 1 s doubling to 60 s, as the data path start.
BIND_RETRY_FIRST = 1.0
BIND_RETRY_MAX = 60.0

TEXT = "text/plain; charset=utf-8"
_BUSY = (b"HTTP/1.0 503 Service Unavailable\r\nContent-Type: text/plain; charset=utf-8\r\n"
         b"Content-Length: 39\r\nRetry-After: 1\r\nConnection: close\r\n\r\n"
         b"busy: too many requests at once, retry\n")


class MetricsServerError(PrismError):
    """The metrics HTTP server cannot listen where it was told to."""


class EventLogLike(Protocol):
    def info(self, event: str, **fields: Any) -> None: ...
    def warn(self, event: str, **fields: Any) -> None: ...


def format_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _iso(ts: float | None) -> str | None:
    return None if ts is None else dt.datetime.fromtimestamp(ts, dt.timezone.utc).isoformat(timespec="milliseconds")


class _RequestTooLarge(Exception):
    pass


class _RequestReader(io.RawIOBase):
    """The request's bytes from the socket, under one deadline for all of
    them (a per-read timeout lets a client that sends a byte a second hold
    a handler forever) and a byte limit."""

    def __init__(self, sock: socket.socket, deadline: float, limit: int):
        self.sock, self.deadline, self.left = sock, deadline, limit

    def readable(self) -> bool:
        return True

    def readinto(self, buf: Any) -> int:
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("request not received within the deadline")
        if self.left <= 0:
            raise _RequestTooLarge()
        self.sock.settimeout(remaining)
        view = memoryview(buf)
        n = self.sock.recv_into(view[: min(len(view), self.left)])
        self.left -= n
        return n


class _Handler(BaseHTTPRequestHandler):
    metrics: Metrics  # set on the per-server subclass
    server_version = "prism-kernel"
    protocol_version = "HTTP/1.0"  # one request per connection: a connection holds a handler that long only

    def setup(self) -> None:
        super().setup()
        self.rfile.close()  # the plain makefile() reader: replaced by one under the request deadline
        self.rfile = io.BufferedReader(_RequestReader(self.connection, time.monotonic() + REQUEST_DEADLINE,
                                                      MAX_REQUEST_BYTES))

    def handle(self) -> None:
        # A client that is slow (TimeoutError, answered by http.server's own
        # handling), sends too much or goes away is not an event of the daemon.
        try:
            super().handle()
        except _RequestTooLarge:
            self.metrics.count_rejected_request("too_large")
            self.close_connection = True
            try:
                self.connection.settimeout(RESPONSE_TIMEOUT)
                self.connection.sendall(b"HTTP/1.0 413 Request Entity Too Large\r\nConnection: close\r\n\r\n")
            except OSError:
                pass
        except OSError:
            self.close_connection = True

    def log_error(self, format: str, *args: Any) -> None:  # noqa: A002
        if format.startswith("Request timed out"):
            self.metrics.count_rejected_request("timeout")

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        self.connection.settimeout(RESPONSE_TIMEOUT)  # the request is in: from here the response's bound
        url = urlparse(self.path)
        if url.path == "/metrics":
            self._metrics(parse_qs(url.query))
        elif url.path == "/healthz":
            self._verdict(*self.metrics.health())
        elif url.path == "/readyz":
            # Ready only when the kernel steers the listen address to a backend that is up.
            from prism_kernel.observe.status import kernel_readiness  # noqa: PLC0415

            self._verdict(*kernel_readiness(self.metrics.readiness(), self.metrics.snapshot,
                                            self.metrics.kernel_readers()[0]))
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


class _Server(HTTPServer):
    """One thread per request as ThreadingHTTPServer, but at most
    MAX_HANDLERS of them: a connection beyond that is answered 503 at once
    from the accepting thread (never blocks it: the reply fits the socket's
    send buffer) and closed."""

    allow_reuse_address = True  # a restarted daemon rebinds at once (TIME_WAIT)
    max_handlers = MAX_HANDLERS
    metrics: Metrics  # set on the per-server subclass

    def __init__(self, *args: Any, **kwargs: Any):
        self._slots = threading.BoundedSemaphore(self.max_handlers)
        super().__init__(*args, **kwargs)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            self.metrics.count_rejected_request("busy")
            try:
                request.recv(MAX_REQUEST_BYTES, socket.MSG_DONTWAIT)  # unread bytes would make close() a reset
            except OSError:
                pass
            try:
                request.send(_BUSY, socket.MSG_DONTWAIT)
            except OSError:
                pass
            self.shutdown_request(request)
            return
        threading.Thread(target=self._serve, args=(request, client_address),
                         name="prism-kernel-metrics-request", daemon=True).start()

    def _serve(self, request: Any, client_address: Any) -> None:
        try:
            self.finish_request(request, client_address)
        except Exception:  # noqa: BLE001 - one request's failure is not the daemon's
            pass
        finally:
            self.shutdown_request(request)
            self._slots.release()


class MetricsServer:
    """/metrics, /healthz and /readyz over HTTP, in a daemon thread.

    `start()` listens if it can; if the address is held (by anyone: a local
    user can bind it during a restart) it logs `metrics_bind_failed` with
    who holds it when /proc tells, and keeps trying in a background thread
    (BIND_RETRY_FIRST doubling to BIND_RETRY_MAX) until it listens or is
    stopped. `listen()` is the one attempt, raising MetricsServerError.
    `status()` says which, for the state file."""

    def __init__(self, metrics: Metrics, address: str = DEFAULT_METRICS_ADDRESS,
                 port: int = DEFAULT_METRICS_PORT, poll_interval: float = 0.5,
                 log: EventLogLike | None = None, retry_first: float = BIND_RETRY_FIRST,
                 retry_max: float = BIND_RETRY_MAX):
        try:
            self._family = socket.AF_INET6 if ipaddress.ip_address(address).version == 6 else socket.AF_INET
        except ValueError:
            raise MetricsServerError(
                f"metrics address {address!r} is not an IP address (use 127.0.0.1, ::1, 0.0.0.0 or ::)") from None
        self.metrics = metrics
        self.host = address
        self.port = port
        self.poll_interval = poll_interval  # how soon stop() is noticed
        self.log = log
        self.retry_first, self.retry_max = retry_first, retry_max
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._retry: threading.Thread | None = None
        self._stopping = threading.Event()
        self._lock = threading.Lock()  # guards _server against stop() during a background bind
        self.failures = 0
        self.last_error: str | None = None
        self.held_by: str | None = None
        self.next_attempt_wall: float | None = None

    @property
    def address(self) -> str:
        """host:port actually bound (the real port when asked for port 0)."""
        server = self._server
        port = server.server_address[1] if server else self.port
        return format_address(self.host, port)

    @property
    def listening(self) -> bool:
        return self._server is not None

    def status(self) -> dict[str, Any]:
        """For the state file and `status`: listening, retrying or stopped."""
        state = "listening" if self._server else "retrying" if self._retry is not None else "stopped"
        return {"state": state, "address": self.address, "bind_failures": self.failures,
                "last_error": self.last_error, "held_by": self.held_by,
                "next_attempt_at": _iso(self.next_attempt_wall) if state == "retrying" else None}

    def listen(self) -> None:
        """Bind now and serve, or raise MetricsServerError (nothing retried)."""
        if self._server is not None:
            return
        self._stopping.clear()
        self._bind()

    def start(self) -> bool:
        """Listen now (True) or, when the address cannot be bound, log it and
        keep trying in the background (False). Never raises for a bind."""
        if self._server is not None or self._retry is not None:
            return self._server is not None
        self._stopping.clear()
        try:
            self._bind()
            return True
        except MetricsServerError as e:
            delay = self.retry_first
            self._failed(e, delay)
        self._retry = threading.Thread(target=self._retry_loop, args=(delay,),
                                       name="prism-kernel-metrics-bind", daemon=True)
        self._retry.start()
        return False

    def stop(self) -> None:
        self._stopping.set()
        retry, self._retry = self._retry, None
        if retry is not None:
            retry.join(timeout=5)
        with self._lock:
            server, thread = self._server, self._thread
            self._server = self._thread = None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        if thread is not None:
            thread.join(timeout=5)

    # ---- internals ---------------------------------------------------------

    def _bind(self) -> None:
        handler = type("MetricsHandler", (_Handler,), {"metrics": self.metrics})
        server_cls = type("MetricsHTTPServer", (_Server,), {"address_family": self._family, "metrics": self.metrics})
        try:
            server = server_cls((self.host, self.port), handler)
        except OSError as e:
            raise MetricsServerError(
                f"cannot serve metrics on {format_address(self.host, self.port)}: "
                f"{e.strerror or e} (set metrics.port / --metrics-port to a free port, "
                f"or metrics.enabled: false)") from None
        with self._lock:  # stop() joins a background bind first, then takes the server under this lock
            self._server = server
            self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": self.poll_interval},
                                            name="prism-kernel-metrics", daemon=True)
            self._thread.start()
        self.last_error = self.held_by = self.next_attempt_wall = None
        if self.log is not None:
            self.log.info("metrics_listening", address=self.address, after_failures=self.failures or None)

    def _failed(self, e: MetricsServerError, retry_in: float) -> None:
        self.failures += 1
        self.last_error = str(e)
        self.held_by = _holder(self.port) if self.port else None
        self.next_attempt_wall = time.time() + retry_in
        if self.log is not None:
            self.log.warn("metrics_bind_failed", address=format_address(self.host, self.port), error=str(e),
                          held_by=self.held_by, failures=self.failures, retry_in_s=retry_in,
                          action="steering goes on; metrics are served once the address is free")

    def _retry_loop(self, delay: float) -> None:
        while not self._stopping.wait(delay):
            try:
                self._bind()
                return
            except MetricsServerError as e:
                delay = min(delay * 2, self.retry_max)
                self._failed(e, delay)


def _holder(port: int) -> str | None:
    """Who listens on PORT where a connect to loopback reaches (best effort:
    a process of another user is only named for root)."""
    try:
        from prism_kernel.datapath.listeners import describe, listening

        return describe(listening(port)) or None
    except Exception:  # noqa: BLE001 - only a hint in a log line
        return None
