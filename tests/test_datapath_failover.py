"""Fast failover in the kernel (issue 4), on both data paths:
close_connections() (sock_diag SOCK_DESTROY of steered sockets only) and the
eBPF passive outcome counters (sockops), plus the layout upgrade that brought
them.

Needs root. Uses the shared testbed with prefix "pkf" (net_offset=20:
198.18.21.0/24 and up, 2001:2:0:15::/64 and up), listen port 37445, instances
"pk-fo-dev-*", backend ports 8080 (plain HTTP of the fake API servers) and a
local API server on 127.0.0.1:16448/16449. Every test removes its data path,
pass or fail; the module removes the testbed.

Run without the shared conftest (its session fixture cleans instance
"pk-test" and testbed "pkt", which other people's runs use):

    .venv/bin/python -m pytest -q --noconftest tests/test_datapath_failover.py
"""

from __future__ import annotations

import errno
import json
import os
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.kernel, pytest.mark.guest]

if os.geteuid() != 0:
    pytest.skip("needs root", allow_module_level=True)

from prism_kernel.core.model import Backend  # noqa: E402
from prism_kernel.datapath.base import DatapathSettings, PassiveCounts  # noqa: E402
from prism_kernel.datapath.ebpf import bpfsys as bpf  # noqa: E402
from prism_kernel.datapath.ebpf.cgroup import find_cgroup2_root  # noqa: E402
from prism_kernel.datapath.ebpf.datapath import LAYOUT, EbpfDatapath  # noqa: E402
from prism_kernel.datapath.nft.datapath import NftablesDatapath  # noqa: E402
from prism_kernel.errors import DatapathUnavailable  # noqa: E402
from tests.harness import (  # noqa: E402
    Hammer,
    has_so_netns_cookie,
    http_ok,
    old_release,
    plain_backend,
    run_old_release,
    tcp_connect,
)
from tests.testbed import Testbed  # noqa: E402

PORT = 37445
PREFIX = "pkf"
NET_OFFSET = 20
INSTANCE = "pk-fo-dev"
# Outside the ephemeral port range (32768-60999): a client socket of a
# busy earlier test can never hold them.
LOCAL_TLS_PORT, LOCAL_HTTP_PORT = 16448, 16449
REPO = Path(__file__).resolve().parents[1]
# The last commit with the layout-1 eBPF data path (four sock_addr programs):
# what a node runs before this change; the upgrade test installs it first.
LAYOUT1_COMMIT = "c45a936"
FAST = 0.5  # "at once": well under a second

PATHS = {"ebpf": EbpfDatapath, "nftables": NftablesDatapath}


def _available(name: str) -> str | None:
    try:
        PATHS[name].check_available(DatapathSettings(listen_port=PORT, instance=f"{INSTANCE}-{name}"))
    except DatapathUnavailable as e:
        return e.reason
    return None


# --- fixtures -------------------------------------------------------------------


@pytest.fixture(scope="module")
def tb():
    with Testbed(n_backends=3, prefix=PREFIX, net_offset=NET_OFFSET) as t:
        t.add_backend(ipv6=True)  # be3: dual stack
        t.add_local_apiserver(port=LOCAL_TLS_PORT, http_port=LOCAL_HTTP_PORT, name="local")
        yield t


@pytest.fixture(autouse=True)
def _backends_healthy(request):
    """Each test starts and ends with every server running and reachable."""
    yield
    if "tb" in request.fixturenames:
        request.getfixturevalue("tb").heal()


be = plain_backend


def be6(srv) -> Backend:
    return plain_backend(srv, 6)


def _cleanup(name: str, instance: str) -> None:
    PATHS[name].cleanup(DatapathSettings(listen_port=PORT, instance=instance))


@pytest.fixture(params=["ebpf", "nftables"])
def dp(request, tb):
    yield from _datapath(request.param)


@pytest.fixture
def nft_dp(tb):
    yield from _datapath("nftables")


def _datapath(name):
    reason = _available(name)
    if reason:
        pytest.fail(f"{name} data path unavailable on this machine: {reason}")
    instance = f"{INSTANCE}-{name}"
    _cleanup(name, instance)
    d = PATHS[name](DatapathSettings(listen_port=PORT, instance=instance))
    try:
        yield d
    finally:
        d.close()
        _cleanup(name, instance)


@pytest.fixture
def ebpf(tb):
    reason = _available("ebpf")
    if reason:
        pytest.fail(f"ebpf data path unavailable on this machine: {reason}")
    instance = f"{INSTANCE}-ebpf"
    made: list[EbpfDatapath] = []

    def make() -> EbpfDatapath:
        d = EbpfDatapath(DatapathSettings(listen_port=PORT, instance=instance))
        made.append(d)
        return d

    _cleanup("ebpf", instance)
    try:
        yield make
    finally:
        for d in made:
            d.close()
        _cleanup("ebpf", instance)


# --- clients ----------------------------------------------------------------------


def connect(host: str = "127.0.0.1", port: int = PORT, timeout: float = 3.0,
            family: int = socket.AF_INET) -> socket.socket:
    return tcp_connect(host, port, timeout, family)


def _one_request() -> None:
    """One new connection and request through the listen port; raises on failure."""
    with connect(timeout=2) as s:
        if not http_ok(s):
            raise OSError("not 200")


class Held:
    """An open connection whose owner blocks in recv() in a thread: records
    when and how it ends."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.error: BaseException | None = None
        self.data: bytes | None = None
        self.ended_at: float | None = None
        sock.settimeout(10)
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.data = self.sock.recv(100)
        except BaseException as e:  # noqa: BLE001
            self.error = e
        self.ended_at = time.monotonic()

    def wait(self, timeout: float = 5) -> None:
        self.thread.join(timeout)

    def close(self) -> None:
        self.sock.close()


class Connecting:
    """A blocking connect() in a thread: records when and how it ends."""

    def __init__(self, host: str, port: int, timeout: float):
        self.error: BaseException | None = None
        self.ok = False
        self.ended_at: float | None = None
        self.started = time.monotonic()
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self._addr = (host, port)
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.sock.connect(self._addr)
            self.ok = True
        except BaseException as e:  # noqa: BLE001
            self.error = e
        self.ended_at = time.monotonic()
        self.sock.close()

    def wait(self, timeout: float = 15) -> None:
        self.thread.join(timeout)


def _aborted(err: BaseException | None) -> bool:
    return isinstance(err, OSError) and err.errno in (errno.ECONNABORTED, errno.ECONNRESET)


def _linear_syn_timeouts() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/tcp_syn_linear_timeouts").read_text())
    except (OSError, ValueError):
        return 0


def syn_sent_count(dst: str, dport: int) -> int:
    out = subprocess.run(["ss", "-Htn", "state", "syn-sent", "dst", f"{dst}:{dport}"],
                         capture_output=True, text=True, timeout=10).stdout
    return len([ln for ln in out.splitlines() if ln.strip()])


def wait_syn_sent(dst: str, dport: int, n: int, timeout: float = 3) -> None:
    end = time.monotonic() + timeout
    while syn_sent_count(dst, dport) < n and time.monotonic() < end:
        time.sleep(0.02)
    assert syn_sent_count(dst, dport) >= n


# --- close_connections: both data paths ---------------------------------------------


def test_close_aborts_established_steered_connections_only(tb, dp):
    b0, b1 = tb.backends[0], tb.backends[1]
    dp.install([be(b0)])
    doomed = [Held(connect()) for _ in range(3)]
    # The daemon's order: the dead backend leaves the set, then its connections go.
    dp.apply([be(b1)])
    survivor = connect()  # steered to b1
    direct_b0 = connect(b0.address, b0.http_port)  # not steered: the same address as b0
    direct_b1 = connect(b1.address, b1.http_port)
    try:
        assert dp.close_connections([]) == 0
        t0 = time.monotonic()
        n = dp.close_connections([be(b0)])
        call_s = time.monotonic() - t0
        for h in doomed:
            h.wait()
        assert n == 3
        for h in doomed:
            assert _aborted(h.error), (h.error, h.data)
            assert h.ended_at - t0 < FAST, h.ended_at - t0
        worst = max(h.ended_at for h in doomed) - t0
        print(f"{dp.name}: close_connections {call_s * 1000:.2f} ms, last client error after "
              f"{worst * 1000:.2f} ms")
        assert http_ok(survivor)
        assert http_ok(direct_b0)
        assert http_ok(direct_b1)
        assert dp.close_connections([be(b0)]) == 0  # nothing left
    finally:
        for s in (survivor, direct_b0, direct_b1):
            s.close()
        for h in doomed:
            h.close()


def test_close_aborts_a_connect_stuck_in_syn_sent(tb, dp):
    b0, b1 = tb.backends[0], tb.backends[1]
    dp.install([be(b0)])
    before = dp.passive_failures().get(be(b0), PassiveCounts())
    b0.blackhole(True)
    steered = Connecting("127.0.0.1", PORT, timeout=10)
    # Its own timeout must outlast the setup below (about 2 s in a TCG guest).
    direct = Connecting(b0.address, b0.http_port, timeout=4)
    if dp.name == "ebpf":  # the socket connects to the backend itself
        wait_syn_sent(b0.address, b0.http_port, 2)
    else:  # the socket connects to 127.0.0.1:PORT; DNAT is below it
        wait_syn_sent(b0.address, b0.http_port, 1)
        wait_syn_sent("127.0.0.1", PORT, 1)
    dp.apply([be(b1)])
    assert direct.ended_at is None, "the direct connect ended before close_connections(): setup too slow"
    t0 = time.monotonic()
    n = dp.close_connections([be(b0)])
    steered.wait()
    assert n == 1
    assert _aborted(steered.error), steered.error
    assert steered.ended_at - t0 < FAST
    print(f"{dp.name}: SYN_SENT connect failed {(steered.ended_at - t0) * 1000:.2f} ms after "
          f"close_connections()")
    # the direct connect to the same (black-holed) address was left alone: it times out
    assert direct.ended_at is None or direct.ended_at - t0 > 0.2
    direct.wait()
    assert isinstance(direct.error, TimeoutError), direct.error
    # an aborted SYN_SENT socket is not a refused connect
    after = dp.passive_failures().get(be(b0), PassiveCounts())
    assert after.refused == before.refused
    # a new connect goes to the healthy backend
    with connect() as s:
        assert http_ok(s)


def test_close_with_a_loopback_backend(tb, dp):
    local, b1 = tb.backend("local"), tb.backends[1]
    lb = Backend.of("127.0.0.1", LOCAL_HTTP_PORT)
    dp.install([lb])
    doomed = Held(connect())
    direct = connect("127.0.0.1", LOCAL_HTTP_PORT)  # kubelet talking to its local API server
    other = None
    try:
        dp.apply([be(b1)])
        other = connect()
        t0 = time.monotonic()
        assert dp.close_connections([lb]) == 1
        doomed.wait()
        assert _aborted(doomed.error), doomed.error
        assert doomed.ended_at - t0 < FAST
        assert http_ok(direct)
        assert http_ok(other)
        assert local.running
    finally:
        direct.close()
        doomed.close()
        if other:
            other.close()


def test_close_many_and_the_count(tb, dp):
    b0, b1, b2 = tb.backends[:3]
    dp.install([be(b0), be(b1), be(b2)])
    held = [connect() for _ in range(60)]
    try:
        peers = {}
        for s in held:
            peers.setdefault(s.getsockname()[0], []).append(s)
        by_backend = {b.address: len(peers.get(b.host_address, [])) for b in (b0, b1, b2)} \
            if dp.name == "ebpf" else None
        dp.apply([be(b2)])
        n = dp.close_connections([be(b0), be(b1)])
        alive = 0
        for s in held:
            s.setblocking(False)
            try:
                s.recv(1)
            except BlockingIOError:
                alive += 1
            except OSError as e:
                assert e.errno in (errno.ECONNABORTED, errno.ECONNRESET)
        assert n + alive == 60
        assert n > 0 and alive > 0  # P(all 60 on one side) ~ 2 * (1/3)^60
        if by_backend is not None:
            assert n == by_backend[b0.address] + by_backend[b1.address]
    finally:
        for s in held:
            s.close()


def test_close_aborts_dual_stack_connections(tb, dp):
    """A dual-stack client (AF_INET6 socket, [::ffff:127.0.0.1]:PORT) is
    steered to an IPv4 backend on both paths; its connection is found and
    aborted like an IPv4 one."""
    b0, b1 = tb.backends[0], tb.backends[1]
    dp.install([be(b0)])
    mapped = Held(connect("::ffff:127.0.0.1", family=socket.AF_INET6))
    plain = Held(connect())
    try:
        dp.apply([be(b1)])
        assert dp.close_connections([be(b0)]) == 2
        for h in (mapped, plain):
            h.wait()
            assert _aborted(h.error), (h.error, h.data)
    finally:
        mapped.close()
        plain.close()


def test_black_hole_is_seen_at_the_first_syn_retransmit(tb, dp):
    """A black-holed backend: both paths count the steered connect's SYN
    retransmits (eBPF: sock_ops RTO in SYN_SENT; nftables: a SYN of an
    already confirmed entry) from the first one, about 1 s after connect(),
    and flag the backend suspect; a direct connect to it is not counted."""
    b0 = tb.backends[0]
    dp.install([be(b0)])
    b0.blackhole(True)
    steered = Connecting("127.0.0.1", PORT, timeout=2.5)
    direct = Connecting(b0.address, b0.http_port, timeout=2.5)
    seen_after = None
    while time.monotonic() - steered.started < 2.4:
        if dp.passive_failures().get(be(b0), PassiveCounts()).syn_timeouts:
            seen_after = time.monotonic() - steered.started
            break
        time.sleep(0.005)
    assert seen_after is not None, "no syn_timeouts within 2.4 s"
    print(f"{dp.name}: syn_timeouts seen {seen_after:.3f} s after a black-holed connect")
    assert 0.8 < seen_after < 1.5
    assert be(b0) in dp.suspect_backends()
    steered.wait()
    direct.wait()
    assert isinstance(steered.error, TimeoutError) and isinstance(direct.error, TimeoutError)
    rtos = 2 if _linear_syn_timeouts() >= 2 else 1  # within 2.5 s: at 1 s, then 2 s (or 3 s)
    pc = dp.passive_failures()[be(b0)]
    assert (pc.syn_timeouts, pc.refused, pc.established) == (rtos, 0, 0)


# --- eBPF specifics -------------------------------------------------------------------


def test_ebpf_close_dual_stack_and_ipv6(tb, ebpf):
    dp = ebpf()
    v6 = tb.backends[3]
    dp.install([be(tb.backends[0]), be6(v6)])
    mapped = Held(connect("::ffff:127.0.0.1", family=socket.AF_INET6))  # v4-mapped: to be0
    six = Held(connect("::1", family=socket.AF_INET6))                  # to be3 over IPv6
    plain = connect()
    direct6 = connect(v6.address6, v6.http_port, family=socket.AF_INET6)
    try:
        dp.apply([be(tb.backends[1])])
        assert dp.close_connections([be6(v6)]) == 1
        six.wait()
        assert _aborted(six.error)
        assert mapped.ended_at is None
        assert dp.close_connections([be(tb.backends[0])]) == 2  # the mapped one and plain
        mapped.wait()
        assert _aborted(mapped.error)
        assert http_ok(direct6)
    finally:
        for s in (plain, direct6):
            s.close()
        mapped.close()
        six.close()


def test_ebpf_passive_counters(tb, ebpf):
    dp = ebpf()
    b0, b1 = tb.backends[0], tb.backends[1]
    dp.install([be(b0)])
    assert dp.passive_failures() == {}
    with connect() as s:
        assert http_ok(s)
    assert dp.passive_failures() == {be(b0): PassiveCounts(established=1)}

    # refused: counted by the time connect() returns
    b0.stop()
    with pytest.raises(ConnectionRefusedError):
        connect()
    assert dp.passive_failures()[be(b0)] == PassiveCounts(refused=1, established=1)
    with pytest.raises(ConnectionRefusedError):
        connect(b0.address, b0.http_port)  # direct: not ours
    assert dp.passive_failures()[be(b0)] == PassiveCounts(refused=1, established=1)

    # black hole: the first SYN retransmit timer, about 1 s after connect()
    b0.start()
    b0.blackhole(True)
    steered = Connecting("127.0.0.1", PORT, timeout=2.5)
    direct = Connecting(b0.address, b0.http_port, timeout=2.5)
    seen_after = None
    while time.monotonic() - steered.started < 2.4:
        if dp.passive_failures()[be(b0)].syn_timeouts:
            seen_after = time.monotonic() - steered.started
            break
        time.sleep(0.005)
    steered.wait()
    direct.wait()
    print(f"syn_timeouts seen {seen_after:.3f} s after a black-holed connect")
    assert seen_after is not None and 0.8 < seen_after < 1.5
    assert isinstance(steered.error, TimeoutError) and isinstance(direct.error, TimeoutError)
    # every RTO of the steered connect within its 2.5 s (1 s, then 2 s with
    # Linux >= 6.7's tcp_syn_linear_timeouts, else 3 s), none of the direct one;
    # the owner giving up in SYN_SENT is not "refused"
    rtos = 2 if _linear_syn_timeouts() >= 2 else 1
    assert dp.passive_failures() == {be(b0): PassiveCounts(refused=1, syn_timeouts=rtos,
                                                           established=1)}

    # other backends have their own counters; removing a backend keeps its counters
    b0.blackhole(False)
    dp.apply([be(b1)])
    with connect() as s:
        assert http_ok(s)
    # b1's SYN may itself have been retransmitted once: the full suite leaves
    # TIME_WAIT sockets on b1 from earlier tests, and a SYN that lands on one
    # is dropped (seen once in a full run, never alone); it is still its own.
    got = dp.passive_failures()
    assert got[be(b0)] == PassiveCounts(refused=1, syn_timeouts=rtos, established=1)
    assert set(got) == {be(b0), be(b1)} and (got[be(b1)].refused, got[be(b1)].established) == (0, 1), got
    st = dp.read_state()
    assert {k: v for k, v in st.counters[be(b1)].extra.items() if k != "syn_timeouts"} == {
        "refused": 0, "established": 1}
    deadline = time.monotonic() + 2.0  # the closed socket's FIN_WAIT1 ends with the peer's ACK
    while dp.steered_sockets() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert dp.steered_sockets() == []  # nothing kept beyond the sockets themselves

    # cost of one call (the daemon polls it every 100 ms)
    n = 2000
    t0 = time.perf_counter()
    for _ in range(n):
        dp.passive_failures()
    per_call = (time.perf_counter() - t0) / n
    print(f"passive_failures(): {per_call * 1e6:.1f} us per call")
    assert per_call < 0.001


def test_ebpf_adopt_keeps_counters_and_finds_steered_sockets(tb, ebpf):
    first = ebpf()
    b0, b1 = tb.backends[0], tb.backends[1]
    first.install([be(b0)])
    held = Held(connect())
    first.apply([be(b1)])
    b1.stop()
    with pytest.raises(ConnectionRefusedError):
        connect()
    b1.start()
    first.close()  # the daemon goes away, the kernel state stays
    second = ebpf()
    assert second.install([be(tb.backends[2])]) is True  # adopted
    assert second.passive_failures() == {be(b0): PassiveCounts(established=1),
                                         be(b1): PassiveCounts(refused=1)}
    assert held.ended_at is None
    assert second.close_connections([be(b0)]) == 1
    held.wait()
    assert _aborted(held.error)
    held.close()


OLD_INSTALL = """
import json, sys
from prism_kernel.datapath.base import DatapathSettings
from prism_kernel.datapath.ebpf import EbpfDatapath, LAYOUT
from prism_kernel.model import Backend
dp = EbpfDatapath(DatapathSettings(listen_port=int(sys.argv[1]), instance=sys.argv[2]))
dp.install([Backend.of(sys.argv[3], int(sys.argv[4]))])
st = dp.read_state()
print(json.dumps({"layout": LAYOUT, "prog_ids": st.details["prog_ids"],
                  "link_ids": st.details["link_ids"]}))
"""


@pytest.mark.skipif(not has_so_netns_cookie(), reason="the earlier release reads the netns cookie with SO_NETNS_COOKIE (Linux 5.14): it never ran on this kernel")
def test_ebpf_upgrade_from_layout1_release(tb, ebpf, tmp_path):
    """A node running the layout-1 data path (four programs, no sockops) is
    upgraded in place: the four links move to the new programs (link update),
    the sockops link is added, the set is carried into the new maps, no
    connect fails on the way; then failover works; cleanup removes it all."""
    old_tree = old_release(LAYOUT1_COMMIT, tmp_path / "old", "prism_kernel", "bpf")
    instance = f"{INSTANCE}-ebpf"
    b0 = tb.backends[0]
    r = run_old_release(old_tree, OLD_INSTALL, str(PORT), instance, b0.address, str(b0.http_port))
    old = json.loads(r.stdout.strip().splitlines()[-1])
    assert old["layout"] == 1 and set(old["prog_ids"]) == {"connect4", "connect6", "getpeername4",
                                                           "getpeername6"}
    assert os.listdir(f"/sys/fs/bpf/{instance}/links") and \
        sorted(n for n in os.listdir(f"/sys/fs/bpf/{instance}") if n.startswith("maps-")) == ["maps-v1"]

    with Hammer(_one_request) as load:
        time.sleep(0.3)
        dp = ebpf()
        assert dp.install([]) is True  # upgraded in place, the set carried over
        n_before = load.ok
        time.sleep(0.3)
    assert load.failures == [], load.failures[:5]
    assert load.ok > n_before > 0
    st = dp.read_state()
    assert st.installed and st.details["layout"] == LAYOUT and st.details["program_current"]
    assert st.backends == (be(b0),)
    for hook, link_id in old["link_ids"].items():
        assert st.details["link_ids"][hook] == link_id  # the same links, new programs
        assert st.details["prog_ids"][hook] != old["prog_ids"][hook]
    assert "sockops" in st.details["link_ids"]
    assert sorted(n for n in os.listdir(f"/sys/fs/bpf/{instance}") if n.startswith("maps-")) == \
        [f"maps-v{LAYOUT}"]
    # failover works on the upgraded data path
    held = Held(connect())
    assert dp.close_connections([be(b0)]) == 1
    held.wait()
    assert _aborted(held.error)
    held.close()
    assert dp.passive_failures()[be(b0)].established >= 1
    # cleanup takes the sockops link and the new maps along
    sockops_prog = st.details["prog_ids"]["sockops"]
    dp.close()
    lines = EbpfDatapath.cleanup(dp.settings)
    assert any(line.startswith("cgroup link sockops") for line in lines)
    assert not os.path.exists(f"/sys/fs/bpf/{instance}")
    root = os.open(find_cgroup2_root(), os.O_RDONLY | os.O_DIRECTORY)
    try:
        assert sockops_prog not in bpf.prog_query(root, bpf.BPF_CGROUP_SOCK_OPS)
    finally:
        os.close(root)


# --- nftables specifics ---------------------------------------------------------------


def test_nftables_close_connections_also_deletes_their_conntrack_entries(tb, nft_dp):
    """The entries of the aborted sockets go, and so does the entry of a
    connect to the dead backend that gave up unanswered (its socket is gone,
    the entry would stay in SYN_SENT for 120 s and catch a new connect that
    reuses its source port)."""
    dp = nft_dp
    from prism_kernel.datapath.netlink import conntrack

    b0 = tb.backends[0]
    dp.install([be(b0)])
    assert not any(c.refused for c in dp.passive_failures().values())  # nothing seen yet
    held = Held(connect())
    b0.blackhole(True)
    gave_up = Connecting("127.0.0.1", PORT, timeout=1.0)
    wait_syn_sent("127.0.0.1", PORT, 1)
    gave_up_port = gave_up.sock.getsockname()[1]
    gave_up.wait()
    assert isinstance(gave_up.error, TimeoutError)
    stuck = Connecting("127.0.0.1", PORT, timeout=10)
    wait_syn_sent("127.0.0.1", PORT, 1)
    ports = {held.sock.getsockname()[1], stuck.sock.getsockname()[1], gave_up_port}

    def entries() -> list:
        return [e for e in conntrack.dnat_entries("127.0.0.1", PORT)
                if str(e.reply_src) == b0.address and e.orig_sport in ports]

    assert len(entries()) == 3
    assert dp.close_connections([be(b0)]) == 2  # the two live sockets
    stuck.wait()
    held.wait()
    assert _aborted(stuck.error) and _aborted(held.error)
    held.close()
    assert entries() == []
