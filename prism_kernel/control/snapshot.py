"""The daemon's state as `status` and the metrics read it: one plain dict,
built anew each time (the state file, Metrics.publish). Schema:
prism_kernel/observe/status.py."""

from __future__ import annotations

import datetime as dt
import os
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from prism_kernel import __version__

if TYPE_CHECKING:
    from prism_kernel.control.supervisor import Daemon


@dataclass
class DaemonStats:
    kernel_writes: int = 0
    kernel_write_errors: int = 0
    last_write_wall: float | None = None
    last_write_seconds: float | None = None
    failovers: int = 0
    connections_closed: int = 0
    started_wall: float = field(default_factory=time.time)
    # Starting the data path (choose + install/adopt + first write)
    start_failures: int = 0  # in total
    start_failures_in_a_row: int = 0
    last_start_error: str | None = None
    last_start_failure_wall: float | None = None
    next_start_attempt_wall: float | None = None
    fallback: str | None = None  # "ebpf -> nftables: why", when auto fell back


def iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return dt.datetime.fromtimestamp(ts, dt.timezone.utc).isoformat(timespec="milliseconds")


LOADER_KEYS = ("loader", "why", "load_s", "maxrss_kb")


def _backends(d: Daemon) -> list[dict[str, Any]]:
    active = set(d.applied or ())
    # Shown only where the kernel uses it (eBPF); the confirmation's connect
    # is bounded by it (at least 200 ms, rto.confirm_connect_ms) on both paths.
    syn_rto = d.targets.syn_rto() if d.dp_cls is not None and d.dp_cls.sets_syn_rto else {}
    rows = []
    for b in sorted(d.targets.by_backend):
        t = d.targets.by_backend[b]
        h = t.health
        rows.append({
            "address": str(b),
            "family": b.family,
            "endpoints": t.origins,
            "state": h.state,
            "reason": h.reason,
            "latency_ms": None if h.latency is None else round(h.latency * 1000, 3),
            "tier": h.tier,
            # The initial SYN RTO of steered connects to it (core/rto.py); None:
            # the kernel default (1 s), always on nftables.
            "syn_rto_ms": syn_rto.get(b),
            "active": b in active,
            "since": iso(t.since_wall),
            "probes": h.probes,
            "failures": dict(h.failures_total),
            "kept_alive_probes": t.prober.reused,
            "down_kind": h.down_kind,
            "flaps": h.flaps,
            "held_out_for_s": None if h.held_until is None else max(0.0, round(h.held_until - time.monotonic(), 1)),
        })
    return rows


def snapshot(d: Daemon) -> dict[str, Any]:
    sel, st, cfg = d.selection, d.stats, d.config
    installed = d.datapath  # what the data path is (name, loader), not the kernel object
    return {
        "schema": 1,
        "version": __version__,
        "pid": os.getpid(),
        "instance": cfg.instance,
        "started_at": iso(st.started_wall),
        "updated_at": iso(time.time()),
        "datapath": installed.name if installed else None,
        "datapath_reason": d.datapath_reason,
        # eBPF: which loader put the programs in the kernel at this start, and why
        "datapath_loader": {k: v for k, v in (getattr(installed, "last_load", None) or {}).items()
                            if k in LOADER_KEYS} or None,
        "datapath_start": {
            "state": "ok" if installed else "retrying" if st.start_failures_in_a_row else "starting",
            "datapath": d.dp_cls.name if d.dp_cls else None,
            "failures": st.start_failures,
            "failures_in_a_row": st.start_failures_in_a_row,
            "last_error": st.last_start_error,
            "last_failure_at": iso(st.last_start_failure_wall),
            "next_attempt_at": None if installed else iso(st.next_start_attempt_wall),
            "fallback": st.fallback,
        },
        "listen_port": cfg.port,
        "probe": {
            "mode": cfg.probe.mode,
            "interval_s": cfg.probe.interval,
            "timeout_s": cfg.probe.timeout,
            "rise": cfg.probe.rise,
            "fall": cfg.probe.fall,
        },
        "fail_open": bool(sel and sel.fail_open),
        "fail_open_families": [f"ipv{f}" for f in (sel.fail_open_families if sel else ())],
        "selection": {f"ipv{f}": {"mode": s.mode, "tier": s.tier, "backends": [str(x) for x in s.backends]}
                      for f, s in (sel.by_family.items() if sel else [])},
        "active": [str(b) for b in (d.applied or ())],
        "backends": _backends(d),
        "kernel_writes": st.kernel_writes,
        "kernel_write_errors": st.kernel_write_errors,
        "last_write_at": iso(st.last_write_wall),
        "failovers": st.failovers,
        "connections_closed": st.connections_closed,
        "discovery": d.watcher.status() if d.watcher is not None else None,
        "metrics": d.metrics_server.status() if d.metrics_server is not None else None,
        # The one writer (control/sync.py): every kernel call by operation, and
        # how many came from another thread (none, or a bug); the event loop's
        # longest iteration (it must never wait for the kernel).
        "writer": d.writer.stats(),
        "loop": d.loop_watch.stats(),
    }
