"""The daemon: probe -> select -> apply.

Startup: take the lock, choose the data path, resolve the endpoints, run one
round of probes (bounded by the probe timeout), then install or adopt the data
path with the first selection. An adopted data path keeps steering with what
it holds until that first selection is written, so a restart has no gap.
Then READY=1 goes to systemd (sd_notify, unit Type=notify).

Never a crash loop, never a flip (issue 9):
* `auto` keeps the data path this instance already has in the kernel
  (datapath.decide); nothing is compiled or loaded to adopt a current one.
* When choosing or installing fails, the daemon stays up and tries again
  after 1 s, doubling to 60 s (jittered), logging each failure
  (`datapath_start_failed`), counting it (metrics) and showing it in
  `status`, while whatever the kernel holds keeps steering. It probes all
  along, so the first write after a success uses fresh health.
* Under `auto`, a failed eBPF install falls back to nftables at once
  (`datapath_fallback`), but only when nothing of this instance was in the
  kernel: an installed eBPF path is never switched away from, and the host
  sysctls the nftables path sets are never touched for it.

Stopping (SIGTERM/SIGINT) leaves the data path in place: the node keeps its
API access while the daemon restarts or is upgraded. `cleanup_on_exit`
removes it instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import time
from collections.abc import Callable

from prism_kernel import __version__
from prism_kernel.config import Config
from prism_kernel.control import sdnotify
from prism_kernel.control.passive import PassiveFeedback
from prism_kernel.control.reload import reload, settings_of
from prism_kernel.control.runstate import DaemonLock, remove_state, write_state
from prism_kernel.control.snapshot import DaemonStats, snapshot
from prism_kernel.control.targets import Targets
from prism_kernel.core.health import Change, ProbeResult
from prism_kernel.core.model import Backend
from prism_kernel.core.selection import FullSelection, select
from prism_kernel.datapath import ALL as ALL_DATAPATHS
from prism_kernel.datapath import Choice, Datapath, datapath_class, decide, installed
from prism_kernel.errors import DatapathError, DatapathUnavailable, PrismError
from prism_kernel.log import EventLog
from prism_kernel.observe.metrics import Metrics, MetricsServer, datapath_readers
from prism_kernel.sources.discovery import EndpointSliceWatcher
from prism_kernel.sources.endpoints import EndpointSpec

STATE_WRITE_EVERY = 2.0  # seconds: latency figures in the state file refresh this often
RECONCILE_EVERY = 10.0  # seconds: re-assert the set, repairs state removed behind our back
PASSIVE_POLL_EVERY = 0.1  # seconds: reading the kernel's outcome counters costs a few syscalls
# Retrying a data-path start that failed: 1 s, doubling to 60 s, each +-20 %.
START_RETRY_MIN = 1.0
START_RETRY_MAX = 60.0
START_RETRY_JITTER = 0.2


def start_retry_delay(failures: int, rand: Callable[[float, float], float] = random.uniform) -> float:
    """Seconds to wait after the `failures`-th consecutive failed start."""
    base = min(START_RETRY_MAX, START_RETRY_MIN * 2 ** max(0, failures - 1))
    return min(START_RETRY_MAX, base * rand(1 - START_RETRY_JITTER, 1 + START_RETRY_JITTER))


def _err(e: BaseException) -> str:
    return str(e) if isinstance(e, PrismError) else f"{type(e).__name__}: {e}"


class Daemon:
    def __init__(self, config: Config, log: EventLog, reload_config: Callable[[], Config] | None = None):
        self.config = config
        self.log = log
        # Re-reads the file and the flags (SIGHUP); None: reload unsupported.
        self.reload_config = reload_config
        self.settings = settings_of(config)
        self.metrics: Metrics | None = None
        self.metrics_server: MetricsServer | None = None
        if config.metrics.enabled:
            self.metrics = Metrics(heartbeat_timeout=config.metrics.heartbeat_timeout)
        self.targets = Targets(config, log, self.metrics)
        self.passive = PassiveFeedback()
        self.datapath: Datapath | None = None
        self.datapath_reason = ""
        self.dp_cls: type[Datapath] | None = None
        self.selection: FullSelection | None = None
        self.applied: tuple[Backend, ...] | None = None
        self.apply_pending = False
        self.stats = DaemonStats()
        self._stop = asyncio.Event()
        self._reload_requested = asyncio.Event()
        self._choice: Choice | None = None
        self._other_removal_failed: type[Datapath] | None = None  # retried by _reconcile
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
            self.metrics_server = MetricsServer(self.metrics, self.config.metrics.address, self.config.metrics.port)
            try:
                self.metrics_server.start()
            except BaseException:
                lock.release()
                raise
            self.log.info("metrics_listening", address=self.metrics_server.address)
        loop = asyncio.get_running_loop()
        for sig, name in ((signal.SIGTERM, "SIGTERM"), (signal.SIGINT, "SIGINT")):
            loop.add_signal_handler(sig, self.request_stop, name)
        loop.add_signal_handler(signal.SIGHUP, self._reload_requested.set)
        try:
            if not await self._choose():
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
            if not await self._start_datapath():
                return 0
            # Load the netlink code (pyroute2's message classes) now, not on
            # the first failover: it takes ~90 ms to import, which would
            # delay the first abort of dead connections (+~10 MB RSS).
            import prism_kernel.datapath.netlink  # noqa: F401
            # An adopted data path may hold connections to a backend that
            # died while no daemon ran.
            self._close_dead(self.targets.dead())
            self.write_state()
            # systemd: the steering is in place (units ordered after this one start now).
            sdnotify.notify(READY=1, STATUS=self._steering_status())
            # Only now: discovery goes through 127.0.0.1:PORT, which steers from here on.
            self.start_discovery()
            await self._main_loop()
            return 0
        finally:
            await self.stop_discovery()
            if self.metrics_server is not None:
                self.metrics_server.stop()
            await self.targets.close()
            if self.datapath is not None:
                self.datapath.close()
            if self.config.cleanup_on_exit and self.dp_cls is not None:
                for line in self.dp_cls.cleanup(self.settings):
                    self.log.info("cleanup", removed=line)
            remove_state(self.config.state_dir)
            lock.release()
            self.log.info("stopped", datapath_left_in_place=not self.config.cleanup_on_exit)

    # ---- starting the data path (never a crash loop, never a flip) ---------

    def _take_choice(self, choice: Choice) -> None:
        self._choice = choice
        self.dp_cls, self.datapath_reason = choice.cls, choice.why
        if self.metrics is not None:
            self.metrics.set_kernel_readers(*datapath_readers(choice.cls, self.settings))
        if choice.fell_back_from is not None:
            self._fell_back(choice.fell_back_from, choice.cls.name, "unavailable", choice.unavailable or "")

    def _fell_back(self, frm: str, to: str, reason: str, error: str) -> None:
        self.stats.fallback = f"{frm} -> {to}: {error}"
        self.log.warn("datapath_fallback", **{"from": frm, "to": to}, reason=reason, error=error)
        if self.metrics is not None:
            self.metrics.observe_datapath_fallback(frm, to, reason)

    async def _choose(self) -> bool:
        """decide() until it finds a data path (retrying with backoff); False
        when stopped first. In a thread: a check may take a while (the
        event loop keeps serving /healthz and, later, the probes)."""
        while not self._stop.is_set():
            try:
                choice = await asyncio.to_thread(decide, self.config.datapath, self.settings)
            except Exception as e:  # noqa: BLE001 - never a crash loop: retried
                await self._start_failed("choose", self.config.datapath, e)
                continue
            self._take_choice(choice)
            return True
        return False

    async def _start_datapath(self) -> bool:
        """Install (or adopt) the chosen data path and write the first set,
        retrying with backoff until it works; False when stopped first."""
        while not self._stop.is_set():
            if self.dp_cls is None and not await self._choose():
                return False
            cls = self.dp_cls
            assert cls is not None and self._choice is not None
            failed = cls.name
            try:
                await self._install_and_write(cls)
                return True
            except Exception as e:  # noqa: BLE001 - never a crash loop: retried or fallen back
                error = e
            if self._may_fall_back(cls):
                self._fell_back(cls.name, "nftables", "install_failed", _err(error))
                try:
                    nft = datapath_class("nftables")
                    await asyncio.to_thread(nft.check_available, self.settings)
                    self.dp_cls = nft
                    self.datapath_reason = f"auto: eBPF install failed ({_err(error)}); using nftables"
                    if self.metrics is not None:
                        self.metrics.set_kernel_readers(*datapath_readers(nft, self.settings))
                    await self._install_and_write(nft)
                    return True
                except Exception as e:  # noqa: BLE001
                    failed, error = "nftables", e
            await self._start_failed("install", failed, error)
            if self._choice.installed is None:
                self.dp_cls = None  # nothing of ours in the kernel: choose afresh next time
        return False

    def _may_fall_back(self, failed: type[Datapath]) -> bool:
        """Only `auto`, only from eBPF, and only when this instance had no data
        path in the kernel before the attempt, nor has one attached after it:
        an installed eBPF path is never switched away from."""
        if self.config.datapath != "auto" or failed.name != "ebpf" or self._choice is None:
            return False
        if self._choice.installed is not None:
            return False
        now = installed(self.settings)
        return now is None or now[0] != "ebpf"

    async def _install_and_write(self, cls: type[Datapath]) -> None:
        """install() (which adopts a current installed path without loading
        anything), then the first set written; self.datapath only on success."""
        self.dp_cls = cls
        self.select()
        assert self.selection is not None
        backends = self.selection.backends
        if not backends:
            raise PrismError(
                f"no endpoint has an address the {cls.name} data path can steer to "
                f"(it steers IPv{'/IPv'.join(map(str, sorted(cls.families)))}); "
                f"known addresses: {', '.join(map(str, self.targets.by_backend)) or 'none'}")
        sdnotify.notify(STATUS=f"installing the {cls.name} data path")
        dp = cls(self.settings)
        try:
            # In a thread: an install may load programs in a child; the event
            # loop keeps the probe tasks turning meanwhile.
            adopted = await asyncio.to_thread(dp.install, backends)
            seconds = None
            if adopted:
                # The adopted path steers to what it held: write the selection.
                start = time.monotonic()
                written = await asyncio.to_thread(dp.apply, backends)
                seconds = time.monotonic() - start if written else None
        except BaseException:
            dp.close()
            raise
        self.datapath = dp
        if not adopted or seconds is not None:
            self._record_write(backends, seconds)
        self.applied = backends
        self.apply_pending = False
        self.stats.start_failures_in_a_row = 0
        self.stats.next_start_attempt_wall = None
        loaded = getattr(dp, "last_load", None) or {}  # eBPF: which loader, why, its cost
        self.log.info("datapath_ready", datapath=cls.name, adopted=adopted,
                      **{k: loaded[k] for k in ("loader", "why", "load_s", "maxrss_kb") if k in loaded})
        self.remove_other_datapaths(cls)

    async def _start_failed(self, stage: str, datapath: str, error: BaseException) -> None:
        """Log, count and show a failed start, then wait (probing) before the next try."""
        st = self.stats
        st.start_failures += 1
        st.start_failures_in_a_row += 1
        delay = start_retry_delay(st.start_failures_in_a_row)
        st.last_start_error = f"{stage} {datapath}: {_err(error)}"
        st.last_start_failure_wall = time.time()
        st.next_start_attempt_wall = time.time() + delay
        present = installed(self.settings)
        self.log.error("datapath_start_failed", stage=stage, datapath=datapath, error=_err(error),
                       attempt=st.start_failures_in_a_row, retry_in_s=round(delay, 2),
                       kernel=(f"the installed {present[0]} data path keeps steering ({present[1]})"
                               if present else "nothing of this instance in the kernel"))
        if self.metrics is not None:
            self.metrics.observe_datapath_start_failure(stage)
        self.write_state()
        sdnotify.notify(STATUS=f"data path start failed {st.start_failures_in_a_row}x ({stage} {datapath}: "
                               f"{_err(error)}); retrying in {delay:.0f}s")
        await self._pause_starting(delay)

    async def _pause_starting(self, seconds: float) -> None:
        """Wait `seconds` (or until stopped) while taking probe results in,
        so the next attempt writes what the probes say now."""
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

    def remove_other_datapaths(self, chosen: type[Datapath]) -> None:
        """A node switched between data paths must not be steered by both.
        Every removal is logged, and so is every failure (then retried by
        the reconcile loop)."""
        failed = False
        for name in ALL_DATAPATHS:
            if name == chosen.name:
                continue
            try:
                removed = datapath_class(name).cleanup(self.settings)
            except DatapathUnavailable as e:
                # Its module cannot load here: it cannot have installed anything either.
                self.log.info("other_datapath_absent", datapath=name, reason=e.reason)
                continue
            except Exception as e:  # noqa: BLE001 - logged, retried
                failed = True
                self.log.error("remove_other_datapath_failed", datapath=name, error=_err(e),
                               action="retrying every reconcile")
                continue
            for line in removed:
                self.log.info("removed_other_datapath", datapath=name, removed=line)
        self._other_removal_failed = chosen if failed else None

    def _heartbeat(self) -> None:
        if self.metrics is not None:
            self.metrics.heartbeat()

    async def _sleep_or_stop(self, seconds: float) -> None:
        try:
            await asyncio.wait_for(self._stop.wait(), seconds)
        except asyncio.TimeoutError:
            pass

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
        if self.datapath is not None and self.select():
            self.apply()
        self.write_state()

    async def _resolve_and_apply(self) -> None:
        await self.targets.resolve_all()
        if self.select():
            self.apply()
            self.write_state()

    # ---- selection and the kernel ---------------------------------------

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

    def apply(self, force: bool = False) -> None:
        assert self.datapath is not None and self.selection is not None
        backends = self.selection.backends
        if not backends:
            # Never write an empty set (selection only returns one when no
            # backend of a steerable family is known at all).
            self.log.error("no_steerable_backends", families=",".join(map(str, sorted(self.datapath.families))))
            return
        if not force and backends == self.applied and not self.apply_pending:
            return
        start = time.monotonic()
        try:
            written = self.datapath.apply(backends)
        except DatapathError as e:
            self.stats.kernel_write_errors += 1
            if self.metrics is not None:
                self.metrics.observe_kernel_write_error()
            self.apply_pending = True
            self.log.error("write_failed", error=str(e), backends=",".join(map(str, backends)))
            return
        self.apply_pending = False
        if written:
            self._record_write(backends, time.monotonic() - start)
        self.applied = backends

    def _record_write(self, backends: tuple[Backend, ...], seconds: float | None) -> None:
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

    def _close_dead(self, backends: list[Backend]) -> None:
        """Abort the connections steered to dead backends: a client blocked
        on a black-holed or frozen API server would otherwise hang until its
        own timeouts (client-go: 30 s + 15 s). Draining backends are never
        passed here: their connections finish on their own."""
        if not backends or self.datapath is None:
            return
        start = time.monotonic()
        try:
            n = self.datapath.close_connections(backends)
        except DatapathError as e:
            self.log.error("close_connections_failed", backends=",".join(map(str, backends)), error=str(e))
            return
        self.stats.connections_closed += n
        if self.metrics is not None:
            self.metrics.observe_connections_closed(n)
        self.log.info("connections_closed", backends=",".join(map(str, backends)), count=n,
                      duration_ms=round((time.monotonic() - start) * 1000, 3))

    async def _passive_loop_supervised(self) -> None:
        """The passive loop, restarted if it ever fails: losing it would
        silently slow every failover down to the probe interval."""
        while True:
            try:
                await self._passive_loop()
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001
                self.log.error("passive_loop_failed", error=f"{type(e).__name__}: {e}", action="restarting in 1 s")
                await asyncio.sleep(1.0)

    async def _passive_loop(self) -> None:
        """Poll the kernel's per-backend outcome counters of steered connects
        and confirm each new failure with an immediate connect: a refused
        backend is out within milliseconds, a black-holed one as soon as its
        first SYN is retransmitted (~1 s)."""
        assert self.datapath is not None
        while True:
            await asyncio.sleep(PASSIVE_POLL_EVERY)
            try:
                counts = self.datapath.passive_failures()
            except (DatapathError, OSError) as e:
                self.log.warn("passive_read_failed", error=str(e))
                await asyncio.sleep(5)
                continue
            for f in self.passive.new_failures(counts):
                self.targets.kernel_saw_failure(f.backend, f.saw, f.refused, f.syn_timeouts)

    async def _reconcile(self) -> None:
        """Re-assert the set: repairs kernel state changed behind our back (a
        flushed table, a detached program). apply() writes only on a
        difference, so this is free when nothing drifted."""
        assert self.datapath is not None and self.selection is not None
        if self._other_removal_failed is not None:
            self.remove_other_datapaths(self._other_removal_failed)
        try:
            if self.datapath.apply(self.selection.backends):
                self.log.warn("repaired", reason="kernel state differed from the selection")
                self._record_write(self.selection.backends, None)
        except DatapathError as e:
            self.log.warn("reinstall", reason=str(e))
            backends = self.selection.backends
            try:
                # In a thread: an eBPF install may compile (~1 s); the event
                # loop (probes, metrics, heartbeat) keeps turning.
                await asyncio.to_thread(self.datapath.install, backends)
                await asyncio.to_thread(self.datapath.apply, backends)
                self._record_write(backends, None)
            except DatapathError as e2:
                self.log.error("reinstall_failed", error=str(e2))

    async def _main_loop(self) -> None:
        loop = asyncio.get_running_loop()
        next_resolve = loop.time() + self.config.resolve_interval
        next_state = loop.time()
        next_reconcile = loop.time() + RECONCILE_EVERY
        has_names = any(s.is_name for s in self.config.endpoints)
        stop_wait = asyncio.ensure_future(self._stop.wait())
        passive_task = asyncio.create_task(self._passive_loop_supervised())
        resolving: asyncio.Task | None = None
        try:
            while not self._stop.is_set():
                self._heartbeat()
                now = loop.time()
                wake = min(next_state, next_reconcile, next_resolve if has_names else now + 60)
                get = asyncio.ensure_future(self.targets.results.get())
                reload_wait = asyncio.ensure_future(self._reload_requested.wait())
                done, _ = await asyncio.wait({get, stop_wait, reload_wait}, timeout=max(0.0, wake - now),
                                             return_when=asyncio.FIRST_COMPLETED)
                reload_wait.cancel()
                if get in done:
                    batch = [get.result()]
                    while not self.targets.results.empty():  # coalesce a burst into one write
                        batch.append(self.targets.results.get_nowait())
                    changes: list[Change] = []
                    for backend, result, passive in batch:
                        changes += self.targets.observe(backend, result, passive)
                    if changes and self.select():
                        self.apply()
                    elif self.apply_pending:
                        self.apply()
                    # After the write, so that a client whose connection is
                    # aborted retries onto the new set.
                    self._close_dead([c.backend for c in changes if c.dead])
                    if changes:  # up/down/tier: `status` shows it at once
                        self.write_state()
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
                if now >= next_reconcile:
                    next_reconcile = now + RECONCILE_EVERY
                    await self._reconcile()
                if now >= next_state:
                    self.write_state()
                    next_state = now + STATE_WRITE_EVERY
        finally:
            stop_wait.cancel()
            passive_task.cancel()
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
