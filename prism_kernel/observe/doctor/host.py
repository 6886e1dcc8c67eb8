"""Checks of what the host provides: the kernel release, capabilities, the
sysctls the nftables path changes, and libnftables. Read only."""

from __future__ import annotations

import os
import re

from prism_kernel.observe.doctor.check import OK, WARN, Check, one_line

# Capability bits (include/uapi/linux/capability.h)
CAP_NET_ADMIN = 12
CAP_SYS_ADMIN = 21
CAP_PERFMON = 38
CAP_BPF = 39
CAPS = {"CAP_SYS_ADMIN": CAP_SYS_ADMIN, "CAP_NET_ADMIN": CAP_NET_ADMIN,
        "CAP_BPF": CAP_BPF, "CAP_PERFMON": CAP_PERFMON}


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


def check_kernel() -> Check:
    release = os.uname().release
    return Check("kernel", OK, f"Linux {release} (the eBPF features are probed below; "
                 "docs/kernel-support.md lists them with their mainline release)",
                 details={"release": release, "version": list(kernel_version(release))})


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
        err = one_line(err or "")
        action = ("run as root (CAP_NET_ADMIN)" if "not permitted" in err
                  else "needs nf_tables in the kernel (CONFIG_NF_TABLES)")
        return Check("nftables.module", WARN, f"libnftables loads, but listing tables fails: {err}",
                     action, needed_by=("nftables",))
    return Check("nftables.module", OK, f"python3-nftables and libnftables {version or '?'} work",
                 details={"module": nftables.__file__, "libnftables": version})

