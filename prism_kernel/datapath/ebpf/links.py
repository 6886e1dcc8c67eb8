"""Pins and links of the eBPF data path: the bpffs layout of an instance, the
cgroup links of the five hooks, and moving them to new programs in place.

    /sys/fs/bpf/<instance>/
        meta            ARRAY[1] {sha256 of program, map layout, loader}: what is attached
        maps-v<LAYOUT>/ the maps (maps.MAP_NAMES), pinned by the loader child
        links/          getpeername4 getpeername6 sockops connect4 connect6 (bpf_link)
        stage-<pid>/    programs between load and attach (transient)
"""

from __future__ import annotations

import errno
import logging
import os
import re

from prism_kernel.datapath.ebpf import bpfsys as bpf
from prism_kernel.datapath.ebpf.maps import LAYOUT, PEER
from prism_kernel.errors import DatapathError

log = logging.getLogger(__name__)

BPFFS = "/sys/fs/bpf"

# Attach order: reverse translation and socket tracking before steering, so
# that every steered socket is translated and followed. Detach in reverse.
HOOKS: tuple[tuple[str, int], ...] = (
    ("getpeername4", bpf.BPF_CGROUP_INET4_GETPEERNAME),
    ("getpeername6", bpf.BPF_CGROUP_INET6_GETPEERNAME),
    ("sockops", bpf.BPF_CGROUP_SOCK_OPS),
    ("connect4", bpf.BPF_CGROUP_INET4_CONNECT),
    ("connect6", bpf.BPF_CGROUP_INET6_CONNECT),
)

_INSTANCE_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


class Paths:
    def __init__(self, instance: str, layout: int = LAYOUT):
        self.base = os.path.join(BPFFS, instance)
        self.meta = os.path.join(self.base, "meta")
        self.links = os.path.join(self.base, "links")
        self.maps = os.path.join(self.base, f"maps-v{layout}")

    def link(self, hook: str) -> str:
        return os.path.join(self.links, hook)

    def map(self, name: str) -> str:
        return os.path.join(self.maps, name)

    def stage(self) -> str:
        return os.path.join(self.base, f"stage-{os.getpid()}")


def validate_instance(instance: str) -> None:
    if not _INSTANCE_RE.fullmatch(instance):
        raise DatapathError(f"instance name {instance!r} is not usable as a bpffs directory "
                            "name (letters, digits, '_', '.', '-'; at most 64)")


def close_quietly(fd: int | None) -> None:
    if fd is not None:
        try:
            os.close(fd)
        except OSError:
            pass


def remove_pins(path: str) -> list[str]:
    """Unpin everything under a bpffs directory (bottom-up). Returns what was removed."""
    removed: list[str] = []
    if not os.path.isdir(path):
        return removed
    for root, dirs, files in os.walk(path, topdown=False):
        for name in files:
            p = os.path.join(root, name)
            try:
                os.unlink(p)
                removed.append(f"pin {p}")
            except FileNotFoundError:
                pass
        for name in dirs:
            try:
                os.rmdir(os.path.join(root, name))
            except FileNotFoundError:
                pass
    try:
        os.rmdir(path)
        removed.append(f"bpffs dir {path}")
    except FileNotFoundError:
        pass
    return removed


def bpffs_mounted(path: str = BPFFS) -> bool:
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                left, _, right = line.partition(" - ")
                if right.split(" ", 1)[0] == "bpf" and left.split(" ")[4] == path:
                    return True
    except OSError:
        pass
    return False


def ensure_bpffs(path: str = BPFFS) -> None:
    if bpffs_mounted(path):
        return
    import ctypes  # noqa: PLC0415

    os.makedirs(path, exist_ok=True)
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.mount(b"bpf", os.fsencode(path), b"bpf", 0, None) != 0:
        err = ctypes.get_errno()
        raise DatapathError(f"cannot mount bpffs at {path}: {os.strerror(err)}")
    log.info("mounted bpffs at %s", path)


def open_links(paths: Paths, drop_defunct: bool = False) -> dict[str, int]:
    """Pinned links by hook. A defunct link (detached behind our back:
    BPF_LINK_DETACH leaves the pin, with no cgroup) is left out, and
    unpinned when `drop_defunct`, so that install() creates it anew."""
    links: dict[str, int] = {}
    for hook, _ in HOOKS:
        path = paths.link(hook)
        try:
            fd = bpf.obj_get(path)
        except OSError as e:
            if e.errno not in (errno.ENOENT, errno.ENOTDIR):
                for fd in links.values():
                    os.close(fd)
                raise DatapathError(f"cannot open pinned link {path}: {e}") from e
            continue
        if bpf.link_info(fd).cgroup_id == 0:
            os.close(fd)
            if drop_defunct:
                log.warning("link %s was detached behind our back; unpinning it", path)
                try:
                    os.unlink(path)
                except FileNotFoundError:
                    pass
            continue
        links[hook] = fd
    return links


def detached_hooks(links: dict[str, int]) -> list[str]:
    """Hooks without an attached link (missing, or detached behind our back)."""
    missing = [hook for hook, _ in HOOKS if hook not in links]
    for hook, fd in links.items():
        try:
            if bpf.link_info(fd).cgroup_id == 0:
                missing.append(hook)
        except OSError:
            missing.append(hook)
    return sorted(missing)


def attached_prog_maps(links: dict[str, int]) -> dict[str, int]:
    """name -> map id of the maps the attached connect program uses."""
    for hook in ("connect4", "connect6"):
        if hook not in links:
            continue
        try:
            pfd = bpf.prog_fd_by_id(bpf.link_info(links[hook]).prog_id)
        except OSError:
            continue
        try:
            out: dict[str, int] = {}
            for mid in bpf.prog_info(pfd).map_ids:
                try:
                    mfd = bpf.map_fd_by_id(mid)
                except OSError:
                    continue
                try:
                    out[bpf.map_info(mfd).name] = mid
                finally:
                    os.close(mfd)
            return out
        finally:
            os.close(pfd)
    return {}


def carry_peers(paths: Paths, attached_ids: dict[str, int]) -> str | None:
    """Before a layout upgrade loads the new program: when the attached
    program's pk_peers has the format this code uses (layouts 2 to 5), pin
    that very map into the new maps dir, so the loader reuses it. Sockets
    steered before the upgrade keep their reverse translation and are still
    found by close_connections(). Returns the path pinned (to be unpinned if
    the load fails), else None."""
    mid = attached_ids.get("pk_peers")
    target = paths.map("pk_peers")
    if mid is None or os.path.exists(target):
        return None
    try:
        fd = bpf.map_fd_by_id(mid)
    except OSError:
        return None
    try:
        mi = bpf.map_info(fd)
        if (mi.type, mi.key_size, mi.value_size) != (bpf.BPF_MAP_TYPE_SK_STORAGE, 4, PEER.size):
            log.info("layout upgrade: the attached pk_peers (value %d bytes) is not carried "
                     "over; sockets steered before the upgrade answer getpeername() with "
                     "the backend's address", mi.value_size)
            return None
        os.makedirs(paths.maps, mode=0o700, exist_ok=True)
        bpf.obj_pin(fd, target)
        log.info("layout upgrade: pk_peers (map %d) carried over with its sockets", mid)
        return target
    except OSError as e:
        log.warning("layout upgrade: could not carry pk_peers over: %s", e)
        return None
    finally:
        os.close(fd)


def swap_programs(paths: Paths, links: dict[str, int], new: dict[str, int], cgroup_root: str) -> None:
    """Move every hook to the new program: BPF_LINK_UPDATE with BPF_F_REPLACE
    (the old program's fd) on an existing link, an atomic swap, never
    detach-then-attach; link create + pin for a missing one. `links` is
    updated with the links created."""
    os.makedirs(paths.links, mode=0o700, exist_ok=True)
    root_fd = os.open(cgroup_root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    created: list[tuple[str, int]] = []
    try:
        for hook, attach_type in HOOKS:
            if hook in links:
                lfd = links[hook]
                old = bpf.link_info(lfd).prog_id
                old_fd = bpf.prog_fd_by_id(old)
                try:
                    bpf.link_update(lfd, new[hook], old_fd)
                finally:
                    os.close(old_fd)
                log.info("%s: link updated, prog %d -> %d", hook, old, bpf.prog_info(new[hook]).id)
            else:
                lfd = bpf.link_create(new[hook], root_fd, attach_type)
                created.append((hook, lfd))
                bpf.obj_pin(lfd, paths.link(hook))
                links[hook] = lfd
    except OSError as e:
        # A fresh attach half done: undo what this call created.
        for hook, lfd in created:
            try:
                bpf.link_detach(lfd)
            except OSError:
                pass
            try:
                os.unlink(paths.link(hook))
            except OSError:
                pass
            links.pop(hook, None)
            close_quietly(lfd)
        raise DatapathError(f"attaching at cgroup {cgroup_root} failed: {e}") from e
    finally:
        os.close(root_fd)


def drop_other_layouts(paths: Paths) -> None:
    for name in os.listdir(paths.base):
        if name.startswith("maps-v") and os.path.join(paths.base, name) != paths.maps:
            remove_pins(os.path.join(paths.base, name))
            log.info("unpinned maps of old layout %s", name)


def detach_all(paths: Paths) -> list[str]:
    """BPF_LINK_DETACH on every pinned link, steering first, reverse
    translation last. A line per link detached."""
    lines: list[str] = []
    for hook, _ in reversed(HOOKS):
        p = paths.link(hook)
        try:
            fd = bpf.obj_get(p)
        except OSError as e:
            if e.errno not in (errno.ENOENT, errno.ENOTDIR):
                raise DatapathError(f"cannot open pinned link {p}: {e}") from e
            continue
        try:
            li = bpf.link_info(fd)
            bpf.link_detach(fd)
            lines.append(f"cgroup link {hook} (link {li.id}, prog {li.prog_id}, "
                         f"cgroup id {li.cgroup_id}): detached")
        except OSError as e:
            if e.errno not in (errno.ENOLINK, errno.EINVAL):
                raise DatapathError(f"cannot detach {p}: {e}") from e
        finally:
            os.close(fd)
    return lines
