"""`prism-kernel doctor`: can prism-kernel run on this node, and if not, why.

One line per check, each with a verdict and what to do:

  ok    nothing to do
  warn  prism-kernel runs, but something is degraded or needs attention
        (e.g. eBPF is missing, so `auto` falls back to nftables; or a listener
        already holds the port)
  fail  one of the reasons no data path can run here

The checks (ids in `-o json`):
  kernel              release (for the record: features are probed, not inferred)
  bpf.*, sock_diag.*  each kernel feature the eBPF data path uses, probed
                      (datapath/ebpf/features.py: libbpf's probes, a link create
                      against /dev/null, sock_diag requests that match nothing)
  cgroup              the real cgroup v2 root (datapath/ebpf/cgroup.py)
  cgroup.exclusive    no program holds connect4/6, getpeername4/6 or sock_ops at
                      that root without BPF_F_ALLOW_MULTI (the kernel would
                      refuse ours: BPF_LINK_CREATE EPERM)
  bpffs               /sys/fs/bpf mounted
  ebpf.loader         which loader would load the programs (libbpf with the
                      precompiled object, or the bcc fallback) and why
  nftables.module     python3-nftables / libnftables
  capabilities        CapEff: CAP_SYS_ADMIN, CAP_NET_ADMIN, CAP_BPF, CAP_PERFMON
  port                listeners on 127.0.0.1:PORT / [::1]:PORT (Talos KubePrism)
  metrics_port        127.0.0.1:7450 (metrics.DEFAULT_METRICS_PORT) free or the daemon's
  sysctls             net.ipv4.conf.all.route_localnet, net.ipv4.tcp_timestamps
  datapath.ebpf       EbpfDatapath.check_available, then check_load (the real
                      programs loaded in a child with private maps, then freed)
  datapath.nftables   NftablesDatapath.check_available (kernel dry run)
  auto                what `--datapath auto` chooses and why (datapath.choose)

Nothing here changes kernel state: the BPF probes load tiny programs that are
freed when their fd closes (never attached, never pinned); the eBPF check
loads in a child that exits; the nftables check is a dry run
that the kernel validates and never commits (it may autoload nf_tables
modules, as any nft command does); sysctls, mounts and listeners are only read.

Exit code: 0 when the daemon can run (`auto` finds a data path), 1 when not,
2 for a bad argument.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TextIO

from prism_kernel.config import DEFAULT_PORT

try:  # the daemon's /metrics, /healthz, /readyz port
    from prism_kernel.observe.metrics import DEFAULT_METRICS_PORT
except Exception:  # pragma: no cover - doctor must work even when metrics cannot load
    DEFAULT_METRICS_PORT = 7450

OK, WARN, FAIL = "ok", "warn", "fail"
SCHEMA = 1

# Capability bits (include/uapi/linux/capability.h)
CAP_NET_ADMIN = 12
CAP_SYS_ADMIN = 21
CAP_PERFMON = 38
CAP_BPF = 39
CAPS = {"CAP_SYS_ADMIN": CAP_SYS_ADMIN, "CAP_NET_ADMIN": CAP_NET_ADMIN,
        "CAP_BPF": CAP_BPF, "CAP_PERFMON": CAP_PERFMON}

# Never suggested as an alternative port: what Talos uses on a node (KubePrism
# 7445, apid 50000, trustd 50001, API server 6443, kubelet 10250, etcd
# 2379/2380), 7446-7448 (Eclipse Zenoh, and taken by another KubePrism-like
# endpoint) and prism-kernel's own metrics port (prism_kernel/observe/metrics.py).
_AVOID_PORTS = {6443, 7445, 7446, 7447, 7448, DEFAULT_METRICS_PORT, 10250, 2379, 2380, 50000, 50001}

_COLOURS = {OK: "\033[32m", WARN: "\033[33m", FAIL: "\033[31m"}
_RESET = "\033[0m"


@dataclass
class Check:
    id: str
    verdict: str          # ok | warn | fail (final, after _settle)
    summary: str          # what was found
    action: str = ""      # what to do; empty when nothing is
    # Data paths that cannot run while this check is not ok. A check that is
    # not ok becomes `fail` only when no data path can run at all.
    needed_by: tuple[str, ...] = ()
    details: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------
# helpers


def _cap_eff() -> int:
    from prism_kernel.datapath.ebpf.bpfsys import cap_eff

    return cap_eff()


def _has(cap_eff: int, bit: int) -> bool:
    return bool(cap_eff >> bit & 1)


def kernel_version(release: str | None = None) -> tuple[int, int, int]:
    release = release or os.uname().release
    m = re.match(r"(\d+)\.(\d+)(?:\.(\d+))?", release)
    if not m:
        return (0, 0, 0)
    return int(m.group(1)), int(m.group(2)), int(m.group(3) or 0)


def _one_line(text: str, limit: int = 400) -> str:
    """A reason that may span lines (a verifier log) as one line: its first
    line and its last telling line (the verifier's verdict)."""
    lines = [l.strip() for l in str(text).splitlines() if l.strip()]
    if not lines:
        return ""
    if len(lines) > 1:
        tail = [l for l in lines[1:] if not l.startswith(("processed ", ";"))]
        lines = [lines[0], "[...]", tail[-1]] if tail else [lines[0]]
    one = " ".join(lines)
    return one if len(one) <= limit else one[:limit - 3] + "..."


def _close(fd: int | None) -> None:
    if fd is not None:
        try:
            os.close(fd)
        except OSError:
            pass


# --------------------------------------------------------------------------
# checks


def check_kernel() -> Check:
    release = os.uname().release
    return Check("kernel", OK, f"Linux {release} (the eBPF features are probed below; "
                 "docs/kernel-support.md lists them with their mainline release)",
                 details={"release": release, "version": list(kernel_version(release))})


def check_bpf_features() -> list[Check]:
    from prism_kernel.datapath.ebpf import features as bpf_features

    checks = []
    for f in bpf_features.probe_all():
        details = {"since": f.since}
        if f.ok:
            checks.append(Check(f.id, OK, f"{f.what}: supported", details=details))
        elif f.ok is None:
            # Unknown rather than missing: the capabilities check names the cause.
            checks.append(Check(f.id, WARN, f"{f.what}: {f.detail}", "run doctor as root (see capabilities)",
                                needed_by=("ebpf",), details=details))
        else:
            checks.append(Check(f.id, WARN, f"{f.what}: {f.detail} (mainline Linux {f.since})",
                                f"a kernel with it (Linux >= {f.since}, or a backport); `auto` uses "
                                "nftables meanwhile", needed_by=("ebpf",), details=details))
    return checks


def check_cgroup() -> Check:
    from prism_kernel.datapath.ebpf.cgroup import (
        PROC_CGROUP_INIT_INO,
        cgroup2_mounts,
        find_cgroup2_root,
        in_initial_cgroup_namespace,
    )
    from prism_kernel.errors import DatapathError

    details: dict[str, Any] = {
        "initial_cgroup_namespace": in_initial_cgroup_namespace(),
        "cgroup2_mounts": [{"mount_point": m.mount_point, "root": m.root} for m in cgroup2_mounts()],
    }
    try:
        root = find_cgroup2_root()
    except DatapathError as e:
        action = ("run prism-kernel in the host cgroup namespace: as a systemd service, or as a "
                  "privileged container (containerd and CRI-O give privileged containers the host "
                  "cgroup namespace); it refuses to attach below the real root (cilium#48420)")
        if not details["initial_cgroup_namespace"]:
            try:
                ino = os.stat("/proc/self/ns/cgroup").st_ino
                details["cgroup_namespace_inode"] = f"{ino:#x} (initial: {PROC_CGROUP_INIT_INO:#x})"
            except OSError:
                pass
        elif not details["cgroup2_mounts"]:
            action = "mount cgroup2 (mount -t cgroup2 none /sys/fs/cgroup) or, in a container, mount the host's /sys/fs/cgroup"
        return Check("cgroup", WARN, f"no usable cgroup v2 root: {e}", action,
                     needed_by=("ebpf",), details=details)
    details["root"] = root
    layout = "pure v2" if root == "/sys/fs/cgroup" else "hybrid layout" if root.endswith("/unified") else "custom mount"
    return Check("cgroup", OK, f"real cgroup v2 root at {root} ({layout}; cgroup id 1, initial cgroup namespace)",
                 details=details)


def _mount_of(fstype: str, path: str) -> dict[str, Any] | None:
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                left, _, right = line.partition(" - ")
                fields = left.split(" ")
                if len(fields) >= 5 and right.split(" ", 1)[0] == fstype and fields[4] == path:
                    return {"mount_point": path, "propagation": [o for o in fields[6:] if ":" in o] or ["private"]}
    except OSError:
        pass
    return None


def check_exclusive() -> Check:
    """Programs holding one of the eBPF data path's hooks at the cgroup v2
    root without BPF_F_ALLOW_MULTI: the kernel then refuses ours."""
    from prism_kernel.datapath.ebpf.cgroup import EBPF_HOOKS, exclusive_attachments, find_cgroup2_root
    from prism_kernel.errors import DatapathError

    hooks = ", ".join(h for h, _ in EBPF_HOOKS)
    try:
        root = find_cgroup2_root()
        found = exclusive_attachments(root)
    except (DatapathError, OSError) as e:
        return Check("cgroup.exclusive", WARN, f"cannot list the programs attached at the cgroup v2 root: {e}",
                     "see cgroup and capabilities", needed_by=("ebpf",))
    if not found:
        return Check("cgroup.exclusive", OK, f"no program holds {hooks} at the cgroup v2 root exclusively")
    return Check("cgroup.exclusive", WARN,
                 "; ".join(a.describe() for a in found) + " at the cgroup v2 root: the kernel refuses the "
                 "eBPF data path's programs there (BPF_LINK_CREATE: EPERM)",
                 "have its owner (an older Cilium or Calico) attach it with BPF_F_ALLOW_MULTI, or detach it "
                 f"(bpftool cgroup detach {root} {found[0].hook} id {found[0].prog_id}); `auto` uses nftables "
                 "meanwhile", needed_by=("ebpf",),
                 details={"attachments": [asdict(a) for a in found]})


def check_bpffs() -> Check:
    from prism_kernel.datapath.ebpf.datapath import BPFFS

    m = _mount_of("bpf", BPFFS)
    if m:
        return Check("bpffs", OK, f"bpffs mounted at {BPFFS} (propagation {' '.join(m['propagation'])})",
                     details=m)
    return Check("bpffs", WARN, f"no bpffs at {BPFFS}: the daemon mounts one when it starts (needs CAP_SYS_ADMIN)",
                 f"mount -t bpf bpf {BPFFS} (systemd does at boot). In a container, mount the host's "
                 f"{BPFFS} (hostPath, mountPropagation Bidirectional): a bpffs of the container's own dies "
                 "with it and takes the pinned links, and the steering, with it",
                 details={"mount_point": BPFFS})


def check_loader(loader: str = "auto") -> Check:
    from prism_kernel.datapath.ebpf.datapath import bcc_missing, default_object, loader_plan
    from prism_kernel.errors import DatapathUnavailable

    details: dict[str, Any] = {"requested": loader, "object": str(default_object()),
                               "bcc": bcc_missing() or "usable"}
    try:
        plan = loader_plan(loader)
    except DatapathUnavailable as e:
        return Check("ebpf.loader", WARN, f"no eBPF loader can run here: {e.reason}",
                     "install the package with its precompiled object (packaging/dev.sh setup builds "
                     "bpf/prism_sock.bpf.o) and Debian's libbpf1; or, for the bcc fallback, "
                     "python3-bpfcc and kernel headers", needed_by=("ebpf",), details=details)
    details["plan"] = [{"loader": n, "why": w} for n, w in plan]
    first, why = plan[0]
    rest = "; then " + ", ".join(f"{n} ({w})" for n, w in plan[1:]) if plan[1:] else ""
    return Check("ebpf.loader", OK, f"{first}: {why}{rest}", details=details)


def check_nftables_module() -> Check:
    try:
        import nftables  # noqa: F401  (Debian python3-nftables)
    except ImportError as e:
        return Check("nftables.module", WARN, f"Python module 'nftables' not importable ({e})",
                     "apt-get install nftables python3-nftables and use a venv made with "
                     "--system-site-packages", needed_by=("nftables",))
    try:
        nft = nftables.Nftables()
        nft.set_json_output(True)
        rc, out, err = nft.json_cmd({"nftables": [{"list": {"tables": {"family": "ip"}}}]})
    except Exception as e:  # OSError: libnftables.so.1 missing
        return Check("nftables.module", WARN, f"libnftables not usable: {e}",
                     "apt-get install nftables", needed_by=("nftables",))
    version = None
    if rc == 0 and isinstance(out, dict):
        for o in out.get("nftables", []):
            if "metainfo" in o:
                version = o["metainfo"].get("version")
    if rc != 0:
        err = _one_line(err or "")
        action = ("run as root (CAP_NET_ADMIN)" if "not permitted" in err
                  else "needs nf_tables in the kernel (CONFIG_NF_TABLES)")
        return Check("nftables.module", WARN, f"libnftables loads, but listing tables fails: {err}",
                     action, needed_by=("nftables",))
    return Check("nftables.module", OK, f"python3-nftables and libnftables {version or '?'} work",
                 details={"module": nftables.__file__, "libnftables": version})


def check_capabilities(cap_eff: int | None = None) -> Check:
    cap = _cap_eff() if cap_eff is None else cap_eff
    have = {name: _has(cap, bit) for name, bit in CAPS.items()}
    present = [n for n, v in have.items() if v]
    shown = ", ".join(present) or "none of them"
    details = {"cap_eff": f"{cap:016x}", "euid": os.geteuid(), **have}
    sys_admin, net_admin = have["CAP_SYS_ADMIN"], have["CAP_NET_ADMIN"]
    bpf = have["CAP_BPF"] or sys_admin
    perfmon = have["CAP_PERFMON"] or sys_admin
    if sys_admin and net_admin:
        return Check("capabilities", OK, f"effective: {shown} (CAP_SYS_ADMIN covers CAP_BPF and CAP_PERFMON)",
                     details=details)
    missing: list[str] = []
    blocked: list[str] = []
    problems: list[str] = []
    if not net_admin:
        missing.append("CAP_NET_ADMIN")
        blocked.append("nftables")
        problems.append("nftables, route_localnet and aborting connections (sock_diag destroy) need CAP_NET_ADMIN")
    if not (bpf and (net_admin or sys_admin)):
        blocked.append("ebpf")
        problems.append("loading cgroup sock_addr programs needs CAP_BPF (or CAP_SYS_ADMIN) and CAP_NET_ADMIN")
    elif not perfmon:
        blocked.append("ebpf")
        problems.append("without CAP_PERFMON (or CAP_SYS_ADMIN) the verifier rejects the connect6 program "
                        "(\"pointer arithmetic ... prohibited for !root\")")
    if not sys_admin:
        missing.append("CAP_SYS_ADMIN")
        if "ebpf" not in blocked:
            problems.append("without CAP_SYS_ADMIN a fresh install works but a restarted daemon cannot adopt "
                            "the pinned data path (opening pinned maps and BPF_*_GET_FD_BY_ID need it), nor "
                            "mount bpffs")
    for name in ("CAP_BPF", "CAP_PERFMON"):
        if not have[name] and not sys_admin:
            missing.append(name)
    verdict = WARN
    return Check("capabilities", verdict, f"effective: {shown}; " + "; ".join(problems),
                 "run as root, or grant CAP_SYS_ADMIN CAP_NET_ADMIN CAP_BPF CAP_PERFMON "
                 "(packaging/prism-kernel.service, or privileged: true in a pod)",
                 needed_by=tuple(dict.fromkeys(blocked)), details={**details, "missing": missing})


def _listeners(port: int) -> list[dict[str, Any]]:
    """Sockets listening on PORT that a connect to 127.0.0.1:PORT or [::1]:PORT
    would reach (loopback or wildcard), from /proc/net/tcp{,6}: read-only."""
    out = []
    for path, fam in (("/proc/net/tcp", 4), ("/proc/net/tcp6", 6)):
        try:
            lines = Path(path).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            f = line.split()
            if len(f) < 10 or f[3] != "0A":  # TCP_LISTEN
                continue
            addr_hex, port_hex = f[1].split(":")
            if int(port_hex, 16) != port:
                continue
            raw = bytes.fromhex(addr_hex)
            if fam == 4:
                addr = socket.inet_ntop(socket.AF_INET, raw[::-1])
                relevant = addr == "0.0.0.0" or addr.startswith("127.")
            else:
                raw = b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4))
                addr = socket.inet_ntop(socket.AF_INET6, raw)
                relevant = addr in ("::", "::1") or addr.startswith("::ffff:127.")
            if relevant:
                out.append({"address": f"[{addr}]:{port}" if fam == 6 else f"{addr}:{port}",
                            "inode": int(f[9])})
    if out:
        owners = _socket_owners({l["inode"] for l in out})
        for l in out:
            l["process"] = owners.get(l["inode"])
    return out


def _socket_owners(inodes: set[int]) -> dict[int, str]:
    """inode -> "comm (pid N)", by scanning /proc/*/fd (best effort, needs root)."""
    found: dict[int, str] = {}
    want = {f"socket:[{i}]": i for i in inodes}
    try:
        pids = [p for p in os.listdir("/proc") if p.isdigit()]
    except OSError:
        return found
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target in want:
                try:
                    comm = Path(f"/proc/{pid}/comm").read_text().strip()
                except OSError:
                    comm = "?"
                found[want[target]] = f"{comm} (pid {pid})"
        if len(found) == len(want):
            break
    return found


def _free_port_near(port: int) -> int | None:
    for p in range(max(port + 1, 1024), min(port + 64, 65535)):
        if p not in _AVOID_PORTS and not _listeners(p):
            return p
    return None


def check_port(port: int, instance: str) -> Check:
    from prism_kernel.control.runstate import daemon_pid

    pid = daemon_pid(Path(f"/run/{instance}"))
    details: dict[str, Any] = {"port": port, "instance_daemon_pid": pid if pid and pid > 0 else None,
                               "instance_daemon_running": pid is not None}
    listeners = _listeners(port)
    details["listeners"] = listeners
    if not listeners:
        running = f"; a prism-kernel daemon runs for instance {instance!r}" if pid else ""
        return Check("port", OK, f"nothing listens on 127.0.0.1:{port} or [::1]:{port}{running}", details=details)
    who = ", ".join(f"{l['address']}" + (f" ({l['process']})" if l.get("process") else "") for l in listeners)
    alt = _free_port_near(port)
    details["suggested_port"] = alt
    alt_text = f"--port {alt} (free here)" if alt else "another free port"
    if port == DEFAULT_PORT:
        kubeprism = ("; on Talos this is KubePrism, a userspace proxy on 7445 (enabled by default "
                     "since Talos 1.6)")
        instead = ("instead of it: disable it (Talos < 1.14: machine.features.kubePrism.enabled: false; "
                   "Talos >= 1.14: remove the KubePrismConfig document) and keep prism-kernel on 7445, "
                   "so the clients configured for 7445 keep their configuration (docs/integration.md)")
    else:
        kubeprism = ""
        instead = "instead of it: stop that listener first"
    return Check(
        "port", WARN,
        f"port {port} is taken: {who}{kubeprism}. prism-kernel would still steer every connect to "
        f"127.0.0.1:{port} from the host network namespace (the kernel rewrites it before it reaches "
        "the listener), silently taking the port over",
        f"run beside it on {alt_text} and point the clients you choose there, or {instead}",
        details=details)


def check_metrics_port(instance: str, port: int = DEFAULT_METRICS_PORT) -> Check:
    from prism_kernel.control.runstate import daemon_pid

    listeners = _listeners(port)
    if not listeners:
        return Check("metrics_port", OK, f"127.0.0.1:{port} (/metrics, /healthz, /readyz) is free",
                     details={"port": port})
    pid = daemon_pid(Path(f"/run/{instance}"))
    owners = [l.get("process") or "" for l in listeners]
    if pid and pid > 0 and all(o.endswith(f"(pid {pid})") for o in owners):
        return Check("metrics_port", OK, f"127.0.0.1:{port} is served by the running daemon (pid {pid})",
                     details={"port": port, "listeners": listeners})
    who = ", ".join(f"{l['address']}" + (f" ({l['process']})" if l.get("process") else "") for l in listeners)
    return Check("metrics_port", WARN, f"metrics port {port} is taken: {who}; the daemon's /metrics, "
                 "/healthz and /readyz (the DaemonSet's probes) would not be reachable there",
                 "free the port, or give the daemon another metrics port (and the probes with it)",
                 details={"port": port, "listeners": listeners})


def check_sysctls() -> Check:
    from prism_kernel.datapath import sysctl

    values: dict[str, str | None] = {}
    for name in ("net.ipv4.conf.all.route_localnet", "net.ipv4.tcp_timestamps"):
        try:
            values[name] = sysctl.read(name)
        except Exception:
            values[name] = None
    rl, ts = values["net.ipv4.conf.all.route_localnet"], values["net.ipv4.tcp_timestamps"]
    parts = [f"route_localnet={rl}", f"tcp_timestamps={ts}"]
    notes = []
    if rl == "0":
        notes.append("the nftables path sets route_localnet=1 (with kube-proxy's CVE-2020-8558 guard) "
                     "and restores it on cleanup")
    elif rl == "1":
        notes.append("route_localnet is already 1: whoever set it (kube-proxy, another prism-kernel "
                     "instance) should also drop martian packets to 127.0.0.0/8 (CVE-2020-8558)")
    if ts == "1":
        notes.append("the nftables path sets tcp_timestamps=2 while installed (nftables.stable_tcp_timestamps; "
                     "see README) and restores it on cleanup")
    elif ts in ("0", "2"):
        notes.append(f"tcp_timestamps={ts} is left as it is")
    notes.append("the eBPF path changes neither")
    return Check("sysctls", OK, ", ".join(parts) + ": " + "; ".join(notes), details=values)


def check_datapath(name: str, port: int, instance: str) -> Check:
    from prism_kernel.datapath import DatapathSettings, datapath_class
    from prism_kernel.errors import DatapathUnavailable, PrismError

    settings = DatapathSettings(listen_port=port, instance=instance)
    cid = f"datapath.{name}"
    loaded: dict[str, Any] = {}
    try:
        cls = datapath_class(name)
        cls.check_available(settings)
        if name == "ebpf":
            loaded = cls.check_load(settings)
    except DatapathUnavailable as e:
        return Check(cid, WARN, f"{name} data path unavailable: {_one_line(e.reason)}",
                     "see the checks above", needed_by=(name,), details={"reason": e.reason})
    except (PrismError, OSError) as e:
        return Check(cid, WARN, f"{name} data path check failed: {_one_line(str(e))}", needed_by=(name,),
                     details={"reason": str(e)})
    what = {"ebpf": f"loaded the programs with {loaded.get('loader')} in a child, nothing attached "
                    f"or pinned ({loaded.get('why')}; {loaded.get('load_s')} s, peak RSS "
                    f"{loaded.get('maxrss_kb', 0) // 1024} MB)",
            "nftables": "the kernel accepted the ruleset in a dry run (nothing committed)"}[name]
    details = {k: v for k, v in loaded.items() if k in ("loader", "why", "load_s", "maxrss_kb", "failed_before")}
    return Check(cid, OK, f"{name} data path available: {what}", details=details)


def check_auto(port: int, instance: str) -> Check:
    from prism_kernel.datapath import DatapathSettings, choose
    from prism_kernel.errors import DatapathUnavailable, PrismError

    settings = DatapathSettings(listen_port=port, instance=instance)
    try:
        cls, why = choose("auto", settings)
    except DatapathUnavailable as e:
        return Check("auto", FAIL, f"no data path can run here: {_one_line(e.reason)}",
                     "fix the checks marked fail above, then run doctor again",
                     details={"datapath": None, "reason": e.reason})
    except (PrismError, OSError) as e:
        return Check("auto", FAIL, f"no data path can run here: {_one_line(str(e))}", "fix the checks above",
                     details={"datapath": None, "reason": str(e)})
    if cls.name == "ebpf":
        return Check("auto", OK, f"--datapath auto would use ebpf ({why}): connect() rewritten at the "
                     "cgroup root, no NAT, no conntrack", details={"datapath": "ebpf", "reason": why})
    return Check("auto", WARN, f"--datapath auto would use {cls.name} ({_one_line(why)})",
                 "nftables works (DNAT + route_localnet, ~0.9x of direct); fix the eBPF checks above "
                 "for the faster, NAT-free path", details={"datapath": cls.name, "reason": why})


# --------------------------------------------------------------------------
# running


def gather(port: int, instance: str) -> dict[str, Any]:
    checks: list[Check] = [check_kernel()]
    checks += check_bpf_features()
    checks += [check_cgroup(), check_exclusive(), check_bpffs(), check_loader(), check_nftables_module(),
               check_capabilities(), check_port(port, instance), check_metrics_port(instance), check_sysctls(),
               check_datapath("ebpf", port, instance), check_datapath("nftables", port, instance)]
    auto = check_auto(port, instance)
    checks.append(auto)
    available = {c.id.split(".", 1)[1] for c in checks if c.id.startswith("datapath.") and c.verdict == OK}
    _settle(checks, available)
    can_run = auto.details.get("datapath") is not None
    return {
        "schema": SCHEMA,
        "instance": instance,
        "port": port,
        "can_run": can_run,
        "datapath": auto.details.get("datapath"),
        "reason": auto.details.get("reason"),
        "checks": [asdict(c) for c in checks],
    }


def _settle(checks: list[Check], available: set[str]) -> None:
    """A check that is not ok is `fail` only when it blocks a data path and no
    data path can run at all; otherwise `warn` (prism-kernel runs regardless)."""
    for c in checks:
        if c.verdict == OK or c.id == "auto":
            continue
        c.verdict = FAIL if c.needed_by and not available else WARN


def render_text(report: dict[str, Any], out: TextIO, colour: bool) -> None:
    out.write(f"prism-kernel doctor: instance {report['instance']!r}, port {report['port']}\n")
    width = max(len(c["id"]) for c in report["checks"])
    for c in report["checks"]:
        verdict = c["verdict"]
        tag = f"{verdict:<4}"
        if colour:
            tag = f"{_COLOURS[verdict]}{tag}{_RESET}"
        line = f"{tag}  {c['id']:<{width}}  {c['summary']}"
        if c["action"] and verdict != OK:
            line += f". Do: {c['action']}"
        out.write(line + "\n")
    if report["can_run"]:
        out.write(f"result: prism-kernel can run here; --datapath auto would use {report['datapath']}\n")
    else:
        out.write("result: prism-kernel cannot run here (no data path available)\n")


def run_doctor(port: int, instance: str, output: str = "text") -> int:
    """Entry point of `prism-kernel doctor`. Returns the exit code: 0 the
    daemon can run here, 1 it cannot, 2 bad argument."""
    if not isinstance(port, int) or not 1 <= port <= 65535:
        print(f"prism-kernel doctor: --port must be 1..65535, not {port!r}", file=sys.stderr)
        return 2
    if output not in ("text", "json"):
        print(f"prism-kernel doctor: -o must be text or json, not {output!r}", file=sys.stderr)
        return 2
    report = gather(port, instance)
    if output == "json":
        json.dump(report, sys.stdout, indent=1)
        sys.stdout.write("\n")
    else:
        colour = sys.stdout.isatty() and "NO_COLOR" not in os.environ
        render_text(report, sys.stdout, colour)
    sys.stdout.flush()
    return 0 if report["can_run"] else 1


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of `prism-kernel doctor` (shared with `python -m prism_kernel.observe.doctor`)."""
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, metavar="PORT",
                        help=f"local port the daemon would use (default {DEFAULT_PORT})")
    parser.add_argument("--instance", default="prism-kernel", metavar="NAME",
                        help="instance name (default prism-kernel)")
    parser.add_argument("-o", "--output", choices=["text", "json"], default="text")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="prism-kernel doctor",
                                description="Check whether prism-kernel can run on this node, and why not.")
    add_arguments(p)
    args = p.parse_args(argv)
    return run_doctor(args.port, args.instance, args.output)


if __name__ == "__main__":
    sys.exit(main())
