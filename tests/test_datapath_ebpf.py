"""The eBPF data path against the real kernel: netns test hosts, real sockets.

Needs root; the upgrade tests also bcc and clang (the fallback loader, and
changed programs built the way bpf/build.sh builds the real one). Everything it creates
is named so that it cannot collide with other work on the machine: netns and
veths `pke*`, BPF instances `pk-ebpf-dev-test*` under /sys/fs/bpf, listen port
37445, addresses 198.19.16.0/20 and 2001:2:0:1000::/56 only. A session first
clears leftovers of an interrupted run, and every test cleans up after itself.
"""

from __future__ import annotations

import bisect
import ctypes
import errno
import ipaddress
import json
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import textwrap
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pytest

pytestmark = [pytest.mark.kernel, pytest.mark.guest]

if os.geteuid() != 0:
    pytest.skip("needs root", allow_module_level=True)

from prism_kernel.core import ebpf_plan as plan  # noqa: E402
from prism_kernel.core.model import Backend  # noqa: E402
from prism_kernel.datapath.base import DatapathSettings  # noqa: E402
from prism_kernel.datapath.ebpf import bpfsys as bpf  # noqa: E402
from prism_kernel.datapath.ebpf import maps as pkmaps  # noqa: E402
from prism_kernel.datapath.ebpf.datapath import LAYOUT, EbpfDatapath, default_source  # noqa: E402
from prism_kernel.errors import DatapathError, DatapathUnavailable  # noqa: E402
from tests.harness import Hammer, build_program  # noqa: E402

PORT = 37445            # the listen port (never 7445 / 17445 / 27445: other work runs here)
BACKEND_PORT = 37446
BACKEND_PORT2 = 37447   # a second listener per backend host: more backends for the race test
INSTANCE = "pk-ebpf-dev-test"
INSTANCE_PREFIX = "pk-ebpf-dev-test"
NS_PREFIX = "pke"
GUARD_ROUTE = "198.18.0.0/15"
V4_NET = ipaddress.ip_network("198.19.16.0/20")
V6_NET = ipaddress.ip_network("2001:2:0:1000::/56")
SERVER_MARK = "pke-test-server"
REPO = Path(__file__).resolve().parents[1]
PY = sys.executable

try:
    EbpfDatapath.check_available(DatapathSettings(listen_port=PORT, instance=INSTANCE))
except DatapathUnavailable as e:  # pragma: no cover - depends on the host
    pytest.fail(f"eBPF data path unavailable on this machine: {e.reason}", pytrace=False)


# --- helpers ------------------------------------------------------------------


def sh(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(args, check=check, capture_output=True, text=True, timeout=60)


SERVER_SRC = textwrap.dedent(
    f"""
    # {SERVER_MARK}
    import ctypes, signal, socket, sys, threading
    ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: die with the test
    name, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(fam, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if fam == socket.AF_INET6:
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    s.bind((host, port))
    s.listen(1024)
    print("ready", flush=True)
    def serve(c, peer):
        try:
            c.sendall(f"{{name}} {{peer[0]}} {{peer[1]}}\\n".encode())
        finally:
            c.close()
    while True:
        c, peer = s.accept()
        serve(c, peer)
    """
)


@dataclass
class Host:
    name: str          # also the netns name
    v4: str
    v6: str
    host_v4: str       # the host side of the veth
    host_v6: str


@dataclass
class NetBed:
    hosts: dict[str, Host] = field(default_factory=dict)
    procs: list[subprocess.Popen] = field(default_factory=list)
    server_file: str = ""

    def backend(self, name: str, family: int = 4, port: int = BACKEND_PORT) -> Backend:
        h = self.hosts[name]
        return Backend.of(h.v4 if family == 4 else h.v6, port)

    def start_server(self, ns: str, name: str, host: str, port: int) -> None:
        p = subprocess.Popen(["ip", "netns", "exec", ns, PY, self.server_file, name, host, str(port)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.procs.append(p)
        line = p.stdout.readline()
        assert line.strip() == "ready", f"server {name} in {ns}: {line!r} {p.stderr.read() if p.poll() is not None else ''}"


def _kill_leftover_servers() -> None:
    me = os.getpid()
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == me:
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().split(b"\0")
        except OSError:
            continue
        if any(SERVER_MARK.encode() in part for part in cmd):
            try:
                os.kill(int(pid), signal.SIGKILL)
            except ProcessLookupError:
                pass


def _clear_leftovers() -> list[str]:
    """Detach/unpin every BPF instance of ours, remove our netns and veths."""
    done = []
    if os.path.isdir("/sys/fs/bpf"):
        for name in sorted(os.listdir("/sys/fs/bpf")):
            if name.startswith(INSTANCE_PREFIX):
                done += EbpfDatapath.cleanup(DatapathSettings(listen_port=PORT, instance=name))
    _kill_leftover_servers()
    for line in sh("ip", "netns", "list").stdout.splitlines():
        ns = line.split()[0] if line.strip() else ""
        if ns.startswith(NS_PREFIX + "-"):
            sh("ip", "netns", "del", ns, check=False)
            done.append(f"netns {ns}")
    for line in sh("ip", "-o", "link", "show").stdout.splitlines():
        ifname = line.split(":")[1].strip().split("@")[0]
        if ifname.startswith(NS_PREFIX + "-"):
            sh("ip", "link", "del", ifname, check=False)
            done.append(f"link {ifname}")
    return done


def _make_host(idx: int, name: str) -> Host:
    ns = f"{NS_PREFIX}-{name}"
    base4 = V4_NET.network_address + 4 * idx
    host_v4, v4 = str(base4 + 1), str(base4 + 2)
    net6 = ipaddress.ip_network(f"{V6_NET.network_address + (idx << 64)}/64")
    assert net6.subnet_of(V6_NET)
    host_v6, v6 = str(net6.network_address + 1), str(net6.network_address + 2)
    hveth = f"{NS_PREFIX}-{name}h"
    sh("ip", "netns", "add", ns)
    sh("ip", "link", "add", hveth, "type", "veth", "peer", "name", "eth0", "netns", ns)
    sh("ip", "addr", "add", f"{host_v4}/30", "dev", hveth)
    sh("ip", "-6", "addr", "add", f"{host_v6}/64", "dev", hveth, "nodad")
    sh("ip", "link", "set", hveth, "up")
    sh("ip", "-n", ns, "link", "set", "lo", "up")
    sh("ip", "-n", ns, "addr", "add", f"{v4}/30", "dev", "eth0")
    sh("ip", "-n", ns, "-6", "addr", "add", f"{v6}/64", "dev", "eth0", "nodad")
    sh("ip", "-n", ns, "link", "set", "eth0", "up")
    sh("ip", "-n", ns, "route", "add", "default", "via", host_v4)
    sh("ip", "-n", ns, "-6", "route", "add", "default", "via", host_v6)
    return Host(ns, v4, v6, host_v4, host_v6)


@pytest.fixture(scope="session")
def testbed(tmp_path_factory):
    _clear_leftovers()
    added_route = False
    if GUARD_ROUTE not in sh("ip", "route", "show", "type", "unreachable").stdout:
        sh("ip", "route", "replace", "unreachable", GUARD_ROUTE)
        added_route = True
    tb = NetBed()
    tb.server_file = str(tmp_path_factory.mktemp("pke") / f"{SERVER_MARK}.py")
    Path(tb.server_file).write_text(SERVER_SRC)
    try:
        for i, name in enumerate(("b1", "b2", "b3", "c1")):
            tb.hosts[name] = _make_host(i + 1, name)
        for name in ("b1", "b2", "b3"):
            # one dual-stack listener per backend host: answers "name peer-ip peer-port"
            tb.start_server(f"{NS_PREFIX}-{name}", name, "::", BACKEND_PORT)
            tb.start_server(f"{NS_PREFIX}-{name}", name, "::", BACKEND_PORT2)
        # c1: a "pod" with its own listener on its own loopback at the listen port
        tb.start_server(f"{NS_PREFIX}-c1", "local", "127.0.0.1", PORT)
        yield tb
    finally:
        for p in tb.procs:
            p.kill()
            p.wait(timeout=10)
            for s in (p.stdout, p.stderr):
                if s:
                    s.close()
        _clear_leftovers()
        if added_route:
            sh("ip", "route", "del", "unreachable", GUARD_ROUTE, check=False)


@pytest.fixture
def dp_factory():
    """Datapaths made by a test, all cleaned up (and closed) afterwards."""
    made: list[EbpfDatapath] = []
    instances: set[str] = set()

    def make(instance: str = INSTANCE, loader: str = "auto", **kw) -> EbpfDatapath:
        settings = DatapathSettings(listen_port=PORT, instance=instance, ebpf_loader=loader)
        dp = EbpfDatapath(settings, **kw)
        made.append(dp)
        instances.add(instance)
        return dp

    try:
        yield make
    finally:
        for dp in made:
            dp.close()
        for inst in instances:
            EbpfDatapath.cleanup(DatapathSettings(listen_port=PORT, instance=inst))


def ask(host: str = "127.0.0.1", family: int = socket.AF_INET, timeout: float = 3.0):
    """Connect to the listen address; returns (backend name, peer seen by the
    backend, getpeername() of the client socket)."""
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        if family == socket.AF_INET6:
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        s.connect((host, PORT))
        peer = s.getpeername()
        data = b""
        while not data.endswith(b"\n"):
            chunk = s.recv(256)
            if not chunk:
                break
            data += chunk
    name, seen_ip, _ = data.decode().split()
    return name, seen_ip, peer


def ClientLoop(max_s: float = 60.0) -> Hammer:
    """Connects to 127.0.0.1:PORT in a loop; `results` are the backends' names."""
    return Hammer(lambda: ask(timeout=2.0)[0], max_s)


def attached_ids(attach_type: int) -> list[int]:
    root = os.open(cgroup_root(), os.O_RDONLY | os.O_DIRECTORY)
    try:
        return bpf.prog_query(root, attach_type)
    finally:
        os.close(root)


def cgroup_root() -> str:
    from prism_kernel.datapath.ebpf.cgroup import find_cgroup2_root
    return find_cgroup2_root()


ALL_TYPES = (bpf.BPF_CGROUP_INET4_CONNECT, bpf.BPF_CGROUP_INET6_CONNECT,
             bpf.BPF_CGROUP_INET4_GETPEERNAME, bpf.BPF_CGROUP_INET6_GETPEERNAME,
             bpf.BPF_CGROUP_SOCK_OPS)
ALL_HOOKS = ("connect4", "connect6", "getpeername4", "getpeername6", "sockops")  # ALL_TYPES order


def run_py(code: str, timeout: float = 60) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([PY, "-c", code], capture_output=True, text=True, timeout=timeout, env=env)


# --- tests --------------------------------------------------------------------


def test_fresh_install_steers_ipv4_to_the_set_only(testbed, dp_factory):
    dp = dp_factory()
    b1, b2 = testbed.backend("b1"), testbed.backend("b2")
    assert dp.install([b1, b2]) is False
    seen = Counter()
    for _ in range(60):
        name, seen_ip, peer = ask()
        seen[name] += 1
        # the backend sees the host's own veth address: no NAT involved
        assert seen_ip in (f"::ffff:{testbed.hosts[name].host_v4}", testbed.hosts[name].host_v4)
        assert peer == ("127.0.0.1", PORT)
    assert set(seen) == {"b1", "b2"}, seen

    assert dp.apply([testbed.backend("b3")]) is True
    assert {ask()[0] for _ in range(20)} == {"b3"}
    assert dp.apply([testbed.backend("b3")]) is False  # unchanged: nothing written


def test_ipv6_and_dual_stack(testbed, dp_factory):
    dp = dp_factory()
    v4 = testbed.backend("b1", 4)
    v6 = testbed.backend("b2", 6)
    dp.install([v4, v6])
    for _ in range(20):
        name, seen_ip, peer = ask("::1", socket.AF_INET6)
        assert name == "b2" and seen_ip == testbed.hosts["b2"].host_v6
        assert peer[:2] == ("::1", PORT)
        name, seen_ip, peer = ask("::ffff:127.0.0.1", socket.AF_INET6)
        assert name == "b1"
        assert peer[:2] == ("::ffff:127.0.0.1", PORT)
        name, _, peer = ask("127.0.0.1", socket.AF_INET)
        assert name == "b1" and peer == ("127.0.0.1", PORT)
    # only IPv6 backends: [::1] is steered, 127.0.0.1 is left alone (nothing listens)
    dp.apply([v6])
    assert ask("::1", socket.AF_INET6)[0] == "b2"
    with pytest.raises(ConnectionRefusedError):
        ask("127.0.0.1")


def test_getpeername_sockname_and_real_peer(testbed, dp_factory):
    dp = dp_factory()
    dp.install([testbed.backend("b1")])
    with socket.create_connection(("127.0.0.1", PORT), timeout=3) as s:
        assert s.getpeername() == ("127.0.0.1", PORT)
        # the local address is the real one (the host's veth address)
        assert s.getsockname()[0] == testbed.hosts["b1"].host_v4
    # a socket that is not steered keeps its real peer
    with socket.create_connection((testbed.hosts["b1"].v4, BACKEND_PORT), timeout=3) as s:
        assert s.getpeername() == (testbed.hosts["b1"].v4, BACKEND_PORT)


def test_other_netns_reaches_its_own_loopback(testbed, dp_factory):
    dp = dp_factory()
    dp.install([testbed.backend("b1")])
    code = textwrap.dedent(f"""
        import socket
        out = []
        for _ in range(5):
            with socket.create_connection(("127.0.0.1", {PORT}), timeout=3) as s:
                out.append(s.recv(100).decode().split()[0])
        print(",".join(out))
    """)
    r = subprocess.run(["ip", "netns", "exec", f"{NS_PREFIX}-c1", PY, "-c", code],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == ",".join(["local"] * 5)
    assert ask()[0] == "b1"  # while the host is steered


def test_empty_set_leaves_connect_untouched(testbed, dp_factory):
    dp = dp_factory()
    assert dp.install([]) is False
    with pytest.raises(ConnectionRefusedError):
        ask()
    st = dp.read_state()
    assert st.backends == ()
    assert st.details["stats"]["no_backend"] >= 1
    dp.apply([testbed.backend("b2")])
    assert ask()[0] == "b2"


def test_counters_count(testbed, dp_factory):
    dp = dp_factory()
    b1, b2 = testbed.backend("b1"), testbed.backend("b2")
    dp.install([b1])
    for _ in range(25):
        ask()
    dp.apply([b1, b2])
    seen = Counter(ask()[0] for _ in range(30))
    st = dp.read_state()
    assert st.counters[b1].connections == 25 + seen["b1"]
    assert st.counters[b2].connections == seen["b2"]
    assert st.details["stats"]["steered"] >= 55
    assert st.details["stats"]["peer_xlate"] >= 55
    dp.apply([b2])  # a backend that leaves takes its counter along: no unbounded state
    assert set(dp.read_state().counters) == {b2}
    # UDP "connects" to the listen address are not steered
    steered = dp.read_state().details["stats"]["steered"]
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
        u.connect(("127.0.0.1", PORT))
        assert u.getpeername() == ("127.0.0.1", PORT)
    assert dp.read_state().details["stats"]["steered"] == steered


# A client of the race test: nonblocking connects to the listen address in a
# loop, each timed (CLOCK_MONOTONIC, the writer's clock too) and kept open
# until its real peer is read from /proc/net/tcp{,6} by socket inode
# (getpeername() answers with the listen address: the program translates it).
RACE_CLIENT = textwrap.dedent("""
    import ctypes, json, os, signal, socket, sys, time
    ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: die with the test
    port, stop, max_s, out = int(sys.argv[1]), sys.argv[2], float(sys.argv[3]), sys.argv[4]
    os.sched_setaffinity(0, {int(sys.argv[5])})

    def peers():
        m = {}
        for path in ("/proc/net/tcp", "/proc/net/tcp6"):
            with open(path) as f:
                next(f)
                for line in f:
                    p = line.split()
                    m[int(p[9])] = p[2]
        return m

    records, batch = [], []

    def flush():
        m = peers()
        for s, t0, t1, fam, rc, ino in batch:
            err = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            records.append((t0, t1, fam, m.get(ino), rc, err))
            s.close()
        batch.clear()

    print("started", flush=True)
    end, n = time.monotonic() + max_s, 0
    while time.monotonic() < end and not (n % 64 == 0 and os.path.exists(stop)):
        fam = 4 if n % 2 == 0 else 6
        s = socket.socket(socket.AF_INET if fam == 4 else socket.AF_INET6, socket.SOCK_STREAM)
        s.setblocking(False)
        t0 = time.monotonic_ns()
        rc = s.connect_ex(("127.0.0.1" if fam == 4 else "::1", port))
        t1 = time.monotonic_ns()
        batch.append((s, t0, t1, fam, rc, os.fstat(s.fileno()).st_ino))
        n += 1
        if len(batch) >= 256:
            flush()
    flush()
    with open(out, "w") as f:
        json.dump(records, f)
""")


def _proc_net_peer(hexpeer: str) -> tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int]:
    """/proc/net/tcp{,6} rem_address: the address as host-order 32-bit words, then the port."""
    addr, port = hexpeer.split(":")
    raw = b"".join(bytes.fromhex(addr[i:i + 8])[::-1] for i in range(0, len(addr), 8))
    return ipaddress.ip_address(raw), int(port, 16)


def _live_sets(history: list[tuple[int, int, list[Backend]]]):
    """For each backend, the indexes of the sets holding it; and a lookup:
    was `b` in a set that was live at some point in [t0, t1]? Set i is
    committed inside its apply() (history[i] = (start, end, set)) and
    replaced inside the next one's."""
    starts = [h[0] for h in history]
    ends = [h[1] for h in history]
    holding: dict[Backend, list[int]] = {}
    for i, (_, _, backends) in enumerate(history):
        for b in set(backends):
            holding.setdefault(b, []).append(i)

    def live_during(b: Backend, t0: int, t1: int) -> bool:
        last = bisect.bisect_right(starts, t1) - 1        # committed before the connect ended
        first = bisect.bisect_left(ends, t0) - 1          # not replaced before it began
        idx = holding.get(b, [])
        j = bisect.bisect_left(idx, max(first, 0))
        return j < len(idx) and idx[j] <= last

    return live_during


def test_rapid_set_changes_land_every_connect_in_one_live_set(testbed, dp_factory, tmp_path):
    """Set changes as fast as the kernel takes them, under connects from
    several processes: every connect is steered (none fails, none is left
    alone), to a backend of a set that was live while it ran (not merely one
    of all the backends), and the pick's retry path really ran (the writer
    committed between a pick's two reads of pk_commit) with no pick
    exhausted. Consecutive sets never share a backend of a family, so a
    stale or mixed pick lands outside the sets live during its connect.

    The first changes go through apply(); then, to hit the race on purpose
    (in a TCG guest apply()'s read-back makes commits rare), the writer runs
    the data path's own plan and execute() without the read-back, on one CPU
    while the clients connect on the other, until the retry counter moves;
    a last apply() finds the kernel holding exactly the last set."""
    dp = dp_factory()
    hosts, ports = ("b1", "b2", "b3"), (BACKEND_PORT, BACKEND_PORT2)
    pool = {fam: [testbed.backend(h, fam, p) for h in hosts for p in ports] for fam in (4, 6)}
    n = len(pool[4])

    def set_of(i: int) -> list[Backend]:
        # one or two per family, shifted by one each time: i and i+1 share none
        k4, k6 = (2 if i % 3 == 0 else 1), (2 if i % 3 == 1 else 1)
        return ([pool[4][(2 * i + j) % n] for j in range(k4)] +
                [pool[6][(2 * i + 3 + j) % n] for j in range(k6)])

    dp.install(set_of(0))
    history = [(0, time.monotonic_ns(), set_of(0))]
    stop = tmp_path / "stop"
    maps = pkmaps.open_maps(f"/sys/fs/bpf/{INSTANCE}/maps-v{LAYOUT}")
    ncpus = bpf.possible_cpus()
    cpus = sorted(os.sched_getaffinity(0))
    writer_cpu, client_cpu = (cpus[0], cpus[1]) if len(cpus) > 1 else (cpus[0], cpus[0])
    clients = []
    try:
        for c in range(3):
            clients.append(subprocess.Popen(
                [PY, "-c", RACE_CLIENT, str(PORT), str(stop), "200", str(tmp_path / f"client{c}.json"),
                 str(client_cpu)], stdout=subprocess.PIPE, text=True))
        for p in clients:
            assert p.stdout.readline().strip() == "started"

        def retries() -> int:
            raw = bpf.map_lookup(maps.fds["pk_stats"], struct.pack("=I", pkmaps.STAT_NAMES.index("retry")),
                                 8 * ncpus)
            return sum(struct.unpack(f"={ncpus}Q", raw))

        i = 0
        for i in range(1, 257):  # the daemon's path
            t = time.monotonic_ns()
            assert dp.apply(set_of(i)) is True
            history.append((t, time.monotonic_ns(), set_of(i)))
        live, counters = pkmaps.live(maps), set(set_of(i))
        os.sched_setaffinity(0, {writer_cpu})
        deadline = time.monotonic() + 150
        while time.monotonic() < deadline and not (i >= 2048 and i % 256 == 0 and retries() >= 3):
            i += 1
            t = time.monotonic_ns()
            ops = plan.plan_update(live, set_of(i), counters)
            assert pkmaps.execute(maps, ops, ncpus) == []
            history.append((t, time.monotonic_ns(), set_of(i)))
            live, counters = plan.live_after(live, ops), set(set_of(i))
        stop.touch()
        for p in clients:
            assert p.wait(timeout=60) == 0
    finally:
        os.sched_setaffinity(0, cpus)
        stop.touch()
        for p in clients:
            if p.poll() is None:
                p.kill()
                p.wait(timeout=10)
            p.stdout.close()
        maps.close()
    assert dp.apply(set_of(i)) is False  # the read-back sees exactly what the storm wrote
    live_during = _live_sets(history)
    st = dp.read_state()
    records = [r for c in range(3) for r in json.loads((tmp_path / f"client{c}.json").read_text())]
    failed, unchecked, wrong = [], 0, []
    for t0, t1, fam, peer, rc, err in records:
        if rc not in (0, errno.EINPROGRESS) or err:
            failed.append((fam, rc, err))
            continue
        if peer is None:
            unchecked += 1  # closed before its peer was read
            continue
        addr, port = _proc_net_peer(peer)
        b = Backend.of(addr, port)
        if not live_during(b, t0, t1):
            wrong.append((fam, str(b), t1 - t0))
    checked = len(records) - len(failed) - unchecked
    print(f"{i} set changes, {len(records)} connects ({checked} checked, {len(failed)} failed, "
          f"{len(wrong)} outside the live sets), retries {st.details['stats']['retry']}, "
          f"exhausted {st.details['stats']['pick_exhausted']}")
    assert failed == [], failed[:5]
    assert wrong == [], f"{len(wrong)} connects landed outside the sets live during them: {wrong[:5]}"
    assert checked >= 0.9 * len(records) and checked >= 2000, (checked, len(records))
    assert st.details["stats"]["retry"] >= 3  # the race was hit, and lost by no connect
    assert st.details["stats"]["pick_exhausted"] == 0
    assert st.details["generation"] == i + 1
    assert sorted(st.backends) == sorted(set_of(i))
    # the live buffer holds exactly that set, each slot tagged with the live generation
    maps = pkmaps.open_maps(f"/sys/fs/bpf/{INSTANCE}/maps-v{LAYOUT}")
    try:
        live = pkmaps.live(maps)
    finally:
        maps.close()
    assert live.seq == i + 1 and sorted(live.v4 + live.v6) == sorted(set_of(i))


ALLOCATOR_PROBE = r"""
BPF_F_TABLE("hash", u32, u64, h, 16, BPF_F_NO_PREALLOC);

/* Inside one program run (one RCU read-side section): an element is
 * deleted while a pointer to its value is held, then another key is added.
 * Returns 2 when the new key's value appears behind the old pointer (the
 * freed element was handed out again at once), 1 when the old value is
 * still there (freed after a grace period). */
int reuse(struct __sk_buff *skb)
{
	u32 a = 1, b = 2;
	u64 va = 111, vb = 222;
	u64 *p;

	h.update(&a, &va);
	p = h.lookup(&a);
	if (!p)
		return 0;
	h.delete(&a);
	h.update(&b, &vb);
	return *p == 222 ? 2 : *p == 111 ? 1 : 3;
}
"""


def test_a_freed_hash_element_is_handed_out_again_at_once_since_bpf_mem_alloc():
    """The premise of the update protocol (docs/design/ebpf-update-protocol.md):
    since Linux 6.1 (bpf_mem_alloc, kernel/bpf/memalloc.c) a BPF_F_NO_PREALLOC
    hash map frees an element to a per-CPU list that the next allocation
    takes from, with no grace period; before, it was freed by call_rcu. So a
    reader holding a pointer can see another key's value appear under it.
    Run with BPF_PROG_TEST_RUN; the kernel's symbols say which allocator it has."""
    from bcc import BPF  # the test process may carry the compiler

    with open("/proc/kallsyms") as f:
        has_mem_alloc = any(line.rstrip().endswith(" bpf_mem_cache_alloc") for line in f)
    b = BPF(text=ALLOCATOR_PROBE.encode())
    try:
        fn = b.load_func(b"reuse", BPF.SOCKET_FILTER)
        data = ctypes.create_string_buffer(64)
        attr = ctypes.create_string_buffer(80)
        # bpf_attr.test: prog_fd, retval, data_size_in, data_size_out, data_in, data_out, repeat
        struct.pack_into("=IIIIQQI", attr, 0, fn.fd, 0, 64, 0, ctypes.addressof(data), 0, 1)
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.syscall(bpf._nr(), 10, attr, 80) != 0:  # BPF_PROG_TEST_RUN
            raise OSError(ctypes.get_errno(), "BPF_PROG_TEST_RUN")
        retval = struct.unpack_from("=I", attr, 4)[0]
    finally:
        b.cleanup()
    print(f"bpf_mem_alloc: {has_mem_alloc}; probe returned {retval}")
    assert retval == (2 if has_mem_alloc else 1)


HOLDER = textwrap.dedent("""
    import json, sys, time
    from prism_kernel.datapath.base import DatapathSettings
    from prism_kernel.datapath.ebpf.datapath import EbpfDatapath
    from prism_kernel.core.model import Backend
    settings = DatapathSettings(listen_port=int(sys.argv[1]), instance=sys.argv[2])
    dp = EbpfDatapath(settings)
    adopted = dp.install([Backend.of(a, int(sys.argv[4])) for a in sys.argv[3].split(",") if a])
    st = dp.read_state()
    print(json.dumps({"adopted": adopted, "prog_ids": st.details["prog_ids"]}), flush=True)
    time.sleep(600)
""")


def test_kill9_and_adopt_without_a_failed_connect(testbed, dp_factory):
    dp_factory()  # registers INSTANCE for cleanup
    env = dict(os.environ, PYTHONPATH=str(REPO))
    addrs = ",".join(testbed.hosts[n].v4 for n in ("b1", "b2"))
    holder = subprocess.Popen([PY, "-c", HOLDER, str(PORT), INSTANCE, addrs, str(BACKEND_PORT)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        first = json.loads(holder.stdout.readline() or "{}")
        assert first.get("adopted") is False, holder.stderr.read() if holder.poll() is not None else first
        with ClientLoop() as loop:
            loop.wait_for(30)
            holder.send_signal(signal.SIGKILL)
            holder.wait(timeout=10)
            loop.wait_for(30)
            dp = dp_factory()
            assert dp.install([testbed.backend("b3")]) is True  # adopted: initial not written
            st = dp.read_state()
            assert st.details["prog_ids"] == first["prog_ids"]
            assert sorted(st.backends) == sorted([testbed.backend("b1"), testbed.backend("b2")])
            loop.wait_for(30)
            dp.apply([testbed.backend("b3")])
            loop.wait_for(30)
        assert loop.failures == [], loop.failures[:5]
        names = Counter(loop.results)
        assert names["b3"] > 0 and names["b1"] + names["b2"] > 0
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait(timeout=10)
        holder.stdout.close()
        holder.stderr.close()


def _with_layout(text: str, layout: int) -> str:
    """The source with another map layout number (the object carries it in
    pk_params; the loader refuses an object of another layout)."""
    assert f"#define PK_LAYOUT {LAYOUT}\n" in text
    return text.replace(f"#define PK_LAYOUT {LAYOUT}\n", f"#define PK_LAYOUT {layout}\n")


def _changed_program(tmp_path: Path, layout: int = LAYOUT) -> dict[str, Path]:
    """A program that differs from the release's (another hash), as the
    source bcc compiles and the object libbpf loads."""
    text = default_source().read_text()
    tries = re.search(r"^#define PK_PICK_TRIES (\d+)\b", text, re.MULTILINE)
    assert tries, "PK_PICK_TRIES not in the source"
    text = text[:tries.start(1)] + str(int(tries.group(1)) + 1) + text[tries.end(1):]
    return build_program(tmp_path, _with_layout(text, layout))


@pytest.mark.parametrize("loader", ["libbpf", "bcc"])
@pytest.mark.parametrize("layout", [LAYOUT, LAYOUT + 1], ids=["same-layout", "new-layout"])
def test_upgrade_replaces_program_atomically(testbed, dp_factory, tmp_path, layout, loader):
    old = dp_factory()
    backends = [testbed.backend("b1"), testbed.backend("b2", 6), testbed.backend("b2")]
    old.install(backends)
    old_state = old.read_state()
    old_ids = old_state.details["prog_ids"]
    old.close()
    with ClientLoop() as loop:
        loop.wait_for(30)
        new = dp_factory(loader=loader, layout=layout, **_changed_program(tmp_path, layout))
        assert new.install([]) is True  # upgraded in place, set carried over
        assert new.last_load["loader"] == loader
        loop.wait_for(30)
    assert loop.failures == [], loop.failures[:5]
    st = new.read_state()
    new_ids = st.details["prog_ids"]
    assert set(new_ids.values()).isdisjoint(old_ids.values())
    assert st.details["link_ids"] == old_state.details["link_ids"]  # same links, new programs
    assert st.details["program_current"] is True
    assert sorted(st.backends) == sorted(backends)
    for (hook, attach_type) in zip(ALL_HOOKS, ALL_TYPES):
        ids = attached_ids(attach_type)
        assert new_ids[hook] in ids and old_ids[hook] not in ids
    maps_dirs = sorted(n for n in os.listdir(f"/sys/fs/bpf/{INSTANCE}") if n.startswith("maps-"))
    assert maps_dirs == [f"maps-v{layout}"]
    if layout == LAYOUT:
        assert st.details["map_ids"] == old_state.details["map_ids"]  # maps kept
    assert ask("::1", socket.AF_INET6)[0] == "b2"
    # and the original program comes back the same way (a downgrade is an upgrade)
    back = dp_factory()
    assert back.install([]) is True
    assert back.last_load["loader"] == "libbpf"
    assert back.read_state().details["program_current"] is True


@pytest.mark.parametrize("layout", [LAYOUT, LAYOUT + 1], ids=["same-layout", "new-layout"])
@pytest.mark.parametrize("breakage", ["compile", "verifier"])
def test_a_failed_upgrade_changes_nothing(testbed, dp_factory, tmp_path, layout, breakage):
    """A new program that does not compile, or that the verifier rejects
    (after its maps were created and pinned): the old program keeps steering
    with its maps and no new pin or directory is left. With a new layout
    install() raises (the old program's maps are not ours to write); with the
    same layout it keeps the old program and the set can still be written."""
    old = dp_factory()
    old.install([testbed.backend("b1")])
    before = old.read_state().details
    pins_before = sorted(os.walk(f"/sys/fs/bpf/{INSTANCE}"))
    text = default_source().read_text()
    if breakage == "compile":
        text += "\n#error a broken release\n"
    else:  # an out-of-bounds read in connect4: compiles, rejected at load
        text = text.replace("\tif (ctx->user_ip4 != PK_LOOPBACK4)\n\t\treturn 1;",
                            "\tif (ctx->user_ip4 != PK_LOOPBACK4)\n\t\treturn *(volatile int *)"
                            "((char *)ctx + 4096);", 1)
        assert "4096" in text
    # auto: libbpf's load fails (no object, or the verifier's no), then bcc's
    new = dp_factory(layout=layout, **build_program(tmp_path, _with_layout(text, layout),
                                                    build=breakage != "compile"))
    if layout != LAYOUT:
        with pytest.raises(DatapathError) as e:
            new.install([])
        assert "libbpf (" in str(e.value) and "bcc (" in str(e.value), e.value
    else:
        assert new.install([]) is True  # kept the old program
        assert "upgrade_failed" in new.read_state().details
    assert sorted(os.walk(f"/sys/fs/bpf/{INSTANCE}")) == pins_before
    after = dp_factory().read_state().details
    assert after["prog_ids"] == before["prog_ids"] and after["map_ids"] == before["map_ids"]
    assert ask()[0] == "b1"
    if layout == LAYOUT:  # the set is still written through the kept program's maps
        assert new.apply([testbed.backend("b2")]) is True
        assert {ask()[0] for _ in range(10)} == {"b2"}


def test_upgrade_waits_for_a_set_when_the_old_maps_are_unreadable(testbed, dp_factory, tmp_path,
                                                                  monkeypatch):
    old = dp_factory()
    old.install([testbed.backend("b1")])
    old_ids = old.read_state().details["prog_ids"]
    new = dp_factory(layout=LAYOUT + 1, **_changed_program(tmp_path, LAYOUT + 1))
    monkeypatch.setattr(EbpfDatapath, "_read_attached_set", lambda self, links: None)
    assert new.install([]) is True
    # nothing swapped yet: the old program still steers to its set
    assert new.read_state().details["prog_ids"] == old_ids
    assert ask()[0] == "b1"
    assert new.apply([testbed.backend("b2")]) is True
    st = new.read_state()
    assert set(st.details["prog_ids"].values()).isdisjoint(old_ids.values())
    assert st.details["program_current"] is True
    assert {ask()[0] for _ in range(10)} == {"b2"}


def test_daemon_rss_after_adopt_and_after_install(testbed, dp_factory):
    dp = dp_factory()
    dp.install([testbed.backend("b1")])
    code = textwrap.dedent(f"""
        from prism_kernel.datapath.base import DatapathSettings
        from prism_kernel.datapath.ebpf.datapath import EbpfDatapath
        from prism_kernel.core.model import Backend
        import sys, json
        dp = EbpfDatapath(DatapathSettings(listen_port={PORT}, instance="{INSTANCE}"))
        adopted = dp.install([Backend.of("{testbed.hosts['b1'].v4}", {BACKEND_PORT})])
        dp.apply([Backend.of("{testbed.hosts['b2'].v4}", {BACKEND_PORT})])
        dp.read_state()
        status = dict(l.split(":", 1) for l in open("/proc/self/status").read().splitlines())
        print(json.dumps({{"adopted": adopted, "bcc": "bcc" in sys.modules,
                          "rss_kb": int(status["VmRSS"].split()[0]),
                          "hwm_kb": int(status["VmHWM"].split()[0])}}))
    """)
    r = run_py(code)
    assert r.returncode == 0, r.stderr
    adopt = json.loads(r.stdout.strip().splitlines()[-1])
    assert adopt["adopted"] is True and adopt["bcc"] is False
    assert adopt["rss_kb"] <= 60 * 1024, adopt
    # A fresh install compiles in the child: the daemon's own peak stays small.
    EbpfDatapath.cleanup(dp.settings)
    dp.close()
    r = run_py(code)
    assert r.returncode == 0, r.stderr
    fresh = json.loads(r.stdout.strip().splitlines()[-1])
    assert fresh["adopted"] is False and fresh["bcc"] is False
    assert fresh["hwm_kb"] <= 60 * 1024, fresh
    print(f"daemon RSS: adopt {adopt}, fresh install {fresh}")


def test_cleanup_leaves_nothing_and_is_idempotent(testbed, dp_factory):
    dp = dp_factory()
    dp.install([testbed.backend("b1")])
    ids = dp.read_state().details["prog_ids"]
    dp.close()
    lines = EbpfDatapath.cleanup(dp.settings)
    assert any(line.startswith("cgroup link connect4") for line in lines)
    assert not os.path.exists(f"/sys/fs/bpf/{INSTANCE}")
    for t in ALL_TYPES:
        assert not set(attached_ids(t)) & set(ids.values())
    shown = json.loads(sh("bpftool", "-j", "cgroup", "show", cgroup_root()).stdout.strip() or "[]")
    assert not {p["id"] for p in shown} & set(ids.values())
    # the programs are gone from the kernel (freed after an RCU grace period)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        alive = [p for p in ids.values() if sh("bpftool", "prog", "show", "id", str(p), check=False).returncode == 0]
        if not alive:
            break
        time.sleep(0.1)
    assert not alive
    assert EbpfDatapath.cleanup(dp.settings) == []
    with pytest.raises(ConnectionRefusedError):
        ask()
    # cleanup of an instance that never existed
    assert EbpfDatapath.cleanup(DatapathSettings(listen_port=PORT, instance=INSTANCE + "-none")) == []


def test_read_state_without_install_and_without_daemon(testbed, dp_factory):
    fresh = dp_factory()
    st = fresh.read_state()
    assert st.installed is False and st.backends == ()
    dp_factory().install([testbed.backend("b1")])
    other = EbpfDatapath(DatapathSettings(listen_port=PORT, instance=INSTANCE))
    try:
        st = other.read_state()  # a `status` process: opens pins, no install()
        assert st.installed is True
        assert st.backends == (testbed.backend("b1"),)
        assert set(st.details["prog_ids"]) == set(ALL_HOOKS)
        assert st.details["attach_cgroup"] == cgroup_root()
        assert st.details["cgroup_ids"] == [1]
        assert len(st.details["program_hash"]) == 64
    finally:
        other.close()


def test_listen_port_change_is_a_config_write(testbed, dp_factory):
    dp = dp_factory()
    dp.install([testbed.backend("b1")])
    ids = dp.read_state().details["prog_ids"]
    moved = EbpfDatapath(DatapathSettings(listen_port=PORT + 10, instance=INSTANCE))
    try:
        assert moved.install([]) is True
        st = moved.read_state()
        assert st.details["prog_ids"] == ids and st.details["listen_port"] == PORT + 10
        with pytest.raises(ConnectionRefusedError):
            ask()  # PORT is no longer steered
        with socket.create_connection(("127.0.0.1", PORT + 10), timeout=3) as s:
            assert s.recv(100).split()[0] == b"b1"
    finally:
        moved.close()


def test_detached_behind_our_back_is_reported_and_reinstalled(testbed, dp_factory):
    dp = dp_factory()
    dp.install([testbed.backend("b1")])
    # someone detaches the connect4 link but leaves its pin (a defunct link)
    fd = bpf.obj_get(f"/sys/fs/bpf/{INSTANCE}/links/connect4")
    try:
        bpf.link_detach(fd)
    finally:
        os.close(fd)
    with pytest.raises(ConnectionRefusedError):
        ask()
    with pytest.raises(DatapathError, match="connect4"):
        dp.apply([testbed.backend("b1")])
    assert dp.read_state().installed is False
    assert dp.install([testbed.backend("b1")]) is True  # the other hooks and the maps are kept
    assert dp.apply([testbed.backend("b1")]) is False
    assert ask()[0] == "b1"
    assert dp.read_state().installed is True
    # everything removed by another process (e.g. `prism-kernel cleanup`)
    EbpfDatapath.cleanup(dp.settings)
    with pytest.raises(DatapathError):
        dp.apply([testbed.backend("b2")])
    assert dp.install([testbed.backend("b2")]) is False
    assert ask()[0] == "b2"


def test_too_many_backends_and_bad_input(dp_factory, testbed):
    dp = dp_factory()
    dp.install([testbed.backend("b1")])
    many = [Backend.of(str(V4_NET.network_address + 1000 + i), BACKEND_PORT) for i in range(65)]
    with pytest.raises(DatapathError, match="at most 64"):
        dp.apply(many)
    assert dp.read_state().backends == (testbed.backend("b1"),)
    with pytest.raises(DatapathError):
        EbpfDatapath(DatapathSettings(listen_port=PORT, instance="../escape"))


def test_refuses_a_non_initial_cgroup_namespace(testbed):
    if shutil.which("unshare") is None:
        pytest.fail("no unshare(1): util-linux is expected on Debian")
    code = textwrap.dedent(f"""
        from prism_kernel.datapath.base import DatapathSettings
        from prism_kernel.datapath.ebpf.datapath import EbpfDatapath
        from prism_kernel.errors import DatapathError, DatapathUnavailable
        s = DatapathSettings(listen_port={PORT}, instance="{INSTANCE}-cgns")
        try:
            EbpfDatapath.check_available(s)
        except DatapathUnavailable as e:
            print("unavailable:", e.reason)
        try:
            EbpfDatapath(s).install([])
        except DatapathError as e:
            print("refused:", e)
    """)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    r = subprocess.run(["unshare", "--cgroup", PY, "-c", code], capture_output=True, text=True,
                       timeout=60, env=env)
    assert r.returncode == 0, r.stderr
    assert "unavailable: this process runs in a non-initial cgroup namespace" in r.stdout
    assert "refused: this process runs in a non-initial cgroup namespace" in r.stdout
    assert not os.path.exists(f"/sys/fs/bpf/{INSTANCE}-cgns")
