"""A real client through 127.0.0.1:PORT during each fault: kubectl (client-go).

Three fake API servers on hosts in network namespaces, the daemon in front of
them with default probe settings, and two real clients through the steered
address: a `kubectl get --watch` of the EndpointSlices, restarted from where
it left off whenever it ends (kubectl's own watch does not reconnect; an
informer would, by re-listing), and a loop of `kubectl get namespaces`. The
fault hits the server holding the watch. For each fault and data path: no
`kubectl get` fails, the watch keeps delivering events, and how long it was
blind is reported (`watch gap`): from the fault to the first event the
restarted watch printed. A draining server keeps its watch: no gap at all.
"""

from __future__ import annotations

import json
import subprocess
import threading
import time
from dataclasses import dataclass, field

import pytest

from tests.harness import TEST_PORT, Daemon, cleanup_instance
from tests.testbed import Testbed, clear_stale

pytestmark = [pytest.mark.kernel]

PREFIX = "pkkc"
FAULTS = ("refused", "blackhole", "frozen", "drain")
OBSERVE_S = 6.0  # after the fault: detection (< 2 s) plus a few watch events on the new set
EVENT_EVERY_S = 0.25  # an EndpointSlice change this often: the watch's heartbeat
MAX_GETS = 200  # bound on the get loop (each kubectl run takes ~0.1 s)


@pytest.fixture(scope="module")
def tb(tmp_path_factory):
    clear_stale(PREFIX)
    cleanup_instance()
    with Testbed(n_backends=3, prefix=PREFIX) as tb:
        yield tb
    cleanup_instance()


@dataclass
class WatchLog:
    """Lines printed by each kubectl watch process, with their arrival times."""

    runs: list[dict] = field(default_factory=list)  # {"start", "end", "rc", "stderr", "lines": [(t, text)]}

    def lines_after(self, t: float) -> list[tuple[float, str]]:
        return [(ts, s) for r in self.runs for ts, s in r["lines"] if ts >= t]


class Watcher(threading.Thread):
    """`kubectl get endpointslices --watch`, started again whenever it exits."""

    def __init__(self, base: list[str]):
        super().__init__(daemon=True)
        self.base = base
        self.log = WatchLog()
        self.stopping = threading.Event()
        self.proc: subprocess.Popen | None = None

    def run(self) -> None:
        while not self.stopping.is_set() and len(self.log.runs) < 20:
            rec = {"start": time.monotonic(), "end": None, "rc": None, "stderr": "", "lines": []}
            self.log.runs.append(rec)
            self.proc = subprocess.Popen(
                [*self.base, "get", "endpointslices", "-n", "default", "--watch", "--output-watch-events",
                 "-o", "jsonpath={.type} {.object.metadata.resourceVersion}{\"\\n\"}"],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)
            assert self.proc.stdout is not None
            for line in self.proc.stdout:
                rec["lines"].append((time.monotonic(), line.strip()))
            self.proc.wait()
            rec["end"], rec["rc"] = time.monotonic(), self.proc.returncode
            rec["stderr"] = self.proc.stderr.read() if self.proc.stderr else ""

    def stop(self) -> None:
        self.stopping.set()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
        self.join(20)


class GetLoop(threading.Thread):
    """`kubectl get namespaces`, one after the other, each result recorded."""

    def __init__(self, base: list[str]):
        super().__init__(daemon=True)
        self.base = base
        self.results: list[dict] = []
        self.stopping = threading.Event()

    def run(self) -> None:
        while not self.stopping.is_set() and len(self.results) < MAX_GETS:
            t0 = time.monotonic()
            r = subprocess.run([*self.base, "--request-timeout=10s", "get", "namespaces", "-o", "name"],
                               capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=30)
            self.results.append({"t0": t0, "s": time.monotonic() - t0, "rc": r.returncode,
                                 "stderr": r.stderr.strip()[-300:]})

    def stop(self) -> None:
        self.stopping.set()
        self.join(40)


def _watch_server(tb: Testbed, deadline: float):
    while time.monotonic() < deadline:
        held = [b for b in tb.backends if tb.endpointslice_stats(b)["active_watches"] >= 1]
        if len(held) == 1:
            return held[0]
        time.sleep(0.02)
    raise AssertionError("no single server holds kubectl's watch")


@pytest.mark.parametrize("fault", FAULTS)
@pytest.mark.parametrize("datapath", ["ebpf", "nftables"])
def test_kubectl_rides_through_the_fault(tb, datapath, fault, request, tmp_path):
    addrs = [b.address for b in tb.backends]
    tb.set_endpointslices(addrs)
    kubeconfig = tb.write_kubeconfig(server=f"https://127.0.0.1:{TEST_PORT}")
    base = ["kubectl", "--kubeconfig", kubeconfig, "--cache-dir", str(tmp_path / "kube-cache")]
    # Default probe settings: what a node runs.
    d = Daemon([b.endpoint for b in tb.backends], datapath, tb.ca_file, str(tmp_path),
               interval=1.0, timeout=0.5, rise=2, fall=2)
    watcher, gets = Watcher(base), GetLoop(base)
    victim = None
    try:
        d.wait_ready()
        d.wait_active({b.endpoint for b in tb.backends})
        watcher.start()
        victim = _watch_server(tb, time.monotonic() + 15)
        gets.start()
        # the get loop is running before the fault
        deadline = time.monotonic() + 15
        while not gets.results:
            assert time.monotonic() < deadline, "kubectl get never returned"
            time.sleep(0.02)
        t_fault = time.monotonic()
        {"refused": victim.stop, "blackhole": lambda: victim.blackhole(True), "frozen": victim.freeze,
         "drain": lambda: victim.drain(True)}[fault]()
        n = 0
        while time.monotonic() < t_fault + OBSERVE_S:
            n += 1
            tb.set_endpointslices(addrs[: 1 + n % 3])  # an event for the watch, on every live server
            time.sleep(EVENT_EVERY_S)
        t_end = time.monotonic()
    finally:
        gets.stop()
        watcher.stop()
        d.stop()
        if victim is not None:
            {"refused": victim.start, "blackhole": lambda: victim.blackhole(False), "frozen": victim.thaw,
             "drain": lambda: victim.drain(False)}[fault]()
        cleanup_instance()

    failed = [g for g in gets.results if g["rc"] != 0]
    during = [g for g in gets.results if g["t0"] >= t_fault]
    runs = watcher.log.runs
    cut = [r for r in runs if r["end"] is not None and t_fault <= r["end"] < t_end]
    resumed = [r for r in runs if r["start"] >= t_fault and r["start"] < t_end]
    first_new = next((ts for r in resumed for ts, s in r["lines"]), None)
    events_after = watcher.log.lines_after(t_fault)
    gap = None
    if fault == "drain":
        gap = 0.0 if not cut else None
    elif first_new is not None:
        gap = first_new - t_fault
    longest = max(g["s"] for g in during) if during else None
    report = {"datapath": datapath, "fault": fault, "gets": len(during), "failed": len(failed),
              "longest_get_s": None if longest is None else round(longest, 3),
              "watch_cut_after_s": round(cut[0]["end"] - t_fault, 3) if cut else None,
              "watch_gap_s": None if gap is None else round(gap, 3), "watch_restarts": len(resumed)}
    tr = request.config.pluginmanager.get_plugin("terminalreporter")
    if tr is not None:
        tr.write_line(f"kubectl {json.dumps(report)}")

    assert len(during) >= 5, report  # the loop really ran through the fault
    assert not failed, (report, failed)
    assert events_after, report
    if fault == "drain":
        # unready, not dead: its watch stays and keeps delivering events
        assert not cut, (report, cut)
        assert len([1 for ts, s in events_after if ts > t_fault + 2.0]) >= 3, report
    else:
        assert cut, ("the watch on the dead server was never ended", report)
        assert resumed and first_new is not None, ("the watch did not resume", report)
        # the resumed watch keeps delivering: events near the end of the window
        assert any(ts > t_end - 1.0 for r in resumed for ts, _ in r["lines"]), report
