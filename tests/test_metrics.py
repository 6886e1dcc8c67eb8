"""Metrics, /healthz and /readyz: over real HTTP on an ephemeral loopback port,
with a fake daemon snapshot and fake kernel readers (no root, no kernel)."""

from __future__ import annotations

import gzip
import io
import ipaddress
import json
import re
import socket
import urllib.error
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest
from prometheus_client.parser import text_string_to_metric_families

from prism_kernel import __version__
from prism_kernel.core.health import TIER_BOUNDS, Change, ProbeResult
from prism_kernel.core.model import Backend
from prism_kernel.datapath.base import BackendCounters, Datapath, DatapathSettings, KernelState, PassiveCounts
from prism_kernel.observe.metrics import (
    DEFAULT_METRICS_ADDRESS,
    DEFAULT_METRICS_PORT,
    MAX_REASONS_PER_ENDPOINT,
    Metrics,
    MetricsServer,
    MetricsServerError,
    datapath_readers,
    exported_metric_names,
)

REPO = Path(__file__).resolve().parent.parent
DASHBOARD = REPO / "packaging" / "grafana-dashboard.json"

B1 = Backend.of("10.0.0.11", 6443)
B2 = Backend.of("10.0.0.12", 6443)
B6 = Backend.of("2001:db8::1", 6443)


def snapshot(states=("up", "down", "up"), active=("10.0.0.11:6443",), fail_open=False,
             datapath="ebpf") -> dict:
    """The shape of Daemon.snapshot() (test_snapshot_contract checks it
    against the real thing)."""
    addrs = [str(B1), str(B2), str(B6)]
    tiers = [0, None, 1]
    lat = [0.4, None, 3.5]
    backends = []
    for addr, state, tier, ms in zip(addrs, states, tiers, lat):
        backends.append({
            "address": addr, "family": 6 if addr.startswith("[") else 4,
            "endpoints": ["cp.example.com:6443", addr] if addr == str(B1) else [addr],
            "state": state, "reason": "ok" if state == "up" else "refused",
            "latency_ms": ms if state == "up" else None, "tier": tier if state == "up" else None,
            "active": addr in active, "since": None, "probes": 5, "failures": {},
            "kept_alive_probes": 0, "down_kind": "dead" if state == "down" else None,
            "flaps": 2 if state == "down" else 0, "held_out_for_s": 3.5 if state == "down" else None,
        })
    return {
        "schema": 1, "version": __version__, "pid": 1, "instance": "prism-kernel",
        "datapath": datapath, "datapath_reason": "requested", "listen_port": 7445,
        "probe": {"mode": "readyz", "interval_s": 1.0, "timeout_s": 1.0, "rise": 2, "fall": 2},
        "fail_open": fail_open,
        "selection": {"ipv4": {"mode": "fail-open" if fail_open else "tier", "tier": 0,
                               "backends": list(active)},
                      "ipv6": {"mode": "tier", "tier": 1, "backends": []}},
        "active": list(active), "backends": backends,
        "kernel_writes": 1, "kernel_write_errors": 0, "last_write_at": None, "failovers": 0,
        "connections_closed": 0,
    }


def kernel_state() -> KernelState:
    return KernelState(
        "ebpf", installed=True, backends=(B1,),
        counters={B1: BackendCounters(connections=1234), B2: BackendCounters(connections=7)},
        details={"stats": {"steered": 1241, "no_backend": 2, "retry": 0, "peer_xlate": 0}},
    )


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock():
    return FakeClock()


@pytest.fixture
def metrics(clock):
    return Metrics(clock=clock, heartbeat_timeout=30.0)


@pytest.fixture
def server(metrics):
    srv = MetricsServer(metrics, "127.0.0.1", 0, poll_interval=0.05)
    assert srv.start()
    try:
        yield srv
    finally:
        srv.stop()


def get(srv: MetricsServer, path: str, headers: dict[str, str] | None = None):
    """(status, headers, body) of GET http://<server><path>."""
    req = urllib.request.Request(f"http://{srv.address}{path}", headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.headers, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read()


def scrape(srv: MetricsServer) -> dict:
    status, headers, body = get(srv, "/metrics")
    assert status == 200
    assert headers["Content-Type"].startswith("text/plain")
    return {f.name: f for f in text_string_to_metric_families(body.decode())}


def samples(fams: dict, family: str, sample: str | None = None) -> dict:
    """{frozenset(labels.items()): value} of one sample name of a family."""
    sample = sample or family
    return {frozenset(s.labels.items()): s.value for s in fams[family].samples if s.name == sample}


def value(fams: dict, family: str, sample: str | None = None, /, **labels) -> float | None:
    return samples(fams, family, sample).get(frozenset(labels.items()))


# ---- bind address and port ---------------------------------------------------


def test_the_daemons_default_is_loopback_on_the_default_port(metrics):
    """What the daemon binds when the configuration says nothing (config.py's
    defaults are what it passes to MetricsServer) is the documented default,
    and a server there is reachable on 127.0.0.1 only, not on another
    loopback address (as it would be bound to the wildcard)."""
    from prism_kernel.config import build_config

    cfg = build_config({}, {"endpoints": ["198.18.1.2:6443"], "probe": {"mode": "tcp"}}).metrics
    assert cfg.enabled and (cfg.address, cfg.port) == (DEFAULT_METRICS_ADDRESS, DEFAULT_METRICS_PORT)
    assert ipaddress.ip_address(cfg.address).is_loopback
    default = MetricsServer(metrics)
    assert (default.host, default.port) == (cfg.address, cfg.port)
    srv = MetricsServer(metrics, cfg.address, 0, poll_interval=0.05)  # any free port: 7450 may be in use here
    srv.start()
    try:
        port = int(srv.address.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            pass
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.2", port), timeout=5).close()
    finally:
        srv.stop()


def _ports_this_repository_uses() -> set[int]:
    """The daemon's default listen port and every *PORT constant of the tests
    and the benchmark (listen and backend ports: a connect to a listen port
    is steered by the kernel, so a metrics server there would be unreachable)."""
    from prism_kernel.config import DEFAULT_PORT

    found = {DEFAULT_PORT}
    for path in [*(REPO / "tests").glob("*.py"), *(REPO / "bench").glob("*.py")]:
        for m in re.finditer(r"^\s*[A-Z_]*PORT[A-Z_]*\s*=\s*(\d+)\b", path.read_text(), re.M):
            found.add(int(m.group(1)))
    return found


def test_default_port_is_none_of_the_ports_this_repository_uses():
    used = _ports_this_repository_uses()
    assert {7445, 17445} <= used  # the scan finds the daemon's and the suites' ports
    assert DEFAULT_METRICS_PORT not in used
    low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    assert not low <= DEFAULT_METRICS_PORT <= high, "in this host's ephemeral range"
    assert not 30000 <= DEFAULT_METRICS_PORT <= 32767, "in Kubernetes' NodePort range"
    assert not 9090 <= DEFAULT_METRICS_PORT <= 9999, "in Prometheus' own and exporter allocations"


def test_listens_on_the_given_address_only(server):
    port = server._server.server_address[1]
    assert get(server, "/healthz")[0] == 200
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.2", port), timeout=5).close()


def test_bind_error_names_the_address(metrics):
    """listen() is the one attempt (a reload keeps the old address on it);
    start() retries in the background: tests/test_metrics_hostile.py."""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        srv = MetricsServer(metrics, "127.0.0.1", port)
        with pytest.raises(MetricsServerError, match=rf"127\.0\.0\.1:{port}"):
            srv.listen()
        assert srv.status()["state"] == "stopped"


def test_address_must_be_an_ip(metrics):
    with pytest.raises(MetricsServerError, match="not an IP address"):
        MetricsServer(metrics, "localhost", 0)


def test_ipv6_loopback(metrics):
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    srv = MetricsServer(metrics, "::1", 0, poll_interval=0.05)
    try:
        srv.listen()
    except MetricsServerError as e:
        pytest.skip(f"no IPv6 loopback here: {e}")
    try:
        assert srv.address.startswith("[::1]:")
        assert get(srv, "/healthz")[0] == 200
    finally:
        srv.stop()


def test_many_registries_side_by_side(clock):
    a, b = Metrics(clock=clock), Metrics(clock=clock)
    a.observe_kernel_write(0.001)
    assert a.registry.get_sample_value("prism_kernel_kernel_writes_total") == 1
    assert b.registry.get_sample_value("prism_kernel_kernel_writes_total") == 0


# ---- /metrics ------------------------------------------------------------------


def test_scrape_state_metrics(metrics, server):
    metrics.publish(snapshot())
    f = scrape(server)
    assert f["prism_kernel_build_info"].type == "gauge"
    (bi,) = f["prism_kernel_build_info"].samples
    assert bi.labels["version"] == __version__ and bi.value == 1
    assert value(f, "prism_kernel_datapath_info", datapath="ebpf") == 1

    assert f["prism_kernel_backend_up"].type == "gauge"
    assert samples(f, "prism_kernel_backend_up") == {
        frozenset({("endpoint", "10.0.0.11:6443")}): 1,
        frozenset({("endpoint", "10.0.0.12:6443")}): 0,
        frozenset({("endpoint", "[2001:db8::1]:6443")}): 1,
    }
    assert value(f, "prism_kernel_backend_state", endpoint="10.0.0.12:6443", state="down") == 1
    assert value(f, "prism_kernel_backend_state", endpoint="10.0.0.12:6443", state="up") == 0
    assert value(f, "prism_kernel_backend_state", endpoint="10.0.0.12:6443", state="unknown") == 0
    assert value(f, "prism_kernel_backend_down_kind", endpoint="10.0.0.12:6443", kind="dead") == 1
    assert value(f, "prism_kernel_backend_down_kind", endpoint="10.0.0.12:6443", kind="unready") == 0
    assert value(f, "prism_kernel_backend_down_kind", endpoint="10.0.0.11:6443", kind="dead") is None  # up
    assert value(f, "prism_kernel_backend_flaps", endpoint="10.0.0.12:6443") == 2
    assert value(f, "prism_kernel_backend_held_out_seconds", endpoint="10.0.0.12:6443") == 3.5
    assert value(f, "prism_kernel_backend_held_out_seconds", endpoint="10.0.0.11:6443") == 0
    assert value(f, "prism_kernel_backend_tier", endpoint="10.0.0.11:6443") == 0
    assert value(f, "prism_kernel_backend_tier", endpoint="[2001:db8::1]:6443") == 1
    assert value(f, "prism_kernel_backend_tier", endpoint="10.0.0.12:6443") is None  # unknown: absent
    assert value(f, "prism_kernel_backend_latency_seconds", endpoint="10.0.0.11:6443") == pytest.approx(0.0004)
    assert value(f, "prism_kernel_backend_active", endpoint="10.0.0.11:6443") == 1
    assert value(f, "prism_kernel_backend_active", endpoint="10.0.0.12:6443") == 0
    assert value(f, "prism_kernel_backend_info", endpoint="10.0.0.11:6443", source="cp.example.com:6443") == 1
    assert value(f, "prism_kernel_fail_open") == 0
    assert value(f, "prism_kernel_selection_mode", family="ipv4", mode="tier") == 1
    assert value(f, "prism_kernel_selection_mode", family="ipv4", mode="fail-open") == 0
    assert "process_resident_memory_bytes" in f or "process_cpu_seconds" in f  # standard process metrics


def test_scrape_before_any_snapshot(server):
    f = scrape(server)
    assert samples(f, "prism_kernel_backend_up") == {}
    assert len(f["prism_kernel_build_info"].samples) == 1


def test_scrape_reads_kernel_counters_at_scrape_time(metrics, server, clock):
    reads = []

    def read_state():
        reads.append(1)
        ks = kernel_state()
        ks.counters[B1].connections += len(reads)  # the kernel counts on between scrapes
        return ks

    metrics.set_kernel_readers(read_state, lambda: {B1: PassiveCounts(refused=3, syn_timeouts=1, established=99)})
    assert reads == []  # nothing read until a scrape asks
    f = scrape(server)
    assert f["prism_kernel_steered_connections"].type == "counter"
    assert value(f, "prism_kernel_steered_connections", "prism_kernel_steered_connections_total",
                 endpoint="10.0.0.11:6443") == 1235
    assert value(f, "prism_kernel_steered_connections", "prism_kernel_steered_connections_total",
                 endpoint="10.0.0.12:6443") == 7
    assert value(f, "prism_kernel_passive_failures", "prism_kernel_passive_failures_total",
                 endpoint="10.0.0.11:6443", kind="refused") == 3
    assert value(f, "prism_kernel_passive_failures", "prism_kernel_passive_failures_total",
                 endpoint="10.0.0.11:6443", kind="syn_timeout") == 1
    assert value(f, "prism_kernel_passive_established", "prism_kernel_passive_established_total",
                 endpoint="10.0.0.11:6443") == 99
    assert value(f, "prism_kernel_datapath_installed") == 1
    assert value(f, "prism_kernel_datapath_events", "prism_kernel_datapath_events_total", event="no_backend") == 2
    assert value(f, "prism_kernel_kernel_read_errors", "prism_kernel_kernel_read_errors_total", what="state") == 0
    assert value(f, "prism_kernel_kernel_read_duration_seconds") >= 0
    f = scrape(server)  # within the read's max age: the same read
    assert value(f, "prism_kernel_steered_connections", "prism_kernel_steered_connections_total",
                 endpoint="10.0.0.11:6443") == 1235
    assert len(reads) == 1
    clock.now += metrics.kernel_read_max_age
    f = scrape(server)
    assert value(f, "prism_kernel_steered_connections", "prism_kernel_steered_connections_total",
                 endpoint="10.0.0.11:6443") == 1236
    assert len(reads) == 2


def test_datapath_readers_use_a_fresh_object_per_read(metrics, server):
    made, closed = [], []

    class FakeDatapath(Datapath):
        name = "fake"

        def __init__(self, settings):
            super().__init__(settings)
            made.append(self)

        @classmethod
        def check_available(cls, settings):
            pass

        def install(self, initial):
            return False

        def apply(self, backends):
            return False

        def read_state(self):
            return kernel_state()

        def passive_failures(self):
            return {B2: PassiveCounts(refused=1)}

        def close(self):
            closed.append(self)

        @classmethod
        def cleanup(cls, settings):
            return []

    metrics.set_kernel_readers(*datapath_readers(FakeDatapath, DatapathSettings(instance="pk-test")))
    f = scrape(server)
    assert value(f, "prism_kernel_steered_connections", "prism_kernel_steered_connections_total",
                 endpoint="10.0.0.11:6443") == 1234
    assert value(f, "prism_kernel_passive_failures", "prism_kernel_passive_failures_total",
                 endpoint="10.0.0.12:6443", kind="refused") == 1
    assert len(made) == 2 and closed == made  # one for the state, one for the passive counts; all closed


def test_nftables_cve_drops_are_an_event(metrics, server):
    metrics.set_kernel_readers(lambda: KernelState("nftables", True, counters={B1: BackendCounters(5)},
                                                   details={"cve_2020_8558_drops": 4}))
    f = scrape(server)
    assert value(f, "prism_kernel_datapath_events", "prism_kernel_datapath_events_total",
                 event="cve_2020_8558_drop") == 4


def test_kernel_read_error_does_not_break_the_scrape(metrics, server, clock):
    def broken():
        raise OSError(9, "Bad file descriptor")

    def broken_passive():
        raise RuntimeError("sock_ops map gone")

    metrics.publish(snapshot())
    metrics.set_kernel_readers(broken, broken_passive)
    for n in (1, 2):
        clock.now += metrics.kernel_read_max_age  # a new read each time (a failed one is shared too)
        f = scrape(server)
        assert value(f, "prism_kernel_kernel_read_errors", "prism_kernel_kernel_read_errors_total", what="state") == n
        assert value(f, "prism_kernel_kernel_read_errors", "prism_kernel_kernel_read_errors_total", what="passive") == n
        assert samples(f, "prism_kernel_steered_connections", "prism_kernel_steered_connections_total") == {}
        assert samples(f, "prism_kernel_datapath_installed") == {}
        assert value(f, "prism_kernel_backend_up", endpoint="10.0.0.11:6443") == 1  # the rest is there
    # the kernel is back: its metrics return, the error count stays
    metrics.set_kernel_readers(kernel_state, lambda: {})
    f = scrape(server)
    assert value(f, "prism_kernel_steered_connections", "prism_kernel_steered_connections_total",
                 endpoint="10.0.0.11:6443") == 1234
    assert value(f, "prism_kernel_kernel_read_errors", "prism_kernel_kernel_read_errors_total", what="state") == 2
    assert samples(f, "prism_kernel_passive_failures", "prism_kernel_passive_failures_total") == {}  # unsupported


def test_probe_observations(metrics, server):
    metrics.observe_probe(B1, ProbeResult(True, 0.0003), [Change("up", B1, "ok", "unknown", "up")])
    metrics.observe_probe(B1, ProbeResult(True, 0.004))
    metrics.observe_probe(B1, ProbeResult(False, None, "refused"), [Change("down", B1, "refused", "up", "down")])
    metrics.observe_probe(B1, ProbeResult(False, None, "connect timeout"))
    metrics.observe_probe(B1, ProbeResult(False, None, "refused"))
    metrics.observe_probe(B1, ProbeResult(True, 0.0003), [Change("held", B1, "held out: flapping", None, 5.0)])
    f = scrape(server)
    assert value(f, "prism_kernel_probes", "prism_kernel_probes_total", endpoint="10.0.0.11:6443") == 6
    assert f["prism_kernel_probe_failures"].type == "counter"
    assert value(f, "prism_kernel_probe_failures", "prism_kernel_probe_failures_total",
                 endpoint="10.0.0.11:6443", reason="refused") == 2
    assert value(f, "prism_kernel_probe_failures", "prism_kernel_probe_failures_total",
                 endpoint="10.0.0.11:6443", reason="connect timeout") == 1
    h = "prism_kernel_probe_latency_seconds"
    assert f[h].type == "histogram"
    buckets = {s.labels["le"]: s.value for s in f[h].samples if s.name == h + "_bucket"}
    edges = {float(le) for le in buckets}
    assert set(TIER_BOUNDS) <= edges, "the latency tier boundaries are bucket edges"
    assert len([e for e in edges if e < TIER_BOUNDS[0]]) >= 3, "finer below the first tier boundary"
    assert buckets["0.0005"] == 2 and buckets["0.001"] == 2 and buckets["0.005"] == 3 and buckets["+Inf"] == 3
    assert value(f, h, h + "_count", endpoint="10.0.0.11:6443") == 3  # failures have no latency
    assert value(f, "prism_kernel_backend_transitions", "prism_kernel_backend_transitions_total",
                 endpoint="10.0.0.11:6443", kind="down") == 1
    assert value(f, "prism_kernel_backend_transitions", "prism_kernel_backend_transitions_total",
                 endpoint="10.0.0.11:6443", kind="held") == 1
    assert not any(s.name.endswith("_created") for fam in f.values() for s in fam.samples)


def test_probe_reason_cardinality_is_bounded(metrics):
    for i in range(MAX_REASONS_PER_ENDPOINT + 5):
        metrics.observe_probe(B1, ProbeResult(False, None, f"error: weird failure number {i} " + "x" * 100))
    reasons = {s.labels["reason"] for fam in metrics.registry.collect()
               if fam.name == "prism_kernel_probe_failures" for s in fam.samples}
    assert len(reasons) == MAX_REASONS_PER_ENDPOINT + 1 and "other" in reasons
    assert max(len(r) for r in reasons) <= 64


def test_kernel_writes_and_failovers(metrics, server):
    metrics.observe_kernel_write(0.0008)
    metrics.observe_kernel_write(0.002, failover=True)
    metrics.observe_kernel_write(None)  # not timed: counted, not in the histogram
    metrics.observe_kernel_write_error()
    metrics.observe_connections_closed(17)
    metrics.observe_connections_closed(0)
    f = scrape(server)
    assert value(f, "prism_kernel_kernel_writes", "prism_kernel_kernel_writes_total") == 3
    assert value(f, "prism_kernel_kernel_write_errors", "prism_kernel_kernel_write_errors_total") == 1
    assert value(f, "prism_kernel_failovers", "prism_kernel_failovers_total") == 1
    assert value(f, "prism_kernel_connections_closed", "prism_kernel_connections_closed_total") == 17
    h = "prism_kernel_kernel_write_duration_seconds"
    assert f[h].type == "histogram"
    assert value(f, h, h + "_count") == 2
    assert value(f, h, h + "_sum") == pytest.approx(0.0028)


def test_removed_backend_series_are_dropped(metrics, server):
    metrics.publish(snapshot())
    metrics.observe_probe(B2, ProbeResult(False, None, "refused"))
    metrics.observe_probe(B2, ProbeResult(True, 0.001))
    f = scrape(server)
    assert value(f, "prism_kernel_probes", "prism_kernel_probes_total", endpoint="10.0.0.12:6443") == 2
    snap = snapshot()
    snap["backends"] = [b for b in snap["backends"] if b["address"] != str(B2)]
    metrics.publish(snap)
    f = scrape(server)
    for fam in f.values():
        for s in fam.samples:
            assert s.labels.get("endpoint") != "10.0.0.12:6443", s


def test_content_negotiation_gzip_and_name_filter(metrics, server):
    metrics.publish(snapshot())
    status, headers, body = get(server, "/metrics", {"Accept": "application/openmetrics-text; version=1.0.0"})
    assert status == 200 and headers["Content-Type"].startswith("application/openmetrics-text")
    assert body.rstrip().endswith(b"# EOF")
    status, headers, body = get(server, "/metrics", {"Accept-Encoding": "gzip"})
    assert status == 200 and headers["Content-Encoding"] == "gzip"
    assert b"prism_kernel_backend_up" in gzip.decompress(body)
    status, _, body = get(server, "/metrics?name[]=prism_kernel_backend_up")
    names = {f.name for f in text_string_to_metric_families(body.decode())}
    assert names == {"prism_kernel_backend_up"}


def test_unknown_path_is_404(server):
    assert get(server, "/nope")[0] == 404
    assert get(server, "/")[0] == 200


# ---- /healthz and /readyz ------------------------------------------------------


def test_healthz_follows_the_heartbeat(metrics, server, clock):
    status, _, body = get(server, "/healthz")
    assert status == 200 and body.startswith(b"ok")  # start counts as the first sign of life
    clock.now += 29
    assert get(server, "/healthz")[0] == 200
    clock.now += 2
    status, _, body = get(server, "/healthz")
    assert status == 503 and b"stalled" in body and b"31.0s" in body
    metrics.heartbeat()
    assert get(server, "/healthz")[0] == 200


def test_readyz_transitions(metrics, server, clock):
    def ready():
        status, _, body = get(server, "/readyz")
        return status, body.decode()

    status, body = ready()
    assert status == 503 and "no state published" in body
    metrics.publish(snapshot(datapath=None, active=()))
    status, body = ready()
    assert status == 503 and "not installed" in body
    metrics.publish(snapshot(active=()))
    status, body = ready()
    assert status == 503 and "no backend set written" in body
    metrics.publish(snapshot())
    status, body = ready()
    assert status == 200 and body.startswith("ok: 2 of 3 backends healthy")
    all_down = ("down", "down", "down")
    metrics.publish(snapshot(states=all_down, active=(str(B1), str(B2)), fail_open=True))
    status, body = ready()
    assert status == 200 and body.startswith("fail-open")
    metrics.publish(snapshot(states=all_down, fail_open=False))
    status, body = ready()
    assert status == 503 and "no healthy backend" in body
    metrics.publish(snapshot())
    assert ready()[0] == 200
    clock.now += 60  # the loop stopped: its published state is stale
    status, body = ready()
    assert status == 503 and "stalled" in body
    metrics.heartbeat()
    assert ready()[0] == 200


# ---- the daemon's real snapshot ----------------------------------------------


def test_snapshot_contract_with_the_daemon(metrics, server):
    """Daemon.snapshot() has the keys the collector reads (no kernel: the
    daemon is built, fed probe results, never run)."""
    from prism_kernel.config import build_config
    from prism_kernel.control.supervisor import Daemon
    from prism_kernel.log import EventLog

    cfg = build_config({}, {"endpoints": [str(B1), str(B2)], "probe": {"mode": "tcp", "rise": 1, "fall": 1}})
    d = Daemon(cfg, EventLog("logfmt", io.StringIO()))
    for spec in cfg.endpoints:
        d.resolved[spec] = [Backend.of(spec.host, spec.port)]
    d._sync_targets()
    for _ in range(3):
        d._observe(B1, ProbeResult(True, 0.0004))
    d._observe(B2, ProbeResult(False, None, "refused"))
    d._select()
    d.applied = d.selection.backends
    d.datapath = SimpleNamespace(name="nftables")
    snap = json.loads(json.dumps(d.snapshot()))  # as plain as the state file
    metrics.publish(snap)
    f = scrape(server)
    assert value(f, "prism_kernel_backend_up", endpoint=str(B1)) == 1
    assert value(f, "prism_kernel_backend_up", endpoint=str(B2)) == 0
    assert value(f, "prism_kernel_backend_state", endpoint=str(B2), state="down") == 1
    assert value(f, "prism_kernel_backend_down_kind", endpoint=str(B2), kind="dead") == 1
    assert value(f, "prism_kernel_backend_flaps", endpoint=str(B2)) == 0
    assert value(f, "prism_kernel_backend_held_out_seconds", endpoint=str(B2)) == 0
    assert value(f, "prism_kernel_backend_active", endpoint=str(B1)) == 1
    assert value(f, "prism_kernel_backend_tier", endpoint=str(B1)) == 0
    assert value(f, "prism_kernel_backend_latency_seconds", endpoint=str(B1)) == pytest.approx(0.0004)
    assert value(f, "prism_kernel_backend_info", endpoint=str(B1), source=str(B1)) == 1
    assert value(f, "prism_kernel_datapath_info", datapath="nftables") == 1
    assert value(f, "prism_kernel_selection_mode", family="ipv4", mode="tier") == 1
    assert value(f, "prism_kernel_fail_open") == 0
    status, _, body = get(server, "/readyz")
    assert status == 200, body


# ---- the Grafana dashboard ---------------------------------------------------

_PROMQL_WORDS = {
    # aggregations and keywords
    "sum", "min", "max", "avg", "count", "stddev", "stdvar", "topk", "bottomk", "quantile",
    "count_values", "group", "by", "without", "on", "ignoring", "group_left", "group_right",
    "bool", "offset", "and", "or", "unless", "le", "inf", "nan",
    # functions
    "rate", "irate", "increase", "delta", "idelta", "deriv", "histogram_quantile", "abs",
    "clamp_min", "clamp_max", "label_replace", "label_join", "vector", "scalar", "time",
    "avg_over_time", "max_over_time", "min_over_time", "sum_over_time", "count_over_time",
    "last_over_time", "changes", "resets", "absent", "sort", "sort_desc", "round", "ceil", "floor",
}


def _metric_names_in(expr: str) -> set[str]:
    e = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # string literals
    e = re.sub(r"\{[^}]*\}", "", e)  # label matchers
    e = re.sub(r"\[[^\]]*\]", "", e)  # range selectors
    e = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", e)  # label lists
    e = re.sub(r"\$\w+", "", e)  # dashboard variables
    words = set(re.findall(r"[A-Za-z_:][A-Za-z0-9_:]*", e))
    return {w for w in words if w.lower() not in _PROMQL_WORDS}


def _dashboard_exprs(dash: dict) -> list[str]:
    exprs = []

    def walk(panels):
        for p in panels:
            for t in p.get("targets", []):
                exprs.append(t["expr"])
            walk(p.get("panels", []))

    walk(dash["panels"])
    for v in dash["templating"]["list"]:
        q = v.get("query")
        q = q.get("query") if isinstance(q, dict) else q
        m = re.fullmatch(r"label_values\((.*),\s*\w+\)", q or "")
        if m:
            exprs.append(m.group(1))
    return exprs


def test_dashboard_is_valid_and_uses_only_exported_metrics(metrics):
    dash = json.loads(DASHBOARD.read_text())
    assert dash["uid"] == "prism-kernel" and dash["title"] == "prism-kernel"
    variables = {v["name"] for v in dash["templating"]["list"]}
    assert {"instance", "node"} <= variables
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    exprs = _dashboard_exprs(dash)
    assert exprs
    exported = exported_metric_names(metrics)
    used = set().union(*(_metric_names_in(e) for e in exprs))
    assert used and used <= exported, sorted(used - exported)
    for e in exprs:
        assert 'instance=~"$instance"' in e or "label_values" in e or e.startswith("prism_kernel_build_info")
    # every panel the issue asks for has a query
    for metric in ("prism_kernel_backend_up", "prism_kernel_backend_active",
                   "prism_kernel_probe_latency_seconds_bucket", "prism_kernel_probe_failures_total",
                   "prism_kernel_steered_connections_total", "prism_kernel_failovers_total",
                   "prism_kernel_fail_open", "prism_kernel_kernel_write_duration_seconds_bucket"):
        assert metric in used, metric


def test_metric_name_extraction():
    assert _metric_names_in(
        'histogram_quantile(0.99, sum by (instance, le) (rate(foo_bucket{a=~"x{1}"}[5m]))) / on(instance) bar'
    ) == {"foo_bucket", "bar"}
