"""Checks of what the eBPF data path needs beyond capabilities: the kernel
features it uses (probed), the real cgroup v2 root, no exclusive program on
its hooks there, bpffs, and which loader would load the programs. Nothing
is attached or pinned: the feature probes load tiny programs that are freed
when their fd closes."""

from __future__ import annotations

import os
from dataclasses import asdict
from typing import Any

from prism_kernel.observe.doctor.check import OK, WARN, Check


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

