"""The daemon: probe -> select -> the writer -> the kernel.

Startup: take the lock, choose the data path, resolve the endpoints, run one
round of probes (bounded by the probe timeout), then install or adopt the data
path with the first selection (start.py: never a crash loop, never a flip).
An adopted data path keeps steering with what it holds until that first
selection is written, so a restart has no gap. Then READY=1 goes to systemd
(sd_notify, unit Type=notify).

Two threads. The event loop owns the daemon's state: probe results, health,
the selection, stats, logs. It never calls the kernel: it hands the wanted
set (and the dead backends whose connections go) to the writer
(control/sync.py), the one thread that does every kernel operation, and takes
the writer's outcomes back as events (the WriterEvents methods below).

Stopping (SIGTERM/SIGINT) leaves the data path in place: the node keeps its
API access while the daemon restarts or is upgraded. `cleanup_on_exit`
removes it instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import Callable, Mapping
from typing import Any

from prism_kernel import __version__
from prism_kernel.config import Config
from prism_kernel.control import sdnotify
from prism_kernel.control.loopwatch import LoopWatch
from prism_kernel.control.passive import PassiveFeedback
from prism_kernel.control.reload import reload, settings_of
from prism_kernel.control.runstate import DaemonLock, remove_state, write_state
from prism_kernel.control.snapshot import DaemonStats, snapshot
from prism_kernel.control.start import Starter
from prism_kernel.control.sync import InstalledDatapath, KernelWriter
from prism_kernel.control.targets import Targets
from prism_kernel.core.health import Change, ProbeResult
from prism_kernel.core.model import Backend
from prism_kernel.core.selection import FullSelection, select
from prism_kernel.datapath import Datapath
from prism_kernel.datapath.base import PassiveCounts
from prism_kernel.log import EventLog
from prism_kernel.observe.metrics import Metrics, MetricsServer
from prism_kernel.sources.discovery import EndpointSliceWatcher
from prism_kernel.sources.endpoints import EndpointSpec

STATE_WRITE_EVERY = 2.0  # seconds: latency figures in the state file refresh this often
# Seconds one kernel operation may keep the writer before /healthz fails: far
# above the slowest legitimate one (a bcc compile in a slow guest, seconds).
WRITER_STUCK_AFTER = 60.0


class Daemon:
    def __init__(self, config: Config, log: EventLog, reload_config: Callable[[], Config] | None = None):
        self.config = config
        self.log = log
        # Re-reads the file and the flags (SIGHUP); None: reload unsupported.
        self.reload_config = reload_config
        self.settings = settings_of(config)
        self.metrics: Metrics | None = None
        self.metrics_server: MetricsServer | None = None
        self.writer = KernelWriter(self)
        if config.metrics.enabled:
            self.metrics = Metrics(heartbeat_timeout=config.metrics.heartbeat_timeout)
            # A scrape reads the kernel through the writer too.
            self.metrics.set_kernel_readers(self.writer.scrape_state, self.writer.scrape_passive)
        self.targets = Targets(config, log, self.metrics)
        self.passive = PassiveFeedback()
        self._passive_generation: int | None = None
        self.loop_watch = LoopWatch(report=lambda s: self.log.warn("loop_blocked", ms=round(s * 1000, 1)))
        # What the writer installed (a description, not the kernel object).
        self.datapath: InstalledDatapath | None = None
        self.datapath_reason = ""
        self.dp_cls: type[Datapath] | None = None
        self.selection: FullSelection | None = None
        self.applied: tuple[Backend, ...] | None = None  # the set the writer last reported in the kernel
        self._syn_rto: dict[Backend, int] = {}  # what the writer was last given
        self._writer_stuck = False
        self.stats = DaemonStats()
        self._stop = asyncio.Event()
        self._reload_requested = asyncio.Event()
        # Endpoint discovery: what the EndpointSlices name, next to the static endpoints.
        self.watcher: EndpointSliceWatcher | None = self.make_watcher(config)
        self._watch_task: asyncio.Task | None = None

    # The health side as the metrics contract test drives it (no kernel).
    @property
    def resolved(self) -> dict[EndpointSpec, list[Backend]]:
        return self.targets.resolved

    def _sync_targets(self) -> None:
        self.targets.sync()

    def _observe(self, backend: Backend, result: ProbeResult, passive: str | None = None) -> list[Change]:
        return self.targets.observe(backend, result, passive)

    def _select(self) -> bool:
        return self.select()

    # ---- lifecycle -------------------------------------------------------

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def request_stop(self, why: str = "signal") -> None:
        if not self._stop.is_set():
            self.log.info("stopping", reason=why)
            sdnotify.notify(STOPPING=1, STATUS=f"stopping ({why}); the data path stays in the kernel"
                            if not self.config.cleanup_on_exit else f"stopping ({why})")
            self._stop.set()

    async def run(self) -> int:
        lock = DaemonLock(self.config.state_dir)
        lock.acquire()
        if self.metrics is not None:
            # After the lock: a second daemon fails on the lock (exit 3), not on the port.
            # Never fatal: a held address is logged and retried in the background (observe/metrics_server.py).
            self.metrics_server = MetricsServer(self.metrics, self.config.metrics.address, self.config.metrics.port,
                                                log=self.log)
            self.metrics_server.start()
        loop = asyncio.get_running_loop()
        for sig, name in ((signal.SIGTERM, "SIGTERM"), (signal.SIGINT, "SIGINT")):
            loop.add_signal_handler(sig, self.request_stop, name)
        loop.add_signal_handler(signal.SIGHUP, self._reload_requested.set)
        self.loop_watch.start(loop)
        self.writer.start(loop)
        starter = Starter(self)
        try:
            # The netlink code (pyroute2, ~10 MB) is loaded first, before any
            # probe runs: loading it takes 0.1-0.3 s of one thread holding
            # the interpreter, which would hold up the probes and
            # confirmations of a start (and loaded by the first failover, it
            # would delay the abort of dead connections).
            try:
                await self.writer.run(self.writer.preload_netlink)
            except Exception as e:  # noqa: BLE001 - only closing connections needs it: said each time it fails
                self.log.warn("netlink_unavailable", error=f"{type(e).__name__}: {e}")
            if not await starter.choose():
                return 0
            assert self.dp_cls is not None
            self.log.info(
                "start", version=__version__, pid=os.getpid(), instance=self.config.instance,
                datapath=self.dp_cls.name, why=self.datapath_reason, port=self.config.port,
                probe=self.config.probe.mode, interval=self.config.probe.interval,
            )
            sdnotify.notify(STATUS=f"starting: {self.dp_cls.name} data path; probing the backends")
            if self.watcher is not None:
                # The last discovered list: the API may be unreachable now.
                self.targets.discovered = self.watcher.load_cached()
            await self.targets.resolve_all()
            while not self.targets.by_backend and not self._stop.is_set():
                self._heartbeat()
                self.log.error("no_backends", reason="no endpoint resolved to an address; retrying")
                await self._sleep_or_stop(min(5.0, self.config.resolve_interval))
                await self.targets.resolve_all()
            if self._stop.is_set():
                return 0
            await self.targets.first_round(self._stop, self._heartbeat)
            if not await starter.start():
                return 0
            # An adopted data path may hold connections to a backend that
            # died while no daemon ran.
            self.apply(close=self.targets.dead())
            self.write_state()
            # systemd: the steering is in place (units ordered after this one start now).
            sdnotify.notify(READY=1, STATUS=self._steering_status())
            # Only now: discovery goes through 127.0.0.1:PORT, which steers from here on.
            self.start_discovery()
            await self._main_loop()
            return 0
        finally:
            # Stopping blocks the loop on purpose (the metrics server's
            # shutdown): not counted.
            self.loop_watch.stop()
            await self.stop_discovery()
            if self.metrics_server is not None:
                self.metrics_server.stop()
            await self.targets.close()
            cleanup = (self.dp_cls, self.settings) if self.config.cleanup_on_exit and self.dp_cls else None
            try:
                for line in await self.writer.stop(cleanup):
                    self.log.info("cleanup", removed=line)
            except Exception as e:  # noqa: BLE001 - stopping goes on: the lock and state file still go
                self.log.error("stop_failed", error=f"{type(e).__name__}: {e}")
            remove_state(self.config.state_dir)
            lock.release()
            self.log.info("stopped", datapath_left_in_place=not self.config.cleanup_on_exit,
                          loop_longest_iteration_ms=self.loop_watch.stats()["longest_iteration_ms"],
                          off_writer_thread_calls=self.writer.stats()["off_thread_calls"])

    async def pause_starting(self, seconds: float) -> None:
        """Wait `seconds` (or until stopped) while taking probe results in,
        so the next attempt to start writes what the probes say now."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + seconds
        stop_wait = asyncio.ensure_future(self._stop.wait())
        if self._reload_requested.is_set():
            self.log.warn("reload_deferred", reason="the data path is not started yet: the new configuration "
                          "is read once it is; restart the daemon to use it now")
        try:
            while not self._stop.is_set():
                self._heartbeat()
                left = deadline - loop.time()
                if left <= 0:
                    return
                get = asyncio.ensure_future(self.targets.results.get())
                done, _ = await asyncio.wait({get, stop_wait}, timeout=min(left, 5.0),
                                             return_when=asyncio.FIRST_COMPLETED)
                if get in done:
                    self.targets.observe(*get.result())
                else:
                    get.cancel()
        finally:
            stop_wait.cancel()

    def _steering_status(self) -> str:
        n = len(self.applied or ())
        mode = " (fail-open)" if self.selection and self.selection.fail_open else ""
        return (f"steering 127.0.0.1:{self.config.port} via {self.datapath.name if self.datapath else '?'} "
                f"to {n} backend{'s' if n != 1 else ''}{mode}")

    def _heartbeat(self) -> None:
        """/healthz's heartbeat: only while the writer answers too. A writer
        stuck in one kernel call for WRITER_STUCK_AFTER cannot write a
        failover: the daemon is not alive for what it is for."""
        busy = self.writer.busy_for()
        if busy is not None and busy > WRITER_STUCK_AFTER:
            if not self._writer_stuck:
                self._writer_stuck = True
                self.log.error("writer_stuck", busy_for_s=round(busy, 1), calls=self.writer.stats()["calls"])
            return
        if self._writer_stuck:
            self._writer_stuck = False
            self.log.info("writer_answers_again")
        if self.metrics is not None:
            self.metrics.heartbeat()

    async def _sleep_or_stop(self, seconds: float) -> None:
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._stop.wait(), seconds)

    # ---- discovery ---------------------------------------------------------

    def make_watcher(self, config: Config) -> EndpointSliceWatcher | None:
        d = config.discovery
        if not d.enabled:
            return None
        return EndpointSliceWatcher(
            d.kubeconfig, f"https://127.0.0.1:{config.port}", namespace=d.namespace, service=d.service,
            cache_file=config.discovery_cache_file, log=self.log, context=d.context,
            tls_server_name=d.tls_server_name, watch_timeout=d.watch_timeout,
        )

    def start_discovery(self) -> None:
        if self.watcher is not None and self._watch_task is None:
            self._watch_task = asyncio.create_task(self.watcher.run(self._on_discovered))

    async def stop_discovery(self) -> None:
        task, self._watch_task = self._watch_task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def _on_discovered(self, specs: list[EndpointSpec]) -> None:
        """The watcher's callback (never called with an empty list)."""
        self.targets.set_discovered(specs)
        if self.select():
            self.apply()
        self.write_state()

    async def _resolve_and_apply(self) -> None:
        await self.targets.resolve_all()
        if self.select():
            self.apply()
            self.write_state()

    # ---- selection, and what the kernel should hold ------------------------

    def select(self) -> bool:
        """Recompute the selection; True when the backend set changed."""
        families = self.dp_cls.families if self.dp_cls else frozenset({4, 6})
        new = select(self.targets.candidates(), families)
        old = self.selection
        self.selection = new
        if old is not None and new.fail_open_families != old.fail_open_families and not new.fail_open:
            for fam in set(new.fail_open_families) - set(old.fail_open_families):
                self.log.warn("family_fail_open", family=f"ipv{fam}",
                              reason=f"no healthy IPv{fam} backend: steering IPv{fam} clients to every known one")
        if old is not None and new.fail_open != old.fail_open:
            if new.fail_open:
                self.log.warn("fail_open", reason="no healthy backend: steering to every known backend")
            else:
                self.log.info("fail_open_ended")
        return old is None or old.backends != new.backends

    def apply(self, force: bool = False, close: list[Backend] | None = None) -> None:
        """Hand the selection to the writer (marks it dirty, returns at
        once), with the dead backends whose connections go after the write.
        Before the data path is started there is nothing to write to: the
        start writes the selection of its moment."""
        if self.datapath is None or self.selection is None:
            return
        self.writer.want(self.selection.backends, close or (), force, syn_rto=self.syn_rto())

    def syn_rto(self) -> dict[Backend, int]:
        """The initial SYN RTO (ms) per backend the writer should have: from
        the probes' latencies (core/rto.py); remembered, so that only a
        change is handed over."""
        self._syn_rto = self.targets.syn_rto()
        return self._syn_rto

    # ---- the writer's events (on the event loop) ------------------------------

    def written(self, backends: tuple[Backend, ...], seconds: float | None, wrote: bool, how: str) -> None:
        if how == "repaired" and wrote:
            self.log.warn("repaired", reason="kernel state differed from the selection")
        if how == "syn_rto":  # the same set, new timers: not a set change
            if wrote:
                self.log.info("syn_rto_written", syn_rto_ms=",".join(f"{b}={ms}" for b, ms in sorted(
                    self._syn_rto.items(), key=lambda kv: str(kv[0]))))
            return
        changed = backends != self.applied
        if wrote:
            self.record_write(backends, seconds)
        self.applied = backends
        if changed or wrote:
            self.write_state()

    def record_write(self, backends: tuple[Backend, ...], seconds: float | None) -> None:
        """`seconds`: how long the write took; None when it was not timed."""
        failover = self.applied is not None and bool(set(self.applied) - set(backends))
        if failover:
            self.stats.failovers += 1
        if self.metrics is not None:
            self.metrics.observe_kernel_write(seconds, failover=failover)
        self.applied = backends
        self.stats.kernel_writes += 1
        self.stats.last_write_wall = time.time()
        self.stats.last_write_seconds = seconds
        sel = self.selection
        modes = ",".join(f"ipv{f}:{s.mode}" for f, s in sel.by_family.items()) if sel else ""
        self.log.info("set_written", backends=",".join(map(str, backends)), selection=modes,
                      duration_ms=None if seconds is None else round(seconds * 1000, 3))
        if self.datapath is not None:
            sdnotify.notify(STATUS=self._steering_status())

    def write_failed(self, backends: tuple[Backend, ...], error: str, retry_in: float) -> None:
        self.stats.kernel_write_errors += 1
        if self.metrics is not None:
            self.metrics.observe_kernel_write_error()
        self.log.error("write_failed", error=error, backends=",".join(map(str, backends)),
                       retry_in_s=round(retry_in, 2))

    def closed(self, backends: tuple[Backend, ...], count: int, seconds: float) -> None:
        """Connections steered to dead backends were aborted: a client blocked
        on a black-holed or frozen API server would otherwise hang until its
        own timeouts (client-go: 30 s + 15 s). Draining backends are never
        closed: their connections finish on their own."""
        self.stats.connections_closed += count
        if self.metrics is not None:
            self.metrics.observe_connections_closed(count)
        self.log.info("connections_closed", backends=",".join(map(str, backends)), count=count,
                      duration_ms=round(seconds * 1000, 3))

    def close_failed(self, backends: tuple[Backend, ...], error: str) -> None:
        self.log.error("close_connections_failed", backends=",".join(map(str, backends)), error=error)

    def passive_counts(self, counts: Mapping[Backend, PassiveCounts], generation: int) -> None:
        """The kernel's outcome counters of steered connects: each new failure
        is confirmed at once (a refused backend is out within milliseconds, a
        black-holed one as soon as its first SYN is retransmitted: after the
        backend's initial SYN RTO on eBPF, 100 ms for a near one; 1 s on nftables)."""
        if generation != self._passive_generation:
            self._passive_generation = generation
            self.passive.reset()
        for f in self.passive.new_failures(counts):
            self.targets.kernel_saw_failure(f.backend, f.saw, f.refused, f.syn_timeouts)

    def log_event(self, level: str, event: str, fields: dict[str, Any]) -> None:
        getattr(self.log, level)(event, **fields)

    # ---- the main loop ----------------------------------------------------------

    def _take_results(self, first: tuple[Backend, ProbeResult, str | None]) -> None:
        batch = [first]
        while not self.targets.results.empty():  # coalesce a burst into one write
            batch.append(self.targets.results.get_nowait())
        changes: list[Change] = []
        for backend, result, passive in batch:
            changes += self.targets.observe(backend, result, passive)
        if not changes:
            rto = self.targets.syn_rto()
            if self.datapath is not None and rto != self._syn_rto:
                self._syn_rto = rto
                self.writer.want(None, syn_rto=rto)  # a latency moved: the timers follow
            return
        self.select()
        # The dead backends' connections are closed by the writer after the
        # write, so that a client whose connection is aborted retries onto
        # the new set.
        self.apply(close=[c.backend for c in changes if c.dead])
        self.write_state()  # up/down/tier: `status` shows it at once

    async def _main_loop(self) -> None:
        loop = asyncio.get_running_loop()
        next_resolve = loop.time() + self.config.resolve_interval
        next_state = loop.time()
        has_names = any(s.is_name for s in self.config.endpoints)
        stop_wait = asyncio.ensure_future(self._stop.wait())
        resolving: asyncio.Task | None = None
        try:
            while not self._stop.is_set():
                self._heartbeat()
                now = loop.time()
                wake = min(next_state, next_resolve if has_names else now + 60)
                get = asyncio.ensure_future(self.targets.results.get())
                reload_wait = asyncio.ensure_future(self._reload_requested.wait())
                done, _ = await asyncio.wait({get, stop_wait, reload_wait}, timeout=max(0.0, wake - now),
                                             return_when=asyncio.FIRST_COMPLETED)
                reload_wait.cancel()
                if get in done:
                    self._take_results(get.result())
                else:
                    get.cancel()
                if self._reload_requested.is_set():
                    self._reload_requested.clear()
                    await reload(self)
                    has_names = any(s.is_name for s in self.config.endpoints)
                now = loop.time()
                if has_names and now >= next_resolve and (resolving is None or resolving.done()):
                    # In the background: probe results (failover) never wait for DNS.
                    next_resolve = now + self.config.resolve_interval
                    resolving = asyncio.create_task(self._resolve_and_apply())
                if now >= next_state:
                    self.write_state()
                    next_state = now + STATE_WRITE_EVERY
        finally:
            stop_wait.cancel()
            if resolving is not None:
                resolving.cancel()

    # ---- state for `status` ---------------------------------------------

    def snapshot(self) -> dict:
        return snapshot(self)

    def write_state(self) -> None:
        snap = self.snapshot()
        if self.metrics is not None:
            self.metrics.publish(snap)  # a new dict each time, never changed after this
        try:
            write_state(self.config.state_dir, snap)
        except OSError as e:
            self.log.warn("state_write_failed", error=str(e))
