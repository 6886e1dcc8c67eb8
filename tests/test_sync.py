"""The single writer (control/sync.py) against a fake data path: no root, no
kernel. The fake keeps a backend set the way a data path does (apply()
compares, writes only on a difference) and records every call with the
thread it came from, in the spirit of knftables.Fake; faults are injected per
method. What is checked: every call on the writer thread, a dirty mark synced
at once, bursts coalesced, the write before the close, retry with backoff
after a failure (also one after the commit point), reinstall, the reload
swap, and that a kernel call off the writer thread is refused and counted."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import pytest

from prism_kernel.control.sync import REINSTALL_AFTER, KernelWriter
from prism_kernel.core.model import Backend
from prism_kernel.datapath.base import Datapath, DatapathSettings, KernelState, PassiveCounts
from prism_kernel.errors import DatapathError

A, B, C, D = (Backend.of(f"198.18.{i}.2", 6443) for i in range(1, 5))
SETTINGS = DatapathSettings(instance="pk-sync-test")
WRITER_THREAD = "prism-kernel-writer"


class FakeKernel:
    """What the fakes share: the set the 'kernel' holds, every call made."""

    def __init__(self) -> None:
        self.held: dict[str, tuple[Backend, ...]] = {}  # data path name -> set
        self.rto: dict[str, dict[Backend, int]] = {}  # data path name -> initial SYN RTO per backend
        self.calls: list[tuple[str, str, str, Any]] = []  # (datapath, method, thread, arg)
        self.faults: dict[str, list[BaseException | Callable[[], None]]] = {}
        self.gate: dict[str, threading.Event] = {}  # method -> released when set
        self.entered: dict[str, threading.Event] = {}
        self.passive: dict[Backend, PassiveCounts] = {}
        self.cleaned: list[str] = []

    def record(self, dp: str, method: str, arg: Any = None) -> None:
        self.calls.append((dp, method, threading.current_thread().name, arg))
        if method in self.entered:
            self.entered[method].set()
        if method in self.gate:
            assert self.gate[method].wait(10), f"{method} never released"
        faults = self.faults.get(method)
        if faults:
            fault = faults.pop(0)
            if isinstance(fault, BaseException):
                raise fault
            fault()

    def hold(self, method: str) -> threading.Event:
        """The next call of `method` waits (inside it) until the returned
        event is set; `entered[method]` is set once it is in."""
        self.gate[method] = threading.Event()
        self.entered[method] = threading.Event()
        return self.gate[method]

    def methods(self, *names: str) -> list[tuple[str, str, Any]]:
        return [(dp, m, a) for dp, m, _, a in self.calls if not names or m in names]


def fake_class(kernel: FakeKernel, name: str = "fake") -> type[Datapath]:
    class Fake(Datapath):
        families: ClassVar[frozenset[int]] = frozenset({4, 6})

        def __init__(self, settings: DatapathSettings):
            super().__init__(settings)
            self._rto: dict[Backend, int] = {}
            kernel.record(name, "open")

        def set_syn_rto(self, syn_rto_ms) -> None:
            kernel.record(name, "set_syn_rto", dict(syn_rto_ms))
            self._rto = dict(syn_rto_ms)

        @classmethod
        def check_available(cls, settings: DatapathSettings) -> None:
            kernel.record(name, "check_available")

        def install(self, initial: Sequence[Backend]) -> bool:
            kernel.record(name, "install", tuple(initial))
            adopted = name in kernel.held
            if not adopted:
                kernel.held[name] = tuple(initial)
                kernel.rto[name] = self._rto
            return adopted

        def apply(self, backends: Sequence[Backend]) -> bool:
            kernel.record(name, "apply", tuple(backends))
            if name not in kernel.held:
                raise DatapathError(f"{name} not installed")
            if kernel.held[name] == tuple(backends) and kernel.rto.get(name) == self._rto:
                return False
            kernel.held[name] = tuple(backends)
            kernel.rto[name] = self._rto
            return True

        def read_state(self) -> KernelState:
            kernel.record(name, "read_state")
            return KernelState(name, name in kernel.held, kernel.held.get(name, ()))

        def close_connections(self, backends: Sequence[Backend]) -> int:
            kernel.record(name, "close_connections", tuple(backends))
            return 3 * len(backends)

        def passive_failures(self) -> dict[Backend, PassiveCounts]:
            kernel.record(name, "passive_failures")
            return dict(kernel.passive)

        def close(self) -> None:
            kernel.record(name, "close")

        @classmethod
        def cleanup(cls, settings: DatapathSettings) -> list[str]:
            kernel.record(name, "cleanup")
            kernel.cleaned.append(name)
            return [f"removed {name}"] if kernel.held.pop(name, None) is not None else []

    Fake.name = name
    return Fake


class Events:
    """WriterEvents, recorded in order (on the event loop)."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, tuple]] = []

    def written(self, backends, seconds, wrote, how):
        self.seen.append(("written", (backends, wrote, how)))

    def write_failed(self, backends, error, retry_in):
        self.seen.append(("write_failed", (backends, error, retry_in)))

    def closed(self, backends, count, seconds):
        self.seen.append(("closed", (backends, count)))

    def close_failed(self, backends, error):
        self.seen.append(("close_failed", (backends, error)))

    def passive_counts(self, counts, generation):
        self.seen.append(("passive_counts", (dict(counts), generation)))

    def log_event(self, level, event, fields):
        self.seen.append((event, (level, fields)))

    def of(self, kind: str) -> list[tuple]:
        return [args for k, args in self.seen if k == kind]


async def until(cond: Callable[[], Any], timeout: float = 5.0) -> Any:
    """Wait (bounded) for a positive marker: `cond()` true."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = cond()
        if got:
            return got
        await asyncio.sleep(0.002)
    raise AssertionError(f"condition not met within {timeout}s")


def run(test: Callable[[KernelWriter, FakeKernel, Events, type[Datapath]], Any], **writer_args: Any) -> None:
    """Run an async test against a started writer with one fake data path
    ("fake"; "other" is the one to remove), then stop it."""
    kernel, events = FakeKernel(), Events()
    classes = {"fake": fake_class(kernel, "fake"), "other": fake_class(kernel, "other")}
    writer_args.setdefault("passive_every", 3600.0)  # timers off unless a test wants them
    writer_args.setdefault("reconcile_every", 3600.0)

    async def main() -> None:
        writer = KernelWriter(events, datapaths=("fake", "other"), datapath_class=classes.__getitem__,
                              **writer_args)
        writer.start(asyncio.get_running_loop())
        try:
            await test(writer, kernel, events, classes["fake"])
        finally:
            for gate in kernel.gate.values():
                gate.set()
            await writer.stop(None)
        # No call into a data path came from any thread but the writer's.
        assert {t for _, _, t, _ in kernel.calls} <= {WRITER_THREAD}, kernel.calls
        assert writer.stats()["off_thread_calls"] == 0

    asyncio.run(main())


async def started(writer: KernelWriter, cls: type[Datapath], backends=(A, B, C)):
    return await writer.run(writer.start_datapath, cls, SETTINGS, tuple(backends))


def test_start_installs_on_the_writer_thread_and_every_call_is_counted():
    async def t(writer, kernel, events, cls):
        st = await started(writer, cls)
        assert (st.adopted, st.wrote, st.info.name) == (False, True, "fake")
        assert kernel.held["fake"] == (A, B, C)
        await writer.run(writer.remove_others, "fake", SETTINGS)
        assert kernel.cleaned == ["other"]
        calls = writer.stats()["calls"]
        assert calls["install"] == 1 and calls["open"] == 1 and calls["cleanup"] == 1
    run(t)


def test_a_call_off_the_writer_thread_is_refused_and_counted():
    kernel, events = FakeKernel(), Events()
    cls = fake_class(kernel)

    async def main() -> None:
        writer = KernelWriter(events, datapaths=("fake",), datapath_class=lambda n: cls)
        writer.start(asyncio.get_running_loop())
        try:
            # A request method called directly from the event loop's thread.
            with pytest.raises(DatapathError, match="not the writer's: refused"):
                writer.start_datapath(cls, SETTINGS, (A,))
            assert writer.stats()["off_thread_calls"] == 1
            assert kernel.calls == []  # refused before it reached the data path
            await until(lambda: events.of("kernel_call_off_writer_thread"))
        finally:
            await writer.stop(None)

    asyncio.run(main())


def test_a_dirty_mark_is_synced_at_once_and_the_write_comes_before_the_close():
    async def t(writer, kernel, events, cls):
        await started(writer, cls)
        t0 = time.monotonic()
        writer.want((A, B), close=[C])  # C died: out of the set, then its connections closed
        await until(lambda: events.of("closed"))
        took = time.monotonic() - t0
        assert kernel.methods("apply", "close_connections")[-2:] == [
            ("fake", "apply", (A, B)), ("fake", "close_connections", (C,))]
        assert events.of("written")[-1] == ((A, B), True, "sync")
        assert events.of("closed") == [((C,), 3)]
        assert took < 0.5, took  # no minimum interval (a loaded machine still answers in ms)
    run(t)


def test_marks_made_while_a_write_runs_coalesce_into_one_write_of_the_latest_set():
    async def t(writer, kernel, events, cls):
        await started(writer, cls)
        kernel.hold("apply")
        writer.want((A, B))
        await until(kernel.entered["apply"].is_set)  # the writer is inside apply((A, B)), held there
        writer.want((A,), close=[B])
        writer.want((A, C), close=[B, D])
        writer.want((A, D))
        kernel.gate["apply"].set()
        await until(lambda: events.of("closed"))
        applies = [a for _, _, a in kernel.methods("apply")]
        assert applies == [(A, B), (A, D)], applies  # the burst: one write, of the latest set
        assert kernel.methods("close_connections") == [("fake", "close_connections", (B, D))]
        assert [m for _, m, _ in kernel.methods("apply", "close_connections")][-2:] == [
            "apply", "close_connections"]  # after the write
    run(t)


def test_an_unchanged_set_writes_nothing_and_a_forced_one_is_applied():
    async def t(writer, kernel, events, cls):
        await started(writer, cls)
        n = len(kernel.methods("apply"))
        writer.want((A, B, C))
        writer.want(None, close=[D])
        await until(lambda: events.of("closed"))
        assert len(kernel.methods("apply")) == n  # the writer knows the kernel holds it
        writer.want((A, B, C), force=True)  # reload: re-assert through the new object
        await until(lambda: len(kernel.methods("apply")) == n + 1)
    run(t)


def test_the_syn_rto_reaches_a_new_object_before_install_and_a_change_alone_is_written():
    async def t(writer, kernel, events, cls):
        writer.want(None, syn_rto={A: 200})  # before the start: kept for the object it opens
        await started(writer, cls)
        assert [m for _, m, _ in kernel.methods("set_syn_rto", "install")] == ["set_syn_rto", "install"]
        assert kernel.rto["fake"] == {A: 200}
        n = len(kernel.methods("apply"))
        writer.want((A, B, C), syn_rto={A: 300})  # the same set, a new timer: written
        await until(lambda: events.of("written") and events.of("written")[-1][2] == "syn_rto")
        assert kernel.rto["fake"] == {A: 300} and len(kernel.methods("apply")) == n + 1
        assert events.of("written")[-1] == ((A, B, C), True, "syn_rto")
        writer.want((A, B, C), syn_rto={A: 300}, close=[D])  # unchanged: nothing written
        await until(lambda: events.of("closed"))
        assert len(kernel.methods("apply")) == n + 1 and len(kernel.methods("set_syn_rto")) == 2
    run(t)


def test_a_failed_write_becomes_a_datapath_error_and_is_retried_with_backoff():
    async def t(writer, kernel, events, cls):
        await started(writer, cls)
        ebadf = OSError(9, "Bad file descriptor")
        # The write fails, and so do its first retries (a retry alone: a
        # passing error must not restart the passive counters with a
        # reinstall); after REINSTALL_AFTER of them the data path is
        # installed again, which fails too; the next retry works.
        kernel.faults["apply"] = [ebadf] * (REINSTALL_AFTER + 1)
        kernel.faults["install"] = [OSError(1, "Operation not permitted")]
        writer.want((A, B))
        await until(lambda: events.of("written") and events.of("written")[-1][0] == (A, B))
        failed = events.of("write_failed")
        assert [f[0] for f in failed] == [(A, B)] * (REINSTALL_AFTER + 1)
        assert failed[0][1] == "apply: [Errno 9] Bad file descriptor"  # OSError -> DatapathError at the boundary
        assert failed[-1][1] == "install: [Errno 1] Operation not permitted"
        assert [f[2] for f in failed] == [0.05, 0.1, 0.2, 0.4]  # backoff doubles
        assert [m for _, m, _ in kernel.methods("apply", "install")][-6:] == [
            "apply", "apply", "apply", "apply", "install", "apply"]
        assert events.of("reinstall_failed") and kernel.held["fake"] == (A, B)
        assert events.of("written")[-1] == ((A, B), True, "retry")
    run(t, retry_min=0.05, retry_max=0.4)


def test_a_failure_after_the_commit_point_is_repaired_by_the_next_sync_never_fatal():
    async def t(writer, kernel, events, cls):
        await started(writer, cls)

        def committed_then_failed() -> None:
            kernel.held["fake"] = (A, B)  # the new set is in, then a later step fails
            raise OSError(22, "Invalid argument")

        kernel.faults["apply"] = [committed_then_failed]
        writer.want((A, B))
        await until(lambda: events.of("write_failed"))
        # The retry finds the set in place: nothing written, pending cleared.
        await until(lambda: events.of("written") and events.of("written")[-1][2] == "retry")
        assert events.of("written")[-1] == ((A, B), False, "retry")
        writer.want((A,))  # the writer is alive and syncs as before
        await until(lambda: kernel.held["fake"] == (A,))
    run(t, retry_min=0.05)


def test_an_unexpected_exception_is_logged_and_the_writer_goes_on():
    async def t(writer, kernel, events, cls):
        await started(writer, cls)
        kernel.faults["close_connections"] = [ValueError("bad sock_diag answer")]
        writer.want((A, B), close=[C])
        await until(lambda: events.of("close_failed"))
        assert events.of("close_failed") == [((C,), "ValueError: bad sock_diag answer")]
        assert not events.of("write_failed")  # the write worked: nothing to retry
        kernel.faults["set_syn_rto"] = [KeyError("rto")]
        writer.want((A,), close=[B], syn_rto={A: 200})
        await until(lambda: events.of("closed"))
        assert kernel.held["fake"] == (A,) and events.of("syn_rto_refused")
        writer.want((A,), syn_rto={A: 200})  # the same timers again: tried again, now taken
        await until(lambda: kernel.rto["fake"] == {A: 200})
    run(t, retry_min=0.05)


def test_a_failing_passive_read_of_any_kind_never_makes_the_writer_spin():
    async def t(writer, kernel, events, cls):
        kernel.faults["passive_failures"] = [ValueError("bad map value")] * 1000  # from the first poll on
        await started(writer, cls)
        await until(lambda: events.of("passive_read_failed"))
        reads = len(kernel.methods("passive_failures"))
        writer.want((A, B))  # a sync still goes through at once
        await until(lambda: kernel.held["fake"] == (A, B))
        assert len(kernel.methods("passive_failures")) == reads == 1, reads  # retried after 5 s, not at once
        assert not events.of("write_failed") and not events.of("writer_failed")
    run(t, passive_every=0.01)


def test_closes_after_a_failed_write_wait_for_the_write_that_works():
    async def t(writer, kernel, events, cls):
        await started(writer, cls)
        kernel.faults["apply"] = [OSError(9, "Bad file descriptor")]
        writer.want((A, B), close=[C])
        await until(lambda: events.of("closed"))
        calls = [(m, a) for _, m, a in kernel.methods("apply", "close_connections")]
        # The failed write, then its retry, and only then the close: an aborted
        # client must reconnect onto a set without C.
        assert calls[-3:] == [("apply", (A, B)), ("apply", (A, B)), ("close_connections", (C,))], calls
    run(t, retry_min=0.05)


def test_a_swap_installs_the_latest_set_even_when_a_mark_came_after_it_was_asked_for():
    async def t(writer, kernel, events, cls):
        await started(writer, cls)
        kernel.hold("read_state")
        scrape = writer.submit(writer._read_state)  # holds the writer while the loop goes on
        await until(kernel.entered["read_state"].is_set)
        swap = writer.submit(writer.swap_datapath, cls, SETTINGS, (A, B, C))  # the reload's set of its moment
        writer.want((A, B), close=[C])  # then C dies: marks go before the queued swap
        kernel.gate["read_state"].set()
        await asyncio.wrap_future(scrape)
        await asyncio.wrap_future(swap)
        await until(lambda: events.of("closed"))
        assert kernel.held["fake"] == (A, B)
    run(t)


def test_a_request_after_the_stop_fails_at_once_and_none_is_left_hanging():
    async def t(writer, kernel, events, cls):
        await started(writer, cls)
        kernel.hold("read_state")
        busy = writer.submit(writer._read_state)
        await until(kernel.entered["read_state"].is_set)
        stopping = writer.submit(writer._stop, None)
        behind = writer.submit(writer._read_state)  # queued behind the stop
        kernel.gate["read_state"].set()
        await asyncio.wrap_future(busy)
        await asyncio.wrap_future(stopping)
        with pytest.raises(DatapathError, match="stopped"):
            await asyncio.wait_for(asyncio.wrap_future(behind), 5)
        with pytest.raises(DatapathError, match="stopped"):
            await asyncio.wait_for(writer.run(writer._read_state), 5)
    run(t)


def test_reconcile_reinstalls_a_data_path_removed_behind_its_back():
    async def t(writer, kernel, events, cls):
        await started(writer, cls)
        del kernel.held["fake"]  # e.g. `nft flush ruleset`
        await until(lambda: events.of("written") and events.of("written")[-1][2] == "reinstalled", timeout=5)
        assert events.of("reinstall") and kernel.held["fake"] == (A, B, C)
        assert [m for _, m, _ in kernel.methods("install", "apply")][-2:] == ["install", "apply"]
    run(t, reconcile_every=0.1)


def test_passive_counts_are_polled_and_posted_when_they_change():
    async def t(writer, kernel, events, cls):
        await started(writer, cls)
        await until(lambda: events.of("passive_counts"))
        kernel.passive[A] = PassiveCounts(refused=2)
        await until(lambda: len(events.of("passive_counts")) == 2)
        polls = len(kernel.methods("passive_failures"))
        await until(lambda: len(kernel.methods("passive_failures")) > polls + 3)
        assert len(events.of("passive_counts")) == 2  # unchanged counts are not posted again
        first, second = events.of("passive_counts")
        assert first == ({}, 1) and second == ({A: PassiveCounts(refused=2)}, 1)
        assert writer.scrape_passive() == {A: PassiveCounts(refused=2)}  # a scrape reads the last poll
    run(t, passive_every=0.01)


def test_reload_swaps_the_data_path_on_the_writer_thread_and_removes_the_old_one():
    async def t(writer, kernel, events, cls):
        await started(writer, cls)
        other = fake_class(kernel, "other")
        mark = len(kernel.calls)
        info = await writer.run(writer.swap_datapath, other, SETTINGS, (A, B, C))
        assert info.name == "other" and kernel.held["other"] == (A, B, C)
        swap = [(dp, m) for dp, m, _ in kernel.methods()[mark:] if m != "passive_failures"]
        # new installed and written, only then the old one closed and removed
        assert swap == [("other", "open"), ("other", "install"), ("other", "apply"),
                        ("fake", "close"), ("fake", "cleanup")], swap
        assert "fake" not in kernel.held
        writer.want((A,))
        await until(lambda: kernel.held["other"] == (A,))
        assert [dp for dp, m, _ in kernel.methods()[mark:] if dp == "fake"] == ["fake", "fake"]  # close, cleanup
    run(t)


def test_a_scrape_reads_the_kernel_on_the_writer_thread():
    async def t(writer, kernel, events, cls):
        await started(writer, cls)
        state = await asyncio.to_thread(writer.scrape_state)  # as the metrics server's thread calls it
        assert state.backends == (A, B, C)
        # (the first passive poll may come before or after it)
        assert [c[1:3] for c in kernel.calls if c[1] == "read_state"] == [("read_state", WRITER_THREAD)]
    run(t)


def test_stop_closes_the_data_path_and_cleans_up_when_asked():
    kernel, events = FakeKernel(), Events()
    cls = fake_class(kernel)

    async def main() -> list[str]:
        writer = KernelWriter(events, datapaths=("fake",), datapath_class=lambda n: cls)
        writer.start(asyncio.get_running_loop())
        await writer.run(writer.start_datapath, cls, SETTINGS, (A,))
        return await writer.stop((cls, SETTINGS))

    assert asyncio.run(main()) == ["removed fake"]
    assert [m for _, m, _ in kernel.methods()][-2:] == ["close", "cleanup"]


# ---- the event loop's watch (control/loopwatch.py) -----------------------------


def test_the_loop_watch_measures_an_iteration_that_blocks_and_nothing_else():
    from prism_kernel.control.loopwatch import LoopWatch

    reported: list[float] = []

    async def main() -> dict:
        watch = LoopWatch(report=reported.append)
        assert watch.start(asyncio.get_running_loop())
        for _ in range(20):
            await asyncio.sleep(0.005)  # idle: each iteration is short, the waits are not counted
        idle = watch.stats()
        loop = asyncio.get_running_loop()
        loop.call_soon(time.sleep, 0.08)  # a callback that blocks, as a kernel call on the loop would
        await asyncio.sleep(0.01)
        await asyncio.sleep(0.01)
        watch.stop()
        return {"idle": idle, "after": watch.stats()}

    got = asyncio.run(main())
    assert got["idle"]["iterations"] >= 20 and got["idle"]["longest_iteration_ms"] < 50, got
    assert 80 <= got["after"]["longest_iteration_ms"] < 1000, got
    assert len(reported) == 1 and reported[0] >= 0.08
