"""Endpoint discovery: the EndpointSlices of Service `kubernetes`.

The API servers of a cluster publish themselves as the endpoints of Service
`kubernetes` in namespace `default`. `EndpointSliceWatcher` lists and then
watches those EndpointSlices (label ``kubernetes.io/service-name=kubernetes``),
the way client-go's reflector does, and reports the API servers it finds, so
control-plane nodes that join or leave are steered to without a config change.

It talks to the cluster **through the daemon's own endpoint**
(``https://127.0.0.1:PORT``), with the node's kubeconfig: the kubeconfig's
``server`` is replaced, its CA and credentials are kept. The certificate of
whichever API server answers is verified against the host of that URL
(127.0.0.1: API server certificates used this way must name it), or against
the kubeconfig's ``tls-server-name`` (or the explicit `tls_server_name`).

Rules:

* an endpoint is an address of a slice endpoint whose ``conditions.ready`` is
  not false, with the slice's port named ``https``; IPv4 and IPv6 slices only
  (FQDN slices are ignored); de-duplicated, sorted;
* an empty list is never reported: the last one is kept (and logged);
* the last reported list is saved atomically to `cache_file` (JSON), and
  `load_cached()` reads it at start, for when the API is unreachable then;
* list, then watch from the list's resourceVersion with bookmarks and
  ``timeoutSeconds`` (renewed when it ends); 410 Gone (an ERROR event or an
  HTTP status) relists; errors reconnect with capped exponential backoff and
  jitter; a watch silent past its timeout is dropped, and TCP keepalive with
  TCP_USER_TIMEOUT notices a peer that went away without a word.

Standard library only (asyncio streams, ssl, json; HTTP/1.1 with chunked
transfer): the daemon is long-lived and small, and a Kubernetes client library
would cost more memory than the rest of it for one list and one watch.
"""

from __future__ import annotations

import asyncio
import base64
import codecs
import contextlib
import datetime as dt
import ipaddress
import json
import os
import random
import socket
import ssl
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urlsplit

import yaml

from prism_kernel import __version__
from prism_kernel.errors import ConfigError, PrismError
from prism_kernel.sources.endpoints import EndpointSpec, parse_endpoint

SERVICE_NAME_LABEL = "kubernetes.io/service-name"
PORT_NAME = "https"
CACHE_SCHEMA = 1

_MAX_HEADER_BYTES = 64 * 1024
_MAX_LIST_BYTES = 16 * 1024 * 1024  # the kubernetes Service has a handful of endpoints
_MAX_EVENT_BYTES = 8 * 1024 * 1024
_MAX_ERROR_BODY = 64 * 1024

# TCP keepalive on the watch connection: a peer that vanished (power loss,
# black hole) is noticed in about KEEPIDLE + KEEPINTVL * KEEPCNT seconds even
# while the watch is idle; TCP_USER_TIMEOUT bounds unacknowledged data alike.
TCP_KEEPIDLE = 30
TCP_KEEPINTVL = 10
TCP_KEEPCNT = 3
TCP_USER_TIMEOUT_MS = (TCP_KEEPIDLE + TCP_KEEPINTVL * TCP_KEEPCNT) * 1000


class DiscoveryError(PrismError):
    """The API did not give us the EndpointSlices (HTTP status, bad document)."""

    def __init__(self, message: str, status: int | None = None, retry_after: float | None = None):
        super().__init__(message)
        self.status = status
        self.retry_after = retry_after


class KubeconfigError(ConfigError):
    """The kubeconfig cannot be used (missing, invalid, unsupported auth)."""


class _Gone(Exception):
    """410: the resourceVersion is too old to watch from; relist."""


# --------------------------------------------------------------------------------
# EndpointSlices -> endpoints
# --------------------------------------------------------------------------------


def spec_sort_key(spec: EndpointSpec) -> tuple:
    ip = spec.ip
    if ip is None:
        return (9, 0, spec.host, spec.port)
    return (ip.version, int(ip), "", spec.port)


def endpoints_from_slices(slices: Iterable[dict], port_name: str = PORT_NAME) -> list[EndpointSpec]:
    """The API server endpoints an EndpointSlice list names: every address of an
    endpoint whose ``conditions.ready`` is not false, at the slice's port named
    `port_name` (TCP). IPv4/IPv6 slices only; de-duplicated and sorted."""
    out: set[EndpointSpec] = set()
    for sl in slices:
        if not isinstance(sl, dict):
            continue
        family = {"IPv4": 4, "IPv6": 6}.get(sl.get("addressType"))
        if family is None:  # FQDN (or unknown): not an address we can steer to
            continue
        port = None
        for p in sl.get("ports") or ():
            if isinstance(p, dict) and p.get("name", "") == port_name \
                    and (p.get("protocol") or "TCP") == "TCP":
                port = p.get("port")
                break
        if not isinstance(port, int) or isinstance(port, bool) or not 1 <= port <= 65535:
            continue
        for ep in sl.get("endpoints") or ():
            if not isinstance(ep, dict):
                continue
            cond = ep.get("conditions") or {}
            if isinstance(cond, dict) and cond.get("ready") is False:
                continue
            for addr in ep.get("addresses") or ():
                try:
                    ip = ipaddress.ip_address(str(addr))
                except ValueError:
                    continue
                if ip.version != family:
                    continue
                out.add(EndpointSpec(ip.compressed, port))
    return sorted(out, key=spec_sort_key)


# --------------------------------------------------------------------------------
# kubeconfig
# --------------------------------------------------------------------------------


@dataclass
class KubeCredentials:
    """What the watcher takes from a kubeconfig: trust, identity, TLS name."""

    path: str
    context: str
    server: str  # the kubeconfig's own server (informational: we override it)
    ca_pem: str | None = None  # None: the system trust store
    insecure_skip_tls_verify: bool = False
    tls_server_name: str | None = None
    client_cert_pem: bytes | None = None
    client_key_pem: bytes | None = None
    token: str | None = None
    token_file: str | None = None
    username: str | None = None
    password: str | None = None
    warnings: list[str] = field(default_factory=list)

    def ssl_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cadata=self.ca_pem) if self.ca_pem else ssl.create_default_context()
        if self.insecure_skip_tls_verify:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        if self.client_cert_pem is not None:
            assert self.client_key_pem is not None
            _load_cert_chain(ctx, self.client_cert_pem, self.client_key_pem)
        ctx.set_alpn_protocols(["http/1.1"])
        return ctx

    def authorization(self) -> str | None:
        """The Authorization header value. A token file is read on each call
        (bound service-account tokens rotate); it wins over `token`, as in
        client-go, while it can be read."""
        if self.token_file:
            try:
                tok = Path(self.token_file).read_text().strip()
                if tok:
                    return f"Bearer {tok}"
            except OSError as e:
                if not self.token:
                    raise KubeconfigError(f"kubeconfig {self.path}: tokenFile {self.token_file}: "
                                          f"{e.strerror or e}") from None
        if self.token:
            return f"Bearer {self.token}"
        if self.username is not None and self.password is not None:
            raw = f"{self.username}:{self.password}".encode()
            return "Basic " + base64.b64encode(raw).decode()
        return None

    @property
    def auth_kind(self) -> str:
        kinds = []
        if self.client_cert_pem is not None:
            kinds.append("client-certificate")
        if self.token_file:
            kinds.append("token-file")
        elif self.token:
            kinds.append("token")
        elif self.username is not None:
            kinds.append("basic")
        return "+".join(kinds) or "anonymous"


def _load_cert_chain(ctx: ssl.SSLContext, cert_pem: bytes, key_pem: bytes) -> None:
    """load_cert_chain() only takes paths: hand it memory files (memfd), so
    key material from `client-key-data` never touches a disk."""
    fds: list[int] = []
    try:
        try:
            paths = []
            for data in (cert_pem, key_pem):
                fd = os.memfd_create("prism-kernel-kubeconfig", os.MFD_CLOEXEC)
                fds.append(fd)
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
                paths.append(f"/proc/self/fd/{fd}")
            ctx.load_cert_chain(paths[0], paths[1])
            return
        except (AttributeError, FileNotFoundError):  # no memfd or no /proc: a private temp dir
            pass
    finally:
        for fd in fds:
            os.close(fd)
    with tempfile.TemporaryDirectory(prefix="prism-kernel-") as d:
        cert, key = Path(d) / "tls.crt", Path(d) / "tls.key"
        for p, data in ((cert, cert_pem), (key, key_pem)):
            fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
        ctx.load_cert_chain(str(cert), str(key))


def _named(items: Any, name: str, what: str, path: str) -> dict:
    for item in items or ():
        if isinstance(item, dict) and item.get("name") == name:
            body = item.get(what)
            if not isinstance(body, dict):
                raise KubeconfigError(f"kubeconfig {path}: {what} {name!r} has no {what} section")
            return body
    raise KubeconfigError(f"kubeconfig {path}: no {what} named {name!r}")


def load_kubeconfig(path: str | os.PathLike, context: str | None = None) -> KubeCredentials:
    """Read a kubeconfig (YAML): the current context (or `context`), its
    cluster's CA and tls-server-name, its user's client certificate/key (file
    or -data), token/tokenFile or basic auth. Relative paths are relative to
    the kubeconfig's directory, as in kubectl. Exec plugins and auth providers
    are not supported (a node daemon should not run them)."""
    path = str(path)
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise KubeconfigError(f"kubeconfig {path}: {e.strerror or e}") from None
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise KubeconfigError(f"kubeconfig {path} is not valid YAML: {e}") from None
    if not isinstance(doc, dict):
        raise KubeconfigError(f"kubeconfig {path}: not a kubeconfig (top level is not a mapping)")
    base = Path(path).resolve().parent
    name = context or doc.get("current-context")
    if not name:
        raise KubeconfigError(f"kubeconfig {path}: no current-context (and no context given)")
    ctx = _named(doc.get("contexts"), name, "context", path)
    cluster = _named(doc.get("clusters"), ctx.get("cluster"), "cluster", path)
    user_name = ctx.get("user")
    user = _named(doc.get("users"), user_name, "user", path) if user_name else {}

    def rel(p: str) -> Path:
        q = Path(os.path.expanduser(str(p)))
        return q if q.is_absolute() else base / q

    warnings: list[str] = []

    def data_or_file(section: dict, key: str, what: str) -> bytes | None:
        data, file = section.get(f"{key}-data"), section.get(key)
        if data and file:
            warnings.append(f"{key}-data and {key} are both set; {key}-data wins")
        if data:
            try:
                return base64.b64decode(str(data), validate=False)
            except ValueError as e:
                raise KubeconfigError(f"kubeconfig {path}: {key}-data is not base64: {e}") from None
        if file:
            try:
                return rel(file).read_bytes()
            except OSError as e:
                raise KubeconfigError(f"kubeconfig {path}: {what} {rel(file)}: {e.strerror or e}") from None
        return None

    creds = KubeCredentials(path=path, context=name, server=str(cluster.get("server") or ""),
                            warnings=warnings)
    ca = data_or_file(cluster, "certificate-authority", "certificate authority")
    if ca is not None:
        creds.ca_pem = ca.decode("ascii", errors="replace")
    creds.insecure_skip_tls_verify = bool(cluster.get("insecure-skip-tls-verify", False))
    creds.tls_server_name = cluster.get("tls-server-name") or None
    if cluster.get("proxy-url"):
        warnings.append("proxy-url is ignored: discovery connects to the local endpoint directly")

    for unsupported in ("exec", "auth-provider"):
        if user.get(unsupported):
            raise KubeconfigError(
                f"kubeconfig {path}: user {user_name!r} authenticates with {unsupported!r}, which "
                "prism-kernel does not run; use a client certificate or a token (file)")
    cert = data_or_file(user, "client-certificate", "client certificate")
    key = data_or_file(user, "client-key", "client key")
    if (cert is None) != (key is None):
        raise KubeconfigError(f"kubeconfig {path}: user {user_name!r} has a client certificate "
                              "without a key, or a key without a certificate")
    creds.client_cert_pem, creds.client_key_pem = cert, key
    creds.token = user.get("token") or None
    if user.get("tokenFile"):
        creds.token_file = str(rel(user["tokenFile"]))
    if user.get("username") is not None:
        creds.username = str(user.get("username"))
        creds.password = str(user.get("password") or "")
    # Fail now on what would fail on every connection.
    try:
        creds.ssl_context()
    except (ssl.SSLError, ValueError, OSError) as e:
        raise KubeconfigError(f"kubeconfig {path}: the CA or the client certificate/key do not load: {e}") from None
    creds.authorization()
    return creds


# --------------------------------------------------------------------------------
# A minimal HTTP/1.1 client
# --------------------------------------------------------------------------------


def _tune_socket(sock: socket.socket | None) -> None:
    if sock is None:
        return
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, TCP_KEEPIDLE)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, TCP_KEEPINTVL)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, TCP_KEEPCNT)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, TCP_USER_TIMEOUT_MS)


class _Response:
    def __init__(self, conn: "_HttpConnection", status: int, headers: dict[str, str], version: str):
        self.conn = conn
        self.status = status
        self.headers = headers
        te = headers.get("transfer-encoding", "").lower()
        self.chunked = "chunked" in te
        cl = headers.get("content-length")
        self.length = int(cl) if (cl is not None and cl.strip().isdigit() and not self.chunked) else None
        conn_hdr = headers.get("connection", "").lower()
        self.keep_alive = version == "HTTP/1.1" and "close" not in conn_hdr
        if not self.chunked and self.length is None:
            self.keep_alive = False  # the body ends when the server closes
        self._left = self.length
        self.done = False

    async def read_chunk(self) -> bytes | None:
        """The next piece of the body; None at its end."""
        if self.done:
            return None
        r = self.conn.reader
        if self.chunked:
            line = await r.readuntil(b"\r\n")
            try:
                size = int(line.split(b";", 1)[0].strip(), 16)
            except ValueError:
                raise DiscoveryError("bad chunked encoding") from None
            if size == 0:
                while (await r.readuntil(b"\r\n")) != b"\r\n":  # trailers
                    pass
                self.done = True
                return None
            if size > _MAX_EVENT_BYTES:
                raise DiscoveryError(f"chunk of {size} bytes is too large")
            data = await r.readexactly(size + 2)
            return data[:-2]
        if self._left is not None:
            if self._left == 0:
                self.done = True
                return None
            data = await r.read(min(self._left, 65536))
            if not data:
                raise asyncio.IncompleteReadError(b"", self._left)
            self._left -= len(data)
            return data
        data = await r.read(65536)
        if not data:
            self.done = True
            return None
        return data

    async def read_body(self, limit: int) -> bytes:
        parts, total = [], 0
        while (chunk := await self.read_chunk()) is not None:
            total += len(chunk)
            if total > limit:
                raise DiscoveryError(f"response larger than {limit} bytes")
            parts.append(chunk)
        return b"".join(parts)


class _HttpConnection:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, host_header: str):
        self.reader = reader
        self.writer = writer
        self.host_header = host_header
        self.reusable = True
        self.requests = 0
        self.peer = writer.get_extra_info("peername")

    @classmethod
    async def open(cls, host: str, port: int, ctx: ssl.SSLContext | None, server_hostname: str | None,
                   host_header: str, timeout: float) -> "_HttpConnection":
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(timeout):
            infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
            family, type_, proto, _, addr = infos[0]
            sock = socket.socket(family, type_, proto)
            try:
                sock.setblocking(False)
                _tune_socket(sock)  # before connecting: the handshake is covered too
                await loop.sock_connect(sock, addr)
                reader, writer = await asyncio.open_connection(
                    sock=sock, ssl=ctx, server_hostname=server_hostname if ctx else None,
                    ssl_handshake_timeout=timeout if ctx else None, limit=_MAX_HEADER_BYTES)
            except BaseException:
                sock.close()
                raise
        return cls(reader, writer, host_header)

    @property
    def closed(self) -> bool:
        return self.writer.transport.is_closing()

    def close(self) -> None:
        self.reusable = False
        self.writer.transport.abort()

    async def request(self, target: str, headers: dict[str, str]) -> _Response:
        self.requests += 1
        lines = [f"GET {target} HTTP/1.1", f"Host: {self.host_header}"]
        lines += [f"{k}: {v}" for k, v in headers.items()]
        self.writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        await self.writer.drain()
        status_line = await self.reader.readuntil(b"\r\n")
        parts = status_line.decode("latin-1").split(None, 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
            raise DiscoveryError(f"bad HTTP status line {status_line[:80]!r}")
        hdrs: dict[str, str] = {}
        seen = len(status_line)
        while True:
            line = await self.reader.readuntil(b"\r\n")
            seen += len(line)
            if seen > _MAX_HEADER_BYTES:
                raise DiscoveryError("HTTP response headers too large")
            if line == b"\r\n":
                break
            k, _, v = line.decode("latin-1").partition(":")
            hdrs[k.strip().lower()] = v.strip()
        resp = _Response(self, int(parts[1]), hdrs, parts[0])
        self.reusable = resp.keep_alive
        return resp


def _retry_after(headers: dict[str, str]) -> float | None:
    v = headers.get("retry-after", "")
    return float(v) if v.isdigit() else None


async def _error_from(resp: _Response) -> DiscoveryError:
    """A DiscoveryError from a non-200 answer, with the kube Status message."""
    message = ""
    try:
        async with asyncio.timeout(5):
            body = await resp.read_body(_MAX_ERROR_BODY)
        try:
            doc = json.loads(body)
            message = doc.get("message") or doc.get("reason") or ""
        except (ValueError, AttributeError):
            message = body[:200].decode(errors="replace").strip()
    except (DiscoveryError, OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError):
        resp.conn.reusable = False
    hint = ""
    if resp.status in (401, 403):
        hint = (" (the kubeconfig's user needs get/list/watch on endpointslices.discovery.k8s.io "
                "in the Service's namespace)")
    text = f"HTTP {resp.status}" + (f": {message}" if message else "") + hint
    return DiscoveryError(text, status=resp.status, retry_after=_retry_after(resp.headers))


# --------------------------------------------------------------------------------
# The watcher
# --------------------------------------------------------------------------------


class _NullLog:
    def info(self, event: str, **fields: Any) -> None:
        pass

    warn = error = info


class _Backoff:
    """Capped exponential backoff with jitter (each delay uniform in [d/2, d])."""

    def __init__(self, initial: float, cap: float):
        self.initial, self.cap = initial, cap
        self.failures = 0

    def next(self) -> float:
        d = min(self.cap, self.initial * (2 ** min(self.failures, 30)))
        self.failures += 1
        return random.uniform(d / 2, d)

    def reset(self) -> None:
        self.failures = 0


def _iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return dt.datetime.fromtimestamp(ts, dt.timezone.utc).isoformat(timespec="milliseconds")


OnChange = Callable[[list[EndpointSpec]], "None | Awaitable[None]"]


class EndpointSliceWatcher:
    """Lists and watches the EndpointSlices of one Service through `server`
    (the daemon's own ``https://127.0.0.1:PORT``) and reports the endpoints.

    `load_cached()` returns the list saved by an earlier run (and makes it the
    baseline); `run(on_change)` runs until cancelled and calls `on_change` with
    the new, non-empty, sorted list each time it differs from the last one
    reported (or loaded from the cache)."""

    def __init__(
        self,
        kubeconfig: str | os.PathLike,
        server: str,
        namespace: str = "default",
        service: str = "kubernetes",
        cache_file: str | os.PathLike | None = None,
        log: Any = None,
        *,
        context: str | None = None,
        tls_server_name: str | None = None,
        port_name: str = PORT_NAME,
        watch_timeout: float = 300.0,
        connect_timeout: float = 10.0,
        request_timeout: float = 30.0,
        backoff_initial: float = 0.5,
        backoff_max: float = 30.0,
    ):
        u = urlsplit(server)
        if u.scheme != "https" or not u.hostname:
            raise ValueError(f"server {server!r}: expected https://HOST:PORT")
        self.kubeconfig = str(kubeconfig)
        self.server = server.rstrip("/")
        self.host = u.hostname
        self.port = u.port or 443
        self.host_header = u.netloc
        self.namespace = namespace
        self.service = service
        self.cache_file = Path(cache_file) if cache_file else None
        self.log = log or _NullLog()
        self.context = context
        self.tls_server_name = tls_server_name
        self.port_name = port_name
        self.watch_timeout = max(1.0, float(watch_timeout))
        self.connect_timeout = connect_timeout
        self.request_timeout = request_timeout
        self.backoff = _Backoff(backoff_initial, backoff_max)

        self._current: list[EndpointSpec] = []  # last reported (or loaded from the cache)
        self._store: dict[tuple[str, str], dict] = {}
        self._rv: str | None = None
        self._conn: _HttpConnection | None = None
        self._creds: KubeCredentials | None = None
        self._empty = False
        self._utf8 = codecs.getincrementaldecoder("utf-8")
        # status
        self.state = "idle"
        self.source = "none"  # none | cache | api
        self.lists = 0
        self.watches = 0
        self.events = 0
        self.bookmarks = 0
        self.relists_gone = 0
        self.errors = 0
        self.last_error: str | None = None
        self.last_change_wall: float | None = None
        self.last_sync_wall: float | None = None

    # ---- public -------------------------------------------------------------

    @property
    def endpoints(self) -> list[EndpointSpec]:
        return list(self._current)

    @property
    def resource_version(self) -> str | None:
        return self._rv

    def load_cached(self) -> list[EndpointSpec]:
        """The list saved by the last run ([] when there is none or it is
        unusable); it becomes the baseline run() compares with."""
        if self.cache_file is None:
            return []
        try:
            doc = json.loads(self.cache_file.read_text())
            if doc.get("schema") != CACHE_SCHEMA:
                raise ValueError(f"schema {doc.get('schema')!r}, expected {CACHE_SCHEMA}")
            if (doc.get("namespace"), doc.get("service")) != (self.namespace, self.service):
                raise ValueError(f"it is for {doc.get('namespace')}/{doc.get('service')}")
            specs = sorted({parse_endpoint(str(e)) for e in doc.get("endpoints", [])}, key=spec_sort_key)
            if any(s.is_name for s in specs):
                raise ValueError("it holds names, not addresses")
        except FileNotFoundError:
            return []
        except (OSError, ValueError, AttributeError, TypeError) as e:
            self.log.warn("discovery_cache_unusable", file=str(self.cache_file), error=str(e))
            return []
        if specs:
            self._current = specs
            self.source = "cache"
            self.log.info("discovery_cache_loaded", file=str(self.cache_file),
                          endpoints=",".join(map(str, specs)), saved_at=doc.get("updated_at"))
        return list(specs)

    def status(self) -> dict:
        return {
            "server": self.server,
            "namespace": self.namespace,
            "service": self.service,
            "state": self.state,
            "source": self.source,
            "endpoints": [str(s) for s in self._current],
            "resource_version": self._rv,
            "last_change_at": _iso(self.last_change_wall),
            "last_sync_at": _iso(self.last_sync_wall),
            "lists": self.lists,
            "watches": self.watches,
            "events": self.events,
            "bookmarks": self.bookmarks,
            "relists_gone": self.relists_gone,
            "errors": self.errors,
            "last_error": self.last_error,
        }

    async def run(self, on_change: OnChange) -> None:
        """List, then watch, forever (until cancelled)."""
        loop = asyncio.get_running_loop()
        self.log.info("discovery_start", server=self.server, namespace=self.namespace,
                      service=self.service, kubeconfig=self.kubeconfig)
        try:
            while True:
                try:
                    if self._rv is None:
                        self.state = "listing"
                        await self._list(on_change)
                    self.state = "watching"
                    started = loop.time()
                    before = self.events + self.bookmarks
                    await self._watch(on_change)
                    # Ended by the server (timeoutSeconds): watch again at once,
                    # unless it ended at once with nothing said (no hot loop).
                    if loop.time() - started >= 1.0 or self.events + self.bookmarks > before:
                        self.backoff.reset()
                        continue
                    raise DiscoveryError("watch ended at once")
                except _Gone as e:
                    self.relists_gone += 1
                    self.log.info("discovery_relist", reason=str(e), resource_version=self._rv)
                    self._rv = None
                    self._drop_conn()
                    if self.backoff.failures == 0:
                        self.backoff.failures = 1  # relist at once; a second 410 in a row waits
                        continue
                    delay = self.backoff.next()
                except Exception as e:  # noqa: BLE001 - the watcher must outlive any failure
                    # Network, TLS, HTTP status, timeouts, a document that is not
                    # what we expect: all are retried with backoff.
                    self._drop_conn()
                    self.errors += 1
                    self.last_error = _describe(e)
                    delay = self.backoff.next()
                    if isinstance(e, DiscoveryError) and e.retry_after:
                        delay = max(delay, min(e.retry_after, self.backoff.cap))
                    self.log.warn("discovery_error", error=self.last_error, phase=self.state,
                                  retry_in_s=round(delay, 3), failures=self.backoff.failures)
                self.state = "backoff"
                await asyncio.sleep(delay)
        finally:
            self._drop_conn()
            self.state = "stopped"

    # ---- connection -----------------------------------------------------------

    def _credentials(self) -> KubeCredentials:
        """Re-read the kubeconfig for every connection (certificates and tokens
        rotate); keep the last good one when it is momentarily unreadable."""
        try:
            creds = load_kubeconfig(self.kubeconfig, self.context)
        except KubeconfigError as e:
            if self._creds is None:
                raise DiscoveryError(str(e)) from None
            self.log.warn("discovery_kubeconfig_reload_failed", error=str(e), using="the last good one")
            return self._creds
        if self._creds is None:
            for w in creds.warnings:
                self.log.warn("discovery_kubeconfig", warning=w, kubeconfig=self.kubeconfig)
        self._creds = creds
        return creds

    async def _connection(self) -> _HttpConnection:
        if self._conn is not None and self._conn.reusable and not self._conn.closed:
            return self._conn
        self._drop_conn()
        creds = self._credentials()
        server_name = self.tls_server_name or creds.tls_server_name or self.host
        self._conn = await _HttpConnection.open(self.host, self.port, creds.ssl_context(), server_name,
                                                self.host_header, self.connect_timeout)
        return self._conn

    def _drop_conn(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    async def _request(self, target: str) -> _Response:
        """GET on the kept-alive connection; when the server closed it while
        idle (the request fails before any answer), once more on a new one."""
        conn = await self._connection()
        reused = conn.requests > 0
        try:
            return await conn.request(target, self._headers())
        except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError):
            if not reused:
                raise
        self._drop_conn()
        conn = await self._connection()
        return await conn.request(target, self._headers())

    def _headers(self) -> dict[str, str]:
        h = {"User-Agent": f"prism-kernel/{__version__} (endpoint-discovery)", "Accept": "application/json"}
        auth = (self._creds or self._credentials()).authorization()
        if auth:
            h["Authorization"] = auth
        return h

    def _path(self, **params: str) -> str:
        q = {"labelSelector": f"{SERVICE_NAME_LABEL}={self.service}", **params}
        return (f"/apis/discovery.k8s.io/v1/namespaces/{self.namespace}/endpointslices?"
                + urlencode(q))

    # ---- list and watch ---------------------------------------------------------

    async def _list(self, on_change: OnChange) -> None:
        async with asyncio.timeout(self.connect_timeout + self.request_timeout):
            # No resourceVersion: the most recent list (a quorum read), so a
            # relist after 410 or a restart never goes back in time.
            resp = await self._request(self._path())
            if resp.status == 410:
                await resp.read_body(_MAX_ERROR_BODY)
                raise DiscoveryError("HTTP 410 on a list", status=410)
            if resp.status != 200:
                raise await _error_from(resp)
            body = await resp.read_body(_MAX_LIST_BYTES)
        doc = json.loads(body)
        if not isinstance(doc, dict) or not isinstance(doc.get("items", []), list):
            raise DiscoveryError("the list is not an EndpointSliceList")
        rv = (doc.get("metadata") or {}).get("resourceVersion")
        if not rv:
            raise DiscoveryError("the list has no metadata.resourceVersion")
        self._store = {}
        for item in doc.get("items") or []:
            self._put(item)
        self._rv = str(rv)
        self.lists += 1
        self.last_sync_wall = time.time()
        self.log.info("discovery_listed", slices=len(self._store), resource_version=self._rv,
                      peer=_peer(self._conn))
        await self._report(on_change)

    async def _watch(self, on_change: OnChange) -> None:
        timeout_s = max(1, round(self.watch_timeout * random.uniform(1.0, 1.25)))
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(self.connect_timeout + self.request_timeout):
            resp = await self._request(
                self._path(watch="1", resourceVersion=self._rv or "", allowWatchBookmarks="true",
                           timeoutSeconds=str(timeout_s)))
            if resp.status == 410:
                await _error_from(resp)
                raise _Gone("HTTP 410 on the watch")
            if resp.status != 200:
                raise await _error_from(resp)
        self.watches += 1
        # The server ends the watch after timeout_s; past that (plus a grace) it
        # is a connection that died without a word.
        deadline = loop.time() + timeout_s + max(5.0, timeout_s * 0.1)
        decoder = json.JSONDecoder()
        utf8 = self._utf8()
        buf = ""
        async with asyncio.timeout_at(deadline):
            while (chunk := await resp.read_chunk()) is not None:
                buf += utf8.decode(chunk)
                changed = False
                while True:
                    buf = buf.lstrip()
                    if not buf:
                        break
                    try:
                        obj, end = decoder.raw_decode(buf)
                    except json.JSONDecodeError:
                        if len(buf) > _MAX_EVENT_BYTES:
                            raise DiscoveryError("watch event too large or not JSON") from None
                        break  # the rest of the event is in the next chunk
                    buf = buf[end:]
                    changed |= self._event(obj)
                if changed:
                    self.last_sync_wall = time.time()
                    await self._report(on_change)

    def _event(self, ev: Any) -> bool:
        """Apply one watch event; True when the set of slices changed."""
        if not isinstance(ev, dict):
            raise DiscoveryError("watch event is not an object")
        typ, obj = ev.get("type"), ev.get("object")
        if not isinstance(obj, dict):
            raise DiscoveryError(f"watch event {typ!r} without an object")
        rv = (obj.get("metadata") or {}).get("resourceVersion")
        if typ == "ERROR":
            code, reason = obj.get("code"), obj.get("reason")
            msg = obj.get("message") or reason or "watch error"
            if code == 410 or reason in ("Expired", "Gone"):
                raise _Gone(f"{code} {reason}: {msg}")
            raise DiscoveryError(f"watch error {code} {reason}: {msg}", status=code)
        if typ == "BOOKMARK":
            self.bookmarks += 1
            if rv:
                self._rv = str(rv)
            return False
        if typ in ("ADDED", "MODIFIED", "DELETED"):
            self.events += 1
            if rv:
                self._rv = str(rv)
            if typ == "DELETED":
                return self._store.pop(_key(obj), None) is not None
            return self._put(obj)
        self.log.warn("discovery_unknown_event", type=str(typ))
        return False

    def _put(self, obj: dict) -> bool:
        key = _key(obj)
        labels = (obj.get("metadata") or {}).get("labels") or {}
        if labels.get(SERVICE_NAME_LABEL) != self.service:  # no longer selected
            return self._store.pop(key, None) is not None
        self._store[key] = obj
        return True

    async def _report(self, on_change: OnChange) -> None:
        specs = endpoints_from_slices(self._store.values(), self.port_name)
        if not specs:
            if not self._empty:
                self._empty = True
                self.log.warn("discovery_empty", slices=len(self._store),
                              keeping=",".join(map(str, self._current)) or "nothing",
                              reason="no ready endpoint in the EndpointSlices; the last list is kept")
            return
        self._empty = False
        if specs == self._current:
            self.source = "api"
            return
        old = set(self._current)
        self._current = specs
        self.source = "api"
        self.last_change_wall = time.time()
        self.log.info("discovered", endpoints=",".join(map(str, specs)),
                      added=",".join(str(s) for s in specs if s not in old) or None,
                      removed=",".join(str(s) for s in sorted(old - set(specs), key=spec_sort_key)) or None,
                      resource_version=self._rv)
        self._save_cache(specs)
        try:
            res = on_change(list(specs))
            if isinstance(res, Awaitable):
                await res
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - the watch must go on
            self.log.error("discovery_callback_failed", error=f"{type(e).__name__}: {e}")

    def _save_cache(self, specs: list[EndpointSpec]) -> None:
        if self.cache_file is None:
            return
        doc = {
            "schema": CACHE_SCHEMA,
            "namespace": self.namespace,
            "service": self.service,
            "updated_at": _iso(time.time()),
            "resource_version": self._rv,
            "endpoints": [str(s) for s in specs],
        }
        try:
            atomic_write(self.cache_file, (json.dumps(doc, indent=2) + "\n").encode())
        except OSError as e:
            self.log.warn("discovery_cache_write_failed", file=str(self.cache_file), error=str(e))


def atomic_write(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Write `data` to `path` so a reader sees the old or the new content,
    never a part (temp file in the same directory, fsync, rename, fsync dir)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fchmod(f.fileno(), mode)
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):
        dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


def _key(obj: dict) -> tuple[str, str]:
    md = obj.get("metadata") or {}
    return str(md.get("namespace") or ""), str(md.get("name") or "")


def _peer(conn: _HttpConnection | None) -> str | None:
    if conn is None or not conn.peer:
        return None
    ip, port = conn.peer[0], conn.peer[1]
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


def _describe(e: BaseException) -> str:
    if isinstance(e, ssl.SSLCertVerificationError):
        return f"tls: {e.verify_message or e.reason}"
    if isinstance(e, ssl.SSLError):
        return f"tls: {e.reason or e}"
    if isinstance(e, TimeoutError):
        return "timeout"
    if isinstance(e, asyncio.IncompleteReadError):
        return "connection closed by peer"
    if isinstance(e, ConnectionRefusedError):
        return "connection refused"
    if isinstance(e, ConnectionResetError):
        return "connection reset"
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    if isinstance(e, PrismError):
        return str(e)
    return f"{type(e).__name__}: {e}"
