"""Probes against real TLS servers on loopback (certificates from trustme)."""

from __future__ import annotations

import asyncio
import socket
import ssl
import time

import pytest
import trustme

from prism_kernel.config import ProbeConfig
from prism_kernel.core.model import Backend
from prism_kernel.probing.probes import Prober, make_ssl_context


@pytest.fixture(scope="module")
def ca():
    return trustme.CA()


@pytest.fixture(scope="module")
def ca_file(ca, tmp_path_factory):
    p = tmp_path_factory.mktemp("ca") / "ca.pem"
    ca.cert_pem.write_to_path(str(p))
    return str(p)


class Server:
    """A tiny HTTPS server: status per request, optional close after N requests, optional silence."""

    def __init__(self, ca, status=200, close_after=None, silent=False, raw=None):
        self.status, self.close_after, self.silent, self.raw = status, close_after, silent, raw
        self.ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ca.issue_cert("127.0.0.1", "localhost").configure_cert(self.ctx)
        self.connections = 0
        self.requests = 0
        self.closed_by_server = 0
        self.raw_closes = raw is not None and b"Content-Length" not in raw and b"chunked" not in raw

    async def handle(self, reader, writer):
        self.connections += 1
        served = 0
        try:
            while True:
                line = await reader.readline()
                if not line:
                    return
                while (await reader.readline()) not in (b"\r\n", b""):
                    pass
                self.requests += 1
                if self.silent:
                    await asyncio.sleep(10)
                    return
                body = b"ok" if self.status == 200 else b"not ready"
                if self.raw is not None:
                    writer.write(self.raw)
                    await writer.drain()
                    if self.raw_closes:
                        writer.close()
                        return
                    continue
                writer.write(b"HTTP/1.1 %d X\r\nContent-Length: %d\r\n\r\n%s" % (self.status, len(body), body))
                await writer.drain()
                served += 1
                if self.close_after and served >= self.close_after:
                    writer.close()
                    await writer.wait_closed()
                    self.closed_by_server += 1
                    return
        except (ConnectionError, ssl.SSLError):
            return

    async def __aenter__(self):
        self.server = await asyncio.start_server(self.handle, "127.0.0.1", 0, ssl=self.ctx)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc):
        self.server.close()


def prober(port, **cfg):
    c = ProbeConfig(**{"interval": 1, "timeout": 1, **cfg})
    return Prober(Backend.of("127.0.0.1", port), c, make_ssl_context(c))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(coro):
    return asyncio.run(coro)


def test_tcp_ok_and_refused(ca):
    async def go():
        async with Server(ca) as srv:
            r = await prober(srv.port, mode="tcp").probe()
            assert r.ok and r.latency is not None and r.latency < 0.5
        r = await prober(free_port(), mode="tcp").probe()
        assert not r.ok and r.reason == "refused"
    run(go())


def test_tls_verifies_the_certificate(ca, ca_file, tmp_path):
    other = trustme.CA()
    other_file = tmp_path / "other.pem"
    other.cert_pem.write_to_path(str(other_file))

    async def go():
        async with Server(ca) as srv:
            assert (await prober(srv.port, mode="tls", ca_file=ca_file).probe()).ok
            bad = await prober(srv.port, mode="tls", ca_file=str(other_file)).probe()
            assert not bad.ok and bad.reason.startswith("tls: "), bad
            assert "unable to get local issuer" in bad.reason or "verify failed" in bad.reason, bad
            assert (await prober(srv.port, mode="tls", ca_file=str(other_file), insecure_skip_verify=True).probe()).ok
            wrong_name = await prober(srv.port, mode="tls", ca_file=ca_file, server_name="kubernetes").probe()
            assert not wrong_name.ok and "tls:" in wrong_name.reason
    run(go())


def test_readyz_200_is_healthy_and_connection_is_kept_alive(ca, ca_file):
    async def go():
        async with Server(ca) as srv:
            p = prober(srv.port, mode="readyz", ca_file=ca_file)
            for _ in range(5):
                r = await p.probe()
                assert r.ok, r
            assert srv.connections == 1 and srv.requests == 5
            assert p.reused == 4
            await p.close()
    run(go())


def test_readyz_503_is_unhealthy(ca, ca_file):
    async def go():
        async with Server(ca, status=503) as srv:
            r = await prober(srv.port, mode="readyz", ca_file=ca_file).probe()
            assert not r.ok and r.reason == "http 503"
    run(go())


def test_readyz_reconnects_when_server_closed_the_idle_connection(ca, ca_file):
    async def go():
        async with Server(ca, close_after=1) as srv:
            p = prober(srv.port, mode="readyz", ca_file=ca_file)
            for i in range(3):
                r = await p.probe()
                assert r.ok, r
                # the server has closed the connection the probe keeps
                async with asyncio.timeout(2):
                    while srv.closed_by_server < i + 1:
                        await asyncio.sleep(0.01)
            assert srv.connections == 3 and srv.requests == 3
    run(go())


def test_silent_server_times_out_within_the_timeout(ca, ca_file):
    async def go():
        async with Server(ca, silent=True) as srv:
            p = prober(srv.port, mode="readyz", ca_file=ca_file, timeout=0.3)
            t0 = time.monotonic()
            r = await p.probe()
            took = time.monotonic() - t0
            assert not r.ok and r.reason == "readyz timeout"
            assert took < 0.6
    run(go())


def test_probes_of_different_backends_do_not_wait_for_each_other(ca, ca_file):
    """One silent backend must not delay a healthy one's result."""
    async def go():
        async with Server(ca, silent=True) as slow, Server(ca) as fast:
            ps = prober(slow.port, mode="readyz", ca_file=ca_file, timeout=0.5)
            pf = prober(fast.port, mode="readyz", ca_file=ca_file, timeout=0.5)
            t0 = time.monotonic()
            done_at = {}

            async def timed(name, p):
                r = await p.probe()
                done_at[name] = time.monotonic() - t0
                return r

            rs, rf = await asyncio.gather(timed("slow", ps), timed("fast", pf))
            assert rf.ok and not rs.ok
            assert done_at["fast"] < 0.2 < done_at["slow"]
    run(go())


@pytest.mark.parametrize("raw,expect", [
    (b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", "ok"),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\nX-Trailer: 1\r\n\r\n", "ok"),
    (b"HTTP/1.1 200 OK\r\n\r\nok", "ok"),  # close-delimited body
    (b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * 70000 + b"\r\n\r\n", "bad http response"),
    (b"SSH-2.0-OpenSSH\r\n", "bad http response"),
    # a declared body over the limit: refused before waiting for it (the server holds the connection)
    (b"HTTP/1.1 200 OK\r\nContent-Length: 100000000\r\n\r\nok", "bad http response"),
    (b"", "closed by peer"),  # the request read, the connection closed without a word
])
def test_readyz_http_edge_cases_are_stable_over_several_probes(ca, ca_file, raw, expect):
    """Leftovers of one response must never be read as the next one's status
    line; a malformed answer is "bad http response" (unready), never dead."""
    async def go():
        async with Server(ca, raw=raw) as srv:
            p = prober(srv.port, mode="readyz", ca_file=ca_file)
            got = [(await p.probe()) for _ in range(4)]
            await p.close()
            return got
    results = run(go())
    reasons = [r.reason for r in results]
    assert reasons == [expect] * 4, reasons
