"""`prism-kernel doctor`: runs as root here, finds the eBPF path, reports a
taken port, and leaves the kernel exactly as it found it.

The end-to-end tests run `python -m prism_kernel.observe.doctor` (the same function
`prism-kernel doctor` calls) on port 17457 with instance `pk-doctor`, so that
they never meet another test's or a live daemon's state. They are marked
`kernel`: doctor loads BPF programs (the feature probes, the programs in a
child), which needs root, although it changes no kernel state (the last of
them proves it). The unit tests below them run as any user.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from prism_kernel.observe import doctor
from prism_kernel.observe.doctor import check, host, ports

REPO = Path(__file__).resolve().parent.parent
PORT = 17457  # outside the ephemeral range: no client socket of another test can hold it
INSTANCE = "pk-doctor"
CHECK_IDS = (
    "kernel", "bpf.sock_addr", "bpf.sock_ops", "bpf.sk_storage", "bpf.lru_hash", "bpf.sk_storage_sock_addr",
    "bpf.netns_cookie", "bpf.sock_ops_cb_flags", "bpf.sk_storage_sock_ops", "bpf.getpeername",
    "bpf.sock_ops_sk", "bpf.cgroup_link", "bpf.link_detach", "sock_diag.destroy", "sock_diag.sk_storage",
    "cgroup", "cgroup.exclusive", "bpffs", "ebpf.loader", "nftables.module", "capabilities", "port", "metrics_port",
    "sysctls", "datapath.ebpf", "datapath.nftables", "auto",
)

def run_doctor(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "prism_kernel.observe.doctor", "--instance", INSTANCE, *args],
                          capture_output=True, text=True, timeout=timeout, cwd=REPO,
                          env={**os.environ, "NO_COLOR": "1"})


def checks_by_id(report: dict) -> dict[str, dict]:
    return {c["id"]: c for c in report["checks"]}


# --------------------------------------------------------------------------
# end to end, as root


@pytest.mark.kernel
def test_doctor_text_root_can_run_auto_ebpf():
    r = run_doctor("--port", str(PORT))
    assert r.returncode == 0, r.stdout + r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].startswith("prism-kernel doctor:")
    for cid in CHECK_IDS:
        matching = [l for l in lines if l.split()[1:2] == [cid]]
        assert len(matching) == 1, f"no single line for check {cid}:\n{r.stdout}"
        assert matching[0].split()[0] in ("ok", "warn", "fail")
    assert not any(l.startswith("fail") for l in lines), r.stdout
    auto = next(l for l in lines if l.split()[1:2] == ["auto"])
    assert auto.startswith("ok") and "would use ebpf" in auto, auto
    assert lines[-1] == "result: prism-kernel can run here; --datapath auto would use ebpf"
    assert "\033[" not in r.stdout  # no colour when stdout is not a terminal


@pytest.mark.kernel
def test_doctor_json_parses_and_matches():
    r = run_doctor("--port", str(PORT), "-o", "json")
    assert r.returncode == 0, r.stdout + r.stderr
    report = json.loads(r.stdout)
    assert report["schema"] == 1
    assert (report["instance"], report["port"]) == (INSTANCE, PORT)
    assert report["can_run"] is True
    assert report["datapath"] == "ebpf"
    by_id = checks_by_id(report)
    assert set(by_id) == set(CHECK_IDS)
    for c in report["checks"]:
        assert c["verdict"] in ("ok", "warn", "fail")
        assert isinstance(c["summary"], str) and c["summary"] and "\n" not in c["summary"]
        if c["verdict"] != "ok":
            assert c["action"], f"{c['id']} is {c['verdict']} but says nothing to do"
    for cid in CHECK_IDS:
        if cid.startswith(("bpf.", "sock_diag.")) or cid in (
                "cgroup", "capabilities", "ebpf.loader", "datapath.ebpf", "datapath.nftables", "auto"):
            assert by_id[cid]["verdict"] == "ok", by_id[cid]
    # the default path: the precompiled object with libbpf, really loaded in a child
    assert by_id["ebpf.loader"]["details"]["plan"][0]["loader"] == "libbpf"
    assert by_id["datapath.ebpf"]["details"]["loader"] == "libbpf"
    assert by_id["cgroup"]["details"]["initial_cgroup_namespace"] is True
    assert by_id["capabilities"]["details"]["CAP_SYS_ADMIN"] is True
    assert set(by_id["sysctls"]["details"]) == {"net.ipv4.conf.all.route_localnet", "net.ipv4.tcp_timestamps"}


@pytest.mark.kernel
def test_doctor_reports_a_taken_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", PORT))
        s.listen()
        r = run_doctor("--port", str(PORT), "-o", "json")
        text = run_doctor("--port", str(PORT))
    assert r.returncode == 1, r.stdout + r.stderr  # `run` would refuse: doctor fails (issue 12)
    report = json.loads(r.stdout)
    assert report["can_run"] is False and report["blocked_by"] == ["port"]
    port = checks_by_id(report)["port"]
    assert port["verdict"] == "fail" and port["blocks_run"] is True
    listeners = port["details"]["listeners"]
    assert [l["address"] for l in listeners] == [f"127.0.0.1:{PORT}"]
    assert listeners[0]["process"].endswith(f"(pid {os.getpid()})")
    alt = port["details"]["suggested_port"]
    assert alt and alt != PORT and alt not in ports.AVOID_PORTS
    assert "instead of it" in port["action"] and f"--port {alt}" in port["action"]
    assert "--take-over-listen-address" in port["action"]
    line = next(l for l in text.stdout.splitlines() if l.split()[1:2] == ["port"])
    assert line.startswith("fail") and f"port {PORT} is taken" in line and "Do:" in line
    assert text.returncode == 1 and "would refuse to start here (port)" in text.stdout


@pytest.mark.kernel
def test_doctor_with_take_over_warns_about_a_taken_port():
    """The operator's opt-in (as `run --take-over-listen-address`): the
    listener is named, the check warns, doctor exits 0."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", PORT))
        s.listen()
        r = run_doctor("--port", str(PORT), "-o", "json", "--take-over-listen-address")
    assert r.returncode == 0, r.stdout + r.stderr
    port = checks_by_id(json.loads(r.stdout))["port"]
    assert port["verdict"] == "warn" and "steers every connect" in port["summary"]


def test_doctor_names_kubeprism_for_7445(monkeypatch):
    """On the default port the advice is about Talos KubePrism (listener faked)."""
    monkeypatch.setattr(ports, "listeners", lambda p: [{"address": f"127.0.0.1:{p}", "inode": 1,
                                                          "process": "machined (pid 1)"}] if p == 7445 else [])
    c = ports.check_port(7445, INSTANCE)
    assert c.verdict == "fail" and c.blocks_run
    assert "KubePrism" in c.summary
    assert "machine.features.kubePrism.enabled: false" in c.action and "KubePrismConfig" in c.action
    assert c.details["suggested_port"] == 7449  # 7446-7448 and 7450 are avoided


# --------------------------------------------------------------------------
# doctor leaves the kernel as it found it


def _json(cmd: list[str]):
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    if out.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)}: {out.stderr}")
    return json.loads(out.stdout.strip() or "null")


def _ours(name: str) -> bool:
    """bpffs dir / nft table names of this test's instance (and its nft dry-run probe)."""
    return name.replace("_", "-").startswith(INSTANCE)


def _other_instance(name: str) -> bool:
    """State of another engineer's or test's instance (pk-*), which may change meanwhile."""
    return name.replace("_", "-").startswith("pk-") and not _ours(name)


def _snapshot(cgroup_root: str) -> dict:
    from prism_kernel.datapath import sysctl

    bpffs = set()
    for root, dirs, files in os.walk("/sys/fs/bpf"):
        rel = os.path.relpath(root, "/sys/fs/bpf")
        top = rel.split(os.sep)[0]
        if top != "." and _other_instance(top):
            continue
        for name in dirs + files:
            if rel == "." and _other_instance(name):
                continue
            bpffs.add(os.path.normpath(os.path.join(rel, name)))
    links = _json(["bpftool", "-j", "-f", "link", "show"]) or []
    tables = _json(["nft", "-j", "list", "tables"])["nftables"]
    mounts = sorted(l.split(" - ")[0].split(" ", 4)[4].split(" ")[0] + " " + l.split(" - ")[1].split(" ")[0]
                    for l in Path("/proc/self/mountinfo").read_text().splitlines()
                    if l.split(" - ")[1].split(" ")[0] in ("bpf", "cgroup2"))
    return {
        "progs": {p["id"]: p.get("name", "") for p in _json(["bpftool", "-j", "prog", "show"]) or []},
        "links": {l["id"]: l for l in links},
        "cgroup": {(a["attach_type"], a["id"]) for a in _json(["bpftool", "-j", "cgroup", "show", cgroup_root]) or []},
        "bpffs": bpffs,
        "tables": {(t["table"]["family"], t["table"]["name"]) for t in tables if "table" in t},
        "sysctls": {n: sysctl.read(n) for n in ("net.ipv4.conf.all.route_localnet", "net.ipv4.tcp_timestamps")},
        "mounts": mounts,
    }


def _explained_by_other_instance(after: dict, prog_id: int) -> bool:
    """A program held by a link another instance pinned under /sys/fs/bpf/pk-*."""
    for link in after["links"].values():
        if link.get("prog_id") == prog_id and any(
                _other_instance(Path(p).relative_to("/sys/fs/bpf").parts[0]) for p in link.get("pinned", [])):
            return True
    return False


@pytest.mark.kernel
def test_doctor_changes_no_kernel_state():
    from prism_kernel.datapath.ebpf.cgroup import find_cgroup2_root

    root = find_cgroup2_root()
    before = _snapshot(root)
    r = run_doctor("--port", str(PORT), "-o", "json")
    assert r.returncode == 0, r.stdout + r.stderr
    # Programs are freed after their last reference goes (deferred work): give
    # the probes' and the check child's programs a moment.
    deadline = time.monotonic() + 5
    while True:
        after = _snapshot(root)
        leftover = [i for i, n in after["progs"].items() if n == "pk_doctor"]
        if not leftover or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert leftover == [], f"doctor's probe programs still loaded: {leftover}"

    new_links = [l for i, l in after["links"].items() if i not in before["links"]]
    unexplained = [l for l in new_links if not any(
        _other_instance(Path(p).relative_to("/sys/fs/bpf").parts[0]) for p in l.get("pinned", []))]
    assert unexplained == [], f"links appeared: {unexplained}"

    new_attached = [a for a in after["cgroup"] - before["cgroup"] if not _explained_by_other_instance(after, a[1])]
    assert new_attached == [], f"programs attached at {root}: {new_attached}"

    assert after["bpffs"] == before["bpffs"], after["bpffs"] ^ before["bpffs"]
    assert not any(_ours(n) for n in os.listdir("/sys/fs/bpf"))

    changed = after["tables"] ^ before["tables"]
    assert not any(_ours(name) for _, name in after["tables"]), after["tables"]
    assert all(_other_instance(name) for _, name in changed), changed

    assert after["mounts"] == before["mounts"]

    if after["sysctls"] != before["sysctls"]:
        # Only another instance's nftables data path may have flipped them meanwhile.
        others = [name for _, name in after["tables"] | before["tables"] if _other_instance(name)]
        assert others, f"sysctls changed with no other prism-kernel table around: {before['sysctls']} -> {after['sysctls']}"


# --------------------------------------------------------------------------
# units (no root needed)


@pytest.mark.parametrize("family,host_addr,shown", [
    (socket.AF_INET, "127.0.0.1", "127.0.0.1"), (socket.AF_INET, "0.0.0.0", "0.0.0.0"),
    (socket.AF_INET6, "::1", "[::1]"),
])
def test_port_check_finds_a_real_listener_and_its_process(family, host_addr, shown):
    """What a connect to 127.0.0.1:PORT or [::1]:PORT would reach, read from
    /proc as any user: this process's own listener, named with its pid."""
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host_addr, 0))
        s.listen()
        port = s.getsockname()[1]
        c = ports.check_port(port, INSTANCE)
    assert c.verdict == "fail" and f"port {port} is taken" in c.summary
    assert [(l["address"], l["process"]) for l in c.details["listeners"]] == [
        (f"{shown}:{port}", f"{Path('/proc/self/comm').read_text().strip()} (pid {os.getpid()})")]
    alt = c.details["suggested_port"]
    assert alt and alt != port and alt not in ports.AVOID_PORTS and ports.listeners(alt) == []
    assert f"--port {alt}" in c.action


def test_capabilities_verdicts():
    bit = lambda *caps: sum(1 << c for c in caps)  # noqa: E731
    full = host.check_capabilities(bit(host.CAP_SYS_ADMIN, host.CAP_NET_ADMIN))
    assert full.verdict == "ok" and full.needed_by == ()

    no_perfmon = host.check_capabilities(bit(host.CAP_BPF, host.CAP_NET_ADMIN))
    assert no_perfmon.verdict == "warn" and no_perfmon.needed_by == ("ebpf",)
    assert "CAP_PERFMON" in no_perfmon.summary

    no_sys_admin = host.check_capabilities(bit(host.CAP_BPF, host.CAP_NET_ADMIN, host.CAP_PERFMON))
    assert no_sys_admin.verdict == "warn" and no_sys_admin.needed_by == ()
    assert "adopt" in no_sys_admin.summary

    none = host.check_capabilities(0)
    assert set(none.needed_by) == {"ebpf", "nftables"}
    assert "CAP_NET_ADMIN" in none.details["missing"]


def test_settle_fails_only_when_nothing_can_run():
    def checks():
        return [check.Check("headers", "warn", "x", "y", needed_by=("ebpf",)),
                check.Check("bpffs", "warn", "x", "y"),
                check.Check("kernel", "ok", "x")]
    some = checks()
    doctor.settle(some, {"nftables"})
    assert [c.verdict for c in some] == ["warn", "warn", "ok"]
    none = checks()
    doctor.settle(none, set())
    assert [c.verdict for c in none] == ["fail", "warn", "ok"]


def test_one_line_keeps_the_verifier_verdict():
    log = ("Failed to load BPF program b'connect6': Permission denied\n"
           "63: (63) *(u32 *)(r10 -4) = r1\n; act = lookup() @ main.c:266\n"
           "R1 tried to add from different maps, paths or scalars, pointer arithmetic with it prohibited for !root\n"
           "processed 458 insns (limit 1000000)")
    one = check.one_line(log)
    assert "\n" not in one
    assert one.startswith("Failed to load BPF program b'connect6'")
    assert one.endswith("prohibited for !root")


def test_kernel_version_parse():
    assert host.kernel_version("6.18.44-fc-v669") == (6, 18, 44)
    assert host.kernel_version("5.4.0-150-generic") == (5, 4, 0)
    assert host.kernel_version("6.1") == (6, 1, 0)


def test_bad_arguments_exit_2(capsys):
    assert doctor.run_doctor(0, INSTANCE) == 2
    assert doctor.run_doctor(70000, INSTANCE) == 2
    assert doctor.run_doctor(PORT, INSTANCE, output="yaml") == 2


def test_render_text_colours_only_when_asked():
    import io

    report = {"instance": INSTANCE, "port": PORT, "can_run": True, "datapath": "ebpf",
              "checks": [{"id": "kernel", "verdict": "ok", "summary": "fine", "action": ""},
                         {"id": "bpffs", "verdict": "warn", "summary": "missing", "action": "mount it"}]}
    plain, coloured = io.StringIO(), io.StringIO()
    doctor.render_text(report, plain, colour=False)
    doctor.render_text(report, coloured, colour=True)
    assert "\033[" not in plain.getvalue()
    assert "\033[33mwarn\033[0m" in coloured.getvalue()
    assert "warn  bpffs   missing. Do: mount it" in plain.getvalue()


def test_settle_keeps_a_check_that_blocks_run_failed():
    """A listener on the port fails doctor even when every data path can run:
    `run` refuses over it (issue 12)."""
    cs = [check.Check("port", "fail", "taken", "move", blocks_run=True), check.Check("bpffs", "warn", "x", "y")]
    doctor.settle(cs, {"ebpf", "nftables"})
    assert [c.verdict for c in cs] == ["fail", "warn"]
