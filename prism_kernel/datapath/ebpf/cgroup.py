"""Finding the real cgroup v2 root to attach cgroup BPF programs to.

A cgroup BPF program attached at a cgroup applies to that cgroup and
everything below it. prism-kernel must steer every process on the node, so it
attaches at the root of the cgroup v2 hierarchy, and refuses (DatapathError)
whenever what it sees might not be that root (cilium#48420: attaching below
the root silently leaves part of the node unsteered):

1. The cgroup2 mount is found in /proc/self/mountinfo (fstype `cgroup2`),
   never by a fixed path: /sys/fs/cgroup on a pure v2 host,
   /sys/fs/cgroup/unified on a hybrid one. A mount whose mountinfo root
   field is not "/" shows a subtree (a bind mount of a sub-cgroup, or a mount
   seen from another cgroup namespace): skipped.
2. The process must be in the initial cgroup namespace. The initial
   namespaces have fixed inode numbers (include/linux/proc_ns.h:
   PROC_CGROUP_INIT_INO = 0xEFFFFFFB), so comparing the inode of
   /proc/self/ns/cgroup with that constant works where comparing with
   /proc/1/ns/cgroup does not (inside a container PID 1 shares the
   container's namespace). In a non-initial cgroup namespace "/" in
   /proc/self/cgroup and in mountinfo means the namespace's root, which is a
   cgroup below the real root.
3. The directory chosen must be the root cgroup itself: its cgroup id (the
   kernfs node id, read with name_to_handle_at(2)) is 1 for the root of the
   v2 hierarchy. This catches whatever 1. and 2. miss.

At that root, a program another tool attached to one of our hooks without
BPF_F_ALLOW_MULTI (exclusive, or BPF_F_ALLOW_OVERRIDE: older Cilium,
Calico's legacy attach) makes the kernel refuse ours (BPF_LINK_CREATE:
EPERM): `exclusive_attachments()` finds such programs with BPF_PROG_QUERY,
and `check_exclusive_attachments()` makes the eBPF data path unavailable,
naming the hook and the program.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import struct
from dataclasses import dataclass

from prism_kernel.datapath.ebpf import bpfsys as _bpfsys
from prism_kernel.errors import DatapathError, DatapathUnavailable

PROC_CGROUP_INIT_INO = 0xEFFFFFFB
ROOT_CGROUP_ID = 1

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


@dataclass(frozen=True)
class CgroupMount:
    mount_point: str
    root: str  # the mountinfo root field: "/" for the whole hierarchy


def _unescape(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and i + 3 < len(field) and field[i + 1:i + 4].isdigit():
            out.append(chr(int(field[i + 1:i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def cgroup2_mounts(mountinfo: str = "/proc/self/mountinfo") -> list[CgroupMount]:
    mounts = []
    try:
        with open(mountinfo) as f:
            lines = f.read().splitlines()
    except OSError:
        return []
    for line in lines:
        left, sep, right = line.partition(" - ")
        if not sep:
            continue
        fstype = right.split(" ", 1)[0]
        if fstype != "cgroup2":
            continue
        fields = left.split(" ")
        if len(fields) < 5:
            continue
        mounts.append(CgroupMount(mount_point=_unescape(fields[4]), root=_unescape(fields[3])))
    return mounts


def in_initial_cgroup_namespace() -> bool:
    try:
        return os.stat("/proc/self/ns/cgroup").st_ino == PROC_CGROUP_INIT_INO
    except FileNotFoundError:
        # Kernel without cgroup namespaces: there is only the initial one.
        return True


def cgroup_id(path: str) -> int:
    """The cgroup id of a cgroup v2 directory (its kernfs node id)."""
    buf = ctypes.create_string_buffer(8 + 64)
    struct.pack_into("=Ii", buf, 0, 64, 0)
    mount_id = ctypes.c_int()
    r = _libc.name_to_handle_at(-100, os.fsencode(path), buf, ctypes.byref(mount_id), 0)
    if r != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"name_to_handle_at({path}): {os.strerror(err)}")
    size = struct.unpack_from("=I", buf, 0)[0]
    if size < 8:
        raise OSError(0, f"unexpected file handle size {size} for {path}")
    return struct.unpack_from("=Q", buf, 8)[0]


def find_cgroup2_root() -> str:
    """The mount point of the real cgroup v2 root, or DatapathError saying why not."""
    if not in_initial_cgroup_namespace():
        raise DatapathError(
            "this process runs in a non-initial cgroup namespace "
            f"(/proc/self/ns/cgroup inode {os.stat('/proc/self/ns/cgroup').st_ino:#x}, "
            f"initial is {PROC_CGROUP_INIT_INO:#x}): its cgroup root is a cgroup below the "
            "node's root, and a program attached there would miss the rest of the node. "
            "Run prism-kernel in the host cgroup namespace (e.g. hostCgroup / cgroupns=host)")
    mounts = cgroup2_mounts()
    if not mounts:
        raise DatapathError("no cgroup2 file system is mounted (/proc/self/mountinfo has no "
                            "cgroup2 entry); mount one, e.g. mount -t cgroup2 none /sys/fs/cgroup")
    whole = [m for m in mounts if m.root == "/"]
    if not whole:
        raise DatapathError(
            "every cgroup2 mount shows a subtree (mountinfo root "
            + ", ".join(f"{m.root!r} at {m.mount_point}" for m in mounts)
            + "): attaching there would be below the real cgroup root")
    errors = []
    for m in whole:
        try:
            cid = cgroup_id(m.mount_point)
        except OSError as e:
            errors.append(f"{m.mount_point}: {e}")
            continue
        if cid == ROOT_CGROUP_ID:
            return m.mount_point
        errors.append(f"{m.mount_point} is cgroup id {cid}, not the root ({ROOT_CGROUP_ID})")
    raise DatapathError("no cgroup2 mount is the root cgroup: " + "; ".join(errors))


# --- programs already attached at the root ------------------------------------

# The hooks of the eBPF data path (bpftool's names), where another program
# attached at the root without BPF_F_ALLOW_MULTI makes the kernel refuse ours.
EBPF_HOOKS: tuple[tuple[str, int], ...] = (
    ("connect4", _bpfsys.BPF_CGROUP_INET4_CONNECT),
    ("connect6", _bpfsys.BPF_CGROUP_INET6_CONNECT),
    ("getpeername4", _bpfsys.BPF_CGROUP_INET4_GETPEERNAME),
    ("getpeername6", _bpfsys.BPF_CGROUP_INET6_GETPEERNAME),
    ("sock_ops", _bpfsys.BPF_CGROUP_SOCK_OPS),
)


@dataclass(frozen=True)
class ExclusiveAttachment:
    """A program attached at a cgroup without BPF_F_ALLOW_MULTI."""

    hook: str
    prog_id: int
    prog_name: str  # "" when the kernel would not say (no CAP_SYS_ADMIN, or gone since)
    attach_flags: int  # 0 or BPF_F_ALLOW_OVERRIDE

    def describe(self) -> str:
        name = f" {self.prog_name!r}" if self.prog_name else ""
        flags = "BPF_F_ALLOW_OVERRIDE" if self.attach_flags & _bpfsys.BPF_F_ALLOW_OVERRIDE else "flags 0"
        return (f"{self.hook} is held exclusively by program id {self.prog_id}{name} "
                f"(attached with {flags}, not BPF_F_ALLOW_MULTI)")


def _prog_name(prog_id: int) -> str:
    try:
        fd = _bpfsys.prog_fd_by_id(prog_id)
    except OSError:
        return ""
    try:
        return _bpfsys.prog_info(fd).name
    except OSError:
        return ""
    finally:
        os.close(fd)


def exclusive_attachments(root: str | None = None) -> list[ExclusiveAttachment]:
    """Programs attached at the cgroup v2 root (`root`, found when None) on
    one of the eBPF data path's hooks without BPF_F_ALLOW_MULTI (older
    Cilium, Calico's legacy attach, `bpftool cgroup attach` without `multi`).
    The kernel then refuses every other program on that hook at that cgroup:
    BPF_LINK_CREATE fails with EPERM. Read-only (BPF_PROG_QUERY, needs
    CAP_NET_ADMIN); a hook this kernel does not know is skipped. OSError
    when the root cannot be queried."""
    root = root or find_cgroup2_root()
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    found: list[ExclusiveAttachment] = []
    try:
        for hook, attach_type in EBPF_HOOKS:
            try:
                flags, ids = _bpfsys.prog_query_flags(fd, attach_type)
            except OSError as e:
                if e.errno == errno.EINVAL:  # an attach type older than this kernel
                    continue
                raise
            if not ids or flags & _bpfsys.BPF_F_ALLOW_MULTI:
                continue
            found += [ExclusiveAttachment(hook, pid, _prog_name(pid), flags) for pid in ids]
    finally:
        os.close(fd)
    return found


def check_exclusive_attachments(root: str | None = None, datapath: str = "ebpf") -> None:
    """Raise DatapathUnavailable naming every hook of ours that another
    program holds exclusively at the cgroup v2 root (see
    exclusive_attachments), or that cannot be queried."""
    try:
        root = root or find_cgroup2_root()
        found = exclusive_attachments(root)
    except DatapathError as e:
        raise DatapathUnavailable(datapath, str(e)) from None
    except OSError as e:
        raise DatapathUnavailable(datapath, f"cannot query the programs attached at the cgroup v2 "
                                            f"root: {e}") from None
    if not found:
        return
    first = found[0]
    raise DatapathUnavailable(datapath, (
        "; ".join(a.describe() for a in found)
        + f" at the cgroup v2 root {root}: the kernel refuses any other program on that hook there "
        f"(BPF_LINK_CREATE: EPERM). Detach it (bpftool cgroup detach {root} {first.hook} id "
        f"{first.prog_id}) or have its owner (an older Cilium or Calico) attach it with BPF_F_ALLOW_MULTI"))
