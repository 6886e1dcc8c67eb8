"""A program attached at the cgroup v2 root WITHOUT BPF_F_ALLOW_MULTI, as an
older Cilium or Calico's legacy attach leaves one: the kernel then refuses
every other program on that hook at the root (BPF_LINK_CREATE: EPERM).

The program is `return 1` (allow, change nothing), yet while attached every
connect() of the machine runs it and no eBPF test can attach there: hold it
only inside `exclusive_program()`. Its name (PROG_NAME) lets the session
clean-up (tests/conftest.py) find and detach one an interrupted run left.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import struct
from collections.abc import Callable, Iterator

from prism_kernel.datapath.ebpf import bpfsys as bpf
from prism_kernel.datapath.ebpf.cgroup import find_cgroup2_root

PROG_NAME = "pk_test_excl"
BPF_PROG_LOAD = 5
BPF_PROG_ATTACH = 8
BPF_PROG_DETACH = 9
EBPF_HOOKS = (("connect4", bpf.BPF_CGROUP_INET4_CONNECT), ("connect6", bpf.BPF_CGROUP_INET6_CONNECT),
              ("getpeername4", bpf.BPF_CGROUP_INET4_GETPEERNAME),
              ("getpeername6", bpf.BPF_CGROUP_INET6_GETPEERNAME), ("sock_ops", bpf.BPF_CGROUP_SOCK_OPS))
_RETURN_1 = struct.pack("<BBhi", 0xB7, 0, 0, 1) + struct.pack("<BBhi", 0x95, 0, 0, 0)  # r0 = 1; exit


def _load(attach_type: int) -> int:
    code = ctypes.create_string_buffer(_RETURN_1, len(_RETURN_1))
    lic = ctypes.create_string_buffer(b"GPL")
    a = bpf._attr()
    prog_type = 13 if attach_type == bpf.BPF_CGROUP_SOCK_OPS else bpf.BPF_PROG_TYPE_CGROUP_SOCK_ADDR
    struct.pack_into("=IIQQIIQII", a, 0, prog_type, len(_RETURN_1) // 8, ctypes.addressof(code),
                     ctypes.addressof(lic), 0, 0, 0, 0, 0)
    a[48:48 + len(PROG_NAME)] = PROG_NAME.encode()
    struct.pack_into("=I", a, 68, attach_type)  # expected_attach_type
    return bpf._bpf(BPF_PROG_LOAD, a)


def _attach_cmd(cmd: int, root_fd: int, prog_fd: int, attach_type: int, flags: int = 0) -> None:
    a = bpf._attr()
    # target_fd, attach_bpf_fd, attach_type, attach_flags
    struct.pack_into("=IIII", a, 0, root_fd, prog_fd, attach_type, flags)
    bpf._bpf(cmd, a)


def _hook_type(hook: str) -> int:
    return dict(EBPF_HOOKS)[hook]


@contextlib.contextmanager
def exclusive_program(hook: str = "connect4") -> Iterator[tuple[int, Callable[[], None]]]:
    """Attach PROG_NAME at the root on `hook` with attach flags 0 (exclusive);
    yields (program id, detach). Detached on exit whatever happens;
    `detach()` may be called earlier (idempotent)."""
    attach_type = _hook_type(hook)
    root = find_cgroup2_root()
    root_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    prog_fd = _load(attach_type)
    attached = False

    def detach() -> None:
        nonlocal attached
        if attached:
            try:
                _attach_cmd(BPF_PROG_DETACH, root_fd, prog_fd, attach_type)
            except FileNotFoundError:
                pass  # detached already (detach_test_programs)
            attached = False

    try:
        _attach_cmd(BPF_PROG_ATTACH, root_fd, prog_fd, attach_type, 0)
        attached = True
        yield bpf.prog_info(prog_fd).id, detach
    finally:
        try:
            detach()
        finally:
            os.close(prog_fd)
            os.close(root_fd)


def attached_test_programs() -> list[tuple[str, int]]:
    """(hook, program id) of every PROG_NAME program attached at the root."""
    root_fd = os.open(find_cgroup2_root(), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    found = []
    try:
        for hook, attach_type in EBPF_HOOKS:
            try:
                ids = bpf.prog_query(root_fd, attach_type)
            except OSError:
                continue
            for pid in ids:
                try:
                    fd = bpf.prog_fd_by_id(pid)
                except OSError:
                    continue
                try:
                    if bpf.prog_info(fd).name == PROG_NAME:
                        found.append((hook, pid))
                finally:
                    os.close(fd)
    finally:
        os.close(root_fd)
    return found


def detach_test_programs() -> list[str]:
    """Detach every PROG_NAME program at the root (what an interrupted run
    left); returns what was detached."""
    done = []
    root_fd = os.open(find_cgroup2_root(), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for hook, pid in attached_test_programs():
            fd = bpf.prog_fd_by_id(pid)
            try:
                _attach_cmd(BPF_PROG_DETACH, root_fd, fd, _hook_type(hook))
                done.append(f"{hook} program {pid} ({PROG_NAME})")
            finally:
                os.close(fd)
    finally:
        os.close(root_fd)
    return done
