"""In-kernel exclusion of suspect backends (eBPF data path, since layout 3): the
sockops program marks a backend suspect for SUSPECT_WINDOW_S when a steered
connect to it is refused or its SYN times out, and connect4/connect6 skip
suspect backends (all suspect: the original pick), so that a client's
immediate retry after ECONNREFUSED does not draw the same dead backend.

Needs root, bcc and kernel headers (skipped otherwise). Uses the shared
testbed with prefix "pks" (net_offset=80: 198.18.81.0/24 and up,
2001:2:0:51::/64 and up), listen port 37455, instance "pk-sus-dev-ebpf",
backend port 8080 (plain HTTP of the fake API servers). Every test removes
its data path, pass or fail; the module removes the testbed.

Run without the shared conftest (its session fixture cleans instance
"pk-test" and testbed "pkt", which other people's runs use):

    .venv/bin/python -m pytest -q -s --noconftest tests/test_datapath_suspect.py
"""

from __future__ import annotations

import errno
import json
import os
import select
import socket
import subprocess
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.kernel, pytest.mark.guest]

if os.geteuid() != 0:
    pytest.skip("needs root", allow_module_level=True)

from prism_kernel.core.model import Backend  # noqa: E402
from prism_kernel.datapath.base import DatapathSettings  # noqa: E402
from prism_kernel.datapath.ebpf import bpfsys as bpf  # noqa: E402
from prism_kernel.datapath.ebpf.datapath import (  # noqa: E402
    LAYOUT,
    SUSPECT_WINDOW_S,
    EbpfDatapath,
    encode_backend,
)
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

PORT = 37455
PREFIX = "pks"
NET_OFFSET = 80
INSTANCE = "pk-sus-dev-ebpf"
REPO = Path(__file__).resolve().parents[1]
# Earlier releases the upgrade test installs first: layout 2 (sockops,
# pk_passive, no pk_suspect), layout 3 (pk_suspect, pk_socks) and layout 4 as
# the last release built by bcc at run time (this one loads the precompiled
# object with libbpf, reusing the maps bcc pinned); they read the netns
# cookie with SO_NETNS_COOKIE (Linux 5.14). "4-libbpf": the last layout 4
# release (the HASH selector and slots), with its own object and libbpf
# loader, which also ran on kernels before 5.14.
OLD_RELEASES = {2: "e28568a", 3: "f5a36d3", 4: "32af8ae", "4-libbpf": "49d3ce6"}


def _unavailable() -> str | None:
    try:
        EbpfDatapath.check_available(DatapathSettings(listen_port=PORT, instance=INSTANCE))
    except DatapathUnavailable as e:
        return e.reason
    return None


# --- fixtures -------------------------------------------------------------------


@pytest.fixture(scope="module")
def tb():
    with Testbed(n_backends=3, prefix=PREFIX, net_offset=NET_OFFSET) as t:
        t.add_backend(ipv6=True)  # be3: dual stack
        t.add_backend(ipv6=True)  # be4: dual stack
        yield t


@pytest.fixture(autouse=True)
def _backends_healthy(request):
    """Each test starts and ends with every server running and reachable."""
    yield
    if "tb" in request.fixturenames:
        request.getfixturevalue("tb").heal()


def _cleanup() -> None:
    EbpfDatapath.cleanup(DatapathSettings(listen_port=PORT, instance=INSTANCE))


@pytest.fixture
def ebpf(tb):
    """A factory of EbpfDatapath objects on INSTANCE; the instance is removed
    before and after the test, pass or fail."""
    reason = _unavailable()
    if reason:
        pytest.fail(f"ebpf data path unavailable on this machine: {reason}")
    made: list[EbpfDatapath] = []

    def make() -> EbpfDatapath:
        d = EbpfDatapath(DatapathSettings(listen_port=PORT, instance=INSTANCE))
        made.append(d)
        return d

    _cleanup()
    try:
        yield make
    finally:
        for d in made:
            d.close()
        _cleanup()


be = plain_backend


def be6(srv) -> Backend:
    return plain_backend(srv, 6)


# --- clients ----------------------------------------------------------------------


def connect(host: str = "127.0.0.1", port: int = PORT, timeout: float = 3.0,
            family: int = socket.AF_INET) -> socket.socket:
    return tcp_connect(host, port, timeout, family)


def served_by(tb, s: socket.socket):
    """The backend server a connected (or connecting) steered socket went to:
    each backend sits behind its own host veth, so the socket's local address
    names it (getpeername() answers 127.0.0.1:PORT, as a proxy would)."""
    local = s.getsockname()[0]
    if local.startswith("::ffff:"):
        local = local[7:]
    for srv in tb.backends:
        if local in (srv.host_address, srv.host_address6):
            return srv
    raise AssertionError(f"local address {local} belongs to no backend")


def steered_to(dp: EbpfDatapath, backend: Backend) -> int:
    """Connects the kernel steered to `backend` so far (pk_counters)."""
    st = dp.read_state()
    return st.counters[backend].connections if backend in st.counters else 0


def stats(dp: EbpfDatapath) -> dict[str, int]:
    return dp.read_state().details["stats"]


def forget_suspect(dp: EbpfDatapath, backend: Backend) -> None:
    """TEST ONLY: drop a mark by hand (the product never writes pk_suspect), so
    that one process can repeat the first-refusal experiment many times."""
    fd = bpf.obj_get(f"/sys/fs/bpf/{INSTANCE}/maps-v{LAYOUT}/pk_suspect")
    try:
        bpf.map_delete(fd, encode_backend(backend))
    finally:
        os.close(fd)


def wait_for(cond, timeout: float, step: float = 0.002) -> float | None:
    """Seconds until cond() held, None on timeout."""
    t0 = time.monotonic()
    while True:
        if cond():
            return time.monotonic() - t0
        if time.monotonic() - t0 > timeout:
            return None
        time.sleep(step)


def request_with_one_retry(tb) -> tuple[bool, list[str], float | None]:
    """A client as client-go behaves after ECONNREFUSED: one immediate retry.
    Returns (request answered 200, backends tried, gap in seconds between the
    refusal and the retry's connect() call)."""
    tried: list[str] = []
    gap = None
    refused_at = 0.0
    for attempt in range(2):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.settimeout(3)
        try:
            if attempt == 1:
                gap = time.perf_counter() - refused_at
            s.connect(("127.0.0.1", PORT))
        except ConnectionRefusedError:
            refused_at = time.perf_counter()
            s.close()
            tried.append("refused")
            continue
        try:
            tried.append(served_by(tb, s).name)
            return http_ok(s), tried, gap
        finally:
            s.close()
    return False, tried, gap


# --- the tests ----------------------------------------------------------------------


@pytest.mark.timing
def test_immediate_retry_avoids_a_refusing_backend(tb, ebpf):
    """(1) 3 backends, one stopped: 300 requests, each retried once at once
    after a refusal. None fails; after the first refusal no connect within the
    window reaches the stopped backend."""
    dp = ebpf()
    b0, b1, b2 = tb.backends[:3]
    dp.install([be(b0), be(b1), be(b2)])
    b0.stop()
    before = stats(dp)
    failed: list[list[str]] = []
    first_refusal = None
    gaps: list[float] = []
    per_backend: dict[str, int] = {}
    t0 = time.monotonic()
    for i in range(300):
        ok, tried, gap = request_with_one_retry(tb)
        if not ok:
            failed.append(tried)
        if "refused" in tried and first_refusal is None:
            first_refusal = time.monotonic()
        if gap is not None:
            gaps.append(gap)
        per_backend[tried[-1]] = per_backend.get(tried[-1], 0) + 1
    elapsed = time.monotonic() - t0
    after = stats(dp)
    print(f"300 requests in {elapsed:.3f} s: served {per_backend}, refusals retried {len(gaps)}, "
          f"retry gap {[round(g * 1e6) for g in gaps]} us, skipped_suspect "
          f"{after['skipped_suspect'] - before['skipped_suspect']}")
    assert failed == [], failed[:5]
    assert first_refusal is not None  # P(300 draws avoid b0 at random) = (2/3)^300
    # all of it within one window after the first refusal (else the test proves less)
    assert time.monotonic() - first_refusal < SUSPECT_WINDOW_S
    # exactly one connect reached the stopped backend: the first, refused one
    assert len(gaps) == 1
    assert steered_to(dp, be(b0)) == 1
    assert dp.passive_failures()[be(b0)].refused == 1
    assert after["skipped_suspect"] - before["skipped_suspect"] >= 50  # ~1/3 of 299 draws
    assert after["all_suspect"] == before["all_suspect"]
    assert set(dp.suspect_backends()) == {be(b0)}
    assert set(dp.read_state().details["suspect"]) == {str(be(b0))}


def _first_connect(nonblocking: bool) -> tuple[bool, float, float]:
    """One connect to 127.0.0.1:PORT: (refused, perf_counter() just before
    the connect() call, perf_counter() when the outcome was known). Non-blocking:
    connect() then poll() for the outcome and SO_ERROR, as an event-loop
    client (Go's netpoller, asyncio) learns of a refusal."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        if not nonblocking:
            t0 = time.perf_counter()
            try:
                s.connect(("127.0.0.1", PORT))
            except ConnectionRefusedError:
                return True, t0, time.perf_counter()
            return False, t0, time.perf_counter()
        s.setblocking(False)
        t0 = time.perf_counter()
        err = s.connect_ex(("127.0.0.1", PORT))
        if err == errno.EINPROGRESS:
            p = select.poll()
            p.register(s, select.POLLOUT | select.POLLERR)
            assert p.poll(3000)
            err = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        return err == errno.ECONNREFUSED, t0, time.perf_counter()
    finally:
        s.close()


@pytest.mark.parametrize("nonblocking", [False, True], ids=["blocking", "poll"])
def test_the_mark_is_set_before_the_refused_connect_returns(tb, ebpf, nonblocking):
    """The ordering, measured: the sockops STATE_CB (SYN_SENT -> CLOSE) runs in
    tcp_done() before the connecting process is woken with ECONNREFUSED. With
    two backends, one stopped, 200 fresh first refusals (the mark dropped by
    hand before each) are each followed by an immediate retry: the retry never
    draws the refusing backend (without the mark it would, half the time: the
    layout-2 program refused 103 of 200 such retries), and the mark is there
    at once."""
    dp = ebpf()
    b0, b1 = tb.backends[:2]
    dp.install([be(b0), be(b1)])
    b0.stop()
    trials, retry_on_b0, mark_missing, draws = 200, 0, 0, 0
    gaps: list[float] = []
    for _ in range(trials):
        forget_suspect(dp, be(b0))
        for _ in range(200):  # until a first connect draws b0 (p = 1/2 each)
            draws += 1
            refused, _, refused_at = _first_connect(nonblocking)
            if refused:
                break
        else:
            raise AssertionError("no connect drew the stopped backend in 200 tries")
        refused, retry_at, _ = _first_connect(nonblocking)  # the immediate retry
        gaps.append(retry_at - refused_at)
        if refused:
            retry_on_b0 += 1
        if be(b0) not in dp.suspect_backends():
            mark_missing += 1
    gaps.sort()
    print(f"{'poll' if nonblocking else 'blocking'}: {trials} first refusals, each retried at "
          f"once (gap median {gaps[len(gaps) // 2] * 1e6:.0f} us, min {gaps[0] * 1e6:.0f} us): "
          f"retry refused {retry_on_b0}/{trials}, mark missing {mark_missing}/{trials}, "
          f"{draws} first connects")
    assert retry_on_b0 == 0
    assert mark_missing == 0


@pytest.mark.timing
def test_black_holed_backend_is_avoided_after_the_first_syn_timeout(tb, ebpf):
    """(2) A black-holed backend: the first RTO in SYN_SENT (~1 s after the
    SYN) marks it; from then on new connects avoid it."""
    dp = ebpf()
    b0, b1, b2 = tb.backends[:3]
    dp.install([be(b0), be(b1), be(b2)])
    b0.blackhole(True)
    stuck = None
    others: list[socket.socket] = []
    try:
        for _ in range(200):  # non-blocking connects until one is steered to b0
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.setblocking(False)
            err = s.connect_ex(("127.0.0.1", PORT))
            assert err in (0, errno.EINPROGRESS), os.strerror(err)
            if served_by(tb, s) is b0:
                stuck = s
                break
            others.append(s)
        assert stuck is not None
        syn_at = time.monotonic()
        assert dp.suspect_backends() == {}
        seen = wait_for(lambda: be(b0) in dp.suspect_backends(), timeout=3)
        assert seen is not None
        print(f"black-holed backend marked suspect {time.monotonic() - syn_at:.3f} s after "
              f"its SYN")
        assert 0.8 < time.monotonic() - syn_at < 1.6
        assert dp.passive_failures()[be(b0)].syn_timeouts >= 1
        n_b0 = steered_to(dp, be(b0))
        served: dict[str, int] = {}
        for _ in range(100):
            with connect(timeout=2) as s:
                served[served_by(tb, s).name] = served.get(served_by(tb, s).name, 0) + 1
                assert http_ok(s)
        print(f"100 connects while b0 is suspect: {served}")
        assert "be0" not in served
        assert steered_to(dp, be(b0)) == n_b0
        assert time.monotonic() - syn_at < 1.0 + SUSPECT_WINDOW_S
    finally:
        if stuck is not None:
            stuck.close()
        for s in others:
            s.close()


def test_all_backends_refused_still_steers(tb, ebpf):
    """(3) Every backend refused (all suspect): each connect is still steered
    (to the random original pick, spread over all) and refused by a backend;
    the program never leaves it untouched or fails it."""
    dp = ebpf()
    servers = tb.backends[:3]
    dp.install([be(s) for s in servers])
    for s in servers:
        s.stop()
    before = stats(dp)
    n = 60
    errors: dict[str, int] = {}
    for _ in range(n):
        try:
            connect(timeout=2).close()
            errors["connected"] = errors.get("connected", 0) + 1
        except OSError as e:
            errors[type(e).__name__] = errors.get(type(e).__name__, 0) + 1
    after = stats(dp)
    print(f"{n} connects with every backend refused: {errors}; suspect "
          f"{dp.read_state().details['suspect']}; all_suspect "
          f"{after['all_suspect'] - before['all_suspect']}")
    assert errors == {"ConnectionRefusedError": n}
    assert after["steered"] - before["steered"] == n
    assert after["no_backend"] == before["no_backend"]
    passive = dp.passive_failures()
    assert sum(passive[be(s)].refused for s in servers) == n  # refused by backends, steered
    assert all(steered_to(dp, be(s)) > 0 for s in servers)  # the original pick: still random
    assert set(dp.suspect_backends()) == {be(s) for s in servers}
    assert after["all_suspect"] - before["all_suspect"] >= n - 6  # all three marked after a few


@pytest.mark.timing
def test_the_mark_expires_by_itself(tb, ebpf):
    """(4) After the window a restarted backend receives connects again, with
    no write from user space (the set's generation is unchanged)."""
    dp = ebpf()
    b0, b1, b2 = tb.backends[:3]
    dp.install([be(b0), be(b1), be(b2)])
    gen = dp.read_state().details["generation"]
    b0.stop()
    for _ in range(200):
        try:
            connect().close()
        except ConnectionRefusedError:
            break
    marked_at = time.monotonic()
    b0.start()
    left = dp.suspect_backends()[be(b0)]
    assert 0 < left <= SUSPECT_WINDOW_S
    # still inside the window: b0 is up again, but avoided
    inside: set[str] = set()
    for _ in range(60):
        with connect() as s:
            inside.add(served_by(tb, s).name)
    assert time.monotonic() - marked_at < SUSPECT_WINDOW_S - 0.1
    assert "be0" not in inside
    # the mark runs out by itself
    gone = wait_for(lambda: be(b0) not in dp.suspect_backends(), timeout=SUSPECT_WINDOW_S + 1)
    expired_after = time.monotonic() - marked_at
    print(f"mark expired {expired_after:.3f} s after the refusal")
    assert gone is not None and SUSPECT_WINDOW_S - 0.2 < expired_after < SUSPECT_WINDOW_S + 0.3
    after: dict[str, int] = {}
    for _ in range(60):
        with connect() as s:
            name = served_by(tb, s).name
            after[name] = after.get(name, 0) + 1
            assert http_ok(s)
    print(f"60 connects after the window: {after}")
    assert after.get("be0", 0) > 0  # P(none) = (2/3)^60
    st = dp.read_state()
    assert st.details["generation"] == gen  # nobody wrote the set
    assert st.details["suspect"] == {}


def test_a_direct_connection_does_not_mark(tb, ebpf):
    """(5) A connection to the backend's own address (not steered) that is
    refused leaves no mark: steered connects keep drawing that backend."""
    dp = ebpf()
    b0, b1, b2 = tb.backends[:3]
    dp.install([be(b0), be(b1), be(b2)])
    b0.stop()
    marks = stats(dp)["suspect_marked"]
    for _ in range(20):
        with pytest.raises(ConnectionRefusedError):
            connect(b0.address, b0.http_port)
    assert dp.suspect_backends() == {}
    assert stats(dp)["suspect_marked"] == marks
    assert be(b0) not in dp.passive_failures()
    # the first steered refusal is what marks it
    for _ in range(200):
        try:
            connect().close()
        except ConnectionRefusedError:
            break
    assert set(dp.suspect_backends()) == {be(b0)}
    assert stats(dp)["suspect_marked"] == marks + 1


def test_ipv6_and_dual_stack(tb, ebpf):
    """connect6: [::1] over two IPv6 backends, one stopped, and a v4-mapped
    [::ffff:127.0.0.1] connect over the IPv4 set: immediate retries never fail."""
    dp = ebpf()
    v6a, v6b = tb.backends[3], tb.backends[4]
    b1, b2 = tb.backends[1:3]
    dp.install([be6(v6a), be6(v6b), be(b1), be(b2)])
    v6a.stop()
    b1.stop()
    for host in ("::1", "::ffff:127.0.0.1"):
        failed = 0
        refused = 0
        for _ in range(100):
            for attempt in range(2):
                try:
                    with connect(host, family=socket.AF_INET6) as s:
                        assert http_ok(s)
                    break
                except ConnectionRefusedError:
                    refused += 1
                    if attempt == 1:
                        failed += 1
        print(f"[{host}]: 100 requests, {refused} refused connects, {failed} failed after a retry")
        assert failed == 0
        assert refused == 1
    assert set(dp.suspect_backends()) == {be6(v6a), be(b1)}
    assert steered_to(dp, be6(v6a)) == 1 and steered_to(dp, be(b1)) == 1


def test_suspect_state_without_install(tb, ebpf):
    dp = ebpf()
    assert dp.suspect_backends() == {}
    dp.install([be(tb.backends[0])])
    st = dp.read_state()
    assert st.details["suspect"] == {} and st.details["suspect_window_s"] == SUSPECT_WINDOW_S
    for name in ("skipped_suspect", "all_suspect", "suspect_marked", "suspect_mark_failed"):
        assert st.details["stats"][name] == 0
    json.dumps(st.details)  # `prism-kernel status -o json` prints it


# --- upgrade from layouts 2 and 3 ------------------------------------------------------


OLD_INSTALL = """
import json, sys
from prism_kernel.datapath.base import DatapathSettings
try:
    from prism_kernel.datapath.ebpf import EbpfDatapath, LAYOUT
    from prism_kernel.model import Backend
except ImportError:  # the package layout of 49d3ce6 and later
    from prism_kernel.datapath.ebpf.datapath import EbpfDatapath, LAYOUT
    from prism_kernel.core.model import Backend
dp = EbpfDatapath(DatapathSettings(listen_port=int(sys.argv[1]), instance=sys.argv[2]))
dp.install([Backend.of(a, int(sys.argv[3])) for a in sys.argv[4:]])
st = dp.read_state()
print(json.dumps({"layout": LAYOUT, "prog_ids": st.details["prog_ids"],
                  "link_ids": st.details["link_ids"]}))
"""


@pytest.mark.parametrize("old_layout", list(OLD_RELEASES))
def test_upgrade_from_older_layout(tb, ebpf, tmp_path, old_layout):
    """A node running an earlier layout is upgraded in place: the five links
    move to the new programs (link update), the set is carried into the new
    maps, no connect fails on the way; pk_peers is carried over, so a
    connection steered before the upgrade keeps its getpeername() answer and
    is still found and aborted by close_connections(); suspect exclusion
    works."""
    if old_layout != "4-libbpf" and not has_so_netns_cookie():
        pytest.skip("the earlier release reads the netns cookie with SO_NETNS_COOKIE (Linux 5.14): "
                    "it never ran on this kernel")
    old_tree = old_release(OLD_RELEASES[old_layout], tmp_path / "old", "prism_kernel", "bpf")
    if old_layout == "4-libbpf":  # its own object, built as that release built it
        r = subprocess.run(["bash", str(old_tree / "bpf" / "build.sh")], capture_output=True, text=True,
                           timeout=120)
        assert r.returncode == 0, r.stderr
    servers = tb.backends[:3]
    r = run_old_release(old_tree, OLD_INSTALL, str(PORT), INSTANCE, str(servers[0].http_port),
                        *(s.address for s in servers))
    old = json.loads(r.stdout.strip().splitlines()[-1])
    assert old["layout"] == int(str(old_layout)[0]) and len(old["link_ids"]) == 5
    held = connect()  # steered by the old program
    assert held.getpeername() == ("127.0.0.1", PORT)

    def one_request() -> None:
        with connect(timeout=2) as s:
            if not http_ok(s):
                raise OSError("not 200")

    try:
        with Hammer(one_request) as load:
            load.wait_for(20)  # requests through the old program
            dp = ebpf()
            assert dp.install([]) is True  # upgraded in place, the set carried over
            n_before = load.ok
            load.wait_for(20)  # and through the new one
        assert load.failures == [], load.failures[:5]
        assert load.ok > n_before > 0
        st = dp.read_state()
        assert st.installed and st.details["layout"] == LAYOUT and st.details["program_current"]
        assert st.details["loader"] == "libbpf"
        assert sorted(st.backends) == sorted(be(s) for s in servers)
        assert st.details["link_ids"] == old["link_ids"]  # the same links, new programs
        assert set(st.details["prog_ids"].values()).isdisjoint(old["prog_ids"].values())
        assert sorted(n for n in os.listdir(f"/sys/fs/bpf/{INSTANCE}") if n.startswith("maps-")) == \
            [f"maps-v{LAYOUT}"]
        # the connection from before the upgrade: same reverse translation, found, aborted
        assert held.getpeername() == ("127.0.0.1", PORT)
        assert dp.close_connections([be(s) for s in servers]) >= 1
        held.settimeout(2)
        with pytest.raises((ConnectionAbortedError, ConnectionResetError)):
            held.recv(1)
    finally:
        held.close()
    # the new programs exclude a refusing backend
    servers[0].stop()
    results = [request_with_one_retry(tb) for _ in range(100)]
    assert all(ok for ok, _, _ in results)
    assert sum(tried.count("refused") for _, tried, _ in results) == 1
    assert dp.passive_failures()[be(servers[0])].refused == 1


def test_passive_counters_and_marks_coexist(tb, ebpf):
    """The outcome counters keep counting every failure while the mark is on
    (the daemon's confirmation still sees them)."""
    dp = ebpf()
    b0, b1 = tb.backends[:2]
    dp.install([be(b0), be(b1)])
    b0.stop()
    for _ in range(200):
        try:
            connect().close()
        except ConnectionRefusedError:
            break
    # a direct refusal: not counted; an apply() leaves the marks alone
    with pytest.raises(ConnectionRefusedError):
        connect(b0.address, b0.http_port)
    assert dp.apply([be(b0), be(b1), be(tb.backends[2])]) is True
    assert set(dp.suspect_backends()) == {be(b0)}
    assert dp.passive_failures()[be(b0)].refused == 1


# --- another sock_ops program on the same cgroup -----------------------------------------

OTHER_SOCKOPS = r"""
BPF_ARRAY(closes, u64, 1);

/* Wants the STATE callback of every connection to the backends' port, for
 * the connection's whole life (as a monitoring program would): sets it at
 * TCP_CONNECT_CB, counts the transitions to CLOSE. */
int other(struct bpf_sock_ops *skops)
{
	int zero = 0;
	u64 *n;

	if (bpf_ntohl(skops->remote_port) != BACKEND_PORT)
		return 1;
	if (skops->op == BPF_SOCK_OPS_TCP_CONNECT_CB) {
		bpf_sock_ops_cb_flags_set(skops, skops->bpf_sock_ops_cb_flags | BPF_SOCK_OPS_STATE_CB_FLAG);
		return 1;
	}
	if (skops->op == BPF_SOCK_OPS_STATE_CB && skops->args[1] == BPF_TCP_CLOSE) {
		n = closes.lookup(&zero);
		if (n)
			__sync_fetch_and_add(n, 1);
	}
	return 1;
}
"""


def test_callbacks_another_sock_ops_program_set_are_kept(tb, ebpf):
    """sock_ops flags are per socket and shared by every sock_ops program of
    the cgroup tree. Ours turns STATE|RTO on at connect and off once the
    handshake is done, but only the flags it turned on: a program attached
    before ours that wants STATE for the whole connection still gets the
    socket's CLOSE."""
    from bcc import BPF  # the test process may carry the compiler

    from prism_kernel.datapath.ebpf.cgroup import find_cgroup2_root

    b0 = tb.backends[0]
    other = BPF(text=OTHER_SOCKOPS.encode(), cflags=[f"-DBACKEND_PORT={b0.http_port}"])
    fn = other.load_func(b"other", BPF.SOCK_OPS)
    root = os.open(find_cgroup2_root(), os.O_RDONLY | os.O_DIRECTORY)
    link = bpf.link_create(fn.fd, root, bpf.BPF_CGROUP_SOCK_OPS)  # before ours: runs first
    try:
        dp = ebpf()
        dp.install([be(b0)])
        n = 5
        for _ in range(n):
            with connect() as s:
                assert http_ok(s)
        closes = other[b"closes"]

        def count() -> int:
            return sum(v.value for v in closes.values())

        assert wait_for(lambda: count() >= n, 3.0) is not None, count()
        assert dp.passive_failures()[be(b0)].established == n
    finally:
        bpf.link_detach(link)
        os.close(link)
        os.close(root)
        other.cleanup()
