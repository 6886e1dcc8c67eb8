"""The metric families built at scrape time, in the scrape thread: from the
snapshot the daemon last published, and from the kernel through the readers
it handed over (docs/design/metrics.md). A scrape reads the snapshot
reference once, so it shows one consistent state; a failed kernel read is
counted and leaves its families out, never fails the scrape. Every scrape
shares one kernel read per KERNEL_READ_MAX_AGE (`SharedRead`): however many
clients scrape, the daemon's writer thread sees at most one read a second."""

from __future__ import annotations

import platform
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from dataclasses import fields as dc_fields
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from prism_kernel.datapath.base import PassiveCounts

if TYPE_CHECKING:
    from prism_kernel.observe.metrics import Metrics

BACKEND_STATES = ("unknown", "up", "down")  # health.State
DOWN_KINDS = ("dead", "unready")  # health.FailureKind
SELECTION_MODES = ("loopback", "tier", "fail-open", "empty")  # selection.Mode
# PassiveCounts fields -> the `kind` label of prism_kernel_passive_failures_total;
# `established` is not a failure: prism_kernel_passive_established_total.
PASSIVE_KINDS = {"refused": "refused", "syn_timeouts": "syn_timeout"}


# Seconds a kernel read is reused by later scrapes. Prometheus scrapes every
# 10-60 s, so only a storm of scrapes (or several scrapers) shares a read.
KERNEL_READ_MAX_AGE = 1.0
# Seconds a scrape waits for the read another scrape has in flight; the
# writer's own bound on a scrape read (control/sync.py) is shorter.
KERNEL_READ_WAIT = 10.0

T = TypeVar("T")


@dataclass(frozen=True)
class ReadOutcome(Generic[T]):
    value: T | None
    error: BaseException | None
    seconds: float  # how long the read took


class SharedRead(Generic[T]):
    """`read` called at most once per `max_age` seconds whatever the number
    of callers: a caller gets the last outcome while it is younger than
    that, waits for the read in flight if there is one, and reads itself
    otherwise. A failed read is shared the same way (a broken kernel is not
    asked again by every scrape) and reported once to `on_error`."""

    def __init__(self, read: Callable[[], T], max_age: float = KERNEL_READ_MAX_AGE,
                 clock: Callable[[], float] = time.monotonic,
                 on_error: Callable[[BaseException], None] | None = None):
        self.read, self.max_age, self.clock, self.on_error = read, max_age, clock, on_error
        self._cv = threading.Condition()
        self._outcome: ReadOutcome[T] | None = None
        self._done_at = 0.0
        self._in_flight = False
        self._reads = 0  # reads finished: a waiter knows its read has ended

    def __call__(self) -> ReadOutcome[T]:
        with self._cv:
            if self._outcome is not None and self.clock() - self._done_at < self.max_age:
                return self._outcome
            if self._in_flight:
                seen = self._reads
                if self._cv.wait_for(lambda: self._reads != seen, KERNEL_READ_WAIT) and self._outcome is not None:
                    return self._outcome
                return ReadOutcome(None, TimeoutError("the shared kernel read did not finish"), KERNEL_READ_WAIT)
            self._in_flight = True
        start = self.clock()
        try:
            outcome: ReadOutcome[T] = ReadOutcome(self.read(), None, self.clock() - start)
        except Exception as e:  # noqa: BLE001 - reported, and its families left out of the scrape
            outcome = ReadOutcome(None, e, self.clock() - start)
            if self.on_error is not None:
                self.on_error(e)
        with self._cv:
            self._outcome, self._done_at = outcome, self.clock()
            self._in_flight = False
            self._reads += 1
            self._cv.notify_all()
        return outcome


class ScrapeCollector(Collector):
    """Registered in a `Metrics` registry; builds the state and kernel
    families on every collect()."""

    def __init__(self, m: Metrics):
        self.m = m

    def describe(self) -> Iterable[Metric]:
        # Names only (for the registry's duplicate check and name[] filters);
        # never reads the kernel.
        return list(families().values())

    def collect(self) -> Iterable[Metric]:
        snap = self.m.snapshot  # read once: this scrape uses one consistent snapshot
        fams = families()
        self._fill_state(fams, snap)
        self._fill_kernel(fams)
        return list(fams.values())

    def _fill_state(self, fams: dict[str, Metric], snap: dict[str, Any] | None) -> None:
        fams["prism_kernel_build_info"].add_metric([self.m.version, platform.python_version()], 1)
        fams["prism_kernel_last_heartbeat_timestamp_seconds"].add_metric([], self.m.last_heartbeat_wall)
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
        state_reader, passive_reader = self.m.kernel_readers()
        if state_reader is not None:
            got = state_reader()  # shared with every other scrape of the last second
            if got.error is None and got.value is not None:
                ks = got.value
                fams["prism_kernel_kernel_read_duration_seconds"].add_metric([], got.seconds)
                fams["prism_kernel_datapath_installed"].add_metric([], 1 if ks.installed else 0)
                for backend, cnt in sorted(ks.counters.items()):
                    fams["prism_kernel_steered_connections"].add_metric([str(backend)], cnt.connections)
                stats = ks.details.get("stats")
                if isinstance(stats, dict):
                    for event, value in sorted(stats.items()):
                        if isinstance(value, int):
                            fams["prism_kernel_datapath_events"].add_metric([event], value)
                drops = ks.details.get("cve_2020_8558_drops")
                if isinstance(drops, int):
                    fams["prism_kernel_datapath_events"].add_metric(["cve_2020_8558_drop"], drops)
        if passive_reader is not None:
            got_passive = passive_reader()
            if got_passive.error is None and got_passive.value is not None:
                passive = dict(got_passive.value)
                names = {f.name for f in dc_fields(PassiveCounts)}
                for backend, pc in sorted(passive.items()):
                    ep = str(backend)
                    for field_name, kind in PASSIVE_KINDS.items():
                        if field_name in names:
                            fams["prism_kernel_passive_failures"].add_metric([ep, kind], getattr(pc, field_name))
                    if "established" in names:
                        fams["prism_kernel_passive_established"].add_metric([ep], pc.established)
        if state_reader is not None or passive_reader is not None:
            for what, n in sorted(self.m.read_errors().items()):
                fams["prism_kernel_kernel_read_errors"].add_metric([what], n)


def families() -> dict[str, Metric]:
    """Every family the collector exports, empty: the one place that names them."""
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
        g("prism_kernel_kernel_read_duration_seconds", "How long the read of the kernel state "
          "this scrape shows took (scrapes within a second share one read)."),
    ]
    return {f.name: f for f in fams}
