"""Fast failover on the nftables data path: abort the connections the table
DNATed to dead backends, and forget their conntrack entries.

Which sockets: the live TCP sockets of the host connected to 127.0.0.1:PORT
(a sock_diag dump the kernel filters by port; both families, since a
dual-stack socket reaches it as ::ffff:127.0.0.1 and its packets are IPv4),
then each one's conntrack entry by exact tuple (one batch of CT_GET): DNATed
to a dead backend = ours. Direct connections to the same backend have another
original destination and are never touched. Why not a dump of the conntrack
table, and the measurements: docs/design/nft-datapath.md.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import os
import socket
from collections.abc import Sequence
from typing import Any

from prism_kernel.core.model import Backend
from prism_kernel.datapath.base import import_netlink
from prism_kernel.errors import DatapathError

log = logging.getLogger("prism_kernel.datapath.nft")

_LOOPBACK = ipaddress.IPv4Address("127.0.0.1")
_DECODE_ERRORS = (OSError, AttributeError, TypeError, ValueError)  # netlink, or its decoding


def _conntrack():
    try:
        from prism_kernel.datapath.netlink import conntrack  # noqa: PLC0415 (pyroute2: on first use)
    except ImportError as e:
        raise DatapathError(f"pyroute2 is needed to close connections: {e}") from e
    return conntrack


def close_connections(listen_port: int, backends: Sequence[Backend]) -> int:
    """Abort every connection DNATed from 127.0.0.1:listen_port to `backends`
    (IPv4 only: nothing else is steered); returns how many sockets were
    aborted. Their conntrack entries are deleted afterwards."""
    targets = {(b.address, b.port) for b in backends
               if b.family == 4 and isinstance(b.address, ipaddress.IPv4Address)}
    if not targets:
        return 0
    sockets, ct = import_netlink(), _conntrack()

    live: list[tuple[Any, tuple[str, int, str, int]]] = []
    try:
        for family in (socket.AF_INET, socket.AF_INET6):
            for fs in sockets.tcp_sockets(family, listen_port):
                src, dst = sockets.unmapped(fs.sock.src), sockets.unmapped(fs.sock.dst)
                if dst == _LOOPBACK and src.version == 4:
                    live.append((fs.sock, (str(src), fs.sock.sport, str(dst), listen_port)))
    except _DECODE_ERRORS as e:
        raise DatapathError(f"sock_diag dump failed: {e}") from e
    try:
        found = ct.entries_by_tuple([t for _, t in live])
    except _DECODE_ERRORS as e:
        raise DatapathError(f"conntrack lookup failed: {e}") from e
    socks, ours = [], []
    for (sock, _), e in zip(live, found):
        if e is not None and e.status & ct.IPS_DST_NAT and (e.reply_src, e.reply_sport) in targets:
            socks.append(sock)
            ours.append(e)
    res = sockets.DestroyResult()
    if socks:
        try:
            res = sockets.destroy_sockets(socks)
        except OSError as e:
            raise DatapathError(f"sock_diag SOCK_DESTROY failed: {e}") from e
    # Entries of connects to these backends that never got an answer and
    # whose socket is gone (a client that gave up on a black hole): conntrack
    # keeps them in SYN_SENT for 120 s and would take a new connect that
    # reuses the source port for a retransmission, NATed to the dead backend.
    # Few: a dump the kernel filters to DNATed, never-answered entries.
    try:
        known = {(e.orig_src, e.orig_sport) for e in ours}
        ours += [e for e in ct.dnat_entries(str(_LOOPBACK), listen_port, unanswered=True)
                 if (e.reply_src, e.reply_sport) in targets and (e.orig_src, e.orig_sport) not in known]
    except _DECODE_ERRORS as e:
        log.warning("conntrack dump of unanswered connects failed: %s", e)
    # After the sockets: an established one's RST still needs its entry for NAT.
    try:
        deleted = ct.delete_entries(ours)
    except _DECODE_ERRORS as e:
        log.warning("deleting %d conntrack entries failed: %s", len(ours), e)
        deleted = 0
    other = {e: n for e, n in res.errors().items() if e != errno.ENOENT}
    if other:
        desc = ", ".join(f"{os.strerror(e)} x{n}" for e, n in other.items())
        if res.destroyed == 0 and sum(other.values()) == len(socks):
            raise DatapathError(f"sock_diag SOCK_DESTROY refused for all {len(socks)} sockets: "
                                f"{desc} (needs CAP_NET_ADMIN and CONFIG_INET_DIAG_DESTROY)")
        log.warning("close_connections: %d aborted, %d failed: %s", res.destroyed,
                    sum(other.values()), desc)
    log.debug("close_connections: %d conntrack entries, %d sockets aborted, %d entries deleted",
              len(ours), res.destroyed, deleted)
    return res.destroyed
