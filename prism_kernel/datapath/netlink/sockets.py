"""sock_diag for fast failover: find TCP sockets by remote port, together
with their BPF socket storage (one dump), and abort them with SOCK_DESTROY
(as `ss -K` does).

SOCK_DESTROY needs CAP_NET_ADMIN in the sockets' network namespace and
CONFIG_INET_DIAG_DESTROY; it acts in the network namespace of the calling
process (the host's, for the daemon). The owner of a destroyed TCP socket
gets ECONNABORTED at once (connect() in SYN_SENT included); an established
one also sends an RST to its peer.
"""

from __future__ import annotations

import errno
import ipaddress
import socket
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field

from pyroute2.netlink import NETLINK_SOCK_DIAG, NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST, nla
from pyroute2.netlink.diag import (
    SOCK_DESTROY,
    SOCK_DIAG_BY_FAMILY,
    SS_ALL,
    SS_CONN,
    inet_diag_msg,
    inet_diag_req,
)

from prism_kernel.datapath.netlink.transport import Marshal, Socket

INET_DIAG_NOCOOKIE = (1 << 64) - 1

Address = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True)
class SockId:
    """One TCP socket, as sock_diag finds it: the exact 4-tuple as the socket
    sees it (local = src), and its cookie when known (then only that socket
    matches, never a later one that reuses the tuple)."""

    src: Address
    sport: int
    dst: Address
    dport: int
    cookie: int | None = None

    @property
    def family(self) -> int:
        return socket.AF_INET if self.dst.version == 4 else socket.AF_INET6


@dataclass
class DestroyResult:
    destroyed: int = 0
    failed: list[tuple[SockId, int]] = field(default_factory=list)  # (socket, errno); ENOENT: gone

    def errors(self) -> dict[int, int]:
        """errno -> count."""
        out: dict[int, int] = {}
        for _, err in self.failed:
            out[err] = out.get(err, 0) + 1
        return out


def unmapped(addr: Address) -> Address:
    """An IPv4-mapped IPv6 address (::ffff:a.b.c.d, as a dual-stack socket
    shows an IPv4 peer) as the IPv4 address; any other address as is."""
    if addr.version == 6 and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


def _words(addr: Address) -> tuple[int, int, int, int]:
    if addr.version == 4:
        return (int(addr), 0, 0, 0)
    return struct.unpack(">4I", addr.packed)



# asks for the values of BPF_MAP_TYPE_SK_STORAGE maps (by fd) with each socket,
# and the reply attribute carrying them (Linux >= 5.7, CAP_BPF or CAP_SYS_ADMIN).
INET_DIAG_REQ_SK_BPF_STORAGES = 2
INET_DIAG_SK_BPF_STORAGES = 20


# pyroute2 compiles a class's nla_map once and marks the class with a flag
# (nlmsg_base.__compiled_nla, name-mangled) that subclasses inherit: a
# subclass of a message class used before would run on its parent's compiled
# map. Each subclass below resets the flag, so its own map is compiled.


class _storage_dump_req(inet_diag_req):
    """inet_diag_req_v2 plus INET_DIAG_REQ_SK_BPF_STORAGES (pyroute2 0.9
    defines no request attributes)."""

    _nlmsg_base__compiled_nla = False
    nla_map = ((INET_DIAG_REQ_SK_BPF_STORAGES, "INET_DIAG_REQ_SK_BPF_STORAGES", "map_fds|nested"),)

    class map_fds(nla):
        nla_map = ((1, "SK_DIAG_BPF_STORAGE_REQ_MAP_FD", "uint32"),)


class _storage_diag_msg(inet_diag_msg):
    """inet_diag_msg whose INET_DIAG_SK_BPF_STORAGES is decoded (pyroute2
    0.9 leaves it as hex): one SK_DIAG_BPF_STORAGE per map, {map id, value}."""

    _nlmsg_base__compiled_nla = False
    nla_map = tuple(
        (i, name, "sk_bpf_storages" if i == INET_DIAG_SK_BPF_STORAGES else kind)
        for i, (name, kind) in enumerate(inet_diag_msg.nla_map)
    )

    class sk_bpf_storages(nla):
        nla_map = ((1, "SK_DIAG_BPF_STORAGE", "storage"),)

        class storage(nla):
            nla_map = ((2, "SK_DIAG_BPF_STORAGE_MAP_ID", "uint32"),
                       (3, "SK_DIAG_BPF_STORAGE_MAP_VALUE", "cdata"))


@dataclass(frozen=True)
class FoundSock:
    """A TCP socket from a sock_diag dump, with the value it holds in the
    socket-storage map asked for (None when none was asked for)."""

    sock: SockId
    state: int  # TCP_* (1 established, 2 SYN_SENT, ...)
    value: bytes | None = None


def tcp_sockets(family: int, dport: int, map_fd: int | None = None,
                map_id: int | None = None) -> list[FoundSock]:
    """Every TCP socket of `family` in the calling network namespace with
    remote port `dport` (0: any), in a connected state (SYN_SENT to LAST_ACK:
    not listening, not TIME_WAIT). With a socket-storage map (`map_fd`, whose
    id is `map_id`): only the sockets that have an entry in it, with that
    entry. One dump; the kernel filters by port, so a node's other
    connections are not even sent."""
    req = _diag_req(_storage_dump_req(), SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST | NLM_F_DUMP, family,
                    SS_CONN, dport=dport)
    if map_fd is not None:
        req["attrs"] = [("INET_DIAG_REQ_SK_BPF_STORAGES",
                         {"attrs": [("SK_DIAG_BPF_STORAGE_REQ_MAP_FD", map_fd)]})]
    out: list[FoundSock] = []
    with Socket(NETLINK_SOCK_DIAG) as nl:
        req["header"]["sequence_number"] = nl.next_seq()
        req.encode()
        for m in nl.dump(req, Marshal({SOCK_DIAG_BY_FAMILY: _storage_diag_msg})):
            value = None
            if map_fd is not None:
                stgs = m.get_attr("INET_DIAG_SK_BPF_STORAGES")
                for st in (stgs.get_attrs("SK_DIAG_BPF_STORAGE") if stgs is not None else ()):
                    if st.get_attr("SK_DIAG_BPF_STORAGE_MAP_ID") == map_id:
                        value = bytes(st.get_attr("SK_DIAG_BPF_STORAGE_MAP_VALUE"))
                if value is None:
                    continue  # not in the map
            out.append(FoundSock(
                sock=SockId(src=ipaddress.ip_address(m["idiag_src"]), sport=m["idiag_sport"],
                            dst=ipaddress.ip_address(m["idiag_dst"]), dport=m["idiag_dport"],
                            cookie=m["idiag_cookie"]),
                state=m["idiag_state"], value=value))
    return out


def _diag_req(req: inet_diag_req, kind: int, flags: int, family: int, states: int, sport: int = 0,
              dport: int = 0, src: Address | None = None, dst: Address | None = None,
              cookie: int | None = None) -> inet_diag_req:
    """Fill an inet_diag_req_v2 for TCP (not encoded: the caller may add attributes)."""
    req["header"]["type"] = kind
    req["header"]["flags"] = flags
    req["header"]["pid"] = 0
    req["sdiag_family"] = family
    req["sdiag_protocol"] = socket.IPPROTO_TCP
    req["idiag_ext"] = 0
    req["idiag_states"] = states
    req["idiag_sport"] = sport
    req["idiag_dport"] = dport
    req["idiag_src"] = _words(src) if src is not None else (0, 0, 0, 0)
    req["idiag_dst"] = _words(dst) if dst is not None else (0, 0, 0, 0)
    req["idiag_if"] = 0
    req["idiag_cookie"] = INET_DIAG_NOCOOKIE if cookie is None else cookie
    return req


def _destroy_msg(sid: SockId, seq: int) -> inet_diag_req:
    req = _diag_req(inet_diag_req(), SOCK_DESTROY, NLM_F_REQUEST | NLM_F_ACK, sid.family, SS_ALL,
                    sid.sport, sid.dport, sid.src, sid.dst, sid.cookie)
    req["header"]["sequence_number"] = seq
    req.encode()
    return req


def destroy_sockets(socks: Iterable[SockId]) -> DestroyResult:
    """SOCK_DESTROY each socket (TCP). Sockets that are gone already (ENOENT)
    are not counted. Raises OSError only when netlink itself fails."""
    socks = list(socks)
    res = DestroyResult()
    if not socks:
        return res
    with Socket(NETLINK_SOCK_DIAG) as nl:
        by_seq = {nl.next_seq(): s for s in socks}
        acks = nl.request_acks([_destroy_msg(s, seq) for seq, s in by_seq.items()])
        for seq, s in by_seq.items():
            err = acks.get(seq, errno.EIO)
            if err == 0:
                res.destroyed += 1
            else:
                res.failed.append((s, err))
    return res
