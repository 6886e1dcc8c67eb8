"""Netlink for fast failover: find sockets together with their BPF socket
storage (a sock_diag dump), abort sockets (sock_diag SOCK_DESTROY, as `ss -K`
does) and find / delete conntrack entries (ctnetlink).

Messages are pyroute2's classes (`inet_diag_req`, `nfct_msg`, `nlmsgerr`,
its Marshal for parsing); the transport is a plain blocking AF_NETLINK
socket of our own. pyroute2's socket classes (DiagSocket, NFCTSocket) are
not used: in pyroute2 0.9 they drive a private asyncio event loop with
run_until_complete(), which raises "This event loop is already running" when
called from the daemon's own event loop (checked with 0.9.7). A request to a
netlink *kernel* socket is handled synchronously inside sendmsg(), so when
send() returns every ack of the batch is queued: one send and a few
non-blocking reads per batch.

SOCK_DESTROY needs CAP_NET_ADMIN in the sockets' network namespace and
CONFIG_INET_DIAG_DESTROY; it acts in the network namespace of the calling
process (the host's, for the daemon). The owner of a destroyed TCP socket
gets ECONNABORTED at once (connect() in SYN_SENT included); an established
one also sends an RST to its peer.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import select
import socket
import struct
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

from pyroute2.netlink import (
    NETLINK_NETFILTER,
    NETLINK_SOCK_DIAG,
    NLM_F_ACK,
    NLM_F_DUMP,
    NLM_F_REQUEST,
    NLMSG_DONE,
    NLMSG_ERROR,
    nla,
    nlmsg,
    nlmsgerr,
)
from pyroute2.netlink.diag import (
    SOCK_DESTROY,
    SOCK_DIAG_BY_FAMILY,
    SS_ALL,
    SS_CONN,
    inet_diag_msg,
    inet_diag_req,
)

try:
    from pyroute2.netlink.marshal import Marshal
except ImportError:  # pyroute2 < 0.9
    from pyroute2.netlink.nlsocket import Marshal
from pyroute2.netlink.nfnetlink import NFNL_SUBSYS_CTNETLINK
from pyroute2.netlink.nfnetlink.nfctsocket import (
    IPCTNL_MSG_CT_DELETE,
    IPCTNL_MSG_CT_GET,
    IPCTNL_MSG_CT_NEW,
    IPS_DST_NAT,
    IPS_SEEN_REPLY,
    NFCTAttrTuple,
    nfct_msg,
)

SOL_NETLINK = 270
NETLINK_CAP_ACK = 10       # acks carry only the request's header, not its payload
INET_DIAG_NOCOOKIE = (1 << 64) - 1
BATCH = 128                # requests per sendmsg(): their acks must fit the receive buffer
RCVBUF = 4 << 20
RECV_SIZE = 65536          # > the largest netlink skb (dumps: 32 KiB at most)
RECV_TIMEOUT = 2.0         # s: the kernel answers within sendmsg(); this is a safety net
SO_RCVBUFFORCE = 33

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


class _Marshal(Marshal):
    """Parses acks (NLMSG_ERROR -> nlmsgerr, by the base class) and the
    message classes given."""

    def __init__(self, msg_map: dict[int, type] | None = None):
        super().__init__()
        self.msg_map = dict(msg_map or {})

    def parse_one_message(self, key, flags, sequence_number, data, offset, length):
        if key == self.error_type:
            # Only the errno: pyroute2 would also decode the echoed request as
            # msg_map's class for its type, and a dump request has the type of
            # its replies (SOCK_DIAG_BY_FAMILY) while NETLINK_CAP_ACK echoes
            # only its header: that decode fails (struct.error), so a dump
            # the kernel refused never raised its OSError.
            msg = nlmsgerr(data, offset=offset)
            msg.decode()
            return msg
        return super().parse_one_message(key, flags, sequence_number, data, offset, length)


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


class _Netlink:
    """A blocking netlink socket to the kernel (one protocol)."""

    def __init__(self, protocol: int):
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, protocol)
        try:
            self.sock.bind((0, 0))
            try:
                self.sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, RCVBUF)
            except OSError:
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF)
            try:
                self.sock.setsockopt(SOL_NETLINK, NETLINK_CAP_ACK, 1)
            except OSError:
                pass
        except BaseException:
            self.sock.close()
            raise
        self.seq = 0

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> "_Netlink":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def next_seq(self) -> int:
        self.seq = (self.seq + 1) & 0xFFFFFFFF or 1
        return self.seq

    def _wait_readable(self, timeout: float) -> bool:
        return bool(select.select([self.sock], [], [], timeout)[0])

    def _recv_all(self, block: bool) -> bytes:
        """Whatever is queued; when `block`, first wait up to RECV_TIMEOUT for something."""
        if block and not self._wait_readable(RECV_TIMEOUT):
            return b""
        chunks = []
        while True:
            try:
                data = self.sock.recv(RECV_SIZE, socket.MSG_DONTWAIT)
            except BlockingIOError:
                break
            chunks.append(data)
        return b"".join(chunks)

    def request(self, msgs: Sequence[nlmsg], marshal: Marshal | None = None
                ) -> dict[int, tuple[int, list[nlmsg]]]:
        """Send messages that carry NLM_F_ACK (sequence numbers set by the
        caller, encoded) in batches; returns seq -> (error, answers): error 0 =
        done, else a positive errno; answers = the messages the kernel sent for
        that request before its ack (parsed with `marshal`: a GET's entry)."""
        marshal = marshal or _Marshal()
        results: dict[int, tuple[int, list[nlmsg]]] = {}
        for start in range(0, len(msgs), BATCH):
            part = msgs[start:start + BATCH]
            want = {m["header"]["sequence_number"] for m in part}
            answers: dict[int, list[nlmsg]] = {seq: [] for seq in want}
            self.sock.send(b"".join(m.data for m in part))
            # The kernel socket handled the batch inside send(): answers are queued.
            block = False
            while want:
                data = self._recv_all(block)
                if not data:
                    if block:
                        break
                    block = True  # not expected; wait once for stragglers
                    continue
                for msg in marshal.parse(data):
                    seq = msg["header"]["sequence_number"]
                    if seq not in want:
                        continue
                    if isinstance(msg, nlmsgerr):
                        want.discard(seq)
                        results[seq] = (abs(msg["error"] or 0), answers[seq])
                    else:
                        answers[seq].append(msg)
            for seq in want:
                results[seq] = (errno.EIO, answers[seq])
        return results

    def request_acks(self, msgs: Sequence[nlmsg]) -> dict[int, int]:
        """request() when only the outcome matters: seq -> error."""
        return {seq: err for seq, (err, _) in self.request(msgs).items()}

    def dump(self, msg: nlmsg, marshal: Marshal) -> Iterator[nlmsg]:
        """Send one NLM_F_DUMP request (encoded by the caller: encoding twice
        appends a second copy to msg.data); yield the messages of the answer."""
        self.sock.send(msg.data)
        seq = msg["header"]["sequence_number"]
        while True:
            if not self._wait_readable(RECV_TIMEOUT):
                raise OSError(errno.ETIMEDOUT, f"netlink dump: no answer in {RECV_TIMEOUT} s")
            data = self.sock.recv(RECV_SIZE)
            for m in marshal.parse(data):
                if m["header"]["sequence_number"] != seq:
                    continue
                if m["header"]["type"] == NLMSG_DONE:
                    # NLMSG_DONE carries the dump's result: an error after its start
                    # (say, in the middle of the walk) is reported here, not as an ack.
                    err = _done_errno(data, m)
                    if err:
                        raise OSError(err, f"netlink dump: {os.strerror(err)}")
                    return
                if isinstance(m, nlmsgerr):
                    err = abs(m["error"] or 0)
                    if err:
                        raise OSError(err, f"netlink dump: {os.strerror(err)}")
                    return
                yield m


def _done_errno(data: bytes, msg: nlmsg) -> int:
    """The int after an NLMSG_DONE header (0 or -errno) as a positive errno."""
    off, length = getattr(msg, "offset", None), msg["header"]["length"]
    if off is None or length < 20:
        return 0
    return abs(struct.unpack_from("=i", data, off + 16)[0])


# --- sock_diag -------------------------------------------------------------------

# include/uapi/linux/inet_diag.h and sock_diag.h: the request attribute that
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
    with _Netlink(NETLINK_SOCK_DIAG) as nl:
        req["header"]["sequence_number"] = nl.next_seq()
        req.encode()
        for m in nl.dump(req, _Marshal({SOCK_DIAG_BY_FAMILY: _storage_diag_msg})):
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
    with _Netlink(NETLINK_SOCK_DIAG) as nl:
        by_seq = {nl.next_seq(): s for s in socks}
        acks = nl.request_acks([_destroy_msg(s, seq) for seq, s in by_seq.items()])
        for seq, s in by_seq.items():
            err = acks.get(seq, errno.EIO)
            if err == 0:
                res.destroyed += 1
            else:
                res.failed.append((s, err))
    return res


# --- conntrack -------------------------------------------------------------------

_CT_MSG = NFNL_SUBSYS_CTNETLINK << 8


@dataclass(frozen=True)
class CtEntry:
    """One IPv4 TCP conntrack entry: original and reply tuples."""

    id: int | None
    status: int
    orig_src: ipaddress.IPv4Address
    orig_sport: int
    orig_dst: ipaddress.IPv4Address
    orig_dport: int
    reply_src: ipaddress.IPv4Address
    reply_sport: int
    reply_dst: ipaddress.IPv4Address
    reply_dport: int
    state: int | None  # TCP_CONNTRACK_*


def _tuple(msg: nlmsg, name: str) -> NFCTAttrTuple | None:
    t = msg.get_attr(name)
    if t is None:
        return None
    try:
        return NFCTAttrTuple.from_netlink(socket.AF_INET, t)
    except (AttributeError, NotImplementedError):
        return None


def dnat_entries(daddr: str, dport: int, unanswered: bool = False) -> list[CtEntry]:
    """IPv4 TCP entries whose original destination is daddr:dport and that
    were DNATed (status IPS_DST_NAT); with `unanswered`, only those that never
    saw a reply packet (no IPS_SEEN_REPLY: connects to a black hole).
    Filtered in the kernel (CTA_FILTER, Linux >= 5.8; CTA_STATUS filter >=
    5.15): one dump request."""
    flt = NFCTAttrTuple(family=socket.AF_INET, daddr=daddr, proto=socket.IPPROTO_TCP, dport=dport)
    flt.attrs()  # computes flt.flags
    mask = IPS_DST_NAT | (IPS_SEEN_REPLY if unanswered else 0)
    out: list[CtEntry] = []
    marshal = _Marshal({_CT_MSG | IPCTNL_MSG_CT_NEW: nfct_msg, _CT_MSG | IPCTNL_MSG_CT_GET: nfct_msg})
    with _Netlink(NETLINK_NETFILTER) as nl:
        msg = _ct_msg(IPCTNL_MSG_CT_GET, NLM_F_REQUEST | NLM_F_DUMP, nl.next_seq(), tuple_orig=flt,
                      cta_filter={"attrs": [["CTA_FILTER_ORIG_FLAGS", flt.flags]]},
                      status=IPS_DST_NAT, status_mask=mask)
        for m in nl.dump(msg, marshal):
            if not isinstance(m, nfct_msg):
                continue
            o, r = _tuple(m, "CTA_TUPLE_ORIG"), _tuple(m, "CTA_TUPLE_REPLY")
            if o is None or r is None or o.proto != socket.IPPROTO_TCP:
                continue
            # The kernel filter is a superset guarantee on old kernels only: re-check.
            status = m.get_attr("CTA_STATUS") or 0
            if o.daddr != daddr or o.dport != dport or status & mask != IPS_DST_NAT:
                continue
            e = _entry(m)
            if e is not None:
                out.append(e)
    return out


def _ct_msg(kind: int, flags: int, seq: int, **attrs) -> nfct_msg:
    """A ctnetlink request (IPv4) of `kind` (IPCTNL_MSG_CT_*) with the given
    attributes (nfct_msg.create_from keywords), encoded."""
    m = nfct_msg.create_from(**attrs)
    m["nfgen_family"] = socket.AF_INET
    m["version"] = 0
    m["res_id"] = 0
    m["header"]["type"] = _CT_MSG | kind
    m["header"]["flags"] = flags
    m["header"]["sequence_number"] = seq
    m.encode()
    return m


def _tcp_tuple(src: str, sport: int, dst: str, dport: int) -> NFCTAttrTuple:
    return NFCTAttrTuple(family=socket.AF_INET, saddr=src, daddr=dst, proto=socket.IPPROTO_TCP,
                         sport=sport, dport=dport)


def _entry(m: nlmsg) -> CtEntry | None:
    """The CtEntry of a ctnetlink message (IPv4 TCP), else None."""
    o, r = _tuple(m, "CTA_TUPLE_ORIG"), _tuple(m, "CTA_TUPLE_REPLY")
    if o is None or r is None or o.proto != socket.IPPROTO_TCP:
        return None
    state = None
    pi = m.get_attr("CTA_PROTOINFO")
    if pi is not None:
        tcp = pi.get_attr("CTA_PROTOINFO_TCP")
        if tcp is not None:
            state = tcp.get_attr("CTA_PROTOINFO_TCP_STATE")
    try:
        return CtEntry(
            id=m.get_attr("CTA_ID"), status=m.get_attr("CTA_STATUS") or 0,
            orig_src=ipaddress.IPv4Address(o.saddr), orig_sport=o.sport,
            orig_dst=ipaddress.IPv4Address(o.daddr), orig_dport=o.dport,
            reply_src=ipaddress.IPv4Address(r.saddr), reply_sport=r.sport,
            reply_dst=ipaddress.IPv4Address(r.daddr), reply_dport=r.dport,
            state=state)
    except (TypeError, ValueError):
        return None


def entries_by_tuple(tuples: Sequence[tuple[str, int, str, int]]) -> list[CtEntry | None]:
    """The conntrack entry of each IPv4 TCP original tuple (src, sport, dst,
    dport), None where there is none: one CT_GET per tuple, sent as one
    batch. For the few live sockets of a failover, this is much cheaper than
    a dump of every entry (TIME_WAIT ones included: thousands under churn,
    ~30 us each to parse)."""
    if not tuples:
        return []
    marshal = _Marshal({_CT_MSG | IPCTNL_MSG_CT_NEW: nfct_msg, _CT_MSG | IPCTNL_MSG_CT_GET: nfct_msg})
    with _Netlink(NETLINK_NETFILTER) as nl:
        by_seq: dict[int, int] = {}
        msgs = []
        for i, t in enumerate(tuples):
            seq = nl.next_seq()
            msgs.append(_ct_msg(IPCTNL_MSG_CT_GET, NLM_F_REQUEST | NLM_F_ACK, seq,
                                tuple_orig=_tcp_tuple(*t)))
            by_seq[seq] = i
        out: list[CtEntry | None] = [None] * len(tuples)
        for seq, (err, answers) in nl.request(msgs, marshal).items():
            if err == 0 and answers and isinstance(answers[0], nfct_msg):
                out[by_seq[seq]] = _entry(answers[0])
        return out


def delete_entries(entries: Iterable[CtEntry]) -> int:
    """Delete conntrack entries by original tuple (and id). Returns how many
    were deleted (an entry gone already is not an error)."""
    entries = list(entries)
    if not entries:
        return 0
    with _Netlink(NETLINK_NETFILTER) as nl:
        msgs = []
        for e in entries:
            kw: dict = {"tuple_orig": _tcp_tuple(str(e.orig_src), e.orig_sport, str(e.orig_dst),
                                                 e.orig_dport)}
            if e.id is not None:
                kw["id"] = e.id
            msgs.append(_ct_msg(IPCTNL_MSG_CT_DELETE, NLM_F_REQUEST | NLM_F_ACK, nl.next_seq(), **kw))
        return sum(1 for err in nl.request_acks(msgs).values() if err == 0)


__all__ = ["SockId", "FoundSock", "tcp_sockets", "DestroyResult", "destroy_sockets", "CtEntry",
           "dnat_entries", "entries_by_tuple", "delete_entries", "NLMSG_ERROR"]
