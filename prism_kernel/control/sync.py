"""The single writer: the one thread that calls the kernel.

In the shape of kube-proxy's BoundedFrequencyRunner driving syncProxyRules
(docs/design/one-writer.md). The event loop owns the daemon's state and never
calls the kernel; it marks what it wants dirty (`want`: the set to steer to,
the dead backends whose connections go) or queues a request (`run`: start,
reload's swap, removing the other data path, a query, a scrape's read). This
thread syncs at once on a dirty mark (marks that arrive meanwhile coalesce:
one write of the latest set, then the closes), polls the passive counters
every 50 ms, re-asserts the set every 10 s, and retries a failed write with
a backoff. Outcomes go back to the loop as WriterEvents calls
(call_soon_threadsafe).

Invariant: every call into a data path goes through `_call`, which counts
it, refuses it off this thread (a counted violation) and turns an OSError
into a DatapathError. Only a request's own failure reaches the loop (through
its future); the thread itself never dies.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from prism_kernel.core.model import Backend
from prism_kernel.datapath import ALL as ALL_DATAPATHS
from prism_kernel.datapath import Datapath, DatapathSettings, datapath_class
from prism_kernel.datapath.base import KernelState, PassiveCounts, import_netlink
from prism_kernel.errors import DatapathError, DatapathUnavailable, describe

# Seconds between reads of the kernel's outcome counters (a few syscalls,
# ~0.1 ms): with a 100 ms initial SYN RTO a black hole is seen 100 ms after
# the SYN, and this poll plus the confirmation come on top of it.
PASSIVE_POLL_EVERY = 0.05
PASSIVE_RETRY_AFTER = 5.0  # seconds after a failed read
RECONCILE_EVERY = 10.0  # seconds: re-assert the set, repairs state removed behind our back
RETRY_MIN = 0.2  # seconds before retrying a failed write, doubling ...
RETRY_MAX = 10.0  # ... up to this
REINSTALL_AFTER = 3  # failed retries of a write before the data path is installed again
SCRAPE_TIMEOUT = 5.0  # seconds a metrics scrape waits for a kernel read
STOP_TIMEOUT = 60.0  # seconds the daemon waits for the writer's last job at exit


@dataclass(frozen=True)
class InstalledDatapath:
    """What the event loop knows of the installed data path: a description,
    never the kernel object (that stays on the writer thread)."""

    name: str
    families: frozenset[int]
    last_load: dict[str, Any] = field(default_factory=dict)  # eBPF: which loader, why, its cost


@dataclass(frozen=True)
class Started:
    info: InstalledDatapath
    adopted: bool
    wrote: bool  # the first set is in the kernel by our write (install, or apply after adopting)
    seconds: float | None  # how long the write took, when it was timed


class WriterEvents(Protocol):
    """What the writer reports; each method runs on the event loop."""

    def written(self, backends: tuple[Backend, ...], seconds: float | None, wrote: bool, how: str) -> None:
        """The kernel holds `backends` (`wrote`: by this write; `how`: sync,
        retry, repaired, reinstalled)."""

    def write_failed(self, backends: tuple[Backend, ...], error: str, retry_in: float) -> None: ...

    def closed(self, backends: tuple[Backend, ...], count: int, seconds: float) -> None: ...

    def close_failed(self, backends: tuple[Backend, ...], error: str) -> None: ...

    def passive_counts(self, counts: Mapping[Backend, PassiveCounts], generation: int) -> None:
        """Fresh counters (only when they changed); a new `generation` is a
        new data-path object, whose counters start afresh."""

    def log_event(self, level: str, event: str, fields: dict[str, Any]) -> None: ...


@dataclass
class _Want:
    backends: tuple[Backend, ...] | None = None
    syn_rto: dict[Backend, int] | None = None  # None: unchanged
    close: list[Backend] = field(default_factory=list)
    force: bool = False
    dirty: bool = False


class KernelWriter:
    def __init__(self, events: WriterEvents, clock: Callable[[], float] = time.monotonic,
                 passive_every: float = PASSIVE_POLL_EVERY, reconcile_every: float = RECONCILE_EVERY,
                 retry_min: float = RETRY_MIN, retry_max: float = RETRY_MAX,
                 datapaths: Sequence[str] = ALL_DATAPATHS,
                 datapath_class: Callable[[str], type[Datapath]] = datapath_class):
        """`datapaths` and `datapath_class`: every data path there is, to
        remove the ones not chosen (tests pass fakes)."""
        self.events = events
        self._datapaths, self._datapath_class = tuple(datapaths), datapath_class
        self._clock = clock
        self._passive_every, self._reconcile_every = passive_every, reconcile_every
        self._retry_min, self._retry_max = retry_min, retry_max
        self._cv = threading.Condition()
        # Guarded by _cv: what the loop hands over, and the counters it reads.
        self._want = _Want()
        self._jobs: collections.deque[tuple[concurrent.futures.Future, Callable[[], Any]]] = collections.deque()
        self._calls: collections.Counter[str] = collections.Counter()
        self._off_thread = 0
        self._exit = False
        self._stopped = False  # guarded by _cv: no request is taken any more
        self._busy_since: float | None = None
        # Writer thread only.
        self._dp: Datapath | None = None
        self._applied: tuple[Backend, ...] | None = None
        self._close_after_write: list[Backend] = []  # dead backends whose closes wait for a write that works
        self._failed_in_a_row = 0
        self._syn_rto: dict[Backend, int] = {}  # given to every data-path object this thread opens
        self._pending = False  # the last write failed: retried at _retry_at
        self._retry_at: float | None = None
        self._backoff = retry_min
        self._passive_at: float | None = None
        self._reconcile_at: float | None = None
        self._generation = 0
        self._posted_passive: Mapping[Backend, PassiveCounts] | None = None
        self._last_passive: Mapping[Backend, PassiveCounts] | None = None  # for a scrape
        self._reader: tuple[type[Datapath], DatapathSettings] | None = None
        self._other_removal: tuple[str, DatapathSettings] | None = None  # retried every reconcile
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ident: int | None = None

    # ---- the event loop's side ----------------------------------------------

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._thread = threading.Thread(target=self._main, name="prism-kernel-writer", daemon=True)
        self._thread.start()

    def want(self, backends: Sequence[Backend] | None, close: Sequence[Backend] = (), force: bool = False,
             syn_rto: Mapping[Backend, int] | None = None) -> None:
        """Mark dirty: the kernel should steer to `backends` (None: unchanged)
        with the initial SYN RTO (ms) of `syn_rto` per backend (None:
        unchanged; core/rto.py), and the connections to `close` go, after
        that write. Returns at once."""
        with self._cv:
            w = self._want
            if backends is not None:
                w.backends = tuple(backends)
            if syn_rto is not None:
                w.syn_rto = dict(syn_rto)
            w.close.extend(b for b in close if b not in w.close)
            w.force |= force
            w.dirty = True
            self._cv.notify()

    def submit(self, fn: Callable[..., Any], *args: Any) -> concurrent.futures.Future:
        """Queue a request: `fn` (a request method of this writer, below) runs
        on the writer thread; its result or exception comes in the future."""
        fut: concurrent.futures.Future = concurrent.futures.Future()
        with self._cv:
            gone = self._stopped or (self._thread is not None and not self._thread.is_alive())
            if not gone:
                self._jobs.append((fut, lambda: fn(*args)))
                self._cv.notify()
        if gone:
            fut.set_exception(DatapathError("the kernel writer has stopped"))
        return fut

    async def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.wrap_future(self.submit(fn, *args))

    async def stop(self, cleanup: tuple[type[Datapath], DatapathSettings] | None) -> list[str]:
        """The last request: release the data path's descriptors (the kernel
        state stays) or, with `cleanup`, remove it; then the thread ends."""
        with self._cv:
            if self._stopped:
                return []
        fut = self.submit(self._stop, cleanup)
        try:
            return await asyncio.wait_for(asyncio.wrap_future(fut), STOP_TIMEOUT)
        finally:
            if self._thread is not None:
                self._thread.join(1.0)

    def busy_for(self) -> float | None:
        """Seconds the writer has been in its current operation; None when idle."""
        with self._cv:
            return None if self._busy_since is None else self._clock() - self._busy_since

    def stats(self) -> dict[str, Any]:
        """For the state file: every kernel call by operation, and how many
        came from another thread (refused; there must be none)."""
        with self._cv:
            busy = None if self._busy_since is None else round(self._clock() - self._busy_since, 3)
            return {"thread": "prism-kernel-writer", "calls": dict(sorted(self._calls.items())),
                    "off_thread_calls": self._off_thread, "busy_for_s": busy}

    # Metrics scrapes (their HTTP threads): through the writer, never a kernel call of their own.

    def set_reader(self, cls: type[Datapath], settings: DatapathSettings) -> None:
        """What a scrape reads before a data path is installed (the chosen one)."""
        with self._cv:
            self._reader = (cls, settings)

    def scrape_state(self) -> KernelState:
        return self.submit(self._read_state).result(SCRAPE_TIMEOUT)

    def scrape_passive(self) -> Mapping[Backend, PassiveCounts]:
        last = self._last_passive  # one reference read: the writer replaces it, never changes it
        if last is not None:
            return last
        return self.submit(self._read_passive).result(SCRAPE_TIMEOUT)

    # ---- the writer thread ----------------------------------------------------

    def _post(self, fn: Callable[..., None], *args: Any) -> None:
        loop = self._loop
        if loop is None:
            return
        try:
            loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:
            pass  # the loop is closed: the daemon is gone

    def _log(self, level: str, event: str, **fields: Any) -> None:
        self._post(self.events.log_event, level, event, fields)

    def _call(self, op: str, fn: Callable[..., Any], *args: Any) -> Any:
        """Every call into a data path (and every kernel query: decide,
        cleanup, check_available) goes through here."""
        on_thread = threading.get_ident() == self._ident
        with self._cv:
            self._calls[op] += 1
            if not on_thread:
                self._off_thread += 1
        if not on_thread:
            where = threading.current_thread().name
            self._log("error", "kernel_call_off_writer_thread", op=op, thread=where)
            raise DatapathError(f"{op}: a kernel call from thread {where!r}, not the writer's: refused")
        try:
            return fn(*args)
        except OSError as e:
            raise DatapathError(f"{op}: {e}") from e

    def _main(self) -> None:
        self._ident = threading.get_ident()
        while True:
            with self._cv:
                while True:
                    now = self._clock()
                    if self._want.dirty or self._jobs:
                        break
                    due = self._next_due()
                    if due is not None and due <= now:
                        break
                    self._busy_since = None
                    self._cv.wait(None if due is None else due - now)
                self._busy_since = now
                job, want = None, None
                if self._want.dirty:
                    want, self._want = self._want, _Want(backends=self._want.backends, syn_rto=self._want.syn_rto)
                elif self._jobs:
                    job = self._jobs.popleft()
            try:
                if want is not None:
                    self._sync(want)
                elif job is not None:
                    fut, fn = job
                    if fut.set_running_or_notify_cancel():
                        try:
                            fut.set_result(fn())
                        except BaseException as e:  # noqa: BLE001 - the requester gets it
                            fut.set_exception(e)
                else:
                    self._timers(self._clock())
            except Exception as e:  # noqa: BLE001 - the writer never dies: logged, retried
                self._log("error", "writer_failed", error=describe(e), action="retrying")
                if want is not None and self._dp is not None:
                    self._failed(want.backends or self._applied or (), e)  # the sync is retried
            if self._exit:
                with self._cv:
                    self._busy_since = None
                    self._stopped = True
                    left, self._jobs = list(self._jobs), collections.deque()
                for fut, _fn in left:  # requests queued behind the stop: answered, never left hanging
                    if fut.set_running_or_notify_cancel():
                        fut.set_exception(DatapathError("the kernel writer has stopped"))
                return

    def _next_due(self) -> float | None:
        if self._dp is None:
            return None
        due = [t for t in (self._passive_at, self._reconcile_at, self._retry_at) if t is not None]
        return min(due) if due else None

    def _timers(self, now: float) -> None:
        """Each timer is moved on before its work runs, so a failure of any
        kind never makes it due again at once (the thread would spin)."""
        if self._retry_at is not None and now >= self._retry_at:
            self._retry_at = None
            self._repair(reconcile=False)
        if self._reconcile_at is not None and now >= self._reconcile_at:
            self._reconcile_at = now + self._reconcile_every
            if self._other_removal is not None:
                self.remove_others(*self._other_removal)
            self._repair(reconcile=True)
        if self._passive_at is not None and now >= self._passive_at:
            self._passive_at = now + PASSIVE_RETRY_AFTER  # until a read works
            self._poll_passive()

    # ---- the sync -------------------------------------------------------------

    def _sync(self, want: _Want) -> None:
        """The plan: write the wanted set when the kernel's differs (or a
        write failed, or a reload forces it), then close what is dead."""
        rto_changed = False
        if want.syn_rto is not None and want.syn_rto != self._syn_rto:
            if self._dp is None:
                self._syn_rto = want.syn_rto  # for the object the start opens
            else:
                try:
                    self._call("set_syn_rto", self._dp.set_syn_rto, want.syn_rto)
                    self._syn_rto, rto_changed = want.syn_rto, True
                except Exception as e:  # noqa: BLE001 - the set still goes in; the same timers are tried again next mark
                    self._log("error", "syn_rto_refused", error=describe(e))
        if self._dp is None:
            return  # not installed: the start request writes the set itself
        backends = want.backends
        written = not self._pending
        if backends is not None:
            if not backends:
                # Never an empty set (selection returns one only when no
                # backend of a steerable family is known at all).
                self._log("error", "no_steerable_backends",
                          families=",".join(map(str, sorted(self._dp.families))))
            elif want.force or rto_changed or backends != self._applied or self._pending:
                written = self._write(
                    backends, "retry" if self._pending else "syn_rto" if backends == self._applied else "sync")
        close = tuple(want.close)
        if close and written:
            self._close(close)
        elif close:
            # After a failed write the kernel may still steer to them: the
            # closes wait for the write that succeeds, so that an aborted
            # client reconnects onto the new set.
            self._close_after_write.extend(b for b in close if b not in self._close_after_write)

    def _write(self, backends: tuple[Backend, ...], how: str) -> bool:
        assert self._dp is not None
        t0 = self._clock()
        try:
            wrote = self._call("apply", self._dp.apply, backends)
        except Exception as e:  # noqa: BLE001 - any failure: the kernel's set is unknown, retried
            self._failed(backends, e)
            return False
        self._succeeded(backends)
        self._post(self.events.written, backends, self._clock() - t0 if wrote else None, bool(wrote), how)
        return True

    def _succeeded(self, backends: tuple[Backend, ...]) -> None:
        self._applied = backends
        self._pending = False
        self._retry_at = None
        self._backoff = self._retry_min
        self._failed_in_a_row = 0
        if self._close_after_write and self._dp is not None:
            close, self._close_after_write = tuple(self._close_after_write), []
            self._close(close)

    def _failed(self, backends: tuple[Backend, ...], error: BaseException) -> None:
        """A write that failed, possibly after its commit point: the kernel's
        set is unknown, so the next sync writes again (apply() compares)."""
        delay = self._backoff
        self._failed_in_a_row += 1
        self._pending = True
        self._retry_at = self._clock() + delay
        self._backoff = min(self._retry_max, self._backoff * 2)
        self._post(self.events.write_failed, backends, describe(error), delay)

    def _close(self, backends: tuple[Backend, ...]) -> None:
        assert self._dp is not None
        t0 = self._clock()
        try:
            n = self._call("close_connections", self._dp.close_connections, backends)
        except Exception as e:  # noqa: BLE001 - reported; the backend is out of the set already
            self._post(self.events.close_failed, backends, describe(e))
            return
        self._post(self.events.closed, backends, int(n), self._clock() - t0)

    def _repair(self, reconcile: bool) -> None:
        """Re-assert the wanted set (apply() writes only on a difference, so
        this is free when nothing drifted). A data path that cannot be
        written is installed again by the reconcile, or after REINSTALL_AFTER
        failed retries (a passing error gets the retry alone: a reinstall
        starts the passive counters afresh)."""
        assert self._dp is not None
        with self._cv:
            backends = self._want.backends or self._applied
        if not backends:
            return
        try:
            wrote = self._call("apply", self._dp.apply, backends)
        except Exception as e:  # noqa: BLE001 - any failure: retried, then reinstalled
            if not reconcile and self._failed_in_a_row < REINSTALL_AFTER:
                self._failed(backends, e)
                return
            self._log("warn", "reinstall", reason=describe(e))
            try:
                self._call("install", self._dp.install, backends)
                self._call("apply", self._dp.apply, backends)
            except Exception as e2:  # noqa: BLE001 - retried with backoff
                self._log("error", "reinstall_failed", error=describe(e2))
                self._failed(backends, e2)
                return
            self._new_generation()
            self._succeeded(backends)
            self._post(self.events.written, backends, None, True, "reinstalled")
            return
        self._succeeded(backends)
        self._post(self.events.written, backends, None, bool(wrote), "repaired" if reconcile else "retry")

    def _poll_passive(self) -> None:
        assert self._dp is not None
        try:
            counts = self._call("passive_failures", self._dp.passive_failures)
        except Exception as e:  # noqa: BLE001 - read again after PASSIVE_RETRY_AFTER, never at once
            self._log("warn", "passive_read_failed", error=describe(e))
            self._passive_at = self._clock() + PASSIVE_RETRY_AFTER
            self._last_passive = None  # a scrape reads afresh, never old counters as new
            return
        self._passive_at = self._clock() + self._passive_every
        self._last_passive = counts
        if counts != self._posted_passive:
            self._posted_passive = counts
            self._post(self.events.passive_counts, counts, self._generation)

    def _new_generation(self) -> None:
        self._generation += 1
        self._posted_passive = None
        self._last_passive = None

    def _take(self, dp: Datapath, backends: tuple[Backend, ...]) -> InstalledDatapath:
        """`dp` is the data path from now on, holding `backends`."""
        self._dp = dp
        self._new_generation()
        self._succeeded(backends)
        now = self._clock()
        self._passive_at = now
        self._reconcile_at = now + self._reconcile_every
        with self._cv:
            if self._want.backends is None:
                self._want.backends = backends
            elif self._want.backends != backends:
                # A mark synced to the old object while this request waited
                # (marks go first): the new one gets the latest set next.
                self._want.dirty = True
        return InstalledDatapath(dp.name, frozenset(dp.families), dict(getattr(dp, "last_load", None) or {}))

    # ---- requests (run on this thread through submit/run) ----------------------

    def query(self, fn: Callable[..., Any], *args: Any) -> Any:
        """A kernel query outside any data-path object (datapath.decide,
        installed, a class's check_available), on this thread."""
        return self._call(getattr(fn, "__name__", "query"), fn, *args)

    def _open(self, cls: type[Datapath], settings: DatapathSettings) -> Datapath:
        dp = self._call("open", cls, settings)
        if self._syn_rto:
            try:
                self._call("set_syn_rto", dp.set_syn_rto, self._syn_rto)
            except DatapathError as e:
                self._log("error", "syn_rto_refused", error=describe(e))
        return dp

    def _close_quietly(self, dp: Datapath) -> None:
        try:
            self._call("close", dp.close)
        except Exception as e:  # noqa: BLE001 - releasing descriptors; the error that led here matters more
            self._log("warn", "datapath_close_failed", datapath=dp.name, error=describe(e))

    def start_datapath(self, cls: type[Datapath], settings: DatapathSettings,
                       backends: tuple[Backend, ...]) -> Started:
        """Install `cls` with `backends`, or adopt the one an earlier daemon
        left (it steers on with what it holds until the set is written)."""
        dp = self._open(cls, settings)
        try:
            adopted = bool(self._call("install", dp.install, backends))
            seconds, wrote = None, not adopted
            if adopted:
                t0 = self._clock()
                wrote = bool(self._call("apply", dp.apply, backends))
                seconds = self._clock() - t0 if wrote else None
        except BaseException:
            self._close_quietly(dp)
            raise
        return Started(self._take(dp, backends), adopted, wrote, seconds)

    def preload_netlink(self) -> None:
        """The netlink code closing connections needs (pyroute2's message
        classes), loaded ahead of the first failover."""
        import_netlink()

    def swap_datapath(self, cls: type[Datapath], settings: DatapathSettings,
                      backends: tuple[Backend, ...]) -> InstalledDatapath:
        """Reload: a new data-path object (port, data path, loader) installed
        with the current set; the old one writes nothing after this starts
        (one thread), so the kernel never sees two writers."""
        with self._cv:
            backends = self._want.backends or backends  # the loop's latest, if a mark came since
        if not backends:
            raise DatapathError("no backend to steer to: the running data path is kept")
        dp = self._open(cls, settings)
        try:
            # atomic: port / table replaced in place
            self._call("install", dp.install, backends)
            self._call("apply", dp.apply, backends)
        except BaseException:
            self._close_quietly(dp)
            raise
        old = self._dp
        info = self._take(dp, backends)
        if old is not None:
            self._close_quietly(old)
            if old.name != dp.name:
                self.remove_others(dp.name, settings)
        return info

    def remove_others(self, chosen: str, settings: DatapathSettings) -> None:
        """A node switched between data paths must not be steered by both.
        Every removal is logged, and so is every failure (then retried every
        reconcile)."""
        failed = False
        for name in self._datapaths:
            if name == chosen:
                continue
            try:
                cls = self._datapath_class(name)
                removed = self._call("cleanup", cls.cleanup, settings)
            except DatapathUnavailable as e:
                # Its module cannot load here: it cannot have installed anything either.
                self._log("info", "other_datapath_absent", datapath=name, reason=e.reason)
                continue
            except Exception as e:  # noqa: BLE001 - logged, retried
                failed = True
                self._log("error", "remove_other_datapath_failed", datapath=name, error=describe(e),
                          action="retrying every reconcile")
                continue
            for line in removed:
                self._log("info", "removed_other_datapath", datapath=name, removed=line)
        self._other_removal = (chosen, settings) if failed else None

    def _read_state(self) -> KernelState:
        if self._dp is not None:
            return self._call("read_state", self._dp.read_state)
        return self._with_reader(lambda dp: self._call("read_state", dp.read_state))

    def _read_passive(self) -> Mapping[Backend, PassiveCounts]:
        if self._dp is not None:
            return self._call("passive_failures", self._dp.passive_failures)
        return self._with_reader(lambda dp: self._call("passive_failures", dp.passive_failures))

    def _with_reader(self, read: Callable[[Datapath], Any]) -> Any:
        with self._cv:
            reader = self._reader
        if reader is None:
            raise DatapathError("no data path chosen yet")
        dp = self._open(*reader)
        try:
            return read(dp)
        finally:
            self._close_quietly(dp)

    def _stop(self, cleanup: tuple[type[Datapath], DatapathSettings] | None) -> list[str]:
        self._exit = True
        if self._dp is not None:
            self._close_quietly(self._dp)
            self._dp = None
        if cleanup is None:
            return []
        cls, settings = cleanup
        return list(self._call("cleanup", cls.cleanup, settings))
