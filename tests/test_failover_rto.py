"""The initial SYN RTO per backend, end to end (issue 13): the daemon derives
it from each backend's probe latencies (core/rto.py), the writer hands it to
the eBPF data path, steered connects to that backend carry it (TCP_INFO), a
black hole is seen one short RTO after a steered SYN and confirmed with a
connect bounded by that RTO (at least 200 ms), and a far backend gets a
longer one, so it is never taken for a black hole.

The data-path side alone (the slot field, jiffies, both loaders, IPv6) is
tests/test_ebpf_rto.py; the time it saves is measured by bench.failover.
"""

from __future__ import annotations

import select
import socket
import struct
import time

import pytest

from prism_kernel.core.rto import FLOOR_MS, initial_syn_rto_ms
from tests.harness import TEST_PORT, Daemon, RecordingClient, client_context

pytestmark = pytest.mark.kernel

TCP_INFO_HEAD = struct.Struct("=8BI")  # struct tcp_info: 8 one-byte fields, then tcpi_rto (us)
TCP_SYN_SENT = 2
KERNEL_DEFAULT_US = 1_000_000  # TCP_TIMEOUT_INIT
FAR_DELAY = 0.25  # seconds added to every packet the far backend's host sends: above the 100 ms floor
# A first probe to the far backend is a TCP, a TLS and an HTTP round trip
# (750 ms): a far endpoint needs a probe timeout above that, as in production.
PROBE_TIMEOUT = 2.0


def endpoints(tb) -> list[str]:
    return [b.endpoint for b in tb.backends]


def events(d: Daemon, event: str, **match) -> list[dict]:
    return [e for e in d.events() if e.get("event") == event
            and all(str(e.get(k)) == str(v) for k, v in match.items())]


def rto_rows(d: Daemon, want: set[str], timeout: float = 20.0) -> dict[str, int]:
    """address -> syn_rto_ms from the state file, once every address in
    `want` has one (bounded: the first probes give the first latencies)."""
    deadline = time.monotonic() + timeout
    while True:
        rows = {b["address"]: b.get("syn_rto_ms") for b in d.status()["state"]["backends"]}
        if all(rows.get(a) is not None for a in want):
            return rows
        if time.monotonic() > deadline:
            raise AssertionError(f"no syn_rto_ms for every backend in {timeout}s: {rows}")
        time.sleep(0.1)  # polling the state file for a positive marker, bounded


def tcp_info(s: socket.socket) -> tuple[int, int]:
    """(state, rto in microseconds) of a socket."""
    raw = s.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)
    fields = TCP_INFO_HEAD.unpack_from(raw)
    return fields[0], fields[8]


class SynSent:
    """`n` connects to host:port started at once; `rtos`: the tcpi_rto (us)
    of those still in SYN_SENT once the others have connected (a 100 ms
    bound: a live test host answers in well under 1 ms). Kept open until
    the block ends, so their SYNs time out in the kernel."""

    def __init__(self, host: str, port: int, n: int):
        self.host, self.port, self.n = host, port, n
        self.socks: list[socket.socket] = []
        self.rtos: list[int] = []

    def __enter__(self) -> "SynSent":
        for _ in range(self.n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.setblocking(False)
            self.socks.append(s)
            s.connect_ex((self.host, self.port))
        select.select([], self.socks, [], 0.1)
        self.rtos = [rto for state, rto in map(tcp_info, self.socks) if state == TCP_SYN_SENT]
        return self

    def __exit__(self, *exc) -> None:
        for s in self.socks:
            s.close()


def test_steered_syns_carry_their_backends_rto_and_a_black_hole_is_confirmed_by_it(testbed):
    tb = testbed
    near, far, victim = tb.backends
    far.link_delay(FAR_DELAY)
    with Daemon(endpoints(tb), "ebpf", tb.ca_file, tb.tmpdir, timeout=PROBE_TIMEOUT) as d:
        d.wait_ready()
        d.wait_serving({near.endpoint, victim.endpoint})  # the far one sits in a slower tier
        rows = rto_rows(d, {near.endpoint, far.endpoint, victim.endpoint})
        # Near backends (well under 1 ms away) get the floor; the far one at
        # least 3x its delay (what its probes measured is one round trip at least).
        assert rows[near.endpoint] == rows[victim.endpoint] == FLOOR_MS, rows
        assert rows[far.endpoint] >= initial_syn_rto_ms(FAR_DELAY), rows

        victim.blackhole()
        mark = len(d.events())
        # A steered SYN to the black hole carries the victim's 100 ms; a
        # direct connect to it keeps the kernel's 1 s.
        with SynSent("127.0.0.1", TEST_PORT, 16) as steered, SynSent(victim.address4, victim.port, 1) as direct:
            assert steered.rtos and all(rto == FLOOR_MS * 1000 for rto in steered.rtos), steered.rtos
            assert direct.rtos == [KERNEL_DEFAULT_US], direct.rtos
            # The kernel saw a steered SYN time out (suspect mark, counter);
            # the daemon confirmed with a connect bounded by 200 ms:
            # dead, and out (before a probe, whose timeout is 2 s, could say so).
            seen = d.wait_event("passive_failure", after=mark, address=victim.endpoint)
            assert seen["syn_timeouts"] >= 1, seen
            down = d.wait_event("backend_down", after=mark, address=victim.endpoint)
        assert down["kind"] == "dead" and down["reason"].endswith("confirmed: connect timeout"), down
        assert d.events().index(seen) < d.events().index(down)
        d.wait_active({near.endpoint})
        victim.blackhole(False)


def test_a_far_backend_gets_a_longer_rto_and_is_never_taken_for_a_black_hole(testbed):
    """Without the latency in the rule (every backend at the 100 ms floor),
    the far backend's SYN-ACK (250 ms away) comes after the timer: every
    steered connect to it would count a SYN timeout and mark it suspect."""
    tb = testbed
    far = tb.backends[1]
    far.link_delay(FAR_DELAY)
    with Daemon([far.endpoint], "ebpf", tb.ca_file, tb.tmpdir, timeout=PROBE_TIMEOUT) as d:
        d.wait_ready()
        rto = rto_rows(d, {far.endpoint})[far.endpoint]
        assert rto >= initial_syn_rto_ms(FAR_DELAY), rto
        mark = len(d.events())
        with SynSent("127.0.0.1", TEST_PORT, 4) as steered:  # 250 ms to the SYN-ACK: all still in SYN_SENT
            assert steered.rtos and all(r == rto * 1000 for r in steered.rtos), (steered.rtos, rto)
        # Load: new connections through 127.0.0.1:PORT for 10 s (bounded);
        # each request is three round trips of 250 ms (TCP, TLS, HTTP).
        with RecordingClient(client_context(tb.ca_file), rate=20, threads=8, max_seconds=10) as client:
            client.wait_requests(40, timeout=30)
        assert not client.failed(), client.failed()[:3]
        assert not events(d, "passive_failure", address=far.endpoint), d.log_path.read_text()
        assert not [e for e in d.events()[mark:] if e.get("event") == "backend_down"], d.log_path.read_text()
        counters = {b["address"]: b for b in d.status()["state"]["backends"]}
        assert counters[far.endpoint]["state"] == "up", counters
