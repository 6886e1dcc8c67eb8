"""The eBPF data path's maps: their layout, the encodings of the C structs of
bpf/prism_sock.bpf.c, and every read and write of them (bpf(2) through
bpfsys). The update protocol itself is the pure plan
(prism_kernel/core/ebpf_plan.py); `execute()` here only runs its ops.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import os
import socket
import struct
import time
from collections.abc import Sequence
from dataclasses import dataclass

from prism_kernel.core import ebpf_plan as plan
from prism_kernel.core.model import Backend
from prism_kernel.datapath.base import PassiveCounts
from prism_kernel.datapath.ebpf import bpfsys as bpf
from prism_kernel.errors import DatapathError

log = logging.getLogger(__name__)

# Bump when a map's type, key or value changes: a new maps-v<N> dir, filled
# from the old maps before the programs are swapped (docs/design/ebpf-datapath.md).
LAYOUT = 5
MAX_BACKENDS = plan.MAX_BACKENDS
MAX_PASSIVE = 1024    # PK_MAX_PASSIVE: backends with outcome counters (and pk_suspect entries)
SUSPECT_WINDOW_S = 2.0  # a refused / SYN-timed-out backend is avoided this long (pk_params.suspect_ns)
SUSPECT_NS = int(SUSPECT_WINDOW_S * 1_000_000_000)
SO_NETNS_COOKIE = 71

MAP_NAMES = ("pk_config", "pk_commit", "pk_sets", "pk_slots", "pk_counters", "pk_stats", "pk_peers",
             "pk_passive", "pk_suspect", "pk_suspect_until")
STAT_NAMES = ("steered", "no_backend", "retry", "peer_xlate",  # PK_STAT_* order
              "passive_full",
              "skipped_suspect", "all_suspect", "suspect_marked", "suspect_mark_failed",
              "pick_exhausted")

# The C structs, native byte order.
CONFIG = struct.Struct("=QII")      # pk_config: host_netns_cookie, listen_port, flags
COMMIT = struct.Struct("=Q")        # pk_commit: seq
SET = struct.Struct("=QII")         # pk_set: gen, count4, count6
SLOT = struct.Struct("=Q20sI")      # pk_slot: gen, backend, syn_rto (jiffies; was padding before it)
BACKEND_SIZE = 20                   # pk_backend: addr[16] (network order), port (network order), family, pad
META = struct.Struct("=32sII24x")   # meta: sha256, layout, loader (LOADER_CODES; 0 before it was kept)
PEER = struct.Struct("=16s16s2s2s4x20s")  # pk_peer: orig addr, backend addr, ports, backend key
OUTCOME = struct.Struct("=QQQ")     # pk_outcome: refused, syn_timeouts, established (per CPU)
DEADLINE = struct.Struct("=Q")      # pk_suspect value: bpf_ktime_get_ns() (CLOCK_MONOTONIC)
KEY0 = struct.pack("=I", 0)


def key(i: int) -> bytes:
    return struct.pack("=I", i)


def encode_backend(b: Backend) -> bytes:
    addr = b.address.packed.ljust(16, b"\0")
    return addr + struct.pack("!H", b.port) + bytes((b.family, 0))


def decode_backend(raw: bytes) -> Backend:
    family = raw[18]
    port = struct.unpack("!H", raw[16:18])[0]
    if family == 4:
        return Backend(4, ipaddress.IPv4Address(raw[:4]), port)
    if family == 6:
        return Backend(6, ipaddress.IPv6Address(raw[:16]), port)
    raise DatapathError(f"corrupt backend entry in kernel map (family {family})")


def host_netns_cookie() -> int:
    """The netns cookie of this process's network namespace (SO_NETNS_COOKIE,
    Linux 5.14), or 0 where the kernel cannot tell it: the programs then
    steer in the initial network namespace (bpf_get_netns_cookie(NULL))."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            raw = s.getsockopt(socket.SOL_SOCKET, SO_NETNS_COOKIE, 8)
        except OSError as e:
            if e.errno != errno.ENOPROTOOPT:
                raise
            return 0
    return struct.unpack("=Q", raw)[0]


@dataclass
class Maps:
    """Open fds of one layout's maps, by name, and their ids."""

    fds: dict[str, int]
    ids: dict[str, int]

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()


def open_maps(directory: str) -> Maps | None:
    """The pinned maps in `directory`; None when they are not (all) there."""
    fds: dict[str, int] = {}
    ids: dict[str, int] = {}
    try:
        for name in MAP_NAMES:
            fd = bpf.obj_get(os.path.join(directory, name))
            fds[name] = fd
            ids[name] = bpf.map_info(fd).id
    except OSError as e:
        for fd in fds.values():
            os.close(fd)
        if e.errno in (errno.ENOENT, errno.ENOTDIR):
            return None
        raise DatapathError(f"cannot open pinned map in {directory}: {e}") from e
    return Maps(fds, ids)


# --- the backend set: read and write -------------------------------------------


def read_live(commit_fd: int, sets_fd: int, slots_fd: int, tries: int = 8) -> plan.Live:
    """What pk_commit publishes, read as a connect reads it (the writer may be
    another process: `status` while the daemon writes). When the published
    buffer is not a valid set under a stable commit (maps left half-written
    by hand), an empty set: the next plan then writes a whole generation."""
    for _ in range(tries):
        seq = COMMIT.unpack(bpf.map_lookup(commit_fd, KEY0, COMMIT.size) or bytes(8))[0]
        buf = seq & 1
        gen, c4, c6 = SET.unpack(bpf.map_lookup(sets_fd, key(buf), SET.size) or bytes(SET.size))
        fams: dict[int, list[Backend]] = {4: [], 6: []}
        rto: list[tuple[Backend, int]] = []
        valid = gen == seq and c4 <= MAX_BACKENDS and c6 <= MAX_BACKENDS
        for fam, cnt in ((4, c4), (6, c6)):
            for i in range(cnt if valid else 0):
                raw = bpf.map_lookup(slots_fd, key(plan.slot_index(buf, fam, i)), SLOT.size)
                sgen, be, syn_rto = SLOT.unpack(raw or bytes(SLOT.size))
                try:
                    b = decode_backend(be)
                except DatapathError:
                    valid = False
                    break
                if sgen != seq or b.family != fam:
                    valid = False
                    break
                fams[fam].append(b)
                if syn_rto:
                    rto.append((b, syn_rto))
        again = COMMIT.unpack(bpf.map_lookup(commit_fd, KEY0, COMMIT.size) or bytes(8))[0]
        if again != seq:
            continue  # a commit while we read: read again
        if not valid:
            return plan.Live(seq)
        return plan.Live(seq, tuple(fams[4]), tuple(fams[6]), tuple(sorted(rto)))
    raise DatapathError(f"the backend set changed {tries} times while it was read")


def live(maps: Maps) -> plan.Live:
    return read_live(maps.fds["pk_commit"], maps.fds["pk_sets"], maps.fds["pk_slots"])


def backend_keys(fd: int, limit: int) -> list[Backend]:
    """Keys of a map keyed by struct pk_backend; an undecodable one is skipped."""
    out = []
    for raw in bpf.map_keys(fd, BACKEND_SIZE, limit):
        try:
            out.append(decode_backend(raw))
        except DatapathError:
            continue
    return out


def execute(maps: Maps, ops: Sequence[plan.Op], ncpus: int) -> list[str]:
    """Run a plan's ops in order. A failure before the Commit raises
    DatapathError (nothing a connect sees has changed: the kernel still steers
    to the previous set); one after it is logged and returned, and the next
    plan repairs it (the set is committed)."""
    fds = maps.fds
    committed = plan.commit_index(ops) is None  # repairs only: every op is after the fact
    failed: list[str] = []
    for op in ops:
        try:
            if isinstance(op, plan.CreateCounter):
                try:
                    bpf.map_update(fds["pk_counters"], encode_backend(op.backend), bytes(8 * ncpus),
                                   bpf.BPF_NOEXIST)
                except OSError as e:
                    if e.errno != errno.EEXIST:
                        raise
            elif isinstance(op, plan.WriteSlot):
                bpf.map_update(fds["pk_slots"], key(plan.slot_index(op.buf, op.family, op.index)),
                               SLOT.pack(op.gen, encode_backend(op.backend), op.syn_rto))
            elif isinstance(op, plan.WriteSet):
                bpf.map_update(fds["pk_sets"], key(op.buf), SET.pack(op.gen, op.count4, op.count6))
            elif isinstance(op, plan.Commit):
                bpf.map_update(fds["pk_commit"], KEY0, COMMIT.pack(op.seq))
                committed = True
            elif isinstance(op, plan.DeleteCounter):
                bpf.map_delete(fds["pk_counters"], encode_backend(op.backend))
            elif isinstance(op, plan.DeleteOutcomes):
                bpf.map_delete(fds["pk_passive"], encode_backend(op.backend))
        except OSError as e:
            if not committed:
                raise DatapathError(f"writing the backend set failed before the commit "
                                    f"(the kernel still steers to the previous set): {op}: {e}") from e
            failed.append(f"{op}: {e}")
    if failed:
        log.warning("after the commit, %d map writes failed (the next update repairs them): %s",
                    len(failed), "; ".join(failed[:5]))
    return failed


# --- the set of an attached program of any layout (upgrades) ---------------------

_LEGACY_ACTIVE = struct.Struct("=QIIII")  # layouts 1-4 pk_active: gen, count4, count6, buf, pad


def read_legacy_set(active_fd: int, slots_fd: int) -> list[Backend]:
    """The set of a layout 1-4 program: pk_active HASH[1] {gen, count4,
    count6, buf} and pk_slots HASH (family << 24 | buf << 16 | index) -> backend."""
    raw = bpf.map_lookup(active_fd, KEY0, _LEGACY_ACTIVE.size)
    if raw is None:
        return []
    _, c4, c6, buf, _ = _LEGACY_ACTIVE.unpack(raw)
    out: list[Backend] = []
    for fam, cnt in ((4, c4), (6, c6)):
        for i in range(min(cnt, MAX_BACKENDS)):
            v = bpf.map_lookup(slots_fd, key((fam << 24) | (buf << 16) | i), BACKEND_SIZE)
            if v is not None:
                out.append(decode_backend(v))
    return out


def read_set_by_ids(ids: dict[str, int]) -> list[Backend] | None:
    """The set a program steers to, read through its own maps (found by id:
    unpinned or older-layout maps work too), when their format is one this
    code knows (layout 5, or the pk_active format of layouts 1-4); else None."""
    names = ("pk_commit", "pk_sets", "pk_slots") if "pk_commit" in ids else ("pk_active", "pk_slots")
    if not all(n in ids for n in names):
        return None
    fds: list[int] = []
    try:
        for n in names:
            fds.append(bpf.map_fd_by_id(ids[n]))
        infos = [bpf.map_info(fd) for fd in fds]
        sizes = [(mi.key_size, mi.value_size) for mi in infos]
        if names[0] == "pk_commit":
            if sizes != [(4, COMMIT.size), (4, SET.size), (4, SLOT.size)]:
                return None
            got = read_live(*fds)
            return list(got.v4 + got.v6)
        if sizes != [(4, _LEGACY_ACTIVE.size), (4, BACKEND_SIZE)]:
            return None
        return read_legacy_set(*fds)
    except (OSError, DatapathError):
        return None
    finally:
        for fd in fds:
            os.close(fd)


# --- config, meta, state ---------------------------------------------------------


def write_config(maps: Maps, listen_port: int) -> bool:
    """pk_config = {this netns's cookie, listen_port}; False when it already was."""
    want = CONFIG.pack(host_netns_cookie(), listen_port, 0)
    if bpf.map_lookup(maps.fds["pk_config"], KEY0, CONFIG.size) == want:
        return False
    bpf.map_update(maps.fds["pk_config"], KEY0, want)
    return True


def read_config(maps: Maps) -> tuple[int, int] | None:
    """(host netns cookie, listen port), None before the first write."""
    raw = bpf.map_lookup(maps.fds["pk_config"], KEY0, CONFIG.size)
    if not raw:
        return None
    cookie, port, _ = CONFIG.unpack(raw)
    return cookie, port


def read_meta(path: str) -> tuple[bytes, int, int] | None:
    """(program hash, layout, loader code) of what is attached."""
    try:
        fd = bpf.obj_get(path)
    except OSError:
        return None
    try:
        raw = bpf.map_lookup(fd, KEY0, META.size)
    finally:
        os.close(fd)
    return META.unpack(raw) if raw is not None else None


def write_meta(path: str, digest: bytes, layout: int, loader_code: int) -> None:
    try:
        fd = bpf.obj_get(path)
    except OSError:
        fd = bpf.map_create(bpf.BPF_MAP_TYPE_ARRAY, 4, META.size, 1, name="pk_meta")
        try:
            bpf.obj_pin(fd, path)
        except OSError:
            os.close(fd)
            raise
    try:
        bpf.map_update(fd, KEY0, META.pack(digest, layout, loader_code))
    finally:
        os.close(fd)


def read_stats(maps: Maps, ncpus: int) -> dict[str, int]:
    stats: dict[str, int] = {}
    for i, name in enumerate(STAT_NAMES):
        raw = bpf.map_lookup(maps.fds["pk_stats"], key(i), 8 * ncpus)
        stats[name] = sum(struct.unpack(f"={ncpus}Q", raw)) if raw else 0
    return stats


def read_counters(maps: Maps, ncpus: int) -> dict[Backend, int]:
    """Connections steered per backend of the set (pk_counters, summed over CPUs)."""
    out: dict[Backend, int] = {}
    fd = maps.fds["pk_counters"]
    for raw_key in bpf.map_keys(fd, BACKEND_SIZE):
        raw = bpf.map_lookup(fd, raw_key, 8 * ncpus)
        if raw is not None:
            out[decode_backend(raw_key)] = sum(struct.unpack(f"={ncpus}Q", raw))
    return out


def read_passive(maps: Maps, ncpus: int) -> dict[Backend, PassiveCounts]:
    """pk_passive: one BPF_MAP_LOOKUP_BATCH, summed over CPUs."""
    per_cpu = struct.Struct(f"={3 * ncpus}Q")
    out: dict[Backend, PassiveCounts] = {}
    for raw_key, raw in bpf.map_lookup_batch(maps.fds["pk_passive"], BACKEND_SIZE,
                                             OUTCOME.size * ncpus, chunk=64):
        v = per_cpu.unpack(raw)
        out[decode_backend(raw_key)] = PassiveCounts(refused=sum(v[0::3]), syn_timeouts=sum(v[1::3]),
                                                     established=sum(v[2::3]))
    return out


def read_suspect(maps: Maps) -> dict[Backend, float]:
    """Live marks in pk_suspect: backend -> seconds left."""
    now = time.monotonic_ns()  # the clock of bpf_ktime_get_ns()
    out: dict[Backend, float] = {}
    for raw_key, raw in bpf.map_lookup_batch(maps.fds["pk_suspect"], BACKEND_SIZE, DEADLINE.size,
                                             chunk=256):
        until = DEADLINE.unpack(raw)[0]
        if until > now:
            try:
                out[decode_backend(raw_key)] = (until - now) / 1e9
            except DatapathError:
                continue
    return out
