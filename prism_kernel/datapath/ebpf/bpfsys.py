"""A minimal bpf(2) binding through ctypes: what the long-lived daemon needs to
drive pinned maps and links without importing bcc (bcc's compiler would cost
the daemon ~130 MB of RSS).

Only the commands prism-kernel uses: map create/lookup/update/delete/next-key,
batch lookup, obj pin/get, get-fd-by-id, info-by-fd, prog query, link create/update/detach.
Every failure raises OSError with the kernel's errno and the command's name.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno as _errno
import os
import platform
import struct
from dataclasses import dataclass

# enum bpf_cmd
BPF_MAP_CREATE = 0
BPF_MAP_LOOKUP_ELEM = 1
BPF_MAP_UPDATE_ELEM = 2
BPF_MAP_DELETE_ELEM = 3
BPF_MAP_GET_NEXT_KEY = 4
BPF_OBJ_PIN = 6
BPF_OBJ_GET = 7
BPF_PROG_GET_FD_BY_ID = 13
BPF_MAP_GET_FD_BY_ID = 14
BPF_OBJ_GET_INFO_BY_FD = 15
BPF_PROG_QUERY = 16
BPF_LINK_CREATE = 28
BPF_LINK_UPDATE = 29
BPF_LINK_GET_FD_BY_ID = 30
BPF_MAP_LOOKUP_BATCH = 24
BPF_LINK_DETACH = 34

# enum bpf_map_type (the ones used here)
BPF_MAP_TYPE_ARRAY = 2
BPF_MAP_TYPE_SK_STORAGE = 24

# enum bpf_attach_type
BPF_CGROUP_SOCK_OPS = 3
BPF_CGROUP_INET4_CONNECT = 10
BPF_CGROUP_INET6_CONNECT = 11
BPF_CGROUP_INET4_GETPEERNAME = 29
BPF_CGROUP_INET6_GETPEERNAME = 30

BPF_PROG_TYPE_CGROUP_SOCK_ADDR = 18

# map update flags
BPF_ANY = 0
BPF_NOEXIST = 1
BPF_EXIST = 2

BPF_F_REPLACE = 1 << 2  # link_update: fail unless old_prog_fd is attached
BPF_F_RDONLY = 1 << 3  # obj_get file flags

_SYS_BPF = {"x86_64": 321, "aarch64": 280, "armv7l": 386, "ppc64le": 361, "s390x": 351,
            "riscv64": 280}

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.syscall.restype = ctypes.c_long


def _nr() -> int:
    machine = platform.machine()
    try:
        return _SYS_BPF[machine]
    except KeyError:
        raise OSError(_errno.ENOSYS, f"bpf(2) syscall number unknown for {machine}") from None


_NR_BPF: int | None = None

_CMD_NAMES = {
    BPF_MAP_CREATE: "MAP_CREATE", BPF_MAP_LOOKUP_ELEM: "MAP_LOOKUP_ELEM",
    BPF_MAP_UPDATE_ELEM: "MAP_UPDATE_ELEM", BPF_MAP_DELETE_ELEM: "MAP_DELETE_ELEM",
    BPF_MAP_GET_NEXT_KEY: "MAP_GET_NEXT_KEY", BPF_OBJ_PIN: "OBJ_PIN", BPF_OBJ_GET: "OBJ_GET",
    BPF_PROG_GET_FD_BY_ID: "PROG_GET_FD_BY_ID", BPF_MAP_GET_FD_BY_ID: "MAP_GET_FD_BY_ID",
    BPF_OBJ_GET_INFO_BY_FD: "OBJ_GET_INFO_BY_FD", BPF_PROG_QUERY: "PROG_QUERY",
    BPF_LINK_CREATE: "LINK_CREATE", BPF_LINK_UPDATE: "LINK_UPDATE",
    BPF_LINK_GET_FD_BY_ID: "LINK_GET_FD_BY_ID", BPF_LINK_DETACH: "LINK_DETACH",
    BPF_MAP_LOOKUP_BATCH: "MAP_LOOKUP_BATCH",
}


def _bpf(cmd: int, attr: ctypes.Array) -> int:
    global _NR_BPF
    if _NR_BPF is None:
        _NR_BPF = _nr()
    ret = _libc.syscall(ctypes.c_long(_NR_BPF), ctypes.c_int(cmd), attr, ctypes.c_uint(len(attr)))
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"bpf({_CMD_NAMES.get(cmd, cmd)}): {os.strerror(err)}")
    return int(ret)


def _attr(size: int = 128) -> ctypes.Array:
    return ctypes.create_string_buffer(size)


def _addr(buf: ctypes.Array | None) -> int:
    return 0 if buf is None else ctypes.addressof(buf)


# --- objects -----------------------------------------------------------------


def obj_get(path: str, read_only: bool = False) -> int:
    """Open a pinned object; returns a new fd (O_CLOEXEC)."""
    p = ctypes.create_string_buffer(os.fsencode(path))
    a = _attr()
    # pathname u64, bpf_fd u32, file_flags u32
    struct.pack_into("=QII", a, 0, _addr(p), 0, BPF_F_RDONLY if read_only else 0)
    return _bpf(BPF_OBJ_GET, a)


def obj_pin(fd: int, path: str) -> None:
    p = ctypes.create_string_buffer(os.fsencode(path))
    a = _attr()
    struct.pack_into("=QII", a, 0, _addr(p), fd, 0)
    _bpf(BPF_OBJ_PIN, a)


def prog_fd_by_id(prog_id: int) -> int:
    a = _attr()
    struct.pack_into("=I", a, 0, prog_id)
    return _bpf(BPF_PROG_GET_FD_BY_ID, a)


def map_fd_by_id(map_id: int) -> int:
    a = _attr()
    struct.pack_into("=I", a, 0, map_id)
    return _bpf(BPF_MAP_GET_FD_BY_ID, a)


def link_fd_by_id(link_id: int) -> int:
    a = _attr()
    struct.pack_into("=I", a, 0, link_id)
    return _bpf(BPF_LINK_GET_FD_BY_ID, a)


def _info(fd: int, size: int) -> bytes:
    info = ctypes.create_string_buffer(size)
    a = _attr()
    struct.pack_into("=IIQ", a, 0, fd, size, _addr(info))
    _bpf(BPF_OBJ_GET_INFO_BY_FD, a)
    return info.raw


@dataclass(frozen=True)
class ProgInfo:
    type: int
    id: int
    tag: str
    name: str
    map_ids: tuple[int, ...]


@dataclass(frozen=True)
class MapInfo:
    type: int
    id: int
    key_size: int
    value_size: int
    max_entries: int
    flags: int
    name: str


@dataclass(frozen=True)
class LinkInfo:
    type: int
    id: int
    prog_id: int
    cgroup_id: int
    attach_type: int


def _cstr(raw: bytes) -> str:
    return raw.split(b"\0", 1)[0].decode(errors="replace")


def prog_info(fd: int) -> ProgInfo:
    raw = _info(fd, 232)
    ptype, pid = struct.unpack_from("=II", raw, 0)
    tag = raw[8:16].hex()
    nr_map_ids = struct.unpack_from("=I", raw, 52)[0]
    name = _cstr(raw[64:80])
    map_ids: tuple[int, ...] = ()
    if nr_map_ids:
        ids = (ctypes.c_uint32 * nr_map_ids)()
        info = ctypes.create_string_buffer(232)
        struct.pack_into("=IQ", info, 52, nr_map_ids, ctypes.addressof(ids))
        a = _attr()
        struct.pack_into("=IIQ", a, 0, fd, 232, _addr(info))
        _bpf(BPF_OBJ_GET_INFO_BY_FD, a)
        map_ids = tuple(ids)
    return ProgInfo(ptype, pid, tag, name, map_ids)


def map_info(fd: int) -> MapInfo:
    raw = _info(fd, 88)
    mtype, mid, ks, vs, me, fl = struct.unpack_from("=IIIIII", raw, 0)
    return MapInfo(mtype, mid, ks, vs, me, fl, _cstr(raw[24:40]))


def link_info(fd: int) -> LinkInfo:
    raw = _info(fd, 64)
    ltype, lid, prog_id = struct.unpack_from("=III", raw, 0)
    cgroup_id, attach_type = struct.unpack_from("=QI", raw, 16)
    return LinkInfo(ltype, lid, prog_id, cgroup_id, attach_type)


def prog_query(target_fd: int, attach_type: int, max_progs: int = 64) -> list[int]:
    """Ids of the programs attached at target_fd (a cgroup) for attach_type."""
    return prog_query_flags(target_fd, attach_type, max_progs)[1]


# --- links -------------------------------------------------------------------


def link_create(prog_fd: int, target_fd: int, attach_type: int) -> int:
    a = _attr()
    struct.pack_into("=IIII", a, 0, prog_fd, target_fd, attach_type, 0)
    return _bpf(BPF_LINK_CREATE, a)


def link_update(link_fd: int, new_prog_fd: int, old_prog_fd: int | None = None) -> None:
    """Atomically swap the program of a link. With old_prog_fd, only when that
    program is the one attached (BPF_F_REPLACE), else EPERM."""
    a = _attr()
    flags = BPF_F_REPLACE if old_prog_fd is not None else 0
    struct.pack_into("=IIII", a, 0, link_fd, new_prog_fd, flags, old_prog_fd or 0)
    _bpf(BPF_LINK_UPDATE, a)


def link_detach(link_fd: int) -> None:
    a = _attr()
    struct.pack_into("=I", a, 0, link_fd)
    _bpf(BPF_LINK_DETACH, a)


# --- maps --------------------------------------------------------------------


def map_create(map_type: int, key_size: int, value_size: int, max_entries: int,
               flags: int = 0, name: str = "") -> int:
    a = _attr()
    struct.pack_into("=IIIIIII", a, 0, map_type, key_size, value_size, max_entries, flags, 0, 0)
    nm = name.encode()[:15]
    a[28:28 + len(nm)] = nm
    return _bpf(BPF_MAP_CREATE, a)


def _elem(cmd: int, fd: int, key: bytes, value: ctypes.Array | None, flags: int = 0) -> int:
    k = ctypes.create_string_buffer(key, len(key))
    a = _attr()
    struct.pack_into("=IIQQQ", a, 0, fd, 0, _addr(k), _addr(value), flags)
    return _bpf(cmd, a)


def map_lookup(fd: int, key: bytes, value_size: int) -> bytes | None:
    """The value, or None when the key is absent."""
    v = ctypes.create_string_buffer(value_size)
    try:
        _elem(BPF_MAP_LOOKUP_ELEM, fd, key, v)
    except OSError as e:
        if e.errno == _errno.ENOENT:
            return None
        raise
    return v.raw


def map_update(fd: int, key: bytes, value: bytes, flags: int = BPF_ANY) -> None:
    v = ctypes.create_string_buffer(value, len(value))
    _elem(BPF_MAP_UPDATE_ELEM, fd, key, v, flags)


def map_delete(fd: int, key: bytes) -> bool:
    """True when deleted, False when the key was absent."""
    try:
        _elem(BPF_MAP_DELETE_ELEM, fd, key, None)
    except OSError as e:
        if e.errno == _errno.ENOENT:
            return False
        raise
    return True


def map_keys(fd: int, key_size: int, limit: int = 1 << 16) -> list[bytes]:
    """All keys (a snapshot; bounded by `limit`)."""
    keys: list[bytes] = []
    nxt = ctypes.create_string_buffer(key_size)
    cur: bytes | None = None
    while len(keys) < limit:
        a = _attr()
        kbuf = ctypes.create_string_buffer(cur, key_size) if cur is not None else None
        struct.pack_into("=IIQQ", a, 0, fd, 0, _addr(kbuf), _addr(nxt))
        try:
            _bpf(BPF_MAP_GET_NEXT_KEY, a)
        except OSError as e:
            if e.errno == _errno.ENOENT:
                break
            raise
        cur = nxt.raw
        keys.append(cur)
    return keys


def map_lookup_batch(fd: int, key_size: int, value_size: int, chunk: int = 256,
                     limit: int = 1 << 20) -> list[tuple[bytes, bytes]]:
    """All (key, value) pairs of a hash map (plain, per-CPU or LRU), `chunk`
    elements per BPF_MAP_LOOKUP_BATCH call: one syscall for a small map.
    `value_size` is what one lookup returns (per-CPU maps: the size rounded up
    to 8, times possible_cpus()). Consistent per hash bucket, not across the
    whole map (as any iteration of a live map). Bounded by `limit` elements.
    Kernels without batch operations (< 5.6): GET_NEXT_KEY + LOOKUP per key."""
    out: list[tuple[bytes, bytes]] = []
    in_batch = ctypes.create_string_buffer(8)   # hash maps: a u32 bucket index
    out_batch = ctypes.create_string_buffer(8)
    first = True
    while len(out) < limit:
        keys = ctypes.create_string_buffer(key_size * chunk)
        values = ctypes.create_string_buffer(value_size * chunk)
        a = _attr()
        # in_batch, out_batch, keys, values (u64 pointers), count u32, map_fd u32,
        # elem_flags u64, flags u64
        struct.pack_into("=QQQQIIQQ", a, 0, 0 if first else _addr(in_batch), _addr(out_batch),
                         _addr(keys), _addr(values), chunk, fd, 0, 0)
        done = False
        try:
            _bpf(BPF_MAP_LOOKUP_BATCH, a)
        except OSError as e:
            if e.errno == _errno.ENOSPC and chunk < (1 << 16):
                chunk *= 4  # a bucket holds more elements than fit: retry larger
                continue
            if e.errno in (_errno.EINVAL, _errno.EOPNOTSUPP, 524) and first:  # 524: ENOTSUPP
                return _lookup_each(fd, key_size, value_size, limit)
            if e.errno != _errno.ENOENT:
                raise
            done = True
        n = struct.unpack_from("=I", a, 32)[0]
        kr, vr = keys.raw, values.raw
        for i in range(n):
            out.append((kr[i * key_size:(i + 1) * key_size], vr[i * value_size:(i + 1) * value_size]))
        if done:
            break
        ctypes.memmove(in_batch, out_batch, 8)
        first = False
    return out


def _lookup_each(fd: int, key_size: int, value_size: int, limit: int) -> list[tuple[bytes, bytes]]:
    out = []
    for key in map_keys(fd, key_size, limit):
        v = map_lookup(fd, key, value_size)
        if v is not None:
            out.append((key, v))
    return out


def possible_cpus() -> int:
    """Number of possible CPUs: the per-CPU value count of a per-CPU map."""
    with open("/sys/devices/system/cpu/possible") as f:
        text = f.read().strip()
    n = 0
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        n = max(n, int(hi or lo) + 1)
    return n


def enable_run_time_stats() -> int:
    """BPF_ENABLE_STATS (BPF_STATS_RUN_TIME, Linux 5.8): every program's
    run_time_ns and run_cnt count while the returned fd is open; closing it
    (or the process ending) turns them off again, unlike the sysctl
    kernel.bpf_stats_enabled, which a crash would leave on."""
    a = _attr()
    struct.pack_into("=I", a, 0, 0)  # type: BPF_STATS_RUN_TIME
    return _bpf(32, a)


def prog_run_stats(fd: int) -> tuple[int, int]:
    """(run_time_ns, run_cnt) of a program (struct bpf_prog_info)."""
    raw = _info(fd, 216)
    return struct.unpack_from("=QQ", raw, 192)


def cap_eff() -> int:
    """This process's effective capability set (CapEff), 0 when unreadable."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("CapEff:"):
                    return int(line.split()[1], 16)
    except OSError:
        pass
    return 0


def raise_memlock() -> None:
    """RLIMIT_MEMLOCK to unlimited. Kernels before 5.11 charge BPF maps and
    programs to it (often 64 KiB: not even our maps fit); later ones charge
    the memory cgroup and ignore it, so raising it is harmless there."""
    import resource  # noqa: PLC0415

    try:
        resource.setrlimit(resource.RLIMIT_MEMLOCK, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    except (ValueError, OSError):
        pass  # no CAP_SYS_RESOURCE: the kernel's answer (EPERM) will say so


# --- attachments at a cgroup ---------------------------------------------------

BPF_F_ALLOW_OVERRIDE = 1 << 0  # prog_attach flags; PROG_QUERY reports them as attach_flags
BPF_F_ALLOW_MULTI = 1 << 1


def prog_query_flags(target_fd: int, attach_type: int, max_progs: int = 64) -> tuple[int, list[int]]:
    """(attach_flags, program ids) at target_fd (a cgroup) for attach_type.
    attach_flags are the cgroup's flags for that hook: BPF_F_ALLOW_MULTI when
    the programs there share it (bpf_links always do), else 0 or
    BPF_F_ALLOW_OVERRIDE: one exclusive program that makes the kernel refuse
    any other at that cgroup and hook (BPF_LINK_CREATE: EPERM)."""
    ids = (ctypes.c_uint32 * max_progs)()
    a = _attr()
    # target_fd u32, attach_type u32, query_flags u32, attach_flags u32, prog_ids u64, prog_cnt u32
    struct.pack_into("=IIIIQI", a, 0, target_fd, attach_type, 0, 0, ctypes.addressof(ids), max_progs)
    _bpf(BPF_PROG_QUERY, a)
    flags, = struct.unpack_from("=I", a, 12)
    cnt = struct.unpack_from("=I", a, 24)[0]
    return flags, list(ids[: min(cnt, max_progs)])
