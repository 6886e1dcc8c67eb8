"""The metrics endpoint against hostile neighbours and clients (issue 12):
a metrics address someone else holds, slow and oversized requests, more
clients than handlers, and scrape storms. The server and the shared kernel
read over real loopback sockets with fake readers (no root); the daemon
against the testbed in the tests marked `kernel` at the end."""

from __future__ import annotations

import datetime as dt
import itertools
import os
import select
import socket
import threading
import time
import urllib.error
import urllib.request

import pytest

from prism_kernel.datapath.base import KernelState
from prism_kernel.observe import metrics_server
from prism_kernel.observe.metrics import Metrics, MetricsServer
from prism_kernel.observe.metrics_scrape import SharedRead
from tests.harness import Daemon, client_context, prism, who

WAIT = 10.0  # seconds any positive marker below may take on a loaded machine


class RecordingLog:
    """EventLog's interface; an Event per event name, set when it is logged."""

    def __init__(self) -> None:
        self.lines: list[tuple[str, dict]] = []
        self._events: dict[str, threading.Event] = {}
        self._lock = threading.Lock()

    def _event(self, name: str) -> threading.Event:
        with self._lock:
            return self._events.setdefault(name, threading.Event())

    def _emit(self, event: str, fields: dict) -> None:
        with self._lock:
            self.lines.append((event, fields))
        self._event(event).set()

    def info(self, event: str, **fields) -> None:
        self._emit(event, fields)

    warn = error = info

    def wait(self, event: str, timeout: float = WAIT) -> dict:
        assert self._event(event).wait(timeout), f"no {event} within {timeout}s: {self.lines}"
        return self.of(event)[-1]

    def of(self, event: str) -> list[dict]:
        with self._lock:
            return [f for e, f in self.lines if e == event]


def squat() -> socket.socket:
    """A listener on a free loopback port, as a local user's would be."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    return s


def port_of(srv: MetricsServer) -> int:
    return int(srv.address.rsplit(":", 1)[1])


def http_get(port: int, path: str = "/healthz", timeout: float = WAIT) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


@pytest.fixture
def metrics():
    return Metrics(process_metrics=False)


@pytest.fixture
def server(metrics):
    srv = MetricsServer(metrics, "127.0.0.1", 0, poll_interval=0.05)
    assert srv.start()
    try:
        yield srv
    finally:
        srv.stop()


# ---- a held address: never fatal, retried, served once free --------------------


def test_a_held_address_is_logged_retried_with_backoff_and_served_once_free(metrics):
    log = RecordingLog()
    squatter = squat()
    port = squatter.getsockname()[1]
    srv = MetricsServer(metrics, "127.0.0.1", port, poll_interval=0.05, log=log, retry_first=0.05, retry_max=0.2)
    try:
        assert srv.start() is False  # no exception: the daemon goes on without metrics
        first = log.wait("metrics_bind_failed")
        assert first["address"] == f"127.0.0.1:{port}" and "Address already in use" in first["error"]
        assert first["held_by"] and f"127.0.0.1:{port}" in first["held_by"]  # who holds it, from /proc
        st = srv.status()
        assert st["state"] == "retrying" and st["next_attempt_at"] and st["last_error"]
        deadline = time.monotonic() + WAIT
        while len(log.of("metrics_bind_failed")) < 5:  # the retries keep failing while it is held
            assert time.monotonic() < deadline, log.lines
            log._event("metrics_bind_failed").clear()
            log.wait("metrics_bind_failed")
        delays = [f["retry_in_s"] for f in log.of("metrics_bind_failed")[:5]]
        assert delays == [0.05, 0.1, 0.2, 0.2, 0.2]  # doubling, capped
        assert not log.of("metrics_listening")
        squatter.close()
        listening = log.wait("metrics_listening")
        assert listening["address"] == f"127.0.0.1:{port}" and listening["after_failures"] >= 5
        assert http_get(port)[0] == 200
        assert srv.status()["state"] == "listening" and srv.status()["last_error"] is None
    finally:
        squatter.close()
        srv.stop()


def test_stop_ends_the_background_retry(metrics):
    log = RecordingLog()
    squatter = squat()
    port = squatter.getsockname()[1]
    srv = MetricsServer(metrics, "127.0.0.1", port, log=log, retry_first=0.05)
    try:
        assert srv.start() is False
        log.wait("metrics_bind_failed")
        srv.stop()
        assert srv.status()["state"] == "stopped"
        assert not [t for t in threading.enumerate() if t.name == "prism-kernel-metrics-bind"]
        squatter.close()
        assert not srv.listening and not log.of("metrics_listening")
    finally:
        squatter.close()
        srv.stop()


def test_a_reload_to_a_held_address_keeps_serving_on_the_old_one(metrics):
    """A reload is one attempt (listen()): the operator asked for a move now,
    and the old address keeps serving when the new one is held."""
    from types import SimpleNamespace

    from prism_kernel.config import build_config
    from prism_kernel.control.reload import reload_metrics

    log = RecordingLog()
    with socket.socket() as probe:  # a free port for the old address (a fixed one: port 0 would move on restart)
        probe.bind(("127.0.0.1", 0))
        old_port = probe.getsockname()[1]
    squatter = squat()
    base = {"endpoints": ["198.18.1.2:6443"], "probe": {"mode": "tcp"}}
    old = build_config({**base, "metrics": {"port": old_port}}, {})
    new = build_config({**base, "metrics": {"port": squatter.getsockname()[1]}}, {})
    srv = MetricsServer(metrics, "127.0.0.1", old_port, poll_interval=0.05, log=log)
    d = SimpleNamespace(metrics=metrics, metrics_server=srv, log=log)
    try:
        assert srv.start()
        reload_metrics(d, old, new)
        assert [f["kept"] for f in log.of("reload_partial")] == ["the previous metrics address"]
        assert d.metrics_server is srv and srv.status()["state"] == "listening"
        assert http_get(old_port)[0] == 200
        assert [f["address"] for f in log.of("metrics_listening")] == [f"127.0.0.1:{old_port}"] * 2
    finally:
        squatter.close()
        d.metrics_server.stop()


# ---- bounded handlers, slow and large requests -------------------------------------


def test_more_clients_than_handlers_get_a_quick_503(metrics, server):
    port = port_of(server)
    held = [socket.create_connection(("127.0.0.1", port), timeout=WAIT) for _ in range(metrics_server.MAX_HANDLERS)]
    try:
        # Accepted after the held ones (the listen queue is in order), so
        # every handler is taken: sending nothing, they hold it until the deadline.
        start = time.monotonic()
        code, body = http_get(port)
        assert code == 503 and b"busy" in body
        assert time.monotonic() - start < 1.0  # answered at once, not after a handler frees up
        assert metrics.registry.get_sample_value("prism_kernel_metrics_requests_rejected_total",
                                                 {"reason": "busy"}) == 1
        held.pop().close()  # a handler frees up: requests are served again
        deadline = time.monotonic() + WAIT
        while http_get(port)[0] != 200:
            assert time.monotonic() < deadline, "no handler freed after its client closed"
    finally:
        for s in held:
            s.close()


def test_a_slowloris_client_is_dropped_at_the_request_deadline(metrics, server, monkeypatch):
    monkeypatch.setattr(metrics_server, "REQUEST_DEADLINE", 1.0)
    request = b"GET /healthz HTTP/1.0\r\nHost: x\r\nUser-Agent: slow\r\n\r\n"
    with socket.create_connection(("127.0.0.1", port_of(server)), timeout=WAIT) as s:
        start = time.monotonic()
        closed_after = None
        for i in range(len(request)):
            s.send(request[i:i + 1])
            # One byte every 0.1 s: each read of the server is quick, the
            # whole request is not (about 5 s), so a timeout per read never fires.
            if select.select([s], [], [], 0.1)[0]:
                try:
                    assert s.recv(100) == b""  # closed without an answer
                except ConnectionResetError:
                    pass
                closed_after = time.monotonic() - start
                break
        assert closed_after is not None, "the server kept reading a request that never completes"
        assert closed_after < 1.0 + 1.5, closed_after  # the deadline, and a margin for a loaded machine
    assert metrics.registry.get_sample_value("prism_kernel_metrics_requests_rejected_total",
                                             {"reason": "timeout"}) == 1
    assert http_get(port_of(server))[0] == 200  # its handler is free again


def test_an_oversized_request_is_refused(metrics, server):
    junk = b"".join(b"X-Junk-%d: %s\r\n" % (i, b"a" * 1000) for i in range(40))  # 40 KB of headers
    with socket.create_connection(("127.0.0.1", port_of(server)), timeout=WAIT) as s:
        try:
            s.sendall(b"GET /metrics HTTP/1.0\r\n" + junk + b"\r\n")
        except OSError:
            pass  # the server may close before it has all of it
        reply = s.recv(100)
    assert reply.startswith(b"HTTP/1.0 413"), reply
    assert metrics.registry.get_sample_value("prism_kernel_metrics_requests_rejected_total",
                                             {"reason": "too_large"}) == 1


def test_a_normal_request_is_still_served_whole(metrics, server):
    code, body = http_get(port_of(server), "/metrics")
    assert code == 200 and b"prism_kernel_build_info" in body


# ---- one kernel read shared by every scrape ------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_concurrent_callers_share_the_read_in_flight_and_its_result():
    clock = FakeClock()
    release, reading = threading.Event(), threading.Event()
    calls = []

    def read() -> int:
        calls.append(1)
        reading.set()
        assert release.wait(WAIT)
        return len(calls)

    shared = SharedRead(read, max_age=1.0, clock=clock)
    results: list = []
    threads = [threading.Thread(target=lambda: results.append(shared())) for _ in range(50)]
    for t in threads:
        t.start()
    assert reading.wait(WAIT)  # the first caller reads; the others wait for it or come later
    release.set()
    for t in threads:
        t.join(WAIT)
    assert len(calls) == 1
    assert len(results) == 50 and {r.value for r in results} == {1}
    clock.now += 0.5
    assert shared().value == 1 and len(calls) == 1  # younger than max_age: reused
    clock.now += 0.5
    assert shared().value == 2 and len(calls) == 2  # as old as max_age: read again


def test_a_failed_read_is_shared_and_reported_once():
    clock = FakeClock()
    errors = []
    calls = []

    def broken() -> int:
        calls.append(1)
        raise OSError("map gone")

    shared = SharedRead(broken, max_age=1.0, clock=clock, on_error=errors.append)
    outcomes = [shared() for _ in range(10)]
    assert len(calls) == 1 and len(errors) == 1
    assert all(isinstance(o.error, OSError) and o.value is None for o in outcomes)
    clock.now += 1.0
    shared()
    assert len(calls) == 2 and len(errors) == 2


def test_a_scrape_storm_reads_the_kernel_about_once_a_second(metrics, server):
    """50 clients scraping in a loop for 3 s over HTTP: the kernel is read
    at most once per second (the rest are served the shared read or a 503)."""
    reads = []
    metrics.set_kernel_readers(lambda: reads.append(time.monotonic()) or KernelState("ebpf", True), lambda: {})
    port = port_of(server)
    started = time.monotonic()
    stop_at = started + 3.0
    codes: list[int] = []

    def scraper() -> None:
        while time.monotonic() < stop_at:
            try:
                codes.append(http_get(port, "/metrics", timeout=5)[0])
            except OSError:
                codes.append(0)

    threads = [threading.Thread(target=scraper) for _ in range(50)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT)
    elapsed = time.monotonic() - started  # the last scrapes end after stop_at
    assert codes.count(200) >= 3, codes  # scrapes were served throughout
    assert 1 <= len(reads) <= elapsed / metrics.kernel_read_max_age + 1, (elapsed, reads, len(codes))
    gaps = [b - a for a, b in itertools.pairwise(reads)]
    assert all(g >= metrics.kernel_read_max_age for g in gaps), gaps


# ---- the daemon (kernel: the testbed's hosts in network namespaces) ------------------
# One data path (eBPF, this machine's auto choice): the metrics server and the
# shared read are the same code in front of either; test_one_writer.py and
# test_metrics.py cover the scrape's read of each data path.

FAILOVER_BOUND = 3.0  # seconds from a backend refusing to the set written without it (probe every 0.2 s, fall 2)
STORM_CLIENTS = 50


def _ts(ev: dict) -> float:
    """Unix time of a daemon log line."""
    return dt.datetime.strptime(ev["ts"], "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=dt.timezone.utc).timestamp()


def _iso(text: str) -> float:
    return dt.datetime.fromisoformat(text).timestamp()


def _failover_seconds(d, backend) -> float:
    """Stop `backend` (connects to it are refused from then on) and return
    the time until the daemon's log says the set without it was written."""
    mark = len(d.events())
    stopped_at = time.time()
    backend.stop()
    down = d.wait_event("backend_down", timeout=15, after=mark, address=backend.endpoint)
    after = d.events().index(down)
    while True:  # the first set_written after the down that leaves it out (a tier change may write before)
        written = d.wait_event("set_written", timeout=15, after=after)
        after = d.events().index(written) + 1
        if backend.endpoint not in written["backends"].split(","):
            return _ts(written) - stopped_at


@pytest.mark.kernel
def test_the_daemon_starts_and_steers_with_its_metrics_port_taken(testbed):
    tb = testbed
    squatter = squat()  # a local user's listener on the metrics port before the daemon starts
    port = squatter.getsockname()[1]
    try:
        with Daemon([b.endpoint for b in tb.backends], "ebpf", tb.ca_file, tb.tmpdir,
                    extra=["--metrics-port", str(port)]) as d:
            failed = d.wait_event("metrics_bind_failed")
            assert failed["address"] == f"127.0.0.1:{port}", failed
            assert f"(pid {os.getpid()})" in (failed.get("held_by") or ""), failed  # who holds it
            d.wait_ready()
            d.wait_serving({b.endpoint for b in tb.backends})
            assert who(client_context(tb.ca_file)) in {b.name for b in tb.backends}  # steered through 127.0.0.1
            st = d.status()["state"]["metrics"]
            assert st["state"] == "retrying" and st["bind_failures"] >= 1, st
            text = prism("status", "--instance", d.instance).stdout
            assert f"METRICS NOT SERVED: cannot serve metrics on 127.0.0.1:{port}" in text, text
            assert not [e for e in d.events() if e.get("event") == "metrics_listening"]
            mark = len(d.events())
            squatter.close()
            # The next retry (1 s doubling: 1, 3, 7, 15, 31 s after the first failure) binds.
            listening = d.wait_event("metrics_listening", timeout=40, after=mark)
            assert listening["address"] == f"127.0.0.1:{port}"
            assert http_get(port)[0] == 200
            assert _state_writes_later(d, 1)["metrics"]["state"] == "listening"  # the state file is written every 2 s
        assert d.proc.returncode == 0
    finally:
        squatter.close()


def _state_writes_later(d, n: int) -> dict:
    """The daemon's state `n` state writes (every 2 s) from now."""
    seen = d.status()["state"]["updated_at"]
    deadline = time.monotonic() + 5 * n + WAIT
    while n:
        assert time.monotonic() < deadline, f"the daemon stopped writing its state: {seen}"
        state = d.status()["state"]
        if state["updated_at"] != seen:
            seen, n = state["updated_at"], n - 1
    return state


@pytest.mark.kernel
@pytest.mark.parametrize("datapath", ["ebpf", "nftables"])
def test_a_scrape_storm_neither_slows_failover_nor_floods_the_writer(testbed, datapath):
    tb = testbed
    be0, be1, be2 = tb.backends
    with Daemon([b.endpoint for b in tb.backends], datapath, tb.ca_file, tb.tmpdir) as d:
        d.wait_ready()
        d.wait_serving({b.endpoint for b in tb.backends})
        port = int(d.wait_event("metrics_listening")["address"].rsplit(":", 1)[1])
        quiet = _failover_seconds(d, be0)  # without scrapers
        d.wait_serving({be1.endpoint, be2.endpoint})

        stop = threading.Event()
        codes: list[int] = []

        def scraper() -> None:
            while not stop.is_set():
                try:
                    codes.append(http_get(port, "/metrics", timeout=5)[0])
                except OSError:
                    codes.append(0)

        threads = [threading.Thread(target=scraper) for _ in range(STORM_CLIENTS)]
        before = d.status()["state"]
        try:
            for t in threads:
                t.start()
            deadline = time.monotonic() + WAIT
            while codes.count(200) < STORM_CLIENTS:  # the storm is on: scrapes are being served
                assert time.monotonic() < deadline, f"scrapes not served: {codes[-20:]}"
                time.sleep(0.05)
            stormy = _failover_seconds(d, be1)
            d.wait_serving({be2.endpoint})
            after = _state_writes_later(d, 3)  # a read rate over a few more seconds of storm
        finally:
            stop.set()
            for t in threads:
                t.join(WAIT)
        seconds = _iso(after["updated_at"]) - _iso(before["updated_at"])
        reads = after["writer"]["calls"].get("read_state", 0) - before["writer"]["calls"].get("read_state", 0)
        served = codes.count(200)
        print(f"failover {quiet:.3f}s quiet, {stormy:.3f}s under {STORM_CLIENTS} scrapers; "
              f"{served} scrapes served, {codes.count(503)} busy; {reads} kernel reads in {seconds:.1f}s")
        assert quiet < FAILOVER_BOUND and stormy < FAILOVER_BOUND, (quiet, stormy)
        assert reads <= seconds / 1.0 + 2, (reads, seconds, served)  # about one a second, not one a scrape
        assert served > reads * 2, (served, reads)  # many scrapes shared each read
