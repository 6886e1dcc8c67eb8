"""nftables data path: a refused connect is seen in the kernel (passive
counters) and steers the next connects away from that backend for 2 s (the
suspect flag), with no userspace in the loop. nft/README.md, "Refused
connects", explains the rules.

Needs root. Own fixture: the shared testbed with prefix "pkr" (net_offset=100:
backends be0..be2 at 198.18.101.2, .102.2, .103.2, plain HTTP on 8080), a local
API server on 127.0.0.1:27457 (plain HTTP 27458), listen port 27455, instance
"pk-nftr-dev". The data path is removed after every test, pass or fail; the
module removes the testbed.

    .venv/bin/python -m pytest -q --noconftest tests/test_nft_refused.py
"""

from __future__ import annotations

import os
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.kernel, pytest.mark.guest]

if os.geteuid() != 0:
    pytest.skip("needs root (network namespaces, nftables, sysctls)", allow_module_level=True)
nftables = pytest.importorskip("nftables")

from prism_kernel.core.model import Backend  # noqa: E402
from prism_kernel.datapath import sysctl  # noqa: E402
from prism_kernel.datapath.base import DatapathSettings, PassiveCounts  # noqa: E402
from prism_kernel.datapath.nft.datapath import NftablesDatapath, table_name, template  # noqa: E402
from prism_kernel.errors import DatapathUnavailable  # noqa: E402
from tests.harness import Hammer, old_release, plain_backend, run_old_release, tcp_connect  # noqa: E402
from tests.testbed import Testbed  # noqa: E402

PORT = 27455
PREFIX = "pkr"
NET_OFFSET = 100
INSTANCE = "pk-nftr-dev"
SETTINGS = DatapathSettings(listen_port=PORT, instance=INSTANCE)
TABLE = table_name(INSTANCE)
LOCAL_TLS_PORT, LOCAL_HTTP_PORT = 27457, 27458
SUSPECT = template().suspect_seconds  # 2
REPO = Path(__file__).resolve().parents[1]
# Earlier releases whose tables a node may hold: the last commit with the
# layout-1 nftables data path (one DNAT rule with an anonymous map, no passive
# counters), and with layout 2 (the draw as a numgen vmap, three outcome sets).
LAYOUT1_COMMIT = "afe2601"
LAYOUT2_COMMIT = "49d3ce6"


# --- fixtures -------------------------------------------------------------------


@pytest.fixture(scope="module")
def tb():
    try:
        NftablesDatapath.check_available(SETTINGS)
    except DatapathUnavailable as e:
        pytest.fail(f"nftables data path unavailable on this machine: {e.reason}")
    NftablesDatapath.cleanup(SETTINGS)  # leftovers of an interrupted run
    with Testbed(n_backends=3, prefix=PREFIX, net_offset=NET_OFFSET) as t:
        t.add_local_apiserver(port=LOCAL_TLS_PORT, http_port=LOCAL_HTTP_PORT, name="local")
        yield t


@pytest.fixture(autouse=True)
def _servers_running(request):
    """Each test ends with every server running again."""
    yield
    if "tb" in request.fixturenames:
        request.getfixturevalue("tb").heal()


def table_exists() -> bool:
    out = subprocess.run(["nft", "list", "tables", "ip"], capture_output=True, text=True,
                         timeout=10).stdout
    return TABLE in out.split()


@pytest.fixture
def dp(tb):
    NftablesDatapath.cleanup(SETTINGS)
    d = NftablesDatapath(SETTINGS)
    try:
        yield d
    finally:
        d.close()
        NftablesDatapath.cleanup(SETTINGS)
        assert not table_exists()


be = plain_backend


# --- clients ----------------------------------------------------------------------


def connect(host: str = "127.0.0.1", port: int = PORT, timeout: float = 2.0) -> socket.socket:
    # The client closes first, so its port stays in TIME_WAIT for 60 s. With
    # SO_REUSEADDR on both sides that does not block a server binding the
    # same port later (other tests' fixed ports lie in the ephemeral range).
    return tcp_connect(host, port, timeout, reuse_addr=True)


def attempt() -> str:
    """One connect to 127.0.0.1:PORT: "ok", "refused" or the error."""
    try:
        connect().close()
        return "ok"
    except ConnectionRefusedError:
        return "refused"
    except OSError as e:
        return repr(e)


def connect_until_refused(limit: int = 300) -> float:
    """Connect until one is refused (a connect drawn to the stopped backend);
    returns when. P(none of `limit` draws with 1/3 each) ~ 1e-53."""
    for _ in range(limit):
        if attempt() == "refused":
            return time.monotonic()
    pytest.fail(f"no connect refused in {limit}")


def connections(dp) -> dict[Backend, int]:
    return {b: c.connections for b, c in dp.read_state().counters.items()}


# --- passive counters (B) ------------------------------------------------------------


@pytest.mark.timing
def test_refused_is_counted_at_once_and_only_for_steered_connects(tb, dp):
    b0, b1, b2 = tb.backends
    dp.install([be(b0), be(b1), be(b2)])
    assert dp.passive_failures() == {}  # a backend appears at its first outcome
    for _ in range(30):
        connect().close()
    healthy = dp.passive_failures()
    assert sum(pc.established for pc in healthy.values()) == 30
    assert all(pc.refused == 0 and pc.syn_timeouts == 0 for pc in healthy.values())

    b1.stop()
    t_refused = connect_until_refused()
    seen_after = None
    while time.monotonic() - t_refused < 1.0:
        pc = dp.passive_failures().get(be(b1))
        if pc is not None and pc.refused == 1:
            seen_after = time.monotonic() - t_refused
            break
        time.sleep(0.001)
    assert seen_after is not None and seen_after < 0.1, seen_after
    print(f"refused seen by passive_failures() {seen_after * 1000:.2f} ms after connect() failed")

    # Every steered connect is answered one way or the other, so per backend
    # established + refused == connections steered to it (the DNAT counter).
    pf, steered = dp.passive_failures(), connections(dp)
    for b in (be(b0), be(b1), be(b2)):
        got = pf.get(b, PassiveCounts())
        assert got.established + got.refused == steered[b], (b, got, steered[b])
        assert got.syn_timeouts == 0  # every SYN was answered

    # A direct connect to the same stopped server is not ours: not counted.
    with pytest.raises(ConnectionRefusedError):
        connect(b1.address, b1.http_port)
    assert dp.passive_failures()[be(b1)].refused == 1

    # Counts stay when the backend leaves the set (the daemon works with differences).
    dp.apply([be(b0), be(b2)])
    assert dp.passive_failures()[be(b1)] == pf[be(b1)]

    # Cost of one call (the daemon polls every 100 ms).
    n = 300
    t0 = time.perf_counter()
    for _ in range(n):
        dp.passive_failures()
    per_call = (time.perf_counter() - t0) / n
    print(f"passive_failures(): {per_call * 1e6:.0f} us per call")
    assert per_call < 0.005


def test_loopback_backend_refused(tb, dp):
    local, b0 = tb.backend("local"), tb.backends[0]
    lb = Backend.of("127.0.0.1", LOCAL_HTTP_PORT)
    dp.install([lb, be(b0)])
    local.stop()
    connect_until_refused()
    pf = dp.passive_failures()
    assert pf[lb].refused == 1
    assert set(dp.read_state().details["suspect"]) == {str(lb)}
    before = connections(dp)
    assert [attempt() for _ in range(50)] == ["ok"] * 50  # all to b0 while lb is flagged
    assert connections(dp)[lb] == before[lb]
    with pytest.raises(ConnectionRefusedError):  # kubelet's own connect: not ours
        connect("127.0.0.1", LOCAL_HTTP_PORT)
    assert dp.passive_failures()[lb].refused == 1


# --- in-kernel exclusion (A) ----------------------------------------------------------


def test_refused_backend_is_skipped_for_the_suspect_window(tb, dp):
    b0, b1, b2 = tb.backends
    dead = be(b1)
    dp.install([be(b0), dead, be(b2)])
    b1.stop()
    before = connections(dp)
    # 300 connects over about 1.5 s, each refused one retried at once.
    rounds: list[tuple[float, str, str | None]] = []
    for _ in range(300):
        t = time.monotonic()
        first = attempt()
        retry = attempt() if first == "refused" else None
        rounds.append((t, first, retry))
        if len([r for r in rounds if r[1] == "refused"]) == 1 and first == "refused":
            assert set(dp.read_state().details["suspect"]) == {str(dead)}
        time.sleep(0.004)
    span = rounds[-1][0] - rounds[0][0]
    assert [r for r in rounds if r[1] not in ("ok", "refused")] == []
    assert [r for r in rounds if r[2] not in (None, "ok")] == []  # zero fail after the retry
    refused_at = [t for t, first, _ in rounds if first == "refused"]
    assert refused_at, "no connect was drawn to the stopped backend"
    # After a refusal, no connect reaches the stopped backend for SUSPECT seconds.
    gaps = [b - a for a, b in zip(refused_at, refused_at[1:])]
    assert all(g >= SUSPECT - 0.05 for g in gaps), gaps
    # The kernel agrees: the stopped backend got exactly the refused connects.
    assert connections(dp)[dead] - before[dead] == len(refused_at)
    assert dp.passive_failures()[dead].refused == len(refused_at)
    print(f"{len(rounds)} connects in {span:.2f} s: {len(refused_at)} refused "
          f"(at {[round(t - rounds[0][0], 3) for t in refused_at]} s), 0 failed after the retry")

    # The flag expires by itself, and the backend is drawn again.
    wait = refused_at[-1] + SUSPECT + 0.1 - time.monotonic()
    if wait > 0:
        time.sleep(wait)
    assert dp.read_state().details["suspect"] == {}
    again = connect_until_refused()
    assert again - refused_at[-1] >= SUSPECT
    assert set(dp.read_state().details["suspect"]) == {str(dead)}


def test_all_backends_refused_connects_are_still_dnated(tb, dp):
    servers = tb.backends
    targets = [be(s) for s in servers]
    dp.install(targets)
    for s in servers:
        s.stop()
    before = connections(dp)
    took = []
    for _ in range(30):
        t = time.monotonic()
        with pytest.raises(ConnectionRefusedError):
            connect(timeout=3)
        took.append(time.monotonic() - t)
    assert max(took) < 0.5, took  # refused by a backend, not dropped (that would take the 3 s timeout)
    print(f"all backends stopped: 30 connects refused, slowest in {max(took) * 1000:.2f} ms")
    after = connections(dp)
    per_backend = {b: after[b] - before[b] for b in targets}
    assert sum(per_backend.values()) == 30  # every connect was DNATed ...
    assert all(n > 0 for n in per_backend.values()), per_backend  # ... to the drawn slot
    assert set(dp.suspect_backends()) == set(targets)
    assert sum(dp.passive_failures()[b].refused for b in targets) == 30

    # One comes back: once its flag expired, connects reach it; each dead
    # backend costs at most one refused connect per window.
    servers[0].start()
    time.sleep(SUSPECT + 0.1)
    assert dp.read_state().details["suspect"] == {}
    refused = 0
    for _ in range(30):
        for _try in range(len(servers)):
            outcome = attempt()
            if outcome == "ok":
                break
            assert outcome == "refused"
            refused += 1
        else:
            pytest.fail("no connect succeeded in as many tries as there are backends")
    assert refused <= len(servers) - 1


@pytest.mark.timing
def test_set_changes_under_load_with_a_refusing_backend(tb, dp):
    """A backend refuses while the set changes back and forth: every change
    is one transaction, the flag of a backend that stays in the set survives
    it, so a refused connect retried once never fails."""
    b0, b1, b2 = tb.backends
    local = Backend.of("127.0.0.1", LOCAL_HTTP_PORT)
    dead = be(b1)
    sets = [[dead, be(b0)], [dead, be(b0), be(b2)], [dead, be(b2)], [dead, be(b2), local],
            [dead, local, be(b0), be(b2)]]
    dp.install(sets[0])
    b1.stop()
    failures: list[str] = []
    outcomes: list[str] = []
    stop = threading.Event()

    def loop() -> None:
        end = time.monotonic() + 60
        while not stop.is_set() and time.monotonic() < end:
            first = attempt()
            outcomes.append(first)
            if first == "refused":
                first = attempt()
            if first != "ok":
                failures.append(first)
            time.sleep(0.0005)  # a few thousand connects, not tens of thousands of ports

    t = threading.Thread(target=loop, daemon=True)
    t.start()
    changes = 0
    start = time.monotonic()
    try:
        # Longer than two suspect windows: the flag also expires and is raised
        # again while the set changes.
        while time.monotonic() - start < 2.5 * SUSPECT and changes < 1000:
            assert dp.apply(sets[(changes + 1) % len(sets)]) is True
            changes += 1
            time.sleep(0.02)
    finally:
        stop.set()
        t.join(65)
    assert failures == []
    assert changes >= 50 and outcomes.count("ok") >= changes
    assert outcomes.count("refused") >= 2  # the flag expired at least once meanwhile
    print(f"{len(outcomes)} connects through {changes} set changes in "
          f"{time.monotonic() - start:.1f} s: {outcomes.count('refused')} refused, "
          f"0 failed after the retry")
    assert dp.read_state().details["current_layout"] is True


# --- upgrade, cleanup -------------------------------------------------------------------


OLD_INSTALL = """
import sys
from prism_kernel.datapath.base import DatapathSettings
from prism_kernel.datapath.{module} import NftablesDatapath
from prism_kernel.{model} import Backend
dp = NftablesDatapath(DatapathSettings(listen_port=int(sys.argv[1]), instance=sys.argv[2]))
dp.install([Backend.of(a, int(p)) for a, p in (x.split(":") for x in sys.argv[3:])])
print(dp.read_state().details["marker"])
"""


@pytest.mark.parametrize("layout, commit, module, model", [
    (1, LAYOUT1_COMMIT, "nftables", "model"), (2, LAYOUT2_COMMIT, "nft.datapath", "core.model")],
    ids=["layout1", "layout2"])
def test_older_table_is_replaced_without_a_failed_connect(tb, dp, tmp_path, layout, commit, module, model):
    old_tree = old_release(commit, tmp_path / "old", "prism_kernel", "nft")
    b0, b1, _ = tb.backends
    r = run_old_release(old_tree, OLD_INSTALL.format(module=module, model=model), str(PORT), INSTANCE,
                        f"{b0.address}:{b0.http_port}", f"{b1.address}:{b1.http_port}")
    assert f"layout={layout} " in r.stdout
    assert dp.passive_failures() == {}  # its counters (none, or other sets) are not read
    with Hammer(lambda: connect().close()) as load:
        time.sleep(0.3)
        assert dp.install([be(tb.backends[2])]) is True  # replaced, keeping what it steered to
        n = load.ok
        time.sleep(0.3)
    assert load.failures == []
    assert load.ok > n > 0
    st = dp.read_state()
    assert st.details["current_layout"] is True and f"layout={template().layout} " in st.details["marker"]
    assert st.backends == tuple(sorted([be(b0), be(b1)]))
    b0.stop()
    connect_until_refused()
    assert dp.passive_failures()[be(b0)].refused == 1


def test_cleanup_leaves_nothing(tb):
    b0, b1, _ = tb.backends
    d = NftablesDatapath(SETTINGS)
    try:
        d.install([be(b0), be(b1)])
        b1.stop()
        connect_until_refused()  # dynamic elements: a counter and a suspect flag
        assert set(d.read_state().details["suspect"]) == {str(be(b1))}
        saved = sysctl.saved(INSTANCE)
    finally:
        d.close()
        lines = NftablesDatapath.cleanup(SETTINGS)
    assert f"deleted nft table ip {TABLE}" in lines
    assert not table_exists()
    assert not sysctl.state_path(INSTANCE).exists()
    for name, entry in saved.items():  # restored, unless another instance still needs it
        if not any(name in ln and "still needed" in ln for ln in lines):
            assert sysctl.read(name) == entry["original"], (name, lines)
    assert NftablesDatapath.cleanup(SETTINGS) == []
    assert NftablesDatapath(SETTINGS).passive_failures() == {}
    with pytest.raises(ConnectionRefusedError):
        connect()
