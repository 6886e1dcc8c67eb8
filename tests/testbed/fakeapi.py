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
    anything else                              404 with a kube-style Status object

Control: a Unix socket (``--control``) speaking one JSON object per line, e.g.
``{"op": "set", "draining": true}`` -> ``{"ok": true, ...}``. Ops: ``ping``,
``set`` (``draining``, ``delay``, ``accept_delay``), ``stats``, ``reset_stats``.

When ready (all sockets bound and listening) it writes one line
``READY {"pid": ...}`` to stdout and closes stdout. It exits by itself when its
parent (``--parent-pid``) goes away.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
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
    404: "Not Found",
    405: "Method Not Allowed",
    413: "Payload Too Large",
    431: "Request Header Fields Too Large",
    503: "Service Unavailable",
}
MAX_BODY = 1 << 20
NAMESPACES = ("default", "kube-system")


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
        }


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
            keep = await self.handle(req, writer, conn_id, n, tls)
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

    async def handle(self, req, writer, conn_id: int, n: int, tls: bool) -> bool:
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
                "groups": [],
            }, keep=keep, head_only=head_only)
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
                "delay": self.delay, "accept_delay": self.accept_delay}

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
            return {"ok": True, **self.state()}
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
        servers.append(await asyncio.start_unix_server(api.control, path=args.control))

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
