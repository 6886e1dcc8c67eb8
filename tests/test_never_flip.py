"""Never crash-loop, never flip (issue 9, item 5), with real daemons and real
kernel state:

* a program attached at the cgroup root without BPF_F_ALLOW_MULTI makes eBPF
  unavailable, with the hook and the program named (`auto` picks nftables,
  `doctor` says why);
* a failed eBPF install under `auto`, nothing installed before, falls back to
  nftables (log line, metric);
* a restart adopts the installed eBPF path without loading anything, even
  where a fresh check would fail; a failing install of an installed eBPF path
  never switches paths or touches the host sysctls: the old state keeps
  steering while the daemon retries with backoff;
* READY=1 (sd_notify) arrives once 127.0.0.1:PORT is steered, never while the
  start fails;
* removing the other data path logs what it did and what failed.

The exclusive program is held only inside `exclusive_program()` (detached in
its finally; the session clean-up detaches one an interrupted run left).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.exclusive_prog import PROG_NAME, exclusive_program
from tests.harness import (
    REPO,
    TEST_INSTANCE,
    TEST_PORT,
    Daemon,
    client_context,
    kernel_leftovers,
    prism,
    who,
)

pytestmark = pytest.mark.kernel

SYSCTLS = ("net/ipv4/conf/all/route_localnet", "net/ipv4/tcp_timestamps")
BACKENDS = {"be0", "be1", "be2"}
# The daemon in a mount namespace of its own where bpffs is mounted read-only
# (as in a container whose /sys is read-only): the eBPF checks pass, the
# install cannot pin anything (EROFS). Nothing of the host's bpffs is touched.
READ_ONLY_BPFFS = ["unshare", "-m", "--propagation", "private", "--", "sh", "-c",
                   'mount -t bpf -o ro bpf /sys/fs/bpf && exec "$@"', "sh"]


def endpoints(tb) -> list[str]:
    return [b.endpoint for b in tb.backends]


def names(tb) -> set[str]:
    return set(endpoints(tb))


def sysctls() -> dict[str, str]:
    return {k: Path("/proc/sys", k).read_text().strip() for k in SYSCTLS}


def events(d: Daemon, event: str, **match) -> list[dict]:
    return [e for e in d.events() if e.get("event") == event
            and all(str(e.get(k)) == str(v) for k, v in match.items())]


def wait_events(d: Daemon, event: str, n: int, timeout: float = 30, **match) -> list[dict]:
    """The first `n` `event` lines (bounded wait; fails when the daemon exits)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = events(d, event, **match)
        if len(got) >= n:
            return got[:n]
        if d.proc.poll() is not None:
            raise AssertionError(f"daemon exited {d.proc.returncode}:\n{d.log_path.read_text()}")
        time.sleep(0.05)
    raise AssertionError(f"fewer than {n} {event} {match} in {timeout}s:\n{d.log_path.read_text()}")


def ts(ev: dict) -> float:
    return dt.datetime.fromisoformat(ev["ts"].replace("Z", "+00:00")).timestamp()


def scrape(d: Daemon) -> dict[tuple[str, tuple], float]:
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(d.metrics_url() + "/metrics", timeout=5) as r:
        text = r.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(text) for s in f.samples}


def metric(samples: dict, name: str, **labels) -> float | None:
    return samples.get((name, tuple(sorted(labels.items()))))


def http_code(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def prog_ids() -> dict[str, int]:
    st = json.loads(prism("status", "--instance", TEST_INSTANCE, "-o", "json").stdout)
    return st["kernel"]["ebpf"]["details"].get("prog_ids", {})


def nft_table_exists() -> bool:
    return any(x.startswith("nft table") for x in kernel_leftovers())


def install_ebpf_and_stop(tb) -> dict[str, int]:
    """An eBPF data path installed by a daemon that then stopped (SIGTERM
    leaves it steering); returns its program ids."""
    with Daemon(endpoints(tb), "ebpf", tb.ca_file, tb.tmpdir, cleanup_on_exit=False) as d1:
        d1.wait_ready()
        d1.wait_active(names(tb))
    assert d1.proc.returncode == 0
    ids = prog_ids()
    assert len(ids) == 5, ids
    return ids


class NotifySocket:
    """The socket systemd would listen on for sd_notify (NOTIFY_SOCKET), bound by the test."""

    def __init__(self, tmpdir: str, abstract: bool = False):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        if abstract:
            name = f"pk-test-notify-{os.getpid()}-{time.monotonic_ns()}"
            self.sock.bind("\0" + name)
            self.env = {"NOTIFY_SOCKET": "@" + name}
        else:
            path = str(Path(tmpdir) / f"notify-{time.monotonic_ns()}.sock")
            self.sock.bind(path)
            self.env = {"NOTIFY_SOCKET": path}
        self.messages: list[dict[str, str]] = []

    def _take(self, data: bytes) -> dict[str, str]:
        msg = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
        self.messages.append(msg)
        return msg

    def drain(self) -> list[dict[str, str]]:
        """Every datagram queued now (no wait)."""
        self.sock.setblocking(False)
        try:
            while True:
                self._take(self.sock.recv(65536))
        except BlockingIOError:
            pass
        finally:
            self.sock.setblocking(True)
        return self.messages

    def wait_for(self, key: str, timeout: float = 30) -> dict[str, str]:
        """The first datagram carrying `key`; blocks on the socket itself (bounded)."""
        deadline = time.monotonic() + timeout
        for m in self.messages:
            if key in m:
                return m
        while (left := deadline - time.monotonic()) > 0:
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                break
            msg = self._take(data)
            if key in msg:
                return msg
        raise AssertionError(f"no {key}= within {timeout}s; got {self.messages}")

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def notify_socket(testbed):
    sockets: list[NotifySocket] = []

    def make(abstract: bool = False) -> NotifySocket:
        s = NotifySocket(testbed.tmpdir, abstract)
        sockets.append(s)
        return s

    yield make
    for s in sockets:
        s.close()


# --- an exclusive program at the root ----------------------------------------


@pytest.mark.parametrize("hook", ["connect4", "connect6", "getpeername4", "getpeername6", "sock_ops"])
def test_an_exclusive_program_on_any_of_our_hooks_is_found_and_named(hook):
    from prism_kernel.datapath.ebpf.cgroup import check_exclusive_attachments, exclusive_attachments
    from prism_kernel.errors import DatapathUnavailable

    assert exclusive_attachments() == []
    with exclusive_program(hook) as (pid, _):
        found = exclusive_attachments()
        assert [(a.hook, a.prog_id, a.prog_name, a.attach_flags) for a in found] == [(hook, pid, PROG_NAME, 0)]
        with pytest.raises(DatapathUnavailable) as e:
            check_exclusive_attachments()
        assert e.value.datapath == "ebpf"
        assert f"{hook} is held exclusively by program id {pid} '{PROG_NAME}'" in e.value.reason
        assert f"bpftool cgroup detach" in e.value.reason and f"{hook} id {pid}" in e.value.reason
    assert exclusive_attachments() == []


def test_auto_chooses_nftables_beside_an_exclusive_program_and_doctor_says_why(testbed):
    tb = testbed
    ctx = client_context(tb.ca_file)
    with exclusive_program("connect4") as (pid, _):
        named = f"connect4 is held exclusively by program id {pid} '{PROG_NAME}'"
        with Daemon(endpoints(tb), "auto", tb.ca_file, tb.tmpdir) as d:
            start = d.wait_event("start")
            assert start["datapath"] == "nftables" and named in start["why"], start
            fb = d.wait_event("datapath_fallback")
            assert (fb["from"], fb["to"], fb["reason"]) == ("ebpf", "nftables", "unavailable") and named in fb["error"]
            assert d.wait_ready()["datapath"] == "nftables"
            d.wait_active(names(tb))
            assert who(ctx) in BACKENDS
            samples = scrape(d)
            assert metric(samples, "prism_kernel_datapath_fallbacks_total",
                          **{"from": "ebpf", "to": "nftables", "reason": "unavailable"}) == 1
            assert metric(samples, "prism_kernel_datapath_info", datapath="nftables") == 1
            st = d.status()["state"]
            assert st["datapath"] == "nftables" and named in st["datapath_reason"]

            r = subprocess.run([sys.executable, "-m", "prism_kernel.observe.doctor", "--instance", "pk-doctor",
                                "--port", "17457", "-o", "json"], capture_output=True, text=True,
                               timeout=120, cwd=REPO)
            report = json.loads(r.stdout)
            assert report["datapath"] == "nftables" and named in report["reason"], report["reason"]
            checks = {c["id"]: c for c in report["checks"]}
            assert checks["cgroup.exclusive"]["verdict"] == "warn"
            assert named in checks["cgroup.exclusive"]["summary"]
            assert checks["cgroup.exclusive"]["details"]["attachments"][0]["prog_id"] == pid
            assert checks["datapath.ebpf"]["verdict"] == "warn" and named in checks["datapath.ebpf"]["summary"]
    assert d.proc.returncode == 0


# --- a failed install under auto ------------------------------------------------


def test_a_failed_ebpf_install_under_auto_falls_back_to_nftables(testbed):
    tb = testbed
    before = sysctls()
    with Daemon(endpoints(tb), "auto", tb.ca_file, tb.tmpdir, wrap=READ_ONLY_BPFFS) as d:
        assert d.wait_event("start")["datapath"] == "ebpf"  # every check passed
        fb = d.wait_event("datapath_fallback")
        assert (fb["from"], fb["to"], fb["reason"]) == ("ebpf", "nftables", "install_failed"), fb
        assert "Read-only file system" in fb["error"], fb
        assert d.wait_ready()["datapath"] == "nftables"
        d.wait_active(names(tb))
        assert who(client_context(tb.ca_file)) in BACKENDS
        samples = scrape(d)
        assert metric(samples, "prism_kernel_datapath_fallbacks_total",
                      **{"from": "ebpf", "to": "nftables", "reason": "install_failed"}) == 1
        assert metric(samples, "prism_kernel_datapath_info", datapath="nftables") == 1
        st = d.status()["state"]
        assert st["datapath"] == "nftables" and st["datapath_reason"].startswith("auto: eBPF install failed")
        assert st["datapath_start"]["fallback"].startswith("ebpf -> nftables")
        assert not events(d, "datapath_start_failed")  # fell back at once, no retry needed
        assert not any(x.startswith("bpf pins") for x in kernel_leftovers())
    assert d.proc.returncode == 0
    assert sysctls() == before  # restored by the cleanup on exit


# --- an installed eBPF path is kept --------------------------------------------


def no_loader_env(tmpdir: str) -> dict[str, str]:
    """An environment in which no eBPF loader can run, as after a broken
    package upgrade: libbpf.so.1 does not load (an empty file first on the
    library path) and bcc's Python does not exist."""
    lib = Path(tmpdir) / "broken-libbpf"
    lib.mkdir(exist_ok=True)
    (lib / "libbpf.so.1").write_bytes(b"")
    return {"LD_LIBRARY_PATH": str(lib), "PRISM_KERNEL_BCC_PYTHON": str(lib / "no-python")}


def test_a_restart_adopts_the_installed_ebpf_path_without_loading_anything(testbed):
    """No loader can run, so a fresh check says eBPF is unavailable (today's
    `auto` then switched the node to nftables and flipped its sysctls). The
    restarted daemon keeps the installed eBPF path: adopted, nothing loaded
    (same program ids), no nft table, no sysctl changed."""
    tb = testbed
    before = sysctls()
    ids = install_ebpf_and_stop(tb)
    env = no_loader_env(tb.tmpdir)
    check = subprocess.run(
        [sys.executable, "-c", "from prism_kernel.datapath import DatapathSettings, datapath_class as c\n"
         "c('ebpf').check_available(DatapathSettings(instance='pk-test'))"],
        capture_output=True, text=True, timeout=60, cwd=REPO, env={**os.environ, **env})
    assert check.returncode != 0 and "DatapathUnavailable" in check.stderr, check  # the fault is real
    with Daemon(endpoints(tb), "auto", tb.ca_file, tb.tmpdir, cleanup_on_exit=False, env=env) as d:
        start = d.wait_event("start")
        assert start["datapath"] == "ebpf" and "keeping the installed ebpf" in start["why"], start
        assert d.wait_ready()["adopted"] is True
        d.wait_active(names(tb))
        assert prog_ids() == ids
        assert who(client_context(tb.ca_file)) in BACKENDS
        assert not nft_table_exists() and sysctls() == before
        assert not events(d, "datapath_fallback") and not events(d, "datapath_start_failed")


def test_an_upgrade_that_cannot_load_keeps_the_installed_ebpf_path_serving(testbed, notify_socket):
    """The program files are gone (PRISM_KERNEL_BPF_DIR: an empty dir), so the
    installed program cannot be matched nor replaced: the daemon keeps the
    attached program (same map layout), never switches to nftables nor
    touches the sysctls, says why, and goes on writing the backend set, so
    failover keeps working; READY once it serves."""
    tb = testbed
    before = sysctls()
    ids = install_ebpf_and_stop(tb)
    empty = Path(tb.tmpdir) / "no-bpf-files"
    empty.mkdir()
    ns = notify_socket()
    ctx = client_context(tb.ca_file)
    with Daemon(endpoints(tb), "auto", tb.ca_file, tb.tmpdir, cleanup_on_exit=False,
                env={"PRISM_KERNEL_BPF_DIR": str(empty), **ns.env}) as d:
        ready = d.wait_ready()
        assert ready["datapath"] == "ebpf" and ready["adopted"] is True, ready
        assert "upgrade failed" in ready["why"], ready
        d.wait_active(names(tb))
        assert not events(d, "datapath_fallback") and not events(d, "datapath_start_failed")
        assert not nft_table_exists() and sysctls() == before
        assert prog_ids() == ids
        # the set is still written: a stopped backend leaves it
        tb.backends[0].stop()
        d.wait_active(names(tb) - {tb.backends[0].endpoint})
        assert {who(ctx) for _ in range(10)} <= BACKENDS - {"be0"}
        st = d.status()
        assert st["state"]["datapath"] == "ebpf"
        assert "upgrade failed" in st["state"]["datapath_loader"]["why"]
        ns.wait_for("READY")


# --- READY=1 -----------------------------------------------------------------


@pytest.mark.parametrize("datapath,abstract", [("nftables", False), ("ebpf", True)],
                         ids=["nftables-path", "ebpf-abstract"])
def test_ready_arrives_once_the_port_is_steered(testbed, notify_socket, datapath, abstract):
    tb = testbed
    ns = notify_socket(abstract)
    ctx = client_context(tb.ca_file)
    with Daemon(endpoints(tb), datapath, tb.ca_file, tb.tmpdir, env=ns.env) as d:
        ready = ns.wait_for("READY")
        # At this very moment the port must already be steered.
        assert who(ctx) in BACKENDS
        assert ready["READY"] == "1" and ready["STATUS"].startswith(f"steering 127.0.0.1:{TEST_PORT} via {datapath}")
        before = ns.messages[:-1]
        assert before and all("READY" not in m for m in before)
        assert any(m.get("STATUS", "").startswith("starting") for m in before), before
        assert d.wait_event("datapath_ready")
    assert d.proc.returncode == 0
    assert any(m.get("STOPPING") == "1" for m in ns.drain())


def test_start_failures_back_off_without_ready_and_recover(testbed, notify_socket):
    """--datapath ebpf while an exclusive program holds connect4: no data path,
    so the daemon retries (1 s, 2 s, ...) without READY; once the program is
    gone, the next try installs, and READY=1 arrives with the port steered."""
    tb = testbed
    ns = notify_socket()
    ctx = client_context(tb.ca_file)
    with exclusive_program("connect4") as (pid, detach):
        with Daemon(endpoints(tb), "ebpf", tb.ca_file, tb.tmpdir, env=ns.env) as d:
            fails = wait_events(d, "datapath_start_failed", 2, timeout=20)
            assert [(f["stage"], f["datapath"], f["attempt"]) for f in fails] == [("choose", "ebpf", 1),
                                                                                  ("choose", "ebpf", 2)]
            assert f"program id {pid} '{PROG_NAME}'" in fails[0]["error"]
            assert not any("READY" in m for m in ns.drain())
            st = d.status()["state"]
            assert st["datapath"] is None and st["datapath_start"]["state"] == "retrying"
            assert http_code(d.metrics_url() + "/readyz") == 503
            detach()
            ready = ns.wait_for("READY", timeout=30)
            assert who(ctx) in BACKENDS
            assert ready["READY"] == "1"
            assert d.wait_event("datapath_ready")["datapath"] == "ebpf"
            assert d.status()["state"]["datapath_start"]["state"] == "ok"


def test_a_start_that_fails_for_good_never_sends_ready_and_the_daemon_stops_cleanly(testbed, notify_socket):
    tb = testbed
    ns = notify_socket()
    with exclusive_program("connect6"):
        with Daemon(endpoints(tb), "ebpf", tb.ca_file, tb.tmpdir, env=ns.env) as d:
            wait_events(d, "datapath_start_failed", 2, timeout=20)
        assert d.proc.returncode == 0  # SIGTERM while retrying: a clean stop
    msgs = ns.drain()
    assert not any("READY" in m for m in msgs), msgs
    assert any(m.get("STOPPING") == "1" for m in msgs), msgs


# --- removing the other data path ---------------------------------------------


def test_removing_the_other_datapath_logs_what_it_did_and_what_failed(testbed):
    tb = testbed
    import nftables

    # What it did: nftables installed by a first daemon, then an eBPF daemon.
    with Daemon(endpoints(tb), "nftables", tb.ca_file, tb.tmpdir, cleanup_on_exit=False) as d1:
        d1.wait_ready()
    with Daemon(endpoints(tb), "ebpf", tb.ca_file, tb.tmpdir) as d2:
        d2.wait_ready()
        removed = wait_events(d2, "removed_other_datapath", 1, datapath="nftables")
        assert any("deleted nft table ip pk_test" in e["removed"] for e in events(d2, "removed_other_datapath"))
        assert removed and not nft_table_exists()
    # What failed: a table of that name owned by another process (flags
    # owner: only its owner may delete it; it goes when the owner does).
    owner = nftables.Nftables()
    rc, _, err = owner.cmd("add table ip pk_test { flags owner; }")
    assert rc == 0, err
    try:
        with Daemon(endpoints(tb), "ebpf", tb.ca_file, tb.tmpdir) as d3:
            d3.wait_ready()
            failed = wait_events(d3, "remove_other_datapath_failed", 1, datapath="nftables")[0]
            assert failed["level"] == "error" and "Operation not permitted" in failed["error"], failed
            assert d3.proc.poll() is None and who(client_context(tb.ca_file)) in BACKENDS
    finally:
        owner.cmd("delete table ip pk_test")
        del owner
    assert not nft_table_exists()
