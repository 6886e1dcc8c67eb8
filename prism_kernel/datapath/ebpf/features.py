"""What this kernel can do for the eBPF data path, probed rather than read off
a version number (distributions backport features; RHEL 8's 4.18 has many of
5.x's). `EbpfDatapath.check_available` and `doctor` share these probes.

Every probe leaves nothing behind: libbpf's probes load a tiny program or
create a map and close it at once; the cgroup-link probe targets /dev/null
(never a cgroup, so nothing attaches); the sock_diag probes name a socket or
a map that does not exist. The minimum kernel of each feature is in
docs/kernel-support.md.
"""

from __future__ import annotations

import ctypes
import errno
import os
import socket
from dataclasses import dataclass

from prism_kernel.datapath.ebpf import bpfsys as bpf

# enum bpf_prog_type / bpf_map_type / bpf_func_id (include/uapi/linux/bpf.h)
PROG_SOCK_OPS = 13
PROG_CGROUP_SOCK_ADDR = 18
MAP_LRU_HASH = 9
MAP_SK_STORAGE = 24
FUNC_SOCK_OPS_CB_FLAGS_SET = 59
FUNC_SK_STORAGE_GET = 107
FUNC_GET_NETNS_COOKIE = 122


@dataclass(frozen=True)
class Feature:
    id: str
    what: str
    since: str          # mainline Linux release that brought it
    ok: bool | None     # None: could not be probed (no privileges, no libbpf)
    detail: str = ""


def _libbpf() -> ctypes.CDLL | None:
    try:
        lib = ctypes.CDLL("libbpf.so.1", use_errno=True)
    except OSError:
        return None
    lib.libbpf_probe_bpf_prog_type.argtypes = [ctypes.c_int, ctypes.c_void_p]
    lib.libbpf_probe_bpf_map_type.argtypes = [ctypes.c_int, ctypes.c_void_p]
    lib.libbpf_probe_bpf_helper.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_void_p]
    return lib


def _answer(rc: int) -> tuple[bool | None, str]:
    # libbpf probes: 1 supported, 0 not, -errno when the probe itself failed.
    if rc == 1:
        return True, ""
    if rc == 0:
        return False, "not supported"
    if -rc in (errno.EPERM, errno.EACCES):
        return None, f"cannot probe without privileges ({os.strerror(-rc)})"
    return None, f"probe failed: {os.strerror(-rc)}"


def _may_load_programs() -> bool:
    """CAP_BPF or CAP_SYS_ADMIN in the effective set. libbpf 1.1's probes
    answer "not supported" for any failed load, EPERM included, so they are
    only asked when a load can succeed."""
    return bool(bpf.cap_eff() & (1 << 39 | 1 << 21))


def _libbpf_probes(lib: ctypes.CDLL) -> list[Feature]:
    probes = (
        ("bpf.sock_addr", "cgroup sock_addr programs (connect4/6, getpeername4/6)", "4.17",
         lambda: lib.libbpf_probe_bpf_prog_type(PROG_CGROUP_SOCK_ADDR, None)),
        ("bpf.sock_ops", "sock_ops programs (refused and black-holed connects seen in the kernel)",
         "4.13", lambda: lib.libbpf_probe_bpf_prog_type(PROG_SOCK_OPS, None)),
        ("bpf.sk_storage", "socket storage maps (the mark of a steered socket)", "5.2",
         lambda: lib.libbpf_probe_bpf_map_type(MAP_SK_STORAGE, None)),
        ("bpf.lru_hash", "LRU hash maps (suspect marks)", "4.10",
         lambda: lib.libbpf_probe_bpf_map_type(MAP_LRU_HASH, None)),
        ("bpf.sk_storage_sock_addr", "bpf_sk_storage_get() in sock_addr programs", "5.3",
         lambda: lib.libbpf_probe_bpf_helper(PROG_CGROUP_SOCK_ADDR, FUNC_SK_STORAGE_GET, None)),
        ("bpf.netns_cookie", "bpf_get_netns_cookie() in sock_addr programs", "5.7",
         lambda: lib.libbpf_probe_bpf_helper(PROG_CGROUP_SOCK_ADDR, FUNC_GET_NETNS_COOKIE, None)),
        ("bpf.sock_ops_cb_flags", "bpf_sock_ops_cb_flags_set() (state and RTO callbacks)", "4.16",
         lambda: lib.libbpf_probe_bpf_helper(PROG_SOCK_OPS, FUNC_SOCK_OPS_CB_FLAGS_SET, None)),
        ("bpf.sk_storage_sock_ops", "bpf_sk_storage_get() in sock_ops programs", "5.3",
         lambda: lib.libbpf_probe_bpf_helper(PROG_SOCK_OPS, FUNC_SK_STORAGE_GET, None)),
    )
    if not _may_load_programs():
        return [Feature(fid, what, since, None, "cannot probe without CAP_BPF or CAP_SYS_ADMIN")
                for fid, what, since, _ in probes]
    out = []
    for fid, what, since, probe in probes:
        ok, detail = _answer(probe())
        out.append(Feature(fid, what, since, ok, detail))
    return out


_MOV_R0_1 = bytes((0xB7, 0, 0, 0, 1, 0, 0, 0))  # r0 = 1
_EXIT = bytes((0x95, 0, 0, 0, 0, 0, 0, 0))
# r2 = *(u64 *)(r1 + offsetof(struct bpf_sock_ops, sk)): the verifier accepts
# the load only where the context has the field.
_LOAD_SOCK_OPS_SK = bytes((0x79, 0x12)) + (184).to_bytes(2, "little") + bytes(4)


def _prog_load(prog_type: int, expected_attach_type: int, insns: bytes = _MOV_R0_1 + _EXIT) -> int:
    """A tiny program (default `return 1`) of that type; returns its fd."""
    import struct  # noqa: PLC0415

    code = ctypes.create_string_buffer(insns, len(insns))
    license_ = ctypes.create_string_buffer(b"GPL")
    a = bpf._attr()
    # prog_type, insn_cnt, insns, license, log_level, log_size, log_buf,
    # kern_version, prog_flags, prog_name[16], prog_ifindex, expected_attach_type
    struct.pack_into("=IIQQIIQII", a, 0, prog_type, len(insns) // 8, ctypes.addressof(code),
                     ctypes.addressof(license_), 0, 0, 0, 0, 0)
    a[48:48 + 8] = b"pk_probe"
    struct.pack_into("=I", a, 68, expected_attach_type)
    return bpf._bpf(5, a)  # BPF_PROG_LOAD


def _load_probe(fid: str, what: str, since: str, prog_type: int, attach_type: int = 0,
                insns: bytes = _MOV_R0_1 + _EXIT) -> Feature:
    """The program loads only on a kernel that has what it uses (a hook's
    expected attach type, a context field)."""
    try:
        fd = _prog_load(prog_type, attach_type, insns)
    except OSError as e:
        if e.errno in (errno.EPERM, errno.EACCES):
            return Feature(fid, what, since, None, f"cannot probe without privileges ({e.strerror})")
        return Feature(fid, what, since, False, f"not supported ({e.strerror})")
    os.close(fd)
    return Feature(fid, what, since, True)


def _link_detach() -> Feature:
    """BPF_LINK_DETACH of fd -1: EBADF where the command exists, EINVAL where
    the kernel does not know it."""
    import struct  # noqa: PLC0415

    fid, what, since = "bpf.link_detach", "BPF_LINK_DETACH (cleanup of pinned links)", "5.9"
    a = bpf._attr()
    struct.pack_into("=I", a, 0, 0xFFFFFFFF)
    try:
        bpf._bpf(34, a)  # BPF_LINK_DETACH
    except OSError as e:
        if e.errno == errno.EBADF:
            return Feature(fid, what, since, True)
        if e.errno in (errno.EPERM, errno.EACCES):
            return Feature(fid, what, since, None, f"cannot probe without privileges ({e.strerror})")
        return Feature(fid, what, since, False, f"not supported ({e.strerror})")
    return Feature(fid, what, since, False, "unexpected answer from the kernel")


def _cgroup_link() -> Feature:
    """BPF_LINK_CREATE with a valid sock_addr program and /dev/null as the
    target: a kernel with cgroup links looks the target up as a cgroup and
    answers EBADF; one without answers EINVAL. Nothing can attach."""
    fid, what, since = "bpf.cgroup_link", "bpf_link for cgroups (pinned links, atomic program swap)", "5.7"
    pfd = tfd = None
    try:
        try:
            pfd = _prog_load(PROG_CGROUP_SOCK_ADDR, bpf.BPF_CGROUP_INET4_CONNECT)
        except OSError as e:
            return Feature(fid, what, since, None, f"not probed: no sock_addr program ({e.strerror})")
        tfd = os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)
        try:
            lfd = bpf.link_create(pfd, tfd, bpf.BPF_CGROUP_INET4_CONNECT)
        except OSError as e:
            if e.errno == errno.EBADF:
                return Feature(fid, what, since, True)
            return Feature(fid, what, since, False, f"not supported ({e.strerror})")
        try:  # cannot happen (/dev/null is no cgroup); never leave it attached
            bpf.link_detach(lfd)
        finally:
            os.close(lfd)
        return Feature(fid, what, since, False, "unexpected answer from the kernel")
    finally:
        for fd in (pfd, tfd):
            if fd is not None:
                os.close(fd)


# sock_diag requests for the two probes, packed here rather than with
# pyroute2 (_netlink.py): importing pyroute2 costs ~80 ms, and these run at
# every start before the data path is installed. Only the kernel's errno is
# read back.
_NLMSG_ERROR, _NLMSG_DONE = 2, 3
_SOCK_DIAG_BY_FAMILY, _SOCK_DESTROY = 20, 21
_NLM_F_REQUEST, _NLM_F_ACK, _NLM_F_DUMP = 0x1, 0x4, 0x300
_INET_DIAG_REQ_SK_BPF_STORAGES, _SK_DIAG_BPF_STORAGE_REQ_MAP_FD = 2, 1


def _diag_request(kind: int, flags: int, cookie: int, attrs: bytes = b"", states: int = 0,
                  protocol: int = socket.IPPROTO_TCP) -> bytes:
    """nlmsghdr + inet_diag_req_v2 for `protocol` over IPv4: 127.0.0.1:1 ->
    127.0.0.1:1, in `states` (a dump with states 0 matches no socket)."""
    import struct  # noqa: PLC0415

    lo = socket.inet_aton("127.0.0.1") + bytes(12)
    req = struct.pack("=BBBxI", socket.AF_INET, protocol, 0, states)
    req += struct.pack("!HH", 1, 1) + lo + lo + struct.pack("=IQ", 0, cookie)
    body = req + attrs
    return struct.pack("=IHHII", 16 + len(body), kind, flags, 1, 0) + body


def _diag_errno(msg: bytes) -> int:
    """The kernel's answer to one request: 0 (done, or an ack) or an errno."""
    import struct  # noqa: PLC0415

    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, 4) as nl:  # NETLINK_SOCK_DIAG
        nl.settimeout(2.0)
        nl.bind((0, 0))
        nl.send(msg)
        while True:
            data = nl.recv(65536)
            off = 0
            while off + 16 <= len(data):
                length, kind = struct.unpack_from("=IH", data, off)
                if kind in (_NLMSG_ERROR, _NLMSG_DONE):
                    # both carry the request's result (0 or -errno) after the header
                    return -struct.unpack_from("=i", data, off + 16)[0] if length >= 20 else 0
                off += max((length + 3) & ~3, 16)


def _sock_diag() -> list[Feature]:
    """SOCK_DESTROY of a socket that does not exist answers ENOENT where the
    kernel can destroy sockets (CONFIG_INET_DIAG_DESTROY), EOPNOTSUPP where
    not. A dump that asks for the socket storage of a map fd that is no map
    fails (EINVAL/EBADF) where the kernel reads that attribute, and succeeds
    where it ignores it."""
    import struct  # noqa: PLC0415

    out = []
    destroy = ("sock_diag.destroy", "sock_diag SOCK_DESTROY (abort a dead backend's connections)", "4.5")
    storage = ("sock_diag.sk_storage", "socket storage in sock_diag dumps "
               "(finding a dead backend's connections)", "5.7")
    # Both answers below mean something only where TCP sockets can be dumped at
    # all: without the inet/tcp diag handler the kernel answers ENOENT to any
    # request, which the destroy probe would read as "no such socket".
    try:
        err = _diag_errno(_diag_request(_SOCK_DIAG_BY_FAMILY, _NLM_F_REQUEST | _NLM_F_DUMP, cookie=(1 << 64) - 1))
    except OSError as e:
        err = e.errno or errno.EIO
    if err:
        why = (f"cannot probe without privileges ({os.strerror(err)})" if err in (errno.EPERM, errno.EACCES)
               else f"no TCP sock_diag ({os.strerror(err)}; CONFIG_INET_DIAG, CONFIG_INET_TCP_DIAG)")
        ok = None if err in (errno.EPERM, errno.EACCES) else False
        return [Feature(*destroy, ok, why), Feature(*storage, ok, why)]
    fid, what, since = destroy
    try:
        err = _diag_errno(_diag_request(_SOCK_DESTROY, _NLM_F_REQUEST | _NLM_F_ACK, cookie=(1 << 64) - 2,
                                        states=0xFFFFFFFF))
    except OSError as e:
        out.append(Feature(fid, what, since, False, f"sock_diag unavailable ({e.strerror or e})"))
    else:
        if err in (errno.ENOENT, 0):
            out.append(Feature(fid, what, since, True))
        elif err in (errno.EPERM, errno.EACCES):
            out.append(Feature(fid, what, since, None, f"cannot probe without privileges ({os.strerror(err)})"))
        else:
            out.append(Feature(fid, what, since, False,
                               f"not supported ({os.strerror(err)}; CONFIG_INET_DIAG_DESTROY)"))
    fid, what, since = storage
    tfd = os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)
    try:
        fd_attr = struct.pack("=HHI", 8, _SK_DIAG_BPF_STORAGE_REQ_MAP_FD, tfd)
        attrs = struct.pack("=HH", 4 + len(fd_attr), _INET_DIAG_REQ_SK_BPF_STORAGES) + fd_attr
        err = _diag_errno(_diag_request(_SOCK_DIAG_BY_FAMILY, _NLM_F_REQUEST | _NLM_F_DUMP,
                                        cookie=(1 << 64) - 1, attrs=attrs))
    except OSError as e:
        err = None
        out.append(Feature(fid, what, since, False, f"sock_diag unavailable ({e.strerror or e})"))
    finally:
        os.close(tfd)
    if err == 0:
        out.append(Feature(fid, what, since, False, "the kernel ignores INET_DIAG_REQ_SK_BPF_STORAGES"))
    elif err in (errno.EPERM, errno.EACCES):
        out.append(Feature(fid, what, since, None, f"cannot probe without privileges ({os.strerror(err)})"))
    elif err is not None:
        out.append(Feature(fid, what, since, True))
    return out


def probe_all() -> list[Feature]:
    bpf.raise_memlock()  # before 5.11 even a probe's map counts against it
    lib = _libbpf()
    if lib is None:
        features = [Feature("libbpf", "libbpf.so.1 (Debian: libbpf1) for the feature probes", "-",
                            None, "cannot be loaded")]
    else:
        features = _libbpf_probes(lib)
    features.append(_load_probe("bpf.getpeername", "getpeername4/6 hooks", "5.8",
                                PROG_CGROUP_SOCK_ADDR, bpf.BPF_CGROUP_INET4_GETPEERNAME))
    features.append(_load_probe("bpf.sock_ops_sk", "the socket in the sock_ops context (bpf_sock_ops.sk)",
                                "5.3", PROG_SOCK_OPS, insns=_LOAD_SOCK_OPS_SK + _MOV_R0_1 + _EXIT))
    features.append(_cgroup_link())
    features.append(_link_detach())
    features.extend(_sock_diag())
    return features


def missing() -> list[str]:
    """One line per feature the data path needs and this kernel lacks (or
    that could not be probed). Empty: the kernel can run the eBPF data path."""
    return [f"{f.what}: {f.detail} (Linux >= {f.since})" for f in probe_all() if f.ok is not True]
