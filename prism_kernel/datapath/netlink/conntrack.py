"""ctnetlink for fast failover on the nftables data path: find the
conntrack entries of DNATed connections (by exact tuple, or a kernel-filtered
dump) and delete them."""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from pyroute2.netlink import NETLINK_NETFILTER, NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST, nlmsg
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

from prism_kernel.datapath.netlink.transport import Marshal, Socket

__all__ = ["CtEntry", "IPS_DST_NAT", "dnat_entries", "entries_by_tuple", "delete_entries"]

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
    marshal = Marshal({_CT_MSG | IPCTNL_MSG_CT_NEW: nfct_msg, _CT_MSG | IPCTNL_MSG_CT_GET: nfct_msg})
    with Socket(NETLINK_NETFILTER) as nl:
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
    marshal = Marshal({_CT_MSG | IPCTNL_MSG_CT_NEW: nfct_msg, _CT_MSG | IPCTNL_MSG_CT_GET: nfct_msg})
    with Socket(NETLINK_NETFILTER) as nl:
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
    with Socket(NETLINK_NETFILTER) as nl:
        msgs = []
        for e in entries:
            kw: dict = {"tuple_orig": _tcp_tuple(str(e.orig_src), e.orig_sport, str(e.orig_dst),
                                                 e.orig_dport)}
            if e.id is not None:
                kw["id"] = e.id
            msgs.append(_ct_msg(IPCTNL_MSG_CT_DELETE, NLM_F_REQUEST | NLM_F_ACK, nl.next_seq(), **kw))
        return sum(1 for err in nl.request_acks(msgs).values() if err == 0)
