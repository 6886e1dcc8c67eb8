"""Per-backend initial SYN RTO of steered connects (eBPF data path, issue 13):
sockops answers BPF_SOCK_OPS_TIMEOUT_INIT with the RTO the daemon wrote into
the backend's slot (Datapath.set_syn_rto, then apply), for steered sockets
only; every other socket keeps the kernel's 1 s. A black-holed backend is
then marked suspect (and counted) one short RTO after the SYN.

The RTO of a socket in SYN_SENT is read from TCP_INFO (tcpi_rto, us).

Needs root. Its own testbed: prefix "pko", net_offset=140 (198.18.141.0/24
and up, 2001:2:0:8d::/64 and up), listen port 37465, instance
"pk-rto-dev-ebpf". Every test removes its data path, pass or fail; the module
removes the testbed. Both loaders (libbpf, bcc) run every test.

    flock /run/prism-kernel-hosttests.lock .venv/bin/python -m pytest -q -s --noconftest tests/test_ebpf_rto.py
"""

from __future__ import annotations

import errno
import os
import socket
import struct
import time

import pytest

pytestmark = [pytest.mark.kernel, pytest.mark.guest]

if os.geteuid() != 0:
    pytest.skip("needs root", allow_module_level=True)

from prism_kernel.core.model import Backend  # noqa: E402
from prism_kernel.core.rto import ms_to_jiffies  # noqa: E402
from prism_kernel.datapath.base import DatapathSettings, PassiveCounts  # noqa: E402
from prism_kernel.datapath.ebpf.datapath import SUSPECT_WINDOW_S, EbpfDatapath  # noqa: E402
from prism_kernel.datapath.ebpf.jiffies import kernel_hz  # noqa: E402
from prism_kernel.datapath.ebpf.loading import bcc_missing, libbpf_missing  # noqa: E402
from prism_kernel.errors import DatapathUnavailable  # noqa: E402
from tests.harness import plain_backend  # noqa: E402
from tests.testbed import Testbed  # noqa: E402

PORT = 37465
PREFIX = "pko"
NET_OFFSET = 140
INSTANCE = "pk-rto-dev-ebpf"
KERNEL_DEFAULT_US = 1_000_000  # TCP_TIMEOUT_INIT
TCP_INFO_HEAD = struct.Struct("=8BI")  # struct tcp_info: 8 one-byte fields, then tcpi_rto (us)
TCP_SYN_SENT = 2

be = plain_backend


def be6(srv) -> Backend:
    return plain_backend(srv, 6)


@pytest.fixture(scope="module")
def tb():
    with Testbed(n_backends=2, prefix=PREFIX, net_offset=NET_OFFSET) as t:
        t.add_backend(ipv6=True)  # be2: dual stack
        yield t


@pytest.fixture(autouse=True)
def _backends_healthy(request):
    yield
    if "tb" in request.fixturenames:
        request.getfixturevalue("tb").heal()


def _cleanup() -> None:
    EbpfDatapath.cleanup(DatapathSettings(listen_port=PORT, instance=INSTANCE))


@pytest.fixture(params=["libbpf", "bcc"])
def dp(tb, request):
    """An EbpfDatapath of one loader, not yet installed; removed again after
    the test, pass or fail."""
    loader = request.param
    missing = libbpf_missing() if loader == "libbpf" else bcc_missing()
    if missing:
        pytest.fail(f"{loader} loader unavailable: {missing}")
    d = EbpfDatapath(DatapathSettings(listen_port=PORT, instance=INSTANCE, ebpf_loader=loader))
    try:
        EbpfDatapath.check_available(d.settings)
    except DatapathUnavailable as e:
        pytest.fail(f"ebpf data path unavailable on this machine: {e.reason}")
    _cleanup()
    try:
        yield d
    finally:
        d.close()
        _cleanup()


def hz() -> int:
    got = kernel_hz()
    assert got is not None, "kernel HZ not found"
    return got


def rto_us(ms: int) -> int:
    """What TCP_INFO reports for a timer of `ms` written as jiffies."""
    return ms_to_jiffies(ms, hz()) * 1_000_000 // hz()


def syn_sent(host: str, port: int, family: int = socket.AF_INET) -> socket.socket:
    """A non-blocking socket whose connect is under way (EINPROGRESS)."""
    s = socket.socket(family, socket.SOCK_STREAM)
    if family == socket.AF_INET6:
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    s.setblocking(False)
    err = s.connect_ex((host, port))
    if err != errno.EINPROGRESS:
        s.close()
        raise AssertionError(f"connect to {host}:{port}: {os.strerror(err)}")
    return s


def syn_rto_us(s: socket.socket) -> int:
    """tcpi_rto of a socket still in SYN_SENT."""
    raw = s.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)
    fields = TCP_INFO_HEAD.unpack_from(raw)
    assert fields[0] == TCP_SYN_SENT, f"socket in state {fields[0]}, not SYN_SENT"
    return fields[-1]


def served_by(tb, s: socket.socket):
    """The backend server a steered socket went to (each sits behind its own
    host veth, so the socket's local address names it)."""
    local = s.getsockname()[0]
    local = local.removeprefix("::ffff:")
    for srv in tb.backends:
        if local in (srv.host_address, srv.host_address6):
            return srv
    raise AssertionError(f"local address {local} belongs to no backend")


def wait_for(cond, timeout: float, step: float = 0.002) -> float | None:
    """Seconds until cond() held, None on timeout (bounded)."""
    t0 = time.monotonic()
    while True:
        if cond():
            return time.monotonic() - t0
        if time.monotonic() - t0 > timeout:
            return None
        time.sleep(step)


def test_kernel_hz_is_found():
    """HZ from SO_RCVTIMEO agrees with the kernel config where that is readable."""
    import gzip

    got = hz()
    try:
        with gzip.open("/proc/config.gz", "rt") as f:
            line = next((ln for ln in f if ln.startswith("CONFIG_HZ=")), None)
    except OSError:
        line = None
    if line is not None:
        assert got == int(line.split("=")[1])
    assert got in (100, 250, 300, 1000) or 24 <= got <= 10_000


def test_only_steered_connects_get_the_backends_rto(tb, dp):
    """Both backends black-holed, so that sockets stay in SYN_SENT: a connect
    steered to b0 (RTO 300 ms) gets 300 ms, one steered to b1 (no RTO written)
    and a direct connect to b0 get the kernel's 1 s."""
    b0, b1 = tb.backends[:2]
    dp.set_syn_rto({be(b0): 300})
    dp.install([be(b0), be(b1)])
    b0.blackhole(True)
    b1.blackhole(True)
    socks: list[socket.socket] = []
    try:
        seen: dict[str, int] = {}
        for _ in range(64):  # until both backends were drawn
            s = syn_sent("127.0.0.1", PORT)
            socks.append(s)
            seen.setdefault(served_by(tb, s).name, syn_rto_us(s))
            if len(seen) == 2:
                break
        direct = syn_sent(b0.address, b0.http_port)
        socks.append(direct)
        print(f"HZ {hz()}: steered {seen}, direct to {b0.name} {syn_rto_us(direct)} us")
        assert seen == {b0.name: rto_us(300), b1.name: KERNEL_DEFAULT_US}
        assert syn_rto_us(direct) == KERNEL_DEFAULT_US
        assert dp.read_state().details["syn_rto_jiffies"] == {str(be(b0)): ms_to_jiffies(300, hz())}
    finally:
        for s in socks:
            s.close()


def test_a_change_of_rto_alone_is_written(tb, dp):
    """The same set with another RTO is a new generation; new connects get it,
    and an RTO taken away again gives the kernel default back."""
    b0 = tb.backends[0]
    dp.install([be(b0)])
    b0.blackhole(True)
    gen0 = dp.read_state().details["generation"]
    got = []
    for ms in (400, 250, None):
        dp.set_syn_rto({be(b0): ms} if ms else {})
        assert dp.apply([be(b0)]) is True
        with syn_sent("127.0.0.1", PORT) as s:
            got.append(syn_rto_us(s))
    assert dp.apply([be(b0)]) is False  # unchanged: nothing written
    assert dp.read_state().details["generation"] == gen0 + 3
    assert got == [rto_us(400), rto_us(250), KERNEL_DEFAULT_US]


def test_ipv6_and_dual_stack_connects_get_the_rto(tb, dp):
    """connect6: [::1] to an IPv6 backend and [::ffff:127.0.0.1] to an IPv4
    one (a dual-stack socket) carry their backend's RTO too."""
    b2 = tb.backends[2]
    dp.set_syn_rto({be6(b2): 350, be(b2): 450})
    dp.install([be6(b2), be(b2)])
    b2.blackhole(True)
    with syn_sent("::1", PORT, socket.AF_INET6) as s6, \
            syn_sent("::ffff:127.0.0.1", PORT, socket.AF_INET6) as s4:
        assert (syn_rto_us(s6), syn_rto_us(s4)) == (rto_us(350), rto_us(450))


def test_black_hole_is_marked_one_short_rto_after_the_syn(tb, dp):
    """With a 300 ms RTO the first SYN retransmission, and with it the
    in-kernel suspect mark and the passive syn_timeouts counter, comes about
    0.3 s after the SYN (1 s without: test_datapath_suspect). The mark's time
    is the kernel's own (its deadline minus the window, CLOCK_MONOTONIC like
    bpf_ktime_get_ns()), not when this process happened to look."""
    b0 = tb.backends[0]
    dp.set_syn_rto({be(b0): 300})
    dp.install([be(b0)])
    b0.blackhole(True)
    assert dp.suspect_backends() == {}
    syn_at = time.monotonic()
    with syn_sent("127.0.0.1", PORT) as s:
        assert served_by(tb, s) is b0
        assert wait_for(lambda: be(b0) in dp.suspect_backends(), timeout=2) is not None, \
            "never marked suspect"
        left = dp.suspect_backends()[be(b0)]
        marked = time.monotonic() + left - SUSPECT_WINDOW_S - syn_at
        timeouts = dp.passive_failures().get(be(b0), PassiveCounts()).syn_timeouts
    print(f"black-holed backend marked suspect {marked:.3f} s after its SYN")
    # every later firing moves the deadline on: the mark read must be the first
    assert timeouts == 1, f"read after {timeouts} SYN timeouts: too late to time the first"
    assert 0.28 < marked < 0.45
