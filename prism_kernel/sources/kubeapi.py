"""The Kubernetes API as discovery uses it: GETs to one server URL on one
kept-alive HTTP/1.1 connection (probing.http_client), with the credentials of
a kubeconfig, and kube Status answers turned into errors.

The kubeconfig is re-read for every new connection (certificates and tokens
rotate); the last good one is kept while it is momentarily unreadable.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import ssl
from typing import Any
from urllib.parse import urlsplit

from prism_kernel.errors import PrismError
from prism_kernel.probing.http_client import ConnectionClosed, HttpConnection, HttpError, Response
from prism_kernel.sources.kubeconfig import KubeconfigError, KubeCredentials, load_kubeconfig

# kube-apiserver's heads are well under 1 kB; room for a few Warning headers.
MAX_HEAD_BYTES = 64 * 1024
MAX_ERROR_BODY = 64 * 1024

# TCP keepalive on the connection: a peer that vanished (power loss, black
# hole) is noticed in about KEEPIDLE + KEEPINTVL * KEEPCNT seconds even while a
# watch is idle; TCP_USER_TIMEOUT bounds unacknowledged data alike.
TCP_KEEPIDLE = 30
TCP_KEEPINTVL = 10
TCP_KEEPCNT = 3
TCP_USER_TIMEOUT_MS = (TCP_KEEPIDLE + TCP_KEEPINTVL * TCP_KEEPCNT) * 1000


class ApiError(PrismError):
    """The API did not give us what we asked for (HTTP status, bad document)."""

    def __init__(self, message: str, status: int | None = None, retry_after: float | None = None):
        super().__init__(message)
        self.status = status
        self.retry_after = retry_after


class Gone(ApiError):
    """410 on a watch: its resourceVersion is too old to watch from; relist."""

    def __init__(self, message: str):
        super().__init__(message, status=410)


def tune_socket(sock: socket.socket | None) -> None:
    if sock is None:
        return
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, TCP_KEEPIDLE)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, TCP_KEEPINTVL)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, TCP_KEEPCNT)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, TCP_USER_TIMEOUT_MS)


class NullLog:
    def info(self, event: str, **fields: Any) -> None:
        pass

    warn = error = info


class KubeApiClient:
    """GETs against `server` (https://HOST:PORT) with the kubeconfig's trust
    and identity; the TLS name verified is `tls_server_name`, else the
    kubeconfig's tls-server-name, else HOST. Not task-safe."""

    def __init__(self, server: str, kubeconfig: str, *, context: str | None = None,
                 tls_server_name: str | None = None, connect_timeout: float = 10.0,
                 user_agent: str = "prism-kernel", log: Any = None):
        u = urlsplit(server)
        if u.scheme != "https" or not u.hostname:
            raise ValueError(f"server {server!r}: expected https://HOST:PORT")
        self.server = server.rstrip("/")
        self.host = u.hostname
        self.port = u.port or 443
        self.host_header = u.netloc
        self.kubeconfig = kubeconfig
        self.context = context
        self.tls_server_name = tls_server_name
        self.connect_timeout = connect_timeout
        self.user_agent = user_agent
        self.log = log or NullLog()
        self.conn: HttpConnection | None = None
        self._creds: KubeCredentials | None = None

    @property
    def peer(self) -> str | None:
        """The address the current connection reached (through the steering)."""
        if self.conn is None or not self.conn.peer:
            return None
        ip, port = self.conn.peer[0], self.conn.peer[1]
        return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None

    async def get(self, target: str) -> tuple[HttpConnection, Response]:
        """GET on the kept-alive connection; when the server closed it while
        idle (the request fails before any answer), once more on a new one.
        The body is read from the connection returned."""
        conn = await self._connection()
        reused = conn.requests > 0
        try:
            return conn, await conn.request(target, self._headers())
        except (ConnectionClosed, OSError):  # OSError: ConnectionError and ssl.SSLError too
            if not reused:
                raise
        self.close()
        conn = await self._connection()
        return conn, await conn.request(target, self._headers())

    def credentials(self) -> KubeCredentials:
        try:
            creds = load_kubeconfig(self.kubeconfig, self.context)
        except KubeconfigError as e:
            if self._creds is None:
                raise ApiError(str(e)) from None
            self.log.warn("discovery_kubeconfig_reload_failed", error=str(e), using="the last good one")
            return self._creds
        if self._creds is None:
            for w in creds.warnings:
                self.log.warn("discovery_kubeconfig", warning=w, kubeconfig=self.kubeconfig)
        self._creds = creds
        return creds

    async def _connection(self) -> HttpConnection:
        if self.conn is not None and self.conn.reusable:
            return self.conn
        self.close()
        creds = self.credentials()
        server_name = self.tls_server_name or creds.tls_server_name or self.host
        self.conn = await self._open(creds.ssl_context(), server_name)
        return self.conn

    async def _open(self, ctx: ssl.SSLContext, server_name: str) -> HttpConnection:
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(self.connect_timeout):
            infos = await loop.getaddrinfo(self.host, self.port, type=socket.SOCK_STREAM)
            family, type_, proto, _, addr = infos[0]
            sock = socket.socket(family, type_, proto)
            try:
                sock.setblocking(False)
                tune_socket(sock)  # before connecting: the handshake is covered too
                await loop.sock_connect(sock, addr)
                reader, writer = await asyncio.open_connection(
                    sock=sock, ssl=ctx, server_hostname=server_name,
                    ssl_handshake_timeout=self.connect_timeout)
            except BaseException:
                sock.close()
                raise
        return HttpConnection(reader, writer, self.host_header, max_head_bytes=MAX_HEAD_BYTES)

    def _headers(self) -> list[tuple[str, str]]:
        h = [("User-Agent", self.user_agent), ("Accept", "application/json")]
        # The token file is read on each request (bound tokens rotate).
        auth = (self._creds or self.credentials()).authorization()
        if auth:
            h.append(("Authorization", auth))
        return h


async def error_from(conn: HttpConnection, resp: Response) -> ApiError:
    """An ApiError for a non-200 answer, with the kube Status message."""
    message = ""
    try:
        async with asyncio.timeout(5):
            body = await conn.read_body(MAX_ERROR_BODY)
        try:
            doc = json.loads(body)
            message = doc.get("message") or doc.get("reason") or ""
        except (ValueError, AttributeError):
            message = body[:200].decode(errors="replace").strip()
    except (HttpError, OSError, TimeoutError):
        conn.close()  # the rest of the body is still on it
    hint = ""
    if resp.status in (401, 403):
        hint = (" (the kubeconfig's user needs get/list/watch on endpointslices.discovery.k8s.io "
                "in the Service's namespace)")
    text = f"HTTP {resp.status}" + (f": {message}" if message else "") + hint
    retry_after = resp.headers.get("retry-after", "")
    return ApiError(text, status=resp.status, retry_after=float(retry_after) if retry_after.isdigit() else None)
