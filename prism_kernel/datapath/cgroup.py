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
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import struct
from dataclasses import dataclass

from prism_kernel.errors import DatapathError

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
