"""What the daemon records for /metrics, /healthz and /readyz.

The daemon's loop never waits for a scrape (docs/design/metrics.md): the
`observe_*` methods touch only prometheus_client counters and histograms
(each with its own short lock); `publish()` swaps one reference to a
snapshot that is never changed afterwards; the kernel is read at scrape time
through the readers the daemon hands over (its writer thread, or fresh
data-path objects: `datapath_readers`), one read shared by every scrape of a
second (metrics_scrape.SharedRead).
Each `Metrics` has a registry of its own, never prometheus_client's global one.

The families built at scrape time are in metrics_scrape.py, the HTTP server
in metrics_server.py; `MetricsServer` and `MetricsServerError` are imported
here so that the daemon needs only this module.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import Metric

from prism_kernel import __version__
from prism_kernel.core.health import ProbeResult
from prism_kernel.core.model import Backend
from prism_kernel.datapath.base import (
    Datapath,
    DatapathSettings,
    KernelState,
    PassiveCounts,
)
from prism_kernel.observe.metrics_scrape import (
    KERNEL_READ_MAX_AGE,
    ReadOutcome,
    ScrapeCollector,
    SharedRead,
)
from prism_kernel.observe.metrics_server import (  # noqa: F401 - the daemon's imports
    DEFAULT_METRICS_ADDRESS,
    DEFAULT_METRICS_PORT,
    MetricsServer,
    MetricsServerError,
    format_address,
)

# /healthz turns 503 when the daemon loop has not called heartbeat() for this
# long: the loop turns at least every 2 s, but a DNS re-resolution awaited in
# it can take a few resolver timeouts.
DEFAULT_HEARTBEAT_TIMEOUT = 30.0

# Seconds. The latency tier boundaries (core.health.TIER_BOUNDS) are edges, so
# the share of probes per tier is exact; finer below 1 ms (loopback vs LAN).
PROBE_LATENCY_BUCKETS: tuple[float, ...] = (
    0.000025, 0.00005, 0.0001, 0.00025, 0.0005,
    0.001, 0.0025, 0.005,
    0.01, 0.025, 0.05,
    0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0,
)
# Seconds: an eBPF map update takes tens of microseconds, an nftables transaction about 1 ms.
KERNEL_WRITE_BUCKETS: tuple[float, ...] = (
    0.00005, 0.0001, 0.00025, 0.0005,
    0.001, 0.0025, 0.005,
    0.01, 0.025, 0.05,
    0.1, 0.25, 0.5, 1.0,
)

TRANSITION_KINDS = ("up", "down", "tier", "held")  # health.Change.kind
DATAPATHS = ("ebpf", "nftables")
# Why `auto` fell back to another data path; why starting the data path failed.
FALLBACK_REASONS = ("unavailable", "install_failed")
START_STAGES = ("choose", "install")
# Requests the metrics server turned away (metrics_server.py): all handlers
# busy, the request not in within its deadline, or too large.
REJECT_REASONS = ("busy", "timeout", "too_large")
# Label values stay bounded: a reason is capped, and an endpoint with more
# distinct reasons than this gets "other" (a few reasons carry free text).
MAX_REASON_LEN = 64
MAX_REASONS_PER_ENDPOINT = 20

StateReader = Callable[[], KernelState]
PassiveReader = Callable[[], Mapping[Backend, PassiveCounts]]


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
        kernel_read_max_age: float = KERNEL_READ_MAX_AGE,
    ):
        # prometheus_client adds a `<name>_created` series to every counter and
        # histogram; they double the series count and nothing here needs them.
        # (Process-wide; the daemon is the only user of prometheus_client.)
        getattr(prometheus_client, "disable_created_metrics", lambda: None)()
        self.registry = CollectorRegistry()
        self.heartbeat_timeout = heartbeat_timeout
        self._clock = clock
        self.version = version
        self._snapshot: dict[str, Any] | None = None
        self.kernel_read_max_age = kernel_read_max_age
        self._state_reader: SharedRead[KernelState] | None = None
        self._passive_reader: SharedRead[Mapping[Backend, PassiveCounts]] | None = None
        self._last_beat = clock()  # being created counts as the first sign of life
        self.last_heartbeat_wall = time.time()  # unix time, for prism_kernel_last_heartbeat_timestamp_seconds
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
        self.rejected_requests = Counter(
            "prism_kernel_metrics_requests_rejected", "Requests the metrics server turned away: "
            "reason busy (all its handlers were serving: answered 503), timeout (the request was not "
            "in within 5 s) or too_large (over 16 KiB).", ["reason"], registry=r)
        for reason in REJECT_REASONS:  # at 0 from the start, for alert rules
            self.rejected_requests.labels(reason)
        r.register(ScrapeCollector(self))
        if process_metrics:
            # process_* (CPU, RSS, open fds, start time) and python_* (gc, info)
            prometheus_client.ProcessCollector(registry=r)
            prometheus_client.PlatformCollector(registry=r)
            prometheus_client.GCCollector(registry=r)

    # ---- called by the daemon (asyncio loop) ------------------------------

    def heartbeat(self) -> None:
        """Once per turn of the daemon's loop: /healthz reports it alive."""
        self._last_beat = self._clock()
        self.last_heartbeat_wall = time.time()

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
        ep = str(backend)
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
        ep = str(backend)
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
        """How a scrape reads the kernel (None: leave those metrics out).
        Each is shared by every scrape within `kernel_read_max_age` seconds,
        so a scrape storm reads the kernel at most once per that."""
        self._state_reader = None if state is None else SharedRead(
            state, self.kernel_read_max_age, self._clock, on_error=lambda _e: self.count_read_error("state"))
        self._passive_reader = None if passive is None else SharedRead(
            passive, self.kernel_read_max_age, self._clock, on_error=lambda _e: self.count_read_error("passive"))

    # ---- read by a scrape (the HTTP server's threads) ---------------------

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

    def kernel_readers(self) -> tuple[Callable[[], ReadOutcome[KernelState]] | None,
                                      Callable[[], ReadOutcome[Mapping[Backend, PassiveCounts]]] | None]:
        return self._state_reader, self._passive_reader

    def count_read_error(self, what: str) -> None:
        """A scrape-time kernel read (`state` or `passive`) failed."""
        with self._lock:
            self._read_errors[what] += 1

    def count_rejected_request(self, reason: str) -> None:
        """The metrics server turned a request away (REJECT_REASONS)."""
        self.rejected_requests.labels(reason if reason in REJECT_REASONS else "other").inc()

    def read_errors(self) -> dict[str, int]:
        with self._lock:
            return dict(self._read_errors)

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
