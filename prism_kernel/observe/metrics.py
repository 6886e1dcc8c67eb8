"""Prometheus metrics, /healthz and /readyz for the daemon.

KubePrism exports no metrics at all; prism-kernel exports what an operator
needs to see the endpoint work: backend health, latency and tiers, the active
set, fail-open, failovers, kernel writes, and what the kernel itself counted
(connections steered per backend, failed connects it saw).

Three sources, so that the daemon's asyncio loop never waits for a scrape:

* events: the daemon calls cheap `observe_*` methods from its loop (probe
  results, kernel writes); they update prometheus_client counters and
  histograms (each has its own lock, never held for long);
* state: the daemon publishes its `snapshot()` dict with `publish()`. It is
  replaced by one attribute assignment, and a scrape reads the reference
  once, so a scrape never sees half an update;
* the kernel: read at scrape time, in the scrape thread, by callables the
  daemon hands over (`set_kernel_readers`; `datapath_readers()` builds them
  with a fresh data-path object per scrape, so the scrape thread shares no
  file descriptor with the daemon's writer). A failed read is counted in
  `prism_kernel_kernel_read_errors_total` and its metrics are left out: the
  scrape itself never fails.

Everything lives in a registry of its own (never prometheus_client's global
one), so tests create as many as they like.

The HTTP server (stdlib ThreadingHTTPServer in a daemon thread) listens on
loopback by default, see DEFAULT_METRICS_PORT for the port, and serves
/metrics (text format or OpenMetrics by content negotiation, gzip when asked,
`name[]` filters, as prometheus_client does), /healthz and /readyz.
"""

from __future__ import annotations

import gzip as _gzip
import ipaddress
import platform
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import fields as dc_fields
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlparse

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder, gzip_accepted
from prometheus_client.registry import Collector

from prism_kernel import __version__
from prism_kernel.core.health import ProbeResult
from prism_kernel.core.model import Backend
from prism_kernel.datapath.base import Datapath, DatapathSettings, KernelState, PassiveCounts
from prism_kernel.errors import PrismError

# Where /metrics, /healthz and /readyz listen by default: loopback only (a
# node-local Prometheus agent or a port-forward reaches it; exposing it is an
# explicit choice: metrics.address 0.0.0.0).
#
# Port 7450, chosen to clash with none of:
# * 7445: KubePrism, and prism-kernel's own steered listen port;
# * 7446: taken by third-party software (with 7447-7448 also Eclipse Zenoh's
#   scouting and router ports);
# * 17445, 27445, 37445, 37446: the listen/backend ports of this repository's
#   tests and benchmark (tests/harness.py, tests/test_datapath_*.py,
#   bench/): connects to a listen port are steered by the kernel, so a
#   metrics server there would be unreachable;
# * the Prometheus default port allocations wiki
#   (github.com/prometheus/prometheus/wiki/Default-port-allocations): 9090-9094
#   for Prometheus itself, 9100-9999 for exporters. That range is allocated
#   almost to the last port (the copy at hand: every port 9100-9745 but a
#   dozen "FREE" gaps the wiki asks to be filled first, and 9901-9999 in use;
#   9445, the obvious "x445", is the NVIDIA GPU exporter, which runs on GPU
#   Kubernetes nodes), and a gap cannot be checked free without the live page.
#   So prism-kernel stays out of the range, and off the ports the wiki's
#   "outside the standard range" table lists (3903, 7300, 8080, 8082, 8088,
#   8089, 8292, 8404, 9042, 9087, 9095, 9097, 9099, 16995, 19091, 19999,
#   24231, 42004, 44322, 61091);
# * what else listens on a Kubernetes node: API server 6443, etcd 2379-2381,
#   kubelet 10248/10250, kube-proxy 10249/10256, controller-manager and
#   scheduler 10257/10259, MetalLB 7472/7946, kube-vip 2112, Cilium 9962-9965
#   and 4240/4244, Calico 9091/9099, node-local-dns 9253, CSI liveness 9808;
# * the NodePort range 30000-32767 and the ephemeral range 32768-60999.
DEFAULT_METRICS_ADDRESS = "127.0.0.1"
DEFAULT_METRICS_PORT = 7450
# /healthz turns 503 when the daemon loop has not called heartbeat() for this
# long. The loop turns at least every STATE_WRITE_EVERY (2 s); a DNS
# re-resolution awaited inside the loop can take a few resolver timeouts.
DEFAULT_HEARTBEAT_TIMEOUT = 30.0

# Probe latency buckets (seconds): KubePrism's tier boundaries 1 ms, 10 ms,
# 100 ms and 1 s are bucket edges, so the share of probes per tier is exact;
# below 1 ms finer edges separate loopback (tens of microseconds) from a LAN
# (hundreds); the largest edge above the probe timeout limit is 10 s.
PROBE_LATENCY_BUCKETS: tuple[float, ...] = (
    0.000025, 0.00005, 0.0001, 0.00025, 0.0005,
    0.001, 0.0025, 0.005,
    0.01, 0.025, 0.05,
    0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0,
)
# Kernel write buckets (seconds): an eBPF map update takes tens of
# microseconds, an nftables transaction about a millisecond, a slow one more.
KERNEL_WRITE_BUCKETS: tuple[float, ...] = (
    0.00005, 0.0001, 0.00025, 0.0005,
    0.001, 0.0025, 0.005,
    0.01, 0.025, 0.05,
    0.1, 0.25, 0.5, 1.0,
)

BACKEND_STATES = ("unknown", "up", "down")  # health.State
DOWN_KINDS = ("dead", "unready")  # health.FailureKind
TRANSITION_KINDS = ("up", "down", "tier", "held")  # health.Change.kind
SELECTION_MODES = ("loopback", "tier", "fail-open", "empty")  # selection.Mode
DATAPATHS = ("ebpf", "nftables")
# Why `auto` fell back to another data path; why starting the data path failed.
FALLBACK_REASONS = ("unavailable", "install_failed")
START_STAGES = ("choose", "install")
# Probe failure reasons are short and stable (probes.classify), but a few
# carry free text (an OS error, a certificate message): a label value is
# capped, and an endpoint with more distinct reasons than this gets "other".
MAX_REASON_LEN = 64
MAX_REASONS_PER_ENDPOINT = 20
# PassiveCounts fields -> the `kind` label of prism_kernel_passive_failures_total;
# `established` is not a failure: prism_kernel_passive_established_total.
_PASSIVE_KINDS = {"refused": "refused", "syn_timeouts": "syn_timeout"}

StateReader = Callable[[], KernelState]
PassiveReader = Callable[[], Mapping[Backend, PassiveCounts]]


class MetricsServerError(PrismError):
    """The metrics HTTP server cannot listen where it was told to."""


def _endpoint(backend: Backend | str) -> str:
    return str(backend)


def _reason_label(reason: str) -> str:
    reason = " ".join(reason.split()) or "unknown"
    if len(reason) > MAX_REASON_LEN:
        reason = reason[: MAX_REASON_LEN - 3] + "..."
    return reason


class Metrics:
    """What the daemon owns: call `observe_*`, `publish` and `heartbeat` from
    the asyncio loop; the HTTP server's threads read."""

    def __init__(
        self,
        *,
        heartbeat_timeout: float = DEFAULT_HEARTBEAT_TIMEOUT,
        clock: Callable[[], float] = time.monotonic,
        version: str = __version__,
        process_metrics: bool = True,
    ):
        # prometheus_client adds a `<name>_created` series to every counter and
        # histogram; they double the series count and nothing here needs them.
        # (Process-wide; the daemon is the only user of prometheus_client.)
        getattr(prometheus_client, "disable_created_metrics", lambda: None)()
        self.registry = CollectorRegistry()
        self.heartbeat_timeout = heartbeat_timeout
        self._clock = clock
        self._version = version
        self._snapshot: dict[str, Any] | None = None
        self._state_reader: StateReader | None = None
        self._passive_reader: PassiveReader | None = None
        self._last_beat = clock()  # being created counts as the first sign of life
        self._last_beat_wall = time.time()
        self._lock = threading.Lock()  # guards the bookkeeping below
        self._read_errors: dict[str, int] = {"state": 0, "passive": 0}
        self._reasons: dict[str, set[str]] = {}  # endpoint -> reason labels in use
        self._seen_endpoints: set[str] = set()  # endpoints of the last published snapshot

        r = self.registry
        self.probes = Counter(
            "prism_kernel_probes", "Active probes completed, per backend (successful or not).",
            ["endpoint"], registry=r)
        self.probe_failures = Counter(
            "prism_kernel_probe_failures", "Active probes that failed, per backend and reason "
            "(refused, reset, unreachable, connect timeout, tls handshake timeout, readyz timeout, "
            "tls: ..., http <status>, bad http response, closed by peer, error: ...).",
            ["endpoint", "reason"], registry=r)
        self.probe_latency = Histogram(
            "prism_kernel_probe_latency_seconds", "Round trip of a successful probe: the TCP connect "
            "(tcp), the TLS handshake (tls) or the /readyz request (readyz). Bucket edges include the "
            "latency tier boundaries 1 ms, 10 ms, 100 ms and 1 s.",
            ["endpoint"], buckets=PROBE_LATENCY_BUCKETS, registry=r)
        self.transitions = Counter(
            "prism_kernel_backend_transitions", "Health changes of a backend: kind up or down, tier "
            "(its latency tier changed), or held (it would have come back but is held out for "
            "flapping).", ["endpoint", "kind"], registry=r)
        self.kernel_writes = Counter(
            "prism_kernel_kernel_writes", "Writes of the backend set into the kernel (install, "
            "changes, repairs).", registry=r)
        self.kernel_write_errors = Counter(
            "prism_kernel_kernel_write_errors", "Writes of the backend set the kernel refused "
            "(retried on the next loop turn).", registry=r)
        self.kernel_write_duration = Histogram(
            "prism_kernel_kernel_write_duration_seconds", "How long a timed write of the backend set "
            "into the kernel took.", buckets=KERNEL_WRITE_BUCKETS, registry=r)
        self.failovers = Counter(
            "prism_kernel_failovers", "Kernel writes that took at least one backend out of the "
            "active set.", registry=r)
        self.connections_closed = Counter(
            "prism_kernel_connections_closed", "Steered connections the daemon aborted because "
            "their backend died (clients then reconnect to a live backend).", registry=r)
        self.datapath_fallbacks = Counter(
            "prism_kernel_datapath_fallbacks", "Times `--datapath auto` used another data path than "
            "the one it prefers: from, to, and reason unavailable (a check said no) or install_failed "
            "(the install failed while nothing of this instance was in the kernel).",
            ["from", "to", "reason"], registry=r)
        self.datapath_start_failures = Counter(
            "prism_kernel_datapath_start_failures", "Failed attempts to start the data path, by "
            "stage: choose (no data path available) or install (install, adopt or the first write "
            "failed). The daemon retries with backoff (1 s doubling to 60 s) while the kernel keeps "
            "steering with what it holds.", ["stage"], registry=r)
        r.register(_StateCollector(self))
        if process_metrics:
            # process_* (CPU, RSS, open fds, start time) and python_* (gc, info)
            prometheus_client.ProcessCollector(registry=r)
            prometheus_client.PlatformCollector(registry=r)
            prometheus_client.GCCollector(registry=r)

    # ---- called by the daemon (asyncio loop) ------------------------------

    def heartbeat(self) -> None:
        """Once per turn of the daemon's loop: /healthz reports it alive."""
        self._last_beat = self._clock()
        self._last_beat_wall = time.time()

    def publish(self, snapshot: dict[str, Any]) -> None:
        """Hand over the daemon's latest `snapshot()`. The dict must not be
        changed afterwards (snapshot() builds a new one each call).
        Series of backends that left the snapshot are removed."""
        endpoints = {b["address"] for b in snapshot.get("backends", [])}
        gone = self._seen_endpoints - endpoints
        self._snapshot = snapshot  # one reference swap: scrapes see old or new, never half
        self._seen_endpoints = endpoints
        for ep in gone:
            self._forget(ep)

    def observe_probe(self, backend: Backend, result: ProbeResult, changes: Iterable[Any] = ()) -> None:
        """One probe result (call it where the daemon takes the result into
        its health state, with the changes that produced)."""
        ep = _endpoint(backend)
        self.probes.labels(ep).inc()
        if result.ok:
            if result.latency is not None:
                self.probe_latency.labels(ep).observe(result.latency)
        else:
            self.probe_failures.labels(ep, self._reason(ep, result.reason)).inc()
        self.observe_changes(backend, changes)

    def observe_changes(self, backend: Backend, changes: Iterable[Any]) -> None:
        """Health changes (health.Change) that did not come from a scheduled
        probe, e.g. a kernel-reported failure confirmed by a TCP connect."""
        ep = _endpoint(backend)
        for c in changes:
            kind = getattr(c, "kind", None)
            if kind in TRANSITION_KINDS:
                self.transitions.labels(ep, kind).inc()

    def observe_kernel_write(self, seconds: float | None, failover: bool = False) -> None:
        """A write of the backend set that reached the kernel. `seconds`: how
        long it took, None when it was not timed (kept out of the histogram)."""
        self.kernel_writes.inc()
        if seconds is not None:
            self.kernel_write_duration.observe(seconds)
        if failover:
            self.failovers.inc()

    def observe_kernel_write_error(self) -> None:
        self.kernel_write_errors.inc()

    def observe_connections_closed(self, count: int) -> None:
        """Connections to dead backends aborted (Datapath.close_connections)."""
        if count > 0:
            self.connections_closed.inc(count)

    def observe_datapath_fallback(self, frm: str, to: str, reason: str) -> None:
        """`auto` fell back from `frm` to `to`; labels bounded to the known values."""
        self.datapath_fallbacks.labels(frm if frm in DATAPATHS else "other", to if to in DATAPATHS else "other",
                                       reason if reason in FALLBACK_REASONS else "other").inc()

    def observe_datapath_start_failure(self, stage: str) -> None:
        self.datapath_start_failures.labels(stage if stage in START_STAGES else "other").inc()

    def set_kernel_readers(self, state: StateReader | None, passive: PassiveReader | None = None) -> None:
        """How a scrape reads the kernel (None: leave those metrics out)."""
        self._state_reader = state
        self._passive_reader = passive

    # ---- read by the HTTP server (its threads) ----------------------------

    @property
    def snapshot(self) -> dict[str, Any] | None:
        return self._snapshot

    def health(self) -> tuple[bool, str]:
        """(alive, reason) for /healthz."""
        age = self._clock() - self._last_beat
        if age > self.heartbeat_timeout:
            return False, (f"daemon loop stalled: last heartbeat {age:.1f}s ago "
                           f"(limit {self.heartbeat_timeout:g}s)")
        return True, f"ok: daemon loop alive, last heartbeat {age:.1f}s ago"

    def readiness(self) -> tuple[bool, str]:
        """(ready, reason) for /readyz: the data path is installed with a
        backend set written, and at least one backend is healthy or the
        data path fails open to every known backend."""
        alive, why = self.health()
        if not alive:
            return False, why
        snap = self._snapshot
        if snap is None:
            return False, "starting: no state published yet"
        if not snap.get("datapath"):
            start = snap.get("datapath_start") or {}
            if start.get("failures_in_a_row"):
                return False, (f"starting: data path start failed {start['failures_in_a_row']}x, "
                               f"retrying (next at {start.get('next_attempt_at')}): {start.get('last_error')}")
            return False, "starting: data path not installed yet"
        active = snap.get("active") or []
        if not active:
            return False, f"{snap['datapath']} data path installed but no backend set written"
        backends = snap.get("backends", [])
        healthy = [b for b in backends if b.get("state") == "up"]
        if healthy:
            return True, (f"ok: {len(healthy)} of {len(backends)} backends healthy, "
                          f"{len(active)} active, {snap['datapath']} data path")
        if snap.get("fail_open"):
            return True, (f"fail-open: no healthy backend, steering to all {len(active)} known "
                          f"backends, {snap['datapath']} data path")
        return False, f"no healthy backend ({len(backends)} known)"

    # ---- internals ---------------------------------------------------------

    def _reason(self, ep: str, reason: str) -> str:
        label = _reason_label(reason)
        with self._lock:
            used = self._reasons.setdefault(ep, set())
            if label not in used:
                if len(used) >= MAX_REASONS_PER_ENDPOINT:
                    label = "other"
                used.add(label)
        return label

    def _forget(self, ep: str) -> None:
        """Drop the series of a backend the daemon no longer knows (a DNS
        name that resolves elsewhere now), so they do not linger forever."""
        with self._lock:
            reasons = self._reasons.pop(ep, set())
        for metric, labelsets in (
            (self.probes, [(ep,)]),
            (self.probe_latency, [(ep,)]),
            (self.probe_failures, [(ep, r) for r in reasons]),
            (self.transitions, [(ep, k) for k in TRANSITION_KINDS]),
        ):
            for labels in labelsets:
                try:
                    metric.remove(*labels)
                except KeyError:
                    pass

    def _count_read_error(self, what: str) -> None:
        with self._lock:
            self._read_errors[what] += 1

    def _read_errors_snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self._read_errors)


class _StateCollector(Collector):
    """Builds the state and kernel metrics at scrape time."""

    def __init__(self, m: Metrics):
        self.m = m

    def describe(self) -> Iterable[Metric]:
        # Names only (for the registry's duplicate check and name[] filters);
        # never reads the kernel.
        return list(self._families().values())

    def collect(self) -> Iterable[Metric]:
        snap = self.m.snapshot  # read once: this scrape uses one consistent snapshot
        fams = self._families()
        self._fill_state(fams, snap)
        self._fill_kernel(fams)
        return list(fams.values())

    # One place that names every family this collector exports.
    @staticmethod
    def _families() -> dict[str, Metric]:
        g, c = GaugeMetricFamily, CounterMetricFamily
        fams: list[Metric] = [
            g("prism_kernel_build_info", "Version of the running daemon (value 1).",
              labels=["version", "python_version"]),
            g("prism_kernel_last_heartbeat_timestamp_seconds",
              "When the daemon's loop last turned (unix time)."),
            g("prism_kernel_datapath_info", "The kernel data path in use (value 1): ebpf or nftables.",
              labels=["datapath"]),
            g("prism_kernel_datapath_start_retrying", "1 while starting the data path fails and the "
              "daemon retries (the kernel keeps steering with what it holds, if anything), else 0."),
            g("prism_kernel_backend_up", "1 when the backend is healthy (state up), else 0.",
              labels=["endpoint"]),
            g("prism_kernel_backend_state", "Health state of the backend, one series per state, "
              "1 for the current one: unknown (not probed yet), up, down.", labels=["endpoint", "state"]),
            g("prism_kernel_backend_tier", "Latency tier of the backend: 0 (<1 ms), 1 (<10 ms), "
              "2 (<100 ms), 3 (<1 s), 4 (>=1 s). Absent until the tier is known.", labels=["endpoint"]),
            g("prism_kernel_backend_down_kind", "Why a down backend is down, 1 for the current kind: "
              "dead (no TCP: its connections are aborted) or unready (answers but not ready, or its "
              "certificate does not verify: existing connections drain). Absent while not down.",
              labels=["endpoint", "kind"]),
            g("prism_kernel_backend_flaps", "Recent flaps of the backend (down again soon after "
              "coming back); decides how long it is held out.", labels=["endpoint"]),
            g("prism_kernel_backend_held_out_seconds", "How much longer flap damping keeps the "
              "backend out of the set (0 when not held).", labels=["endpoint"]),
            g("prism_kernel_backend_latency_seconds", "Smoothed probe latency of the backend over "
              "its last samples, the value its tier is decided on.", labels=["endpoint"]),
            g("prism_kernel_backend_active", "1 when the backend is in the set written to the kernel "
              "(new connections are steered to it), else 0.", labels=["endpoint"]),
            g("prism_kernel_backend_info", "Where a backend address comes from (value 1): the "
              "configured endpoint (HOST:PORT or NAME:PORT) as source.", labels=["endpoint", "source"]),
            g("prism_kernel_fail_open", "1 when no backend of a family is healthy and the data path "
              "steers to every known backend of it, else 0."),
            g("prism_kernel_selection_mode", "How the set of each address family was chosen, one "
              "series per mode, 1 for the current one: loopback (the local API server), tier (the "
              "healthy backends of the lowest tier), fail-open, empty.", labels=["family", "mode"]),
            g("prism_kernel_datapath_installed", "1 when the kernel holds the data path completely "
              "(read from the kernel at scrape time), else 0."),
            c("prism_kernel_steered_connections", "Connections the kernel steered to the backend "
              "(read from the kernel at scrape time; restarts from 0 when the backend re-enters the "
              "set or the data path is re-created).", labels=["endpoint"]),
            c("prism_kernel_passive_failures", "Failed connects to the backend seen by the kernel "
              "(eBPF: sock_ops; nftables: conntrack rules): kind refused (SYN answered by RST) or "
              "syn_timeout (SYN retransmission timer fired, a black hole).", labels=["endpoint", "kind"]),
            c("prism_kernel_passive_established", "Connects to the backend the kernel saw complete "
              "the handshake (where observed).", labels=["endpoint"]),
            c("prism_kernel_datapath_events", "Events counted by the data path in the kernel: eBPF "
              "steered, no_backend (a connect found no backend), retry, peer_xlate; nftables "
              "cve_2020_8558_drop (martian packets to 127.0.0.1 dropped).", labels=["event"]),
            c("prism_kernel_kernel_read_errors", "Scrape-time reads of the kernel that failed "
              "(their metrics are left out of that scrape): what state or passive.", labels=["what"]),
            g("prism_kernel_kernel_read_duration_seconds", "How long this scrape's read of the "
              "kernel state took."),
        ]
        return {f.name: f for f in fams}

    def _fill_state(self, fams: dict[str, Metric], snap: dict[str, Any] | None) -> None:
        m = self.m
        fams["prism_kernel_build_info"].add_metric([m._version, platform.python_version()], 1)
        fams["prism_kernel_last_heartbeat_timestamp_seconds"].add_metric([], m._last_beat_wall)
        if snap is None:
            return
        if snap.get("datapath"):
            fams["prism_kernel_datapath_info"].add_metric([snap["datapath"]], 1)
        retrying = not snap.get("datapath") and bool((snap.get("datapath_start") or {}).get("failures_in_a_row"))
        fams["prism_kernel_datapath_start_retrying"].add_metric([], 1 if retrying else 0)
        for b in snap.get("backends", []):
            ep = b["address"]
            state = b.get("state", "unknown")
            fams["prism_kernel_backend_up"].add_metric([ep], 1 if state == "up" else 0)
            for s in BACKEND_STATES:
                fams["prism_kernel_backend_state"].add_metric([ep, s], 1 if s == state else 0)
            if state == "down" and b.get("down_kind") in DOWN_KINDS:
                for k in DOWN_KINDS:
                    fams["prism_kernel_backend_down_kind"].add_metric([ep, k], 1 if k == b["down_kind"] else 0)
            if "flaps" in b:
                fams["prism_kernel_backend_flaps"].add_metric([ep], b["flaps"] or 0)
            if "held_out_for_s" in b:
                fams["prism_kernel_backend_held_out_seconds"].add_metric([ep], b["held_out_for_s"] or 0.0)
            if b.get("tier") is not None:
                fams["prism_kernel_backend_tier"].add_metric([ep], b["tier"])
            if b.get("latency_ms") is not None:
                fams["prism_kernel_backend_latency_seconds"].add_metric([ep], b["latency_ms"] / 1000.0)
            fams["prism_kernel_backend_active"].add_metric([ep], 1 if b.get("active") else 0)
            for source in b.get("endpoints", []):
                fams["prism_kernel_backend_info"].add_metric([ep, source], 1)
        fams["prism_kernel_fail_open"].add_metric([], 1 if snap.get("fail_open") else 0)
        for family, sel in (snap.get("selection") or {}).items():
            mode = sel.get("mode")
            for mo in SELECTION_MODES:
                fams["prism_kernel_selection_mode"].add_metric([family, mo], 1 if mo == mode else 0)

    def _fill_kernel(self, fams: dict[str, Metric]) -> None:
        m = self.m
        state_reader, passive_reader = m._state_reader, m._passive_reader
        if state_reader is not None:
            start = time.monotonic()
            try:
                ks = state_reader()
            except Exception:  # noqa: BLE001 - a failed read must not fail the scrape
                m._count_read_error("state")
            else:
                fams["prism_kernel_kernel_read_duration_seconds"].add_metric([], time.monotonic() - start)
                fams["prism_kernel_datapath_installed"].add_metric([], 1 if ks.installed else 0)
                for backend, cnt in sorted(ks.counters.items()):
                    fams["prism_kernel_steered_connections"].add_metric([_endpoint(backend)], cnt.connections)
                stats = ks.details.get("stats")
                if isinstance(stats, dict):
                    for event, value in sorted(stats.items()):
                        if isinstance(value, int):
                            fams["prism_kernel_datapath_events"].add_metric([event], value)
                drops = ks.details.get("cve_2020_8558_drops")
                if isinstance(drops, int):
                    fams["prism_kernel_datapath_events"].add_metric(["cve_2020_8558_drop"], drops)
        if passive_reader is not None:
            try:
                passive = dict(passive_reader())
            except Exception:  # noqa: BLE001
                m._count_read_error("passive")
            else:
                names = {f.name for f in dc_fields(PassiveCounts)}
                for backend, pc in sorted(passive.items()):
                    ep = _endpoint(backend)
                    for field_name, kind in _PASSIVE_KINDS.items():
                        if field_name in names:
                            fams["prism_kernel_passive_failures"].add_metric([ep, kind], getattr(pc, field_name))
                    if "established" in names:
                        fams["prism_kernel_passive_established"].add_metric([ep], pc.established)
        if state_reader is not None or passive_reader is not None:
            for what, n in sorted(m._read_errors_snapshot().items()):
                fams["prism_kernel_kernel_read_errors"].add_metric([what], n)


def datapath_readers(dp_cls: type[Datapath], settings: DatapathSettings) -> tuple[StateReader, PassiveReader]:
    """Kernel readers for `Metrics.set_kernel_readers`: each call opens a
    fresh data-path object, reads, and closes it (as `prism-kernel status`
    does), so the scrape thread never shares the daemon's file descriptors
    or caches, which its asyncio thread may replace at any time."""

    def read_state() -> KernelState:
        dp = dp_cls(settings)
        try:
            return dp.read_state()
        finally:
            dp.close()

    def read_passive() -> Mapping[Backend, PassiveCounts]:
        dp = dp_cls(settings)
        try:
            return dp.passive_failures()
        finally:
            dp.close()

    return read_state, read_passive


# ---- HTTP ----------------------------------------------------------------


class _Handler(BaseHTTPRequestHandler):
    metrics: Metrics  # set on the per-server subclass
    server_version = "prism-kernel"
    timeout = 10  # a client that sends nothing cannot hold a thread for long
    protocol_version = "HTTP/1.0"

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        url = urlparse(self.path)
        if url.path == "/metrics":
            self._metrics(parse_qs(url.query))
        elif url.path == "/healthz":
            self._text(*self.metrics.health())
        elif url.path == "/readyz":
            self._text(*self.metrics.readiness())
        elif url.path == "/":
            self._reply(200, b"prism-kernel: /metrics /healthz /readyz\n", "text/plain; charset=utf-8")
        else:
            self._reply(404, b"not found: try /metrics, /healthz or /readyz\n", "text/plain; charset=utf-8")

    def _metrics(self, params: dict[str, list[str]]) -> None:
        encoder, content_type = choose_encoder(self.headers.get("Accept"))
        registry: Any = self.metrics.registry
        if "name[]" in params:
            registry = registry.restricted_registry(params["name[]"])
        try:
            body = encoder(registry)
        except Exception as e:  # noqa: BLE001 - report, keep serving
            self._reply(500, f"error collecting metrics: {e}\n".encode(), "text/plain; charset=utf-8")
            return
        headers = {}
        if gzip_accepted(self.headers.get("Accept-Encoding")):
            body = _gzip.compress(body)
            headers["Content-Encoding"] = "gzip"
        self._reply(200, body, content_type, headers)

    def _text(self, ok: bool, reason: str) -> None:
        self._reply(200 if ok else 503, (reason + "\n").encode(), "text/plain; charset=utf-8")

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


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True  # a restarted daemon rebinds at once (TIME_WAIT)


def format_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class MetricsServer:
    """/metrics, /healthz and /readyz over HTTP, in a daemon thread."""

    def __init__(self, metrics: Metrics, address: str = DEFAULT_METRICS_ADDRESS,
                 port: int = DEFAULT_METRICS_PORT, poll_interval: float = 0.5):
        self.metrics = metrics
        self.host = address
        self.port = port
        self.poll_interval = poll_interval  # how soon stop() is noticed
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def address(self) -> str:
        """host:port actually bound (the real port when asked for port 0)."""
        port = self._server.server_address[1] if self._server else self.port
        return format_address(self.host, port)

    def start(self) -> None:
        if self._server is not None:
            return
        try:
            ip = ipaddress.ip_address(self.host)
        except ValueError:
            raise MetricsServerError(
                f"metrics address {self.host!r} is not an IP address (use 127.0.0.1, ::1, 0.0.0.0 or ::)") from None
        handler = type("MetricsHandler", (_Handler,), {"metrics": self.metrics})
        server_cls = type("MetricsHTTPServer", (_Server,), {"address_family": _family(ip)})
        try:
            self._server = server_cls((self.host, self.port), handler)
        except OSError as e:
            raise MetricsServerError(
                f"cannot serve metrics on {format_address(self.host, self.port)}: "
                f"{e.strerror or e} (set metrics.port / --metrics-port to a free port, "
                f"or metrics.enabled: false)") from None
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": self.poll_interval},
                                        name="prism-kernel-metrics", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        server, thread = self._server, self._thread
        self._server = self._thread = None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        if thread is not None:
            thread.join(timeout=5)


def _family(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> int:
    import socket

    return socket.AF_INET6 if ip.version == 6 else socket.AF_INET


def exported_metric_names(metrics: Metrics) -> set[str]:
    """Every series name this registry exports (counters with _total,
    histograms with _bucket/_sum/_count), whether or not it has samples
    right now: for checks of dashboards and alert rules."""
    names: set[str] = set()
    for fam in metrics.registry.collect():
        names |= _sample_names(fam)
    return names


def _sample_names(fam: Metric) -> set[str]:
    if fam.type == "counter":
        return {fam.name + "_total"}
    if fam.type == "histogram":
        return {fam.name + s for s in ("_bucket", "_sum", "_count")}
    if fam.type == "summary":
        return {fam.name, fam.name + "_sum", fam.name + "_count"}
    if fam.type == "info":
        return {fam.name + "_info"}
    return {fam.name} | {s.name for s in fam.samples}
