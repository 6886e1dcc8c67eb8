"""Active probes of one backend: tcp (connect), tls (handshake verified against
the CA) and readyz (TLS + GET /readyz, healthy only on 200).

Each backend is probed by its own task with its own timeout, so a black-holed
backend never delays the others. The readyz probe keeps its TLS connection
alive between probes: a 1,000-node cluster probing every API server once a
second must cost the servers an HTTP request each, not a TLS handshake each.

Latency (from the monotonic clock) is what one round trip costs: the connect
for tcp, the handshake for tls, the request on an established connection for
readyz, so that kept-alive and fresh probes measure the same thing.
"""

from __future__ import annotations

import asyncio
import errno
import ssl
import time

from prism_kernel.config import ProbeConfig
from prism_kernel.core.health import ProbeResult
from prism_kernel.core.model import Backend
from prism_kernel.probing.http_client import ConnectionClosed, HttpConnection, HttpError, ProtocolError

# A /readyz answer is a few bytes (a verbose one a few kB): anything over these
# is "bad http response", never memory the daemon holds.
_MAX_HEAD_BYTES = 16 * 1024
_MAX_BODY_BYTES = 64 * 1024


def make_ssl_context(cfg: ProbeConfig) -> ssl.SSLContext | None:
    if cfg.mode == "tcp":
        return None
    ctx = ssl.create_default_context(cafile=cfg.ca_file)
    if cfg.insecure_skip_verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    if cfg.client_cert_file:
        ctx.load_cert_chain(cfg.client_cert_file, cfg.client_key_file)
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


def classify(exc: BaseException, phase: str) -> str:
    """A short, stable reason for a failed probe (a metric label, a log field)."""
    if isinstance(exc, ProtocolError):
        return "bad http response"
    if isinstance(exc, (asyncio.TimeoutError, TimeoutError)):
        return f"{phase} timeout"
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"tls: {exc.verify_message or exc.reason}"
    if isinstance(exc, ssl.SSLError):
        return f"tls: {exc.reason or exc}"
    if isinstance(exc, ConnectionRefusedError):
        return "refused"
    if isinstance(exc, ConnectionResetError):
        return "reset"
    if isinstance(exc, (ConnectionClosed, EOFError, BrokenPipeError)):
        return "closed by peer"
    if isinstance(exc, OSError):
        if exc.errno in (errno.EHOSTUNREACH, errno.ENETUNREACH):
            return "unreachable"
        return f"error: {exc.strerror or exc}"
    return f"error: {exc}"


class Prober:
    """Probes one backend. Not thread-safe; one task drives it."""

    def __init__(
        self,
        backend: Backend,
        cfg: ProbeConfig,
        ssl_context: ssl.SSLContext | None,
        server_name: str | None = None,
    ):
        self.backend = backend
        self.cfg = cfg
        self.ssl_context = ssl_context
        # What the certificate must name: the configured server name, else the
        # host the operator wrote (a DNS name, or the address itself).
        self.server_name = cfg.server_name or server_name or str(backend.address)
        host = self.server_name if ":" not in self.server_name else f"[{self.server_name}]"
        self._host_header = f"{host}:{backend.port}"
        self._conn: HttpConnection | None = None
        self.reused = 0  # probes served on a kept-alive connection

    async def probe(self) -> ProbeResult:
        deadline = time.monotonic() + self.cfg.timeout
        phase = ["connect"]
        try:
            # asyncio.timeout, not wait_for: in 3.11 wait_for can swallow a
            # cancellation that races with completion, and a cancelled probe
            # loop (backend removed, reload) must stop.
            async with asyncio.timeout(self.cfg.timeout):
                return await self._probe(deadline, phase)
        except asyncio.CancelledError:
            self.abort()
            raise
        except Exception as exc:  # noqa: BLE001 - every failure is a probe result
            self.abort()
            return ProbeResult(False, None, classify(exc, phase[0]))

    async def close(self) -> None:
        self.abort()

    def abort(self) -> None:
        """Abort the kept-alive connection, if any (callable from sync code)."""
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    async def _open(self, phase: list[str], use_tls: bool) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, float]:
        host, port = str(self.backend.address), self.backend.port
        start = time.monotonic()
        phase[0] = "connect"
        reader, writer = await asyncio.open_connection(host, port)
        connected = time.monotonic()
        if use_tls:
            phase[0] = "tls handshake"
            await writer.start_tls(self.ssl_context, server_hostname=self.server_name)
        done = time.monotonic()
        return reader, writer, (connected - start) if not use_tls else (done - connected)

    async def _probe(self, deadline: float, phase: list[str]) -> ProbeResult:
        mode = self.cfg.mode
        if mode in ("tcp", "tls"):
            reader, writer, latency = await self._open(phase, use_tls=(mode == "tls"))
            writer.transport.abort()  # no FIN handshake to wait for; a probe holds nothing
            return ProbeResult(True, latency, "ok")
        # readyz: reuse the kept-alive connection; if the server closed it while
        # idle, the request fails before any answer: retry once fresh.
        if self._conn is not None and self._conn.reusable:
            try:
                result = await self._readyz(self._conn, phase)
                self.reused += 1
                return result
            except (OSError, HttpError):  # OSError: ConnectionError and ssl.SSLError too
                # An idle connection the server closed, or leftovers on it:
                # one fresh connection decides.
                if time.monotonic() >= deadline:
                    raise
        self.abort()
        reader, writer, _ = await self._open(phase, use_tls=True)
        self._conn = HttpConnection(reader, writer, self._host_header, max_head_bytes=_MAX_HEAD_BYTES)
        return await self._readyz(self._conn, phase)

    async def _readyz(self, conn: HttpConnection, phase: list[str]) -> ProbeResult:
        phase[0] = "readyz"
        resp = await conn.request("/readyz", [("User-Agent", "prism-kernel"), ("Accept", "text/plain")])
        latency = resp.first_byte_at - resp.sent_at
        # Read to its end (bounded): the connection then serves the next probe,
        # or is closed when the server asked for that.
        await conn.read_body(_MAX_BODY_BYTES)
        if resp.status == 200:
            return ProbeResult(True, latency, "ok")
        return ProbeResult(False, None, f"http {resp.status}")


def make_confirm_context() -> ssl.SSLContext:
    """For confirmations only: they ask "does the server's TLS stack answer",
    not "is its certificate right" (a verify failure means it is alive)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


async def confirm(backend: Backend, timeout: float, tls: ssl.SSLContext | None,
                  connect_timeout: float | None = None) -> ProbeResult:
    """Is the backend alive? A fresh TCP connect, plus a TLS handshake unless
    probing in tcp mode: a frozen server still completes TCP in its kernel,
    but only a live process completes a handshake. Cheap for the API server
    (no request) and only run after a failure. `connect_timeout` bounds the
    TCP connect alone (the backend's initial SYN RTO: a black hole is judged
    by the same clock as the steered connect that saw it); the handshake
    keeps the rest of `timeout`."""
    start = time.monotonic()
    phase = ["connect"]

    async def attempt() -> None:
        opening = asyncio.open_connection(str(backend.address), backend.port)
        if connect_timeout is not None and connect_timeout < timeout:
            _reader, writer = await asyncio.wait_for(opening, connect_timeout)
        else:
            _reader, writer = await opening
        try:
            if tls is not None:
                phase[0] = "tls handshake"
                await writer.start_tls(tls, server_hostname=None)
        finally:
            writer.transport.abort()

    try:
        await asyncio.wait_for(attempt(), timeout)
    except Exception as exc:  # noqa: BLE001 - every failure is a result
        return ProbeResult(False, None, classify(exc, phase[0]))
    return ProbeResult(True, time.monotonic() - start, "ok")
