"""A neighbour on the node (issue 12 item 1): prism-kernel never takes over
someone else's listen address unless told to, refuses a configuration its
data path cannot serve, and says healthy only when the kernel really steers
the listen address to a backend that is up."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from prism_kernel import datapath as dp
from prism_kernel.errors import ConfigError, DatapathUnavailable
from tests.harness import TEST_INSTANCE, TEST_PORT, Daemon, client_context, kernel_leftovers, prism, who

DATAPATHS = ["nftables", "ebpf"]
V6_ONLY = ["[2001:2:0:31::2]:6443", "[2001:2:0:32::2]:6443"]


def endpoints(tb):
    return [b.endpoint for b in tb.backends]


def _listener(host: str) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(family, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if family == socket.AF_INET6:
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    s.bind((host, TEST_PORT))
    s.listen()
    return s


def _exit_code(d: Daemon, timeout: float = 60) -> int:
    try:
        return d.proc.wait(timeout)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"the daemon did not exit within {timeout}s:\n{d.log_path.read_text()}") from None


def _reaches_listener(s: socket.socket, host: str) -> bool:
    """A connect to host:TEST_PORT is accepted by `s` itself (not steered away)."""
    with socket.create_connection((host, TEST_PORT), timeout=3) as c:
        s.settimeout(3)
        peer, addr = s.accept()
        with peer:
            return addr[1] == c.getsockname()[1]


# --------------------------------------------------------------------------
# a listener on the listen address


@pytest.mark.kernel
@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
@pytest.mark.parametrize("datapath", DATAPATHS)
def test_run_refuses_a_taken_listen_address_and_touches_nothing(testbed, datapath, host):
    """Exit 2 naming the process that listens; nothing of this instance in the
    kernel; the listener still gets its connections."""
    tb = testbed
    assert kernel_leftovers() == []
    with _listener(host) as s:
        d = Daemon(endpoints(tb), datapath, tb.ca_file, tb.tmpdir)
        try:
            code = _exit_code(d)
        finally:
            d.stop()
        log = d.log_path.read_text()
        assert code == 2, log
        comm = Path("/proc/self/comm").read_text().strip()
        shown = f"[{host}]:{TEST_PORT}" if ":" in host else f"{host}:{TEST_PORT}"
        assert f"{shown} ({comm} (pid {os.getpid()}))" in log, log
        assert "--take-over-listen-address" in log, log
        assert not [e for e in d.events() if e.get("event") in ("datapath_ready", "set_written")], log
        assert kernel_leftovers() == [], log
        assert _reaches_listener(s, host)


@pytest.mark.kernel
@pytest.mark.parametrize("datapath", DATAPATHS)
def test_take_over_listen_address_steers_away_from_the_listener(testbed, datapath):
    """With the operator's opt-in it starts, and a connect to 127.0.0.1:PORT
    reaches a backend, not the listener."""
    tb = testbed
    ctx = client_context(tb.ca_file)
    with _listener("127.0.0.1") as s:
        with Daemon(endpoints(tb), datapath, tb.ca_file, tb.tmpdir, extra=["--take-over-listen-address"]) as d:
            d.wait_ready()
            d.wait_serving({b.endpoint for b in tb.backends})
            assert who(ctx) in {"be0", "be1", "be2"}
            s.setblocking(False)
            with pytest.raises(BlockingIOError):
                s.accept()  # nothing reached the listener
            ev = d.wait_event("listen_address_taken_over")
            assert str(os.getpid()) in ev["listeners"]


@pytest.mark.kernel
def test_doctor_fails_on_a_taken_listen_address():
    with _listener("127.0.0.1"):
        r = prism("doctor", "--port", str(TEST_PORT), "--instance", TEST_INSTANCE, "-o", "json", timeout=120)
    assert r.returncode == 1, r.stdout + r.stderr
    report = json.loads(r.stdout)
    port = next(c for c in report["checks"] if c["id"] == "port")
    assert port["verdict"] == "fail" and report["blocked_by"] == ["port"]


@pytest.mark.kernel
def test_a_reload_to_a_taken_port_is_rejected(testbed, tmp_path):
    """SIGHUP moving the listen port onto a listener: rejected naming it, the
    running port keeps steering."""
    tb = testbed
    other = TEST_PORT + 1
    cfg = tmp_path / "config.yaml"
    cfg.write_text(f"port: {TEST_PORT}\n")
    ctx = client_context(tb.ca_file)
    d = Daemon(endpoints(tb), "ebpf", tb.ca_file, tb.tmpdir, extra=["--config", str(cfg)], start=False)
    i = d.argv.index("--port")
    del d.argv[i:i + 2]  # the port from the file, so that a reload can change it
    d.start()
    with d:
        d.wait_ready()
        d.wait_serving({b.endpoint for b in tb.backends})
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("127.0.0.1", other))
            s.listen()
            mark = len(d.events())
            cfg.write_text(f"port: {other}\n")
            d.proc.send_signal(signal.SIGHUP)
            ev = d.wait_event("reload_rejected", after=mark)
            assert f"127.0.0.1:{other}" in ev["reason"] and f"pid {os.getpid()}" in ev["reason"], ev
            assert d.status()["state"]["listen_port"] == TEST_PORT
            assert who(ctx) in {"be0", "be1", "be2"}


# --------------------------------------------------------------------------
# a configuration the data path cannot serve


def test_nftables_with_only_ipv6_endpoints_is_a_config_error():
    r = prism("run", "--datapath", "nftables", "--probe", "tcp", "--instance", TEST_INSTANCE,
              *[a for e in V6_ONLY for a in ("--endpoint", e)])
    assert r.returncode == 2, r.stderr
    assert "datapath 'nftables'" in r.stderr and "IPv6" in r.stderr


def test_auto_with_only_ipv6_endpoints_never_falls_back_to_nftables(monkeypatch):
    """auto picks eBPF for IPv6-only endpoints; where eBPF cannot run it
    refuses (exit 2) instead of installing nftables that steers nothing."""

    class Ebpf:
        name, families = "ebpf", frozenset({4, 6})
        available = True

        @classmethod
        def check_available(cls, settings):
            if not cls.available:
                raise DatapathUnavailable("ebpf", "no BPF here")

    class Nft:
        name, families = "nftables", frozenset({4})

        @classmethod
        def check_available(cls, settings):
            pass

    monkeypatch.setattr(dp, "datapath_class", {"ebpf": Ebpf, "nftables": Nft}.__getitem__)
    monkeypatch.setattr(dp, "installed", lambda settings: None)
    settings = dp.DatapathSettings(instance=TEST_INSTANCE)
    v6 = dp.known_families([6, 6], discovery=False)
    assert dp.decide("auto", settings, v6).cls is Ebpf
    Ebpf.available = False
    with pytest.raises(ConfigError, match="only the eBPF data path steers"):
        dp.decide("auto", settings, v6)
    # Names or discovery: the families are known at run time only, auto falls back as before.
    assert dp.decide("auto", settings, dp.known_families([6, None], discovery=False)).cls is Nft
    assert dp.decide("auto", settings, dp.known_families([6], discovery=True)).cls is Nft
    # auto keeps an installed nftables path: with IPv6-only endpoints that is refused, not kept.
    monkeypatch.setattr(dp, "installed", lambda settings: ("nftables", "its nft table ip x exists"))
    with pytest.raises(ConfigError, match="keeps the installed nftables data path"):
        dp.decide("auto", settings, v6)
    with pytest.raises(ConfigError, match="datapath 'nftables'"):
        dp.decide("nftables", settings, v6)


# --------------------------------------------------------------------------
# healthy only when the kernel steers to a backend that is up


def _http_get(url: str) -> tuple[int, str]:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def _wait_status(d: Daemon, pred, what: str, timeout: float = 15) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        st = d.status()
        if pred(st):
            return st
        if time.monotonic() > deadline:
            raise AssertionError(f"status never {what}: {st}\n{d.log_path.read_text()}")
        time.sleep(0.1)


@pytest.mark.kernel
@pytest.mark.parametrize("datapath", DATAPATHS)
def test_status_fails_when_every_backend_is_down(testbed, datapath):
    tb = testbed
    with Daemon(endpoints(tb), datapath, tb.ca_file, tb.tmpdir) as d:
        d.wait_ready()
        d.wait_serving({b.endpoint for b in tb.backends})
        assert prism("status", "--instance", TEST_INSTANCE).returncode == 0
        assert _http_get(d.metrics_url() + "/readyz")[0] == 200
        for b in tb.backends:
            b.stop()
        st = _wait_status(d, lambda st: all(b["state"] == "down" for b in st["state"]["backends"]),
                          "showed every backend down")
        assert st["healthy"] is False and "none of them up" in st["health"], st
        r = prism("status", "--instance", TEST_INSTANCE)
        assert r.returncode == 1 and "UNHEALTHY" in r.stdout, r.stdout
        # /readyz too: fail-open steers to every known backend, none of them up.
        url = d.metrics_url() + "/readyz"
        deadline = time.monotonic() + 10
        while (code_body := _http_get(url))[0] != 503 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert code_body[0] == 503 and "none of them up" in code_body[1], code_body


@pytest.mark.kernel
@pytest.mark.parametrize("datapath", DATAPATHS)
def test_status_fails_when_the_data_path_is_removed_behind_the_daemons_back(testbed, datapath):
    """The daemon's own view (backends up, its state fresh) is not enough:
    status reads the kernel. The daemon is stopped (SIGSTOP) while its data
    path is removed, so it cannot repair it before status looks."""
    tb = testbed
    with Daemon(endpoints(tb), datapath, tb.ca_file, tb.tmpdir) as d:
        d.wait_ready()
        d.wait_serving({b.endpoint for b in tb.backends})
        assert prism("status", "--instance", TEST_INSTANCE).returncode == 0
        d.proc.send_signal(signal.SIGSTOP)
        try:
            removed = prism("cleanup", "--instance", TEST_INSTANCE, "--force")
            assert removed.returncode == 0 and "removed" in removed.stdout, removed.stdout + removed.stderr
            r = prism("status", "--instance", TEST_INSTANCE, "-o", "json")
            st = json.loads(r.stdout)
            assert all(b["state"] == "up" for b in st["state"]["backends"])  # what the daemon says
            assert r.returncode == 1 and st["healthy"] is False, st
            assert f"holds no {datapath} data path" in st["health"], st
        finally:
            d.proc.send_signal(signal.SIGCONT)


@pytest.mark.kernel
def test_endpoints_turning_ipv6_only_at_run_time_keep_the_last_set_and_fail_status(testbed, hosts_file):
    """nftables steers IPv4 only. A name that re-resolves to IPv6 addresses
    only: the daemon logs it, never writes an empty set (the last one stays
    in the kernel), and status says unhealthy: the kernel steers to a
    backend the daemon no longer counts as up."""
    tb = testbed
    v6 = tb.add_backend(ipv6=True)
    name = "cp.pk-test.invalid"
    hosts_file({name: [v6.address4]})
    conf = Path(tb.tmpdir) / "config.yaml"
    conf.write_text(f"endpoints:\n  - {name}:6443\nresolve_interval: 500ms\n")
    with Daemon([], "nftables", tb.ca_file, tb.tmpdir, probe="tcp", extra=["--config", str(conf)]) as d:
        d.wait_ready()
        first = f"{v6.address4}:6443"
        d.wait_serving({first})
        assert prism("status", "--instance", TEST_INSTANCE).returncode == 0
        mark = len(d.events())
        hosts_file({name: [v6.address]})
        d.wait_event("no_steerable_backends", after=mark)
        st = _wait_status(d, lambda st: not st["healthy"], "unhealthy")
        assert st["kernel"]["nftables"]["backends"] == [first], st  # the last set, never an empty one
        assert "none of them up" in st["health"], st
        assert prism("status", "--instance", TEST_INSTANCE).returncode == 1
        assert not [e for e in d.events()[mark:] if e.get("event") == "set_written"], d.log_path.read_text()


def test_the_real_nftables_class_steers_ipv4_only(monkeypatch):
    """What decide() and the daemon's selection read: without it the daemon
    selected IPv6 backends on nftables, which dropped them and wrote an
    empty set (the issue's case)."""
    monkeypatch.setattr(dp, "installed", lambda settings: None)
    assert dp.datapath_class("nftables").families == frozenset({4})
    with pytest.raises(ConfigError, match="datapath 'nftables'"):
        dp.decide("nftables", dp.DatapathSettings(instance=TEST_INSTANCE), frozenset({6}))
