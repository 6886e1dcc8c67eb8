"""A fake kube-apiserver: one process per test host, standard library only.

Started by the testbed as

    ip netns exec NS python -m tests.testbed.fakeapi --name be0 --cert C --key K \
        --ca CA --control /tmp/.../be0.ctl --listen 0.0.0.0 --tls-port 6443 --http-port 8080

It serves the same handlers over HTTPS (``--tls-port``, ALPN offers only
``http/1.1``; a client certificate signed by ``--ca`` is optional, like
kube-apiserver) and over plain HTTP (``--http-port``, for fast checks; 0 = off).
HTTP/1.1 with keep-alive. Every response carries ``X-Backend: <name>``.

Handlers
    /readyz, /livez, /healthz (and sub-paths)  200 "ok"; /readyz is 503 while draining
    /version                                   kube-apiserver-like version JSON
    /api, /api/v1, /apis                       minimal discovery documents
    /whoami                                    {"backend", "peer", "local", ...}
    /stream                                    chunked, one JSON line every 100 ms until
                                               the client goes away (``?interval=S&count=N``)
    /apis/discovery.k8s.io/v1[/namespaces/NS]/endpointslices[/NAME]
                                               EndpointSlice get, list (labelSelector,
                                               fieldSelector) and watch (``?watch=1``:
                                               resourceVersion, allowWatchBookmarks,
                                               timeoutSeconds, sendInitialEvents; 410 Gone
                                               for a compacted resourceVersion)
    anything else                              404 with a kube-style Status object

EndpointSlices: the state (``{"rv": N, "slices": [...], "tombstones": {name: rv}}``)
comes from ``--endpointslices FILE`` at start and from the control op
``endpointslices`` (the same document); the server diffs it against what it
holds and sends ADDED/MODIFIED/DELETED events to open watches. The testbed
assigns resourceVersions, one counter for all servers, like one etcd.
A bearer token ``invalid-token`` gets 401 on the EndpointSlice paths.

Control: a Unix socket (``--control``) speaking one JSON object per line, e.g.
``{"op": "set", "draining": true}`` -> ``{"ok": true, ...}``. Ops: ``ping``,
``set`` (``draining``, ``delay``, ``accept_delay``, ``bookmark_interval``), ``stats``,
``reset_stats``, ``endpointslices`` (new state), ``compact`` (watching from an older
resourceVersion than the current one gets 410), ``expire_watches`` (open watches get
an ERROR 410 event and end), ``close_watches`` (open watches end cleanly).

When ready (all sockets bound and listening) it writes one line
``READY {"pid": ...}`` to stdout and closes stdout. It exits by itself when its
parent (``--parent-pid``) goes away.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import copy
import json
import os
import re
import signal
import socket
import ssl
import sys
import time
from urllib.parse import parse_qs, urlsplit

SERVER_HEADER = "prism-kernel-testbed-fakeapi"
VERSION = {
    "major": "1",
    "minor": "32",
    "gitVersion": "v1.32.0-fake",
    "gitCommit": "0000000000000000000000000000000000000000",
    "gitTreeState": "clean",
    "buildDate": "2024-12-11T00:00:00Z",
    "goVersion": "go1.23.3",
    "compiler": "gc",
    "platform": "linux/amd64",
}
REASONS = {
    200: "OK",
    400: "Bad Request",
    401: "Unauthorized",
    404: "Not Found",
    405: "Method Not Allowed",
    410: "Gone",
    413: "Payload Too Large",
    431: "Request Header Fields Too Large",
    503: "Service Unavailable",
}
MAX_BODY = 1 << 20
NAMESPACES = ("default", "kube-system")
ES_GROUP = "discovery.k8s.io"
ES_GV = "discovery.k8s.io/v1"
ES_PATH_RE = re.compile(
    r"^/apis/discovery\.k8s\.io/v1(?:/namespaces/(?P<ns>[^/]+))?/endpointslices(?:/(?P<name>[^/]+))?/?$")
ES_HISTORY = 1000  # events kept for watches that resume from a resourceVersion
DEFAULT_WATCH_TIMEOUT = 1800  # kube-apiserver: --min-request-timeout, randomized; here fixed
INVALID_TOKEN = "invalid-token"


def fmt_addr(sockaddr) -> tuple[str, int, str]:
    """(ip, port, "ip:port") of a socket address; IPv4-mapped IPv6 is unmapped,
    IPv6 is bracketed in the joined form."""
    if not sockaddr:
        return "", 0, ""
    ip, port = sockaddr[0], sockaddr[1]
    if ip.startswith("::ffff:") and "." in ip:
        ip = ip[len("::ffff:"):]
    joined = f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"
    return ip, port, joined


class Stats:
    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.requests = 0
        self.connections = 0
        self.tls_connections = 0
        self.http_connections = 0
        self.tls_handshake_failures = 0
        self.paths: dict[str, int] = {}
        self.started = time.monotonic()
        self.es = {"gets": 0, "lists": 0, "watches": 0, "gone": 0, "unauthorized": 0,
                   "events_sent": 0, "bookmarks_sent": 0, "last_auth": None,
                   "last_client_cn": None, "last_user_agent": None, "last_query": None}

    def as_dict(self, active: int) -> dict:
        return {
            "requests": self.requests,
            "connections": self.connections,
            "active_connections": active,
            "tls_connections": self.tls_connections,
            "http_connections": self.http_connections,
            "tls_handshake_failures": self.tls_handshake_failures,
            "paths": dict(self.paths),
            "seconds": round(time.monotonic() - self.started, 3),
            "endpointslices": dict(self.es),
        }


# --- EndpointSlices ------------------------------------------------------------------


def _rv_of(obj: dict) -> int:
    try:
        return int((obj.get("metadata") or {}).get("resourceVersion") or 0)
    except (TypeError, ValueError):
        return 0


def _obj_key(obj: dict) -> tuple[str, str]:
    md = obj.get("metadata") or {}
    return str(md.get("namespace") or "default"), str(md.get("name") or "")


def _split_requirements(text: str) -> list[str]:
    """Split a selector at commas that are not inside parentheses."""
    out, depth, cur = [], 0, ""
    for ch in text:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        if ch == "," and depth == 0:
            out.append(cur)
            cur = ""
        else:
            cur += ch
    out.append(cur)
    return [r.strip() for r in out if r.strip()]


def label_selector(text: str):
    """A predicate over a labels dict for a Kubernetes label selector: k=v, k==v,
    k!=v, k, !k, k in (a,b), k notin (a,b). ValueError when it does not parse."""
    preds = []
    for req in _split_requirements(text or ""):
        m = re.fullmatch(r"([^\s!=(),]+)\s+(in|notin)\s+\(([^)]*)\)", req)
        if m:
            key, op = m.group(1), m.group(2)
            vals = {v.strip() for v in m.group(3).split(",") if v.strip()}
            if op == "in":
                preds.append(lambda lb, k=key, vs=vals: lb.get(k) in vs)
            else:
                preds.append(lambda lb, k=key, vs=vals: lb.get(k) not in vs)
            continue
        m = re.fullmatch(r"([^\s!=(),]+)\s*(!=|==|=)\s*([^\s!=(),]*)", req)
        if m:
            key, op, val = m.groups()
            if op == "!=":
                preds.append(lambda lb, k=key, v=val: lb.get(k) != v)
            else:
                preds.append(lambda lb, k=key, v=val: lb.get(k) == v)
            continue
        m = re.fullmatch(r"(!?)([^\s!=(),]+)", req)
        if m:
            neg, key = m.groups()
            preds.append(lambda lb, k=key, n=bool(neg): (k in lb) != n)
            continue
        raise ValueError(f"unable to parse requirement: {req!r}")
    return lambda labels: all(p(labels or {}) for p in preds)


def field_selector(text: str):
    """metadata.name / metadata.namespace with =, == or != (what kubectl sends)."""
    preds = []
    for req in _split_requirements(text or ""):
        m = re.fullmatch(r"(metadata\.name|metadata\.namespace)\s*(!=|==|=)\s*(\S*)", req)
        if not m:
            raise ValueError(f"field label not supported: {req!r}")
        fld, op, val = m.groups()
        idx = 1 if fld == "metadata.name" else 0
        preds.append(lambda key, i=idx, v=val, ne=(op == "!="): (key[i] == v) != ne)
    return lambda obj: all(p(_obj_key(obj)) for p in preds)


class SliceStore:
    """EndpointSlices of one server, with a history of events for watches that
    resume from a resourceVersion, and the queues of the open watches."""

    def __init__(self) -> None:
        self.rv = 0
        self.objects: dict[tuple[str, str], dict] = {}
        self.history: collections.deque = collections.deque()  # (rv, type, old, new)
        self.oldest = 0  # a watch may resume from any resourceVersion >= this
        self.watchers: set[asyncio.Queue] = set()

    def load(self, state: dict) -> None:
        """The state at start: no events, nothing to resume from before it."""
        self.objects = {_obj_key(o): o for o in state.get("slices") or []}
        self.rv = int(state.get("rv") or 0)
        self.history.clear()
        self.oldest = self.rv

    def apply(self, state: dict) -> int:
        """Move to a new state; the difference becomes ADDED/MODIFIED/DELETED
        events (each at the object's resourceVersion). Returns how many."""
        new = {_obj_key(o): o for o in state.get("slices") or []}
        tomb = state.get("tombstones") or {}
        target_rv = int(state.get("rv") or 0)
        events = []
        for k, obj in new.items():
            old = self.objects.get(k)
            if old is None:
                events.append((_rv_of(obj), "ADDED", None, obj))
            elif _rv_of(old) != _rv_of(obj):
                events.append((_rv_of(obj), "MODIFIED", old, obj))
        for k, old in self.objects.items():
            if k not in new:
                gone = copy.deepcopy(old)
                drv = int(tomb.get(k[1], target_rv))
                gone.setdefault("metadata", {})["resourceVersion"] = str(drv)
                events.append((drv, "DELETED", old, gone))
        events.sort(key=lambda e: e[0])
        self.objects = new
        self.rv = max(self.rv, target_rv, *(e[0] for e in events)) if events else max(self.rv, target_rv)
        for ev in events:
            self.history.append(ev)
            while len(self.history) > ES_HISTORY:
                self.oldest = self.history.popleft()[0]
            for q in self.watchers:
                q.put_nowait(("event", ev))
        return len(events)

    def compact(self) -> None:
        self.history.clear()
        self.oldest = self.rv

    def signal(self, kind: str) -> int:
        for q in self.watchers:
            q.put_nowait((kind, None))
        return len(self.watchers)


def _status(code: int, reason: str, message: str, **extra) -> dict:
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": message, "reason": reason, "code": code, **extra}


class FakeApi:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.name = args.name
        self.draining = args.draining
        self.delay = args.delay
        self.accept_delay = args.accept_delay
        self.stats = Stats()
        self.active = 0
        self.conn_serial = 0
        self.tasks: set[asyncio.Task] = set()
        self.loop = asyncio.get_running_loop()
        self.slices = SliceStore()
        self.bookmark_interval = args.bookmark_interval
        if args.endpointslices:
            with open(args.endpointslices) as f:
                self.slices.load(json.load(f))
        self.tls_ctx = None
        if args.tls_port:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(args.cert, args.key)
            ctx.set_alpn_protocols(["http/1.1"])
            if args.ca:
                ctx.load_verify_locations(args.ca)
                ctx.verify_mode = ssl.CERT_OPTIONAL
            self.tls_ctx = ctx

    def spawn(self, coro) -> None:
        task = self.loop.create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    # --- connections -------------------------------------------------------

    def on_acceptable(self, lsock: socket.socket, tls: bool) -> None:
        """Accept what the kernel queued. Accepting by hand (not create_server)
        lets a connection wait (accept delay) with its bytes, a ClientHello, still
        in the kernel, before a transport (and TLS) takes it over."""
        for _ in range(256):
            try:
                conn, _addr = lsock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:  # EMFILE and friends: retry on the next wakeup
                print(f"accept: {e}", file=sys.stderr, flush=True)
                return
            conn.setblocking(False)
            self.spawn(self.setup_connection(conn, tls))

    async def setup_connection(self, conn: socket.socket, tls: bool) -> None:
        self.stats.connections += 1
        if tls:
            self.stats.tls_connections += 1
        else:
            self.stats.http_connections += 1
        self.conn_serial += 1
        conn_id = self.conn_serial
        self.active += 1
        transport = None
        try:
            if self.accept_delay > 0:
                await asyncio.sleep(self.accept_delay)
            reader = asyncio.StreamReader(limit=64 * 1024)
            try:
                transport, protocol = await self.loop.connect_accepted_socket(
                    lambda: asyncio.StreamReaderProtocol(reader), conn,
                    ssl=self.tls_ctx if tls else None,
                    ssl_handshake_timeout=30.0 if tls else None)
            except (OSError, ssl.SSLError, asyncio.TimeoutError, ConnectionError):
                if tls:
                    self.stats.tls_handshake_failures += 1
                conn.close()
                return
            writer = asyncio.StreamWriter(transport, protocol, reader, self.loop)
            await self.serve_connection(reader, writer, conn_id, tls)
        except (ConnectionError, OSError, ssl.SSLError):
            pass
        finally:
            self.active -= 1
            if transport is not None:
                transport.close()
            else:
                conn.close()

    async def serve_connection(self, reader, writer, conn_id: int, tls: bool) -> None:
        n = 0
        while True:
            req = await self.read_request(reader, writer)
            if req is None:
                return
            n += 1
            keep = await self.handle(req, writer, conn_id, n, tls, reader=reader)
            if not keep:
                return

    async def read_request(self, reader, writer):
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError:
            return None
        except asyncio.LimitOverrunError:
            await self.respond(writer, 431, b"request header too large\n", keep=False)
            return None
        except (ConnectionError, OSError, ssl.SSLError):
            return None
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            await self.respond(writer, 400, b"bad request line\n", keep=False)
            return None
        method, target, version = parts
        headers: dict[str, str] = {}
        for line in lines[1:]:
            if not line:
                continue
            k, _, v = line.partition(":")
            headers[k.strip().lower()] = v.strip()
        try:
            if "chunked" in headers.get("transfer-encoding", "").lower():
                total = 0
                while True:
                    size_line = await reader.readuntil(b"\r\n")
                    size = int(size_line.split(b";")[0].strip() or b"0", 16)
                    if size == 0:
                        # trailers until an empty line
                        while (await reader.readuntil(b"\r\n")) != b"\r\n":
                            pass
                        break
                    total += size
                    if total > MAX_BODY:
                        await self.respond(writer, 413, b"body too large\n", keep=False)
                        return None
                    await reader.readexactly(size + 2)
            else:
                length = int(headers.get("content-length", "0") or "0")
                if length > MAX_BODY:
                    await self.respond(writer, 413, b"body too large\n", keep=False)
                    return None
                if length:
                    await reader.readexactly(length)
        except (ValueError, asyncio.IncompleteReadError, asyncio.LimitOverrunError,
                ConnectionError, OSError, ssl.SSLError):
            return None
        conn = headers.get("connection", "").lower()
        if version == "HTTP/1.0":
            keep = "keep-alive" in conn
        else:
            keep = "close" not in conn
        return method, target, version, headers, keep

    async def respond(self, writer, status: int, body: bytes, *, keep: bool,
                      content_type: str = "text/plain; charset=utf-8",
                      head_only: bool = False) -> bool:
        lines = [
            f"HTTP/1.1 {status} {REASONS.get(status, 'Unknown')}",
            f"Content-Type: {content_type}",
            f"Content-Length: {len(body)}",
            f"X-Backend: {self.name}",
            "Cache-Control: no-cache, private",
            "X-Content-Type-Options: nosniff",
            f"Server: {SERVER_HEADER}",
        ]
        if not keep:
            lines.append("Connection: close")
        data = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        if not head_only:
            data += body
        try:
            writer.write(data)
            await writer.drain()
        except (ConnectionError, OSError, ssl.SSLError):
            return False
        return keep

    async def respond_json(self, writer, status: int, obj, *, keep: bool, head_only=False) -> bool:
        body = (json.dumps(obj, separators=(",", ":")) + "\n").encode()
        return await self.respond(writer, status, body, keep=keep,
                                  content_type="application/json", head_only=head_only)

    # --- handlers ----------------------------------------------------------

    async def handle(self, req, writer, conn_id: int, n: int, tls: bool, reader=None) -> bool:
        method, target, _version, headers, keep = req
        self.stats.requests += 1
        split = urlsplit(target)
        path = split.path or "/"
        query = parse_qs(split.query, keep_blank_values=True)
        top = "/" + path.strip("/").split("/")[0]
        self.stats.paths[top] = self.stats.paths.get(top, 0) + 1
        if self.delay > 0:
            await asyncio.sleep(self.delay)
        head_only = method == "HEAD"
        if method not in ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"):
            return await self.respond(writer, 405, b"method not allowed\n", keep=keep)

        if top in ("/readyz", "/livez", "/healthz"):
            check = top[1:]
            failing = top == "/readyz" and self.draining
            if "verbose" in query:
                if failing:
                    text = f"[+]ping ok\n[-]shutdown failed: reason withheld\n{check} check failed\n"
                else:
                    text = f"[+]ping ok\n[+]etcd ok\n{check} check passed\n"
            else:
                text = "[-]shutdown failed: reason withheld\nreadyz check failed\n" if failing else "ok"
            return await self.respond(writer, 503 if failing else 200, text.encode(),
                                      keep=keep, head_only=head_only)
        if path == "/version":
            return await self.respond_json(writer, 200, VERSION, keep=keep, head_only=head_only)
        if path == "/api":
            sock = writer.get_extra_info("sockname")
            return await self.respond_json(writer, 200, {
                "kind": "APIVersions",
                "versions": ["v1"],
                "serverAddressByClientCIDRs": [
                    {"clientCIDR": "0.0.0.0/0", "serverAddress": fmt_addr(sock)[2]}],
            }, keep=keep, head_only=head_only)
        if path == "/api/v1":
            return await self.respond_json(writer, 200, {
                "kind": "APIResourceList",
                "groupVersion": "v1",
                "resources": [{
                    "name": "namespaces", "singularName": "namespace", "namespaced": False,
                    "kind": "Namespace", "verbs": ["get", "list"], "shortNames": ["ns"],
                }],
            }, keep=keep, head_only=head_only)
        if path == "/api/v1/namespaces":
            return await self.respond_json(writer, 200, {
                "kind": "NamespaceList",
                "apiVersion": "v1",
                "metadata": {"resourceVersion": "1"},
                "items": [self.namespace(n) for n in NAMESPACES],
            }, keep=keep, head_only=head_only)
        if path.startswith("/api/v1/namespaces/") and path.count("/") == 4 \
                and path.rsplit("/", 1)[1] in NAMESPACES:
            return await self.respond_json(writer, 200, self.namespace(path.rsplit("/", 1)[1]),
                                           keep=keep, head_only=head_only)
        if path == "/apis":
            return await self.respond_json(writer, 200, {
                "kind": "APIGroupList",
                "apiVersion": "v1",
                "groups": [self.es_group()],
            }, keep=keep, head_only=head_only)
        if path.rstrip("/") == f"/apis/{ES_GROUP}":
            return await self.respond_json(writer, 200, {"kind": "APIGroup", "apiVersion": "v1",
                                                         **self.es_group()},
                                           keep=keep, head_only=head_only)
        if path.rstrip("/") == f"/apis/{ES_GV}":
            return await self.respond_json(writer, 200, {
                "kind": "APIResourceList",
                "apiVersion": "v1",
                "groupVersion": ES_GV,
                "resources": [{
                    "name": "endpointslices", "singularName": "endpointslice", "namespaced": True,
                    "kind": "EndpointSlice",
                    "verbs": ["create", "delete", "deletecollection", "get", "list", "patch",
                              "update", "watch"],
                }],
            }, keep=keep, head_only=head_only)
        m = ES_PATH_RE.match(path)
        if m:
            return await self.endpointslices(writer, reader, headers, query, m, keep, head_only)
        if path == "/whoami":
            return await self.respond_json(writer, 200, self.whoami(writer, conn_id, n, tls),
                                           keep=keep, head_only=head_only)
        if path == "/stream":
            await self.stream(writer, query)
            return False
        return await self.respond_json(writer, 404, {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": "the server could not find the requested resource",
            "reason": "NotFound",
            "details": {},
            "code": 404,
        }, keep=keep, head_only=head_only)

    def namespace(self, name: str) -> dict:
        return {
            "kind": "Namespace",
            "apiVersion": "v1",
            "metadata": {"name": name, "uid": f"00000000-0000-0000-0000-{len(name):012d}",
                         "resourceVersion": "1", "creationTimestamp": "2024-12-11T00:00:00Z",
                         "labels": {"kubernetes.io/metadata.name": name},
                         "annotations": {"testbed/backend": self.name}},
            "spec": {"finalizers": ["kubernetes"]},
            "status": {"phase": "Active"},
        }

    def whoami(self, writer, conn_id: int, n: int, tls: bool) -> dict:
        peer_ip, peer_port, peer = fmt_addr(writer.get_extra_info("peername"))
        local_ip, local_port, local = fmt_addr(writer.get_extra_info("sockname"))
        out = {
            "backend": self.name,
            "peer": peer,
            "local": local,
            "peer_ip": peer_ip,
            "peer_port": peer_port,
            "local_ip": local_ip,
            "local_port": local_port,
            "tls": tls,
            "connection": conn_id,
            "request_on_connection": n,
            "pid": os.getpid(),
        }
        if tls:
            sslobj = writer.get_extra_info("ssl_object")
            out["alpn"] = sslobj.selected_alpn_protocol() if sslobj else None
            cert = writer.get_extra_info("peercert")
            cn = None
            if cert:
                for rdn in cert.get("subject", ()):
                    for k, v in rdn:
                        if k == "commonName":
                            cn = v
            out["client_cn"] = cn
        return out

    async def stream(self, writer, query) -> None:
        try:
            interval = float(query.get("interval", ["0.1"])[0])
            count = int(query.get("count", ["0"])[0])
        except ValueError:
            interval, count = 0.1, 0
        interval = max(interval, 0.001)
        head = (
            "HTTP/1.1 200 OK\r\n"
            "Content-Type: application/json\r\n"
            "Transfer-Encoding: chunked\r\n"
            f"X-Backend: {self.name}\r\n"
            "Cache-Control: no-cache, private\r\n"
            f"Server: {SERVER_HEADER}\r\n"
            "\r\n"
        ).encode()
        try:
            writer.write(head)
            await writer.drain()
            seq = 0
            while count == 0 or seq < count:
                if writer.transport.is_closing():
                    return
                line = json.dumps({"type": "TICK", "backend": self.name, "seq": seq,
                                   "time": time.time()}) + "\n"
                data = line.encode()
                writer.write(b"%x\r\n%s\r\n" % (len(data), data))
                await writer.drain()
                seq += 1
                await asyncio.sleep(interval)
            writer.write(b"0\r\n\r\n")
            await writer.drain()
        except (ConnectionError, OSError, ssl.SSLError):
            return


    # --- EndpointSlices --------------------------------------------------------------

    @staticmethod
    def es_group() -> dict:
        gv = {"groupVersion": ES_GV, "version": "v1"}
        return {"name": ES_GROUP, "versions": [gv], "preferredVersion": gv}

    async def endpointslices(self, writer, reader, headers, query, m, keep, head_only) -> bool:
        es = self.stats.es
        auth = headers.get("authorization", "")
        cn = None
        cert = writer.get_extra_info("peercert")
        for rdn in (cert or {}).get("subject", ()):
            for k, v in rdn:
                if k == "commonName":
                    cn = v
        es["last_auth"] = auth.split(" ", 1)[0].lower() if auth else ("cert" if cn else "none")
        es["last_client_cn"] = cn
        es["last_user_agent"] = headers.get("user-agent")
        es["last_query"] = {k: v[0] for k, v in query.items()}
        if auth == f"Bearer {INVALID_TOKEN}":
            es["unauthorized"] += 1
            return await self.respond_json(writer, 401, _status(401, "Unauthorized", "Unauthorized"),
                                           keep=keep, head_only=head_only)
        ns, name = m.group("ns"), m.group("name")
        q1 = {k: v[0] for k, v in query.items()}
        try:
            lsel = label_selector(q1.get("labelSelector", ""))
            fsel = field_selector(q1.get("fieldSelector", ""))
        except ValueError as e:
            return await self.respond_json(writer, 400, _status(400, "BadRequest", str(e)),
                                           keep=keep, head_only=head_only)
        if name is not None:
            if ns is None:
                return await self.respond_json(writer, 404, _status(404, "NotFound", "not found"),
                                               keep=keep, head_only=head_only)
            fsel_name = field_selector(f"metadata.name={name}")
        else:
            fsel_name = None

        def match(obj) -> bool:
            if obj is None:
                return False
            k = _obj_key(obj)
            if ns is not None and k[0] != ns:
                return False
            if fsel_name is not None and not fsel_name(obj):
                return False
            return lsel((obj.get("metadata") or {}).get("labels") or {}) and fsel(obj)

        if q1.get("watch") in ("1", "true"):
            es["watches"] += 1
            # Like kube-apiserver, the connection stays open after a watch ended
            # by its timeout (the terminating chunk), for the client to reuse.
            return await self.watch_endpointslices(writer, reader, q1, match) and keep
        if name is not None:
            es["gets"] += 1
            obj = self.slices.objects.get((ns, name))
            if obj is None:
                return await self.respond_json(writer, 404, _status(
                    404, "NotFound", f'endpointslices.{ES_GROUP} "{name}" not found',
                    details={"name": name, "group": ES_GROUP, "kind": "endpointslices"}),
                    keep=keep, head_only=head_only)
            return await self.respond_json(writer, 200, self.es_object(obj), keep=keep,
                                           head_only=head_only)
        es["lists"] += 1
        items = [self.es_object(o, list_item=True)
                 for _k, o in sorted(self.slices.objects.items()) if match(o)]
        return await self.respond_json(writer, 200, {
            "kind": "EndpointSliceList",
            "apiVersion": ES_GV,
            "metadata": {"resourceVersion": str(self.slices.rv)},
            "items": items,
        }, keep=keep, head_only=head_only)

    @staticmethod
    def es_object(obj: dict, list_item: bool = False) -> dict:
        out = dict(obj)
        if list_item:  # kube-apiserver leaves these out of list items
            out.pop("kind", None)
            out.pop("apiVersion", None)
        else:
            out.setdefault("kind", "EndpointSlice")
            out.setdefault("apiVersion", ES_GV)
        return out

    async def watch_endpointslices(self, writer, reader, q1: dict, match) -> bool:
        """A watch as kube-apiserver serves it: chunked, one JSON event per chunk.
        True when it ended cleanly and the connection can serve another request."""
        es = self.stats.es
        store = self.slices
        rv_param = q1.get("resourceVersion", "")
        bookmarks = q1.get("allowWatchBookmarks") in ("true", "1")
        send_initial = q1.get("sendInitialEvents") == "true"
        try:
            timeout = float(q1.get("timeoutSeconds") or 0) or DEFAULT_WATCH_TIMEOUT
            since = int(rv_param) if rv_param not in ("", "0") else None
        except ValueError:
            return await self.respond_json(writer, 400, _status(
                400, "BadRequest", f"invalid resourceVersion {rv_param!r}"), keep=True)
        head = (
            "HTTP/1.1 200 OK\r\n"
            "Content-Type: application/json\r\n"
            "Transfer-Encoding: chunked\r\n"
            f"X-Backend: {self.name}\r\n"
            "Cache-Control: no-cache, private\r\n"
            f"Server: {SERVER_HEADER}\r\n"
            "\r\n"
        ).encode()
        q: asyncio.Queue = asyncio.Queue()
        store.watchers.add(q)
        # Snapshot synchronously with the registration: later changes arrive on q.
        snapshot = list(store.history)
        current = [o for _k, o in sorted(store.objects.items())]
        cur_rv, oldest = store.rv, store.oldest
        eof = self.loop.create_task(reader.read(1)) if reader is not None else None

        def event(typ: str, obj: dict) -> bytes:
            data = (json.dumps({"type": typ, "object": self.es_object(obj)},
                               separators=(",", ":")) + "\n").encode()
            return b"%x\r\n%s\r\n" % (len(data), data)

        def bookmark(initial_end: bool = False) -> bytes:
            md = {"resourceVersion": str(store.rv)}
            if initial_end:
                md["annotations"] = {"k8s.io/initial-events-end": "true"}
            return event("BOOKMARK", {"kind": "EndpointSlice", "apiVersion": ES_GV, "metadata": md})

        def translate(ev) -> bytes | None:
            _rv, typ, old, new = ev
            if typ == "ADDED":
                return event("ADDED", new) if match(new) else None
            if typ == "DELETED":
                return event("DELETED", new) if match(old) else None
            was, now = match(old), match(new)
            if was and now:
                return event("MODIFIED", new)
            if was:
                return event("DELETED", new)
            if now:
                return event("ADDED", new)
            return None

        try:
            writer.write(head)
            out: list[bytes] = []
            if since is None or send_initial:
                out += [event("ADDED", o) for o in current if match(o)]
                if send_initial and bookmarks:
                    out.append(bookmark(initial_end=True))
            elif since < oldest:
                es["gone"] += 1
                out.append(event("ERROR", _status(
                    410, "Expired", f"too old resource version: {since} ({oldest})")))
                writer.write(b"".join(out) + b"0\r\n\r\n")
                await writer.drain()
                return True
            elif since > cur_rv:
                out.append(event("ERROR", _status(
                    504, "Timeout", f"Too large resource version: {since}, current: {cur_rv}",
                    details={"causes": [{"reason": "ResourceVersionTooLarge",
                                         "message": "Too large resource version"}],
                             "retryAfterSeconds": 1})))
                writer.write(b"".join(out) + b"0\r\n\r\n")
                await writer.drain()
                return True
            else:
                out += [b for ev in snapshot if ev[0] > since and (b := translate(ev))]
            es["events_sent"] += len(out)
            if out:
                writer.write(b"".join(out))
            await writer.drain()
            deadline = self.loop.time() + timeout
            next_bm = self.loop.time() + self.bookmark_interval
            while True:
                now = self.loop.time()
                if now >= deadline:
                    break
                wait = deadline - now
                if bookmarks and self.bookmark_interval > 0:
                    wait = min(wait, max(0.0, next_bm - now))
                get = self.loop.create_task(q.get())
                waiting = {get} if eof is None else {get, eof}
                done, _ = await asyncio.wait(waiting, timeout=wait,
                                             return_when=asyncio.FIRST_COMPLETED)
                if get not in done:
                    get.cancel()
                if eof is not None and eof in done:
                    return False  # the client went away (or pipelined: not supported here)
                if writer.transport.is_closing():
                    return False
                if get in done:
                    kind, ev = get.result()
                    if kind == "event":
                        data = translate(ev)
                        if data:
                            es["events_sent"] += 1
                            writer.write(data)
                            await writer.drain()
                    elif kind == "gone":
                        es["gone"] += 1
                        writer.write(event("ERROR", _status(
                            410, "Expired",
                            "The resourceVersion for the provided watch is too old.")))
                        break
                    elif kind == "close":
                        break
                    continue
                if bookmarks and self.loop.time() >= next_bm:
                    es["bookmarks_sent"] += 1
                    writer.write(bookmark())
                    await writer.drain()
                    next_bm = self.loop.time() + self.bookmark_interval
            writer.write(b"0\r\n\r\n")
            await writer.drain()
            return eof is None or not eof.done()
        except (ConnectionError, OSError, ssl.SSLError):
            return False
        finally:
            store.watchers.discard(q)
            if eof is not None and not eof.done():
                eof.cancel()
                # wait until the read is really withdrawn: the connection's next
                # readuntil() must not meet it
                with contextlib.suppress(asyncio.CancelledError):
                    await eof

    # --- control -------------------------------------------------------------

    async def control(self, reader, writer) -> None:
        try:
            while True:
                line = await reader.readline()
                if not line:
                    return
                try:
                    msg = json.loads(line)
                    reply = self.control_op(msg)
                except Exception as e:  # a bad request must not kill the server
                    reply = {"ok": False, "error": f"{type(e).__name__}: {e}"}
                writer.write((json.dumps(reply) + "\n").encode())
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()

    def state(self) -> dict:
        return {"name": self.name, "pid": os.getpid(), "draining": self.draining,
                "delay": self.delay, "accept_delay": self.accept_delay,
                "bookmark_interval": self.bookmark_interval,
                "endpointslices_rv": self.slices.rv, "watches": len(self.slices.watchers)}

    def control_op(self, msg: dict) -> dict:
        op = msg.get("op")
        if op == "ping":
            return {"ok": True, **self.state()}
        if op == "set":
            if "draining" in msg:
                self.draining = bool(msg["draining"])
            if "delay" in msg:
                self.delay = max(0.0, float(msg["delay"]))
            if "accept_delay" in msg:
                self.accept_delay = max(0.0, float(msg["accept_delay"]))
            if "bookmark_interval" in msg:
                self.bookmark_interval = max(0.0, float(msg["bookmark_interval"]))
            return {"ok": True, **self.state()}
        if op == "endpointslices":
            n = self.slices.apply(msg)
            return {"ok": True, "events": n, "rv": self.slices.rv,
                    "watches": len(self.slices.watchers)}
        if op == "compact":
            self.slices.compact()
            return {"ok": True, "rv": self.slices.rv}
        if op == "expire_watches":
            return {"ok": True, "watches": self.slices.signal("gone")}
        if op == "close_watches":
            return {"ok": True, "watches": self.slices.signal("close")}
        if op == "stats":
            return {"ok": True, "stats": self.stats.as_dict(self.active), **self.state()}
        if op == "reset_stats":
            self.stats.reset()
            return {"ok": True}
        return {"ok": False, "error": f"unknown op {op!r}"}


def listen_socket(host: str, port: int, backlog: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(family, socket.SOCK_STREAM)
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        s.bind((host, port))
        s.listen(backlog)
        s.setblocking(False)
    except BaseException:
        s.close()
        raise
    return s


async def amain(args: argparse.Namespace) -> None:
    api = FakeApi(args)
    loop = asyncio.get_running_loop()
    servers = []
    listeners: list[socket.socket] = []
    for host in args.listen:
        for port, tls in ((args.tls_port, True), (args.http_port, False)):
            if not port:
                continue
            sock = listen_socket(host, port, args.backlog)
            listeners.append(sock)
            loop.add_reader(sock.fileno(), api.on_acceptable, sock, tls)
    if args.control:
        try:
            os.unlink(args.control)
        except FileNotFoundError:
            pass
        servers.append(await asyncio.start_unix_server(api.control, path=args.control,
                                                       limit=16 * 1024 * 1024))

    stop = loop.create_future()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda: stop.done() or stop.set_result(None))

    ready = json.dumps({"pid": os.getpid(), "name": args.name})
    os.write(1, f"READY {ready}\n".encode())
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.close(devnull)

    async def watch_parent() -> None:
        while True:
            await asyncio.sleep(0.5)
            if args.parent_pid and os.getppid() != args.parent_pid:
                stop.done() or stop.set_result(None)
                return

    watcher = loop.create_task(watch_parent())
    await stop
    watcher.cancel()
    for s in servers:
        s.close()
    for sock in listeners:
        loop.remove_reader(sock.fileno())
        sock.close()
    if args.control:
        try:
            os.unlink(args.control)
        except OSError:
            pass


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m tests.testbed.fakeapi",
                                description="fake kube-apiserver for the prism-kernel testbed")
    p.add_argument("--name", required=True)
    p.add_argument("--listen", action="append", default=[],
                   help="address to bind (repeatable); default 0.0.0.0")
    p.add_argument("--tls-port", type=int, default=6443, help="HTTPS port (0 = off)")
    p.add_argument("--http-port", type=int, default=8080, help="plain HTTP port (0 = off)")
    p.add_argument("--cert", help="PEM certificate chain")
    p.add_argument("--key", help="PEM private key")
    p.add_argument("--ca", help="CA for optional client certificates")
    p.add_argument("--control", help="Unix socket path for control")
    p.add_argument("--draining", action="store_true")
    p.add_argument("--delay", type=float, default=0.0)
    p.add_argument("--accept-delay", type=float, default=0.0)
    p.add_argument("--backlog", type=int, default=4096)
    p.add_argument("--endpointslices", metavar="FILE",
                   help='EndpointSlice state at start: {"rv": N, "slices": [...]}')
    p.add_argument("--bookmark-interval", type=float, default=1.0,
                   help="seconds between BOOKMARK events on watches that allow them (0 = none)")
    p.add_argument("--parent-pid", type=int, default=0,
                   help="exit when the parent process is no longer this pid")
    p.add_argument("--testbed-prefix", default="",
                   help="tag for clear_stale(): which testbed started this process")
    args = p.parse_args(argv)
    if not args.listen:
        args.listen = ["0.0.0.0"]
    if args.tls_port and not (args.cert and args.key):
        p.error("--tls-port needs --cert and --key")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        asyncio.run(amain(args))
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
