"""The nftables data path against the real kernel (run as root).

Own small fixture for now: backend hosts in network namespaces "pkn-bN"
(198.19.N.0/24, N = 1..3, plus an "attacker" host pkn-x in 198.19.9.0/24),
each running a tiny TCP server that answers with its name and closes, and a
server on 127.0.0.1 for the loopback-backend case. Listen port 27445,
instance "pk-nft-dev". Everything is removed after each test (data path) or
after the module (hosts), also on failure; leftovers of an interrupted run
are removed first.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time

import pytest

pytestmark = [pytest.mark.kernel, pytest.mark.guest]

if os.geteuid() != 0:
    pytest.skip("needs root (network namespaces, nftables, sysctls)", allow_module_level=True)
nftables = pytest.importorskip("nftables")

from prism_kernel.core.model import Backend  # noqa: E402
from prism_kernel.core.nft_plan import parse_table  # noqa: E402
from prism_kernel.datapath import sysctl  # noqa: E402
from prism_kernel.datapath.base import DatapathSettings  # noqa: E402
from prism_kernel.datapath.nft.datapath import (  # noqa: E402
    ROUTE_LOCALNET,
    TCP_TIMESTAMPS,
    NftablesDatapath,
    table_name,
)
from prism_kernel.errors import DatapathError  # noqa: E402
from tests.harness import Hammer  # noqa: E402
from tests.nft_fake import FakeNft  # noqa: E402

PORT = 27445
INSTANCE = "pk-nft-dev"
SETTINGS = DatapathSettings(listen_port=PORT, instance=INSTANCE)
TABLE = table_name(INSTANCE)
PREFIX = "pkn"
GUARD = "198.18.0.0/15"
BACKEND_PORT = 8080
N_HOSTS = 3

SERVER = r"""
import socket, sys
name, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((host, port))
s.listen(4096)
print("ready", flush=True)
while True:
    c, _ = s.accept()
    try:
        c.sendall(name.encode() + b"\n")
    except OSError:
        pass
    c.close()
"""


def sh(*argv: str, check: bool = True) -> subprocess.CompletedProcess:
    cp = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    if check and cp.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {cp.stderr.strip()}")
    return cp


def clear_hosts() -> None:
    for line in sh("ip", "netns", "list", check=False).stdout.splitlines():
        name = (line.split() or [""])[0]
        if name.startswith(f"{PREFIX}-"):
            for pid in sh("ip", "netns", "pids", name, check=False).stdout.split():
                try:
                    os.kill(int(pid), 9)
                except (ProcessLookupError, ValueError):
                    pass
            sh("ip", "netns", "del", name, check=False)
    for line in sh("ip", "-o", "link", "show", check=False).stdout.splitlines():
        parts = line.split(":")
        ifname = parts[1].strip().split("@")[0] if len(parts) > 1 else ""
        if ifname.startswith(PREFIX) and ifname[len(PREFIX):len(PREFIX) + 1].isdigit():
            sh("ip", "link", "del", ifname, check=False)


class Host:
    """A namespace behind a veth; optionally a named server in it."""

    def __init__(self, ns: str, subnet: int, serve: bool = True):
        self.ns, self.host_if, self.ns_if = f"{PREFIX}-{ns}", f"{PREFIX}{subnet}h", f"{PREFIX}{subnet}n"
        self.gw, self.addr = f"198.19.{subnet}.1", f"198.19.{subnet}.2"
        self.name = ns
        self.proc: subprocess.Popen | None = None
        sh("ip", "netns", "add", self.ns)
        sh("ip", "link", "add", self.host_if, "type", "veth", "peer", "name", self.ns_if, "netns", self.ns)
        sh("ip", "addr", "add", f"{self.gw}/24", "dev", self.host_if)
        sh("ip", "link", "set", self.host_if, "up")
        sh("ip", "-n", self.ns, "addr", "add", f"{self.addr}/24", "dev", self.ns_if)
        sh("ip", "-n", self.ns, "link", "set", self.ns_if, "up")
        sh("ip", "-n", self.ns, "link", "set", "lo", "up")
        if serve:
            self.proc = subprocess.Popen(
                ["ip", "netns", "exec", self.ns, sys.executable, "-c", SERVER, self.name, self.addr,
                 str(BACKEND_PORT)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            assert self.proc.stdout.readline().strip() == "ready"

    @property
    def backend(self) -> Backend:
        return Backend.of(self.addr, BACKEND_PORT)

    def close(self) -> None:
        if self.proc:
            self.proc.kill()
            self.proc.wait()
        sh("ip", "netns", "del", self.ns, check=False)
        sh("ip", "link", "del", self.host_if, check=False)


class LoopbackServer:
    """The named server on 127.0.0.1 (a control-plane node's own apiserver;
    on the listen port itself: a decoy that only an un-DNATed connect reaches)."""

    def __init__(self, name: str = "local", port: int = 0):
        self.name = name
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", port))
        self.sock.listen(1024)
        self.port = self.sock.getsockname()[1]
        self.accepted = 0
        self._stop = False
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self._stop:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            try:
                c.sendall(self.name.encode() + b"\n")
            except OSError:
                pass
            c.close()

    @property
    def backend(self) -> Backend:
        return Backend.of("127.0.0.1", self.port)

    def close(self) -> None:
        self._stop = True
        try:
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes the accept(); close() alone would not
        except OSError:
            pass
        self.thread.join(5)
        self.sock.close()


def ask(host: str = "127.0.0.1", port: int = PORT, timeout: float = 2.0) -> str:
    """Connect, read the server's name. SO_REUSEADDR: the client's port may
    stay in TIME_WAIT, which must not block a server that binds it later
    (other tests' fixed ports lie in the ephemeral range)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.settimeout(timeout)
        s.connect((host, port))
        data = b""
        while not data.endswith(b"\n"):
            chunk = s.recv(64)
            if not chunk:
                break
            data += chunk
    return data.decode().strip()


def _ask_name() -> str:
    name = ask(timeout=2.0)
    if not name:
        raise OSError("empty answer")
    return name


class ClientLoop(Hammer):
    """Connects to 127.0.0.1:PORT in a loop; `results` are the backends' names.
    Entering waits for the first outcome, so the loop runs before the test acts."""

    def __init__(self, max_seconds: float = 60):
        super().__init__(_ask_name, max_seconds)

    def __enter__(self) -> "ClientLoop":
        super().__enter__()
        deadline = time.monotonic() + 5
        while not self.results and not self.failures and time.monotonic() < deadline:
            time.sleep(0.01)
        return self


def sysctls() -> dict[str, str]:
    return {n: sysctl.read(n) for n in (ROUTE_LOCALNET, TCP_TIMESTAMPS)}


def other_prism_tables() -> bool:
    nft = nftables.Nftables()
    nft.set_json_output(True)
    rc, out, _ = nft.json_cmd({"nftables": [{"list": {"tables": {"family": "ip"}}}]})
    names = [o["table"]["name"] for o in out.get("nftables", []) if "table" in o]
    for name in names:
        if name == TABLE:
            continue
        rc, out, _ = nft.json_cmd({"nftables": [{"list": {"chain": {
            "family": "ip", "table": name, "name": "nat_postrouting"}}}]})
        if rc == 0 and any((o.get("rule", {}).get("comment") or "").startswith("prism-kernel nftables")
                           for o in out.get("nftables", [])):
            return True
    return False


def table_exists() -> bool:
    return TABLE in sh("nft", "list", "tables", "ip").stdout.split()


# --- fixtures -------------------------------------------------------------------


@pytest.fixture(scope="module")
def hosts():
    NftablesDatapath.cleanup(SETTINGS)
    clear_hosts()
    added_guard = False
    routes = sh("ip", "route", "show", "type", "unreachable").stdout.split()
    if GUARD not in routes:
        sh("ip", "route", "replace", "unreachable", GUARD)
        added_guard = True
    made: list[Host] = []
    local = None
    try:
        for i in range(1, N_HOSTS + 1):
            made.append(Host(f"b{i}", i))
        local = LoopbackServer()
        yield made, local
    finally:
        if local:
            local.close()
        for h in made:
            h.close()
        clear_hosts()
        if added_guard:
            sh("ip", "route", "del", "unreachable", GUARD, check=False)


@pytest.fixture
def dp(hosts):
    """A data path for the test instance; its kernel state is removed after
    the test, pass or fail, and the sysctls are checked to be restored."""
    before = sysctls()
    d = NftablesDatapath(SETTINGS)
    try:
        yield d
    finally:
        d.close()
        NftablesDatapath.cleanup(SETTINGS)
        assert not table_exists()
        if not other_prism_tables():
            assert sysctls() == before


# --- tests ----------------------------------------------------------------------


def test_steers_only_to_the_set(hosts, dp):
    (b1, b2, b3), _ = hosts
    assert dp.install([b1.backend, b2.backend]) is False
    seen = {ask() for _ in range(40)}
    assert seen == {"b1", "b2"}  # P(one missing in 40 tries) ~ 2e-12
    assert dp.apply([b3.backend]) is True
    assert {ask() for _ in range(10)} == {"b3"}
    state = dp.read_state()
    assert state.installed and state.backends == (b3.backend,)
    assert sysctl.read(ROUTE_LOCALNET) == "1"


def test_loopback_backend_and_mixed_set(hosts, dp):
    (b1, _, _), local = hosts
    dp.install([local.backend])
    assert {ask() for _ in range(5)} == {"local"}
    dp.apply([local.backend, b1.backend])
    assert {ask() for _ in range(40)} == {"local", "b1"}


def test_empty_set_refuses_and_ipv6_is_ignored(hosts, dp):
    (b1, _, _), _ = hosts
    dp.install([b1.backend])
    v6 = Backend.of("2001:db8::1", 6443)
    assert dp.apply([b1.backend, v6]) is False  # IPv4 part unchanged: nothing written
    assert dp.read_state().backends == (b1.backend,)
    assert dp.apply([v6]) is True  # no IPv4 backend left: nothing to steer to
    with pytest.raises(ConnectionRefusedError):
        ask()
    assert dp.read_state().backends == ()
    assert dp.apply([b1.backend]) is True
    assert ask() == "b1"


def test_no_write_when_unchanged(hosts, dp):
    (b1, b2, _), _ = hosts
    dp.install([b1.backend, b2.backend])
    handles = dp.read_state().details["handles"]["steer"]
    assert len(handles) == 2
    assert dp.apply([b2.backend, b1.backend]) is False
    assert dp.apply([b1.backend, b2.backend, b1.backend]) is False
    assert dp.read_state().details["handles"]["steer"] == handles
    # A second object (another daemon process) sees the same: no write either.
    other = NftablesDatapath(SETTINGS)
    try:
        assert other.apply([b1.backend, b2.backend]) is False
    finally:
        other.close()


def test_the_fake_lists_what_the_kernel_lists(hosts, dp):
    """tests/test_nft_plan.py checks the plans against tests/nft_fake.py.
    Here the kernel runs the same plans: its listing parses to what the
    fake's does, and the next plan computed from either is the same."""
    (b1, b2, b3), local = hosts
    fake = FakeNft()
    steps = [(b1.backend, b2.backend), (b2.backend, b3.backend, local.backend), (), (b1.backend,)]
    dp.install(steps[0])
    fake.run(dp.plan.create(tuple(sorted(steps[0]))))
    for i, step in enumerate(steps):
        if i:
            fake.run(dp.plan.apply(parse_table(fake.list_table(TABLE)), tuple(sorted(step))).commands)
            assert dp.apply(step) is True
        ks, fs = dp._observe(), parse_table(fake.list_table(TABLE))
        assert dp.plan.problems(ks) == dp.plan.problems(fs) == []
        for what in ("marker", "slot_order", "listed", "flags"):
            assert getattr(ks, what) == getattr(fs, what), what
        assert {c: len(r) for c, r in ks.rules.items()} == {c: len(r) for c, r in fs.rules.items()}
        assert set(ks.sets) == set(fs.sets)
        nxt = tuple(sorted(steps[(i + 1) % len(steps)]))
        assert dp.plan.apply(ks, nxt).commands == dp.plan.apply(fs, nxt).commands


def test_set_changes_are_atomic_under_load(hosts, dp):
    """Three clients connect in a loop through 300 back-to-back set changes. A
    listener on 127.0.0.1:PORT itself (the decoy) catches any connect that
    passed the NAT hook un-DNATed: with the draw as a numgen vmap (layout 2),
    a transaction deactivated the map's elements under packets still on the
    old rule (docs/design/nft-set-change-race.md). Backends on 127.0.0.1 (the
    fastest connects, so the most of them per change) and in a namespace."""
    (b1, b2, _), local = hosts
    extra = [LoopbackServer(f"local{i}") for i in (2, 3)]
    l1, l2, l3 = local, *extra
    sets = [[l1], [l1, l2], [l2, l3], [l3, b1], [l1, l2, l3], [l2], [b1, b2, l1]]
    names_in = set().union(*({h.name for h in s} for s in sets))
    decoy = LoopbackServer("un-DNATed", port=PORT)
    try:
        dp.install([b.backend for b in sets[0]])
        with ClientLoop(120) as one, ClientLoop(120) as two, ClientLoop(120) as three:
            for i in range(300):
                assert dp.apply([h.backend for h in sets[(i + 1) % len(sets)]]) is True
                time.sleep(0.002)  # pacing: connects in between, not a synchronisation
            for loop in (one, two, three):
                loop.wait_for(10)  # the loops still ran after the last change
    finally:
        decoy.close()
        for srv in extra:
            srv.close()
    loops = (one, two, three)
    assert decoy.accepted == 0, f"{decoy.accepted} connects passed un-DNATed"
    assert [loop.failures for loop in loops] == [[], [], []]
    assert all(len(loop.results) >= 300 for loop in loops)
    assert set().union(*(loop.results for loop in loops)) <= names_in
    print(f"{sum(len(loop.results) for loop in loops)} connects through 300 set changes, none un-DNATed")


def test_counters(hosts, dp):
    (b1, b2, _), _ = hosts
    dp.install([b1.backend, b2.backend])
    answers = [ask() for _ in range(30)]
    state = dp.read_state()
    counted = {str(b): c.connections for b, c in state.counters.items()}
    assert counted == {str(b1.backend): answers.count("b1"), str(b2.backend): answers.count("b2")}
    dp.apply([b1.backend])  # b1 keeps its count, b2's element is gone
    assert {str(b): c.connections for b, c in dp.read_state().counters.items()} == \
        {str(b1.backend): answers.count("b1")}


def test_adopt_without_a_failed_connect(hosts, dp):
    (b1, b2, b3), _ = hosts
    dp.install([b1.backend, b2.backend])
    dp.close()  # the first "daemon" goes away; the kernel keeps steering
    with ClientLoop(max_seconds=30) as loop:
        time.sleep(0.2)
        successor = NftablesDatapath(SETTINGS)
        try:
            assert successor.install([b3.backend]) is True  # adopted: initial not written
            assert successor.read_state().backends == tuple(sorted([b1.backend, b2.backend]))
            time.sleep(0.2)
            assert successor.apply([b3.backend]) is True  # then it converges
            time.sleep(0.2)
        finally:
            successor.close()
    assert loop.failures == []
    assert "b3" in loop.results and set(loop.results) <= {"b1", "b2", "b3"}


def test_older_layout_is_replaced_atomically(hosts, dp, monkeypatch):
    (b1, b2, b3), _ = hosts
    old = NftablesDatapath(SETTINGS)
    monkeypatch.setattr(old.plan, "marker", "prism-kernel nftables layout=0 template=old")
    old.install([b1.backend, b2.backend])
    old.close()
    with ClientLoop(max_seconds=30) as loop:
        time.sleep(0.2)
        assert dp.install([b3.backend]) is True  # replaced, keeping what it steered to
        time.sleep(0.2)
    state = dp.read_state()
    assert state.details["current_layout"] is True
    assert state.backends == tuple(sorted([b1.backend, b2.backend]))
    assert loop.failures == []
    assert set(loop.results) <= {"b1", "b2"}


def test_failed_transaction_keeps_the_old_state(hosts, dp, monkeypatch):
    (b1, b2, b3), _ = hosts
    dp.install([b1.backend])
    before = dp.read_state()
    # Bad input: rejected before the kernel is touched.
    for bad in (Backend(4, Backend.of("198.19.1.2", 1).address, 0),
                Backend.of("0.0.0.0", 80), Backend.of("224.0.0.1", 80),
                Backend.of("127.0.0.1", PORT)):
        with pytest.raises(DatapathError):
            dp.apply([b2.backend, bad])
    # A batch the kernel rejects halfway (its last command fails): nothing of it applies.
    real = dp.plan.update

    def poisoned(st, targets):
        return real(st, targets) + [{"add": {"element": {
            "family": "ip", "table": TABLE, "name": "no_such_set", "elem": [1]}}}]

    monkeypatch.setattr(dp.plan, "update", poisoned)
    with pytest.raises(DatapathError, match="unchanged"):
        dp.apply([b2.backend, b3.backend])
    after = dp.read_state()
    assert after.backends == before.backends == (b1.backend,)
    assert after.details["handles"] == before.details["handles"]
    assert set(after.counters) == {b1.backend}
    assert {ask() for _ in range(5)} == {"b1"}


def test_damaged_table_is_recreated(hosts, dp):
    (b1, _, _), _ = hosts
    dp.install([b1.backend])
    sh("nft", "flush", "chain", "ip", TABLE, "filter_prerouting")
    assert dp.read_state().details["current_layout"] is False
    assert dp.apply([b1.backend]) is True
    assert dp.read_state().details["current_layout"] is True
    sh("nft", "delete", "table", "ip", TABLE)
    assert dp.apply([b1.backend]) is True
    assert ask() == "b1"


def test_cve_2020_8558_other_hosts_cannot_reach_localhost(hosts, dp):
    """With route_localnet=1, a host on a link could reach services bound to
    127.0.0.1; the drop rule stops it (and only it)."""
    _, local = hosts
    attacker = Host("x", 9, serve=False)
    try:
        ns = ["ip", "netns", "exec", attacker.ns]
        # Make the attacker send 127.0.0.1 to us and accept answers from
        # it: no 127/8 of its own, a route to ours, route_localnet.
        sh("ip", "-n", attacker.ns, "addr", "flush", "dev", "lo")
        sh("ip", "-n", attacker.ns, "route", "add", "127.0.0.0/8", "via", attacker.gw)
        sh(*ns, "sysctl", "-qw", "net.ipv4.conf.all.route_localnet=1")
        probe = [*ns, sys.executable, "-c",
                 "import socket,sys; s=socket.create_connection(('127.0.0.1', int(sys.argv[1])), timeout=1); "
                 "print(s.recv(64).decode().strip())", str(local.port)]
        dp.install([local.backend])
        accepted = local.accepted
        cp = subprocess.run(probe, capture_output=True, text=True, timeout=10)
        assert cp.returncode != 0 and local.accepted == accepted
        assert dp.read_state().details["cve_2020_8558_drops"] >= 1
        # Control: without the rule, the same probe gets through.
        sh("nft", "flush", "chain", "ip", TABLE, "filter_prerouting")
        cp = subprocess.run(probe, capture_output=True, text=True, timeout=10)
        assert cp.returncode == 0 and cp.stdout.strip() == "local"
        dp.apply([local.backend])  # repairs the table
        cp = subprocess.run(probe, capture_output=True, text=True, timeout=10)
        assert cp.returncode != 0
        assert ask() == "local"  # our own loopback traffic is not affected
    finally:
        attacker.close()


def test_cleanup_removes_everything_and_is_idempotent(hosts):
    (b1, _, _), _ = hosts
    before = sysctls()
    others = other_prism_tables()
    d = NftablesDatapath(SETTINGS)
    try:
        d.install([b1.backend])
        assert table_exists() and sysctl.read(ROUTE_LOCALNET) == "1"
        assert sysctl.state_path(INSTANCE).exists()
    finally:
        d.close()
        lines = NftablesDatapath.cleanup(SETTINGS)
    assert f"deleted nft table ip {TABLE}" in lines
    assert not table_exists()
    assert not sysctl.state_path(INSTANCE).exists()
    if not others:
        assert sysctls() == before
    assert NftablesDatapath.cleanup(SETTINGS) == []
    with pytest.raises(ConnectionRefusedError):
        ask()


def test_sysctl_saved_original_survives_a_second_instance(tmp_path, monkeypatch):
    """Two instances: the second finds the knob already changed and records the
    first one's original, so whichever cleans up last restores the real value."""
    monkeypatch.setattr(sysctl, "RUN_ROOT", tmp_path)
    fake = tmp_path / "proc"
    (fake / "net/ipv4").mkdir(parents=True)
    knob = fake / "net/ipv4/tcp_timestamps"
    knob.write_text("1\n")
    monkeypatch.setattr(sysctl, "PROC_SYS", fake)
    assert sysctl.ensure("a", "net.ipv4.tcp_timestamps", "2") is True
    assert sysctl.ensure("b", "net.ipv4.tcp_timestamps", "2") is False
    assert sysctl.saved("b")["net.ipv4.tcp_timestamps"]["original"] == "1"
    assert sysctl.restore("a", still_needed=lambda n: True)[0].endswith("still needed by another prism-kernel instance")
    assert knob.read_text().strip() == "2"
    assert sysctl.restore("b", still_needed=lambda n: False) == [
        "restored sysctl net.ipv4.tcp_timestamps=1 (was 2)"]
    assert knob.read_text().strip() == "1"
    # An operator's later change is left alone.
    sysctl.ensure("c", "net.ipv4.tcp_timestamps", "2")
    knob.write_text("0\n")
    assert "left alone" in sysctl.restore("c")[0]
    assert knob.read_text().strip() == "0"
    assert not (tmp_path / "c").exists()
