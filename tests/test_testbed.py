"""Tests of the testbed itself: the topology, the fake API server, every fault
switch, kubectl against a fake server, and that nothing is left behind.

Run as root:  .venv/bin/python -m pytest tests/test_testbed.py
"""

from __future__ import annotations

import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.testbed import Testbed, TestbedError, _sys, clear_stale
from tests.testbed.fixtures import PREFIX, testbed, testbed_cleanup  # noqa: F401

pytestmark = [
    pytest.mark.kernel,
    pytest.mark.skipif(os.geteuid() != 0, reason="the testbed needs root"),
]

REPO = Path(__file__).resolve().parents[1]


# --- helpers -----------------------------------------------------------------------


def tcp_connect(host: str, port: int, timeout: float = 1.0) -> socket.socket:
    return socket.create_connection((host, port), timeout=timeout)


def tls_connect(tb, host: str, port: int, timeout: float = 1.0,
                server_hostname: str | None = None) -> ssl.SSLSocket:
    raw = tcp_connect(host, port, timeout)
    try:
        return tb.ssl_context().wrap_socket(raw, server_hostname=server_hostname or host)
    except BaseException:
        raw.close()
        raise


def http_exchange(sock: socket.socket, path: str = "/whoami", keep: bool = True) -> tuple[int, dict, bytes]:
    """One request on an open socket; reads exactly one Content-Length response."""
    conn = "keep-alive" if keep else "close"
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: test\r\nConnection: {conn}\r\n\r\n".encode())
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed before headers")
        buf += chunk
    head, body = buf.split(b"\r\n\r\n", 1)
    lines = head.decode().split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.lower(): v.strip() for k, _, v in (l.partition(":") for l in lines[1:])}
    n = int(headers.get("content-length", "0"))
    while len(body) < n:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return status, headers, body


def snapshot() -> dict:
    """Kernel and file-system state that belongs to the prefix."""
    return {
        "netns": sorted(n for n in _sys.netns_list() if n.startswith(f"{PREFIX}-")),
        "links": sorted(l for l in _sys.link_names() if l.startswith(f"{PREFIX}h")),
        "procs": sorted(_sys.fakeapi_pids(PREFIX)),
        "nft": sorted(t for t in _sys.nft_tables() if t[1].startswith(f"{PREFIX}_")),
        "route6": _sys.ip_json("-6", "route", "show", "exact", _sys.GUARD_ROUTES[6]),
        "records": sorted(p.name for p in (_sys.STATE_ROOT / PREFIX / "procs").glob("*"))
        if (_sys.STATE_ROOT / PREFIX / "procs").is_dir() else [],
        "holders": sorted(p.name for p in (_sys.ROUTE_DIR / "holders").glob(f"{PREFIX}.*"))
        if (_sys.ROUTE_DIR / "holders").is_dir() else [],
        "markers": sorted(p.name for p in _sys.ROUTE_DIR.glob("added-v*")),
        "tmpdirs": sorted(p.name for p in Path("/tmp").glob(f"{PREFIX}-testbed-*")),
    }


def assert_clean(before: dict, pids: list[int] = ()) -> None:
    after = snapshot()
    assert after["netns"] == [] and after["links"] == [] and after["procs"] == []
    assert after["nft"] == [] and after["records"] == [] and after["holders"] == []
    assert after["markers"] == before["markers"]
    assert after["route6"] == before["route6"]
    assert after["tmpdirs"] == before["tmpdirs"]
    for pid in pids:
        assert _sys.proc_state(pid) in (None, "Z"), f"server {pid} still alive"


@pytest.fixture
def be(testbed):
    return testbed.backends[0]


# --- topology and the server -----------------------------------------------------------


def test_topology_and_tls_whoami(testbed):
    tb = testbed
    assert [b.name for b in tb.backends] == ["be0", "be1", "be2"]
    assert tb.host_addresses == ["198.18.1.1", "198.18.2.1", "198.18.3.1"]
    assert Path(tb.tmpdir).is_dir() and Path(tb.ca_file).is_file()
    assert Path(tb.client_cert_file).is_file() and Path(tb.client_key_file).is_file()
    names = set(_sys.netns_list())
    links = set(_sys.link_names())
    for i, be in enumerate(tb.backends):
        assert be.address == f"198.18.{i + 1}.2" and be.port == 6443
        assert be.endpoint == f"198.18.{i + 1}.2:6443"
        assert be.netns == f"{PREFIX}-be{i}" and be.netns in names
        assert f"{PREFIX}h{i}" in links
        r = tb.get(be)  # verifies the certificate against tb.ca_file
        assert r.status == 200 and r.backend == be.name
        who = r.json()
        assert who["backend"] == be.name
        assert who["local"] == be.endpoint
        assert who["peer"].startswith(tb.host_addresses[i] + ":")
        assert who["tls"] is True and who["alpn"] == "http/1.1"


def test_certificate_names(testbed):
    be = testbed.backends[1]
    for name in ("kubernetes", "kubernetes.default.svc", "localhost", "127.0.0.1"):
        with tls_connect(testbed, be.address, be.port, server_hostname=name) as s:
            assert s.selected_alpn_protocol() == "http/1.1"
    with pytest.raises(ssl.SSLCertVerificationError):
        tls_connect(testbed, be.address, be.port, server_hostname="not-in-the-cert.example")
    # a client certificate is optional and reported back
    assert testbed.get(be, client_cert=True).json()["client_cn"] == "system:prism-kernel"
    assert testbed.get(be).json()["client_cn"] is None


def test_handlers_plain_http_and_keepalive(testbed, be):
    tb = testbed
    for path in ("/readyz", "/livez", "/healthz"):
        r = tb.get(be, path, tls=False)
        assert (r.status, r.text, r.backend) == (200, "ok", "be0")
    assert "readyz check passed" in tb.get(be, "/readyz?verbose").text
    v = tb.get(be, "/version").json()
    assert (v["major"], v["minor"], v["gitVersion"]) == ("1", "32", "v1.32.0-fake")
    assert tb.get(be, "/api").json()["versions"] == ["v1"]
    assert tb.get(be, "/apis").json()["kind"] == "APIGroupList"
    nf = tb.get(be, "/nope")
    assert nf.status == 404 and nf.backend == "be0" and nf.json()["reason"] == "NotFound"
    assert tb.get(be, tls=False).json()["tls"] is False
    # keep-alive: three requests on one TLS connection
    with tls_connect(tb, be.address, be.port) as s:
        seen = [json.loads(http_exchange(s)[2]) for _ in range(3)]
    assert len({w["connection"] for w in seen}) == 1
    assert [w["request_on_connection"] for w in seen] == [1, 2, 3]


def test_stream(testbed, be):
    with tls_connect(testbed, be.address, be.port) as s:
        s.sendall(b"GET /stream HTTP/1.1\r\nHost: t\r\n\r\n")
        s.settimeout(2)
        buf, t0 = b"", time.monotonic()
        while buf.count(b'"TICK"') < 4:
            buf += s.recv(65536)
        took = time.monotonic() - t0
    assert b"Transfer-Encoding: chunked" in buf and b"X-Backend: be0" in buf
    assert 0.25 <= took < 1.5  # one line every 100 ms
    deadline = time.monotonic() + 2  # the server notices the client went away
    while be.stats()["active_connections"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert be.stats()["active_connections"] == 0


def test_stats_and_reset(testbed, be):
    be.reset_stats()
    assert be.stats()["requests"] == 0 and be.stats()["connections"] == 0
    for _ in range(3):
        testbed.get(be)
    with tls_connect(testbed, be.address, be.port) as s:
        http_exchange(s)
        http_exchange(s)
    st = be.stats()
    assert st["requests"] == 5 and st["connections"] == 4
    assert st["paths"]["/whoami"] == 5
    be.reset_stats()
    assert be.stats()["requests"] == 0


# --- fault switches --------------------------------------------------------------------


def test_stop_refuses_and_start_restores(testbed, be):
    other = testbed.backends[1]
    old_pid = be.pid
    be.stop()
    assert not be.running and _sys.proc_state(old_pid) in (None, "Z")
    with pytest.raises(ConnectionRefusedError):
        tcp_connect(be.address, be.port)
    with pytest.raises(ConnectionRefusedError):
        tcp_connect(be.address, be.http_port)
    assert testbed.get(other).backend == other.name
    be.start()
    assert be.pid != old_pid
    assert testbed.get(be).backend == "be0"  # same address, same certificate


def test_blackhole(testbed, be):
    be.blackhole(True)
    t0 = time.monotonic()
    with pytest.raises((TimeoutError, socket.timeout)):
        tcp_connect(be.address, be.port, timeout=1.0)
    assert time.monotonic() - t0 >= 0.9
    assert testbed.get(testbed.backends[1]).status == 200  # only be0 is gone
    be.blackhole(False)
    assert testbed.get(be).backend == "be0"


def test_freeze_and_thaw(testbed, be):
    be.freeze()
    assert be.frozen
    # TLS: TCP completes in the kernel, the handshake gets no answer
    raw = tcp_connect(be.address, be.port)
    with raw, pytest.raises((TimeoutError, socket.timeout)):
        testbed.ssl_context().wrap_socket(raw, server_hostname=be.address)
    # plain HTTP: connected, request sent, no answer ...
    s = tcp_connect(be.address, be.http_port)
    with s:
        s.sendall(b"GET /whoami HTTP/1.1\r\nHost: t\r\n\r\n")
        with pytest.raises((TimeoutError, socket.timeout)):
            s.recv(1)
        be.thaw()
        s.settimeout(2)
        status, headers, _ = http_exchange(s, "/readyz")  # ... until thawed
    assert not be.frozen
    assert status == 200 and headers["x-backend"] == "be0"
    assert testbed.get(be).status == 200


def test_drain(testbed, be):
    be.drain(True)
    r = testbed.get(be, "/readyz")
    assert r.status == 503 and r.backend == "be0"
    assert testbed.get(be, "/readyz", tls=False).status == 503
    assert testbed.get(be, "/whoami").status == 200
    assert testbed.get(be, "/livez").status == 200
    # survives a restart
    be.stop()
    be.start()
    assert testbed.get(be, "/readyz").status == 503
    be.drain(False)
    assert testbed.get(be, "/readyz").status == 200


def test_delay(testbed, be):
    be.set_delay(0.4)
    t0 = time.monotonic()
    assert testbed.get(be, timeout=3).status == 200
    assert time.monotonic() - t0 >= 0.4
    # accept delay: the TCP handshake is immediate, the TLS handshake waits
    be.set_delay(0, accept=0.4)
    t0 = time.monotonic()
    raw = tcp_connect(be.address, be.port)
    assert time.monotonic() - t0 < 0.3
    with testbed.ssl_context().wrap_socket(raw, server_hostname=be.address):
        assert time.monotonic() - t0 >= 0.4
    be.set_delay(0)
    t0 = time.monotonic()
    testbed.get(be)
    assert time.monotonic() - t0 < 0.3


def test_link_delay_delays_the_tcp_handshake_itself(testbed, be):
    other = next(b for b in testbed.backends if b is not be)

    def handshake_s(b) -> float:
        t0 = time.monotonic()
        tcp_connect(b.address, b.port, timeout=3).close()
        return time.monotonic() - t0

    assert handshake_s(be) < 0.04
    be.link_delay(0.08)
    try:
        # the SYN-ACK itself is late: what set_delay (the server answering
        # late) cannot do
        assert min(handshake_s(be) for _ in range(3)) >= 0.08
        assert handshake_s(other) < 0.04  # only this host's link
        assert testbed.get(be, timeout=3).status == 200
    finally:
        be.link_delay(0)
    assert handshake_s(be) < 0.04
    rules = _sys.run(["ip", "-n", be.netns, "rule", "show"]).stdout
    assert "lookup 100" not in rules, rules


def test_kubectl_get_raw_readyz(testbed, be):
    kc = testbed.write_kubeconfig(f"https://{be.address}:6443")
    cmd = ["/usr/bin/kubectl", "--kubeconfig", kc, "--cache-dir", f"{testbed.tmpdir}/kube-cache"]
    r = subprocess.run([*cmd, "get", "--raw", "/readyz"], capture_output=True, text=True,
                       stdin=subprocess.DEVNULL, timeout=20)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "ok"
    r = subprocess.run([*cmd, "version", "-o", "json"], capture_output=True, text=True,
                       stdin=subprocess.DEVNULL, timeout=20)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["serverVersion"]["gitVersion"] == "v1.32.0-fake"


def test_ipv6_backend_and_local_apiserver(testbed):
    tb = testbed
    v6 = tb.add_backend(ipv6=True)
    assert v6.name == "be3" and v6.address == "2001:2:0:4::2"
    assert v6.endpoint == "[2001:2:0:4::2]:6443" and v6.address4 == "198.18.4.2"
    who = tb.get(v6).json()
    assert who["backend"] == "be3" and who["peer_ip"] == "2001:2:0:4::1"
    assert tb.get(f"{v6.address4}:6443").backend == "be3"  # dual stack
    v6.blackhole(True)
    with pytest.raises((TimeoutError, socket.timeout)):
        socket.create_connection((v6.address, v6.port), timeout=1.0)
    v6.blackhole(False)

    local = tb.add_local_apiserver(port=16443, http_port=18080)
    assert local.netns is None and local.endpoint == "127.0.0.1:16443"
    assert tb.get("127.0.0.1:16443").json()["backend"] == "local0"
    assert tb.get(local, "/readyz", tls=False).text == "ok"
    local.blackhole(True)
    assert ("inet", f"{PREFIX}_testbed") in _sys.nft_tables()
    with pytest.raises((TimeoutError, socket.timeout)):
        tcp_connect("127.0.0.1", 16443, timeout=1.0)
    local.blackhole(False)
    assert ("inet", f"{PREFIX}_testbed") not in _sys.nft_tables()
    local.stop()
    with pytest.raises(ConnectionRefusedError):
        tcp_connect("127.0.0.1", 16443)


def test_new_tls_connections_per_second(testbed, be):
    """The server must not be the bottleneck: a few hundred new TLS connections/s."""
    ctx = testbed.ssl_context()
    n = 300

    def one(_):
        with socket.create_connection((be.address, be.port), timeout=5) as raw:
            with ctx.wrap_socket(raw, server_hostname=be.address) as s:
                return http_exchange(s, "/readyz", keep=False)[0]

    be.reset_stats()
    t0 = time.monotonic()
    with ThreadPoolExecutor(8) as pool:
        statuses = list(pool.map(one, range(n)))
    rate = n / (time.monotonic() - t0)
    print(f"\n{rate:.0f} new TLS connections/s (client and server on 2 cores)")
    assert statuses == [200] * n
    assert be.stats()["connections"] == n
    assert rate > 150


# --- teardown ------------------------------------------------------------------------------


def test_teardown_leaves_nothing(testbed_cleanup):
    before = snapshot()
    with Testbed(n_backends=3, prefix=PREFIX) as tb:
        pids = [b.pid for b in tb.backends]
        tb.add_backend(ipv6=True)
        tb.add_local_apiserver(port=16444)
        tb.locals[0].blackhole(True)
        tb.backends[0].blackhole(True)
        tb.backends[1].freeze()
        pids += [b.pid for b in tb.servers[3:]]
        tmpdir = tb.tmpdir
        assert snapshot()["netns"]
    print(f"\nsetup {tb.setup_seconds:.3f}s, teardown {tb.teardown_seconds:.3f}s")
    assert not Path(tmpdir).exists()
    assert_clean(before, pids)


@pytest.mark.parametrize("exc", [RuntimeError, KeyboardInterrupt])
def test_teardown_on_exception(testbed_cleanup, exc):
    before = snapshot()
    with pytest.raises(exc):
        with Testbed(n_backends=2, prefix=PREFIX) as tb:
            pids = [b.pid for b in tb.backends]
            raise exc("boom")
    assert_clean(before, pids)


def test_one_testbed_per_prefix_per_process(testbed):
    with pytest.raises(TestbedError):
        Testbed(n_backends=1, prefix=PREFIX).open()
    with pytest.raises(TestbedError):
        clear_stale(PREFIX)
    assert testbed.get(testbed.backends[0]).status == 200  # untouched


CHILD = """
import json, sys, time
from tests.testbed import Testbed
tb = Testbed(n_backends=2, prefix=sys.argv[1])
tb.open()
tb.backends[0].freeze()          # a frozen server cannot notice its parent died
tb.backends[1].blackhole(True)
print(json.dumps([b.pid for b in tb.backends]), flush=True)
time.sleep(60)
"""


def test_clear_stale_after_killed_run(testbed_cleanup):
    before = snapshot()
    child = subprocess.Popen([sys.executable, "-c", CHILD, PREFIX], cwd=str(REPO),
                             stdout=subprocess.PIPE, text=True,
                             env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        pids = json.loads(child.stdout.readline())
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    left = snapshot()
    assert left["netns"] == [f"{PREFIX}-be0", f"{PREFIX}-be1"] and left["links"]
    assert pids[0] in left["procs"]
    removed = clear_stale(PREFIX)
    assert any(r.startswith("netns") for r in removed)
    assert_clean(before, pids)
