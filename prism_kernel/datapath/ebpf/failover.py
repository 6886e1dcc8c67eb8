"""Finding and aborting the sockets the eBPF data path steered to a backend.

Nothing is kept per socket for this, so it costs nothing per connection: a
sock_diag dump of the TCP sockets with the backends' remote port (the kernel
filters by port) asks for each socket's pk_peers value
(INET_DIAG_REQ_SK_BPF_STORAGES). A socket whose value names one of the
backends and whose peer still is that backend was steered there; a direct
connection to the same address has no value. Each is then destroyed by exact
4-tuple and cookie (SOCK_DESTROY, one netlink batch): a later socket reusing
the tuple does not match. Call it after apply() removed the backends: a
connect that picked a backend just before the removal and has no local port
yet is not in the dump.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
from collections.abc import Sequence
from typing import Any

from prism_kernel.core.model import Backend
from prism_kernel.datapath.base import import_netlink
from prism_kernel.datapath.ebpf.maps import PEER, Maps, decode_backend, encode_backend
from prism_kernel.errors import DatapathError

log = logging.getLogger(__name__)


def steered_sockets(maps: Maps, backends: Sequence[Backend] | None = None) -> list[Any]:
    """The live steered sockets (SYN_SENT to LAST_ACK) as netlink.SockId, to
    `backends` only when given."""
    _netlink = import_netlink()  # pyroute2: ~10 MB of RSS, so only on failover

    wanted = None if backends is None else {encode_backend(b): b for b in backends}
    # (family, remote port) dumps: an IPv4 backend is also reached by
    # dual-stack AF_INET6 sockets, as ::ffff:a.b.c.d. Port 0: any.
    if backends is None:
        dumps = {(socket.AF_INET, 0), (socket.AF_INET6, 0)}
    else:
        dumps = {(socket.AF_INET6, b.port) for b in backends}
        dumps |= {(socket.AF_INET, b.port) for b in backends if b.family == 4}
    fd, map_id = maps.fds["pk_peers"], maps.ids["pk_peers"]
    out: list[Any] = []
    for family, port in sorted(dumps):
        try:
            found = _netlink.tcp_sockets(family, port, fd, map_id)
        except (OSError, AttributeError, TypeError, ValueError) as e:  # netlink, or its decoding
            raise DatapathError(f"sock_diag dump of steered sockets failed: {e}") from e
        for ss in found:
            be_raw = PEER.unpack(ss.value[:PEER.size])[4]
            try:
                b = decode_backend(be_raw) if wanted is None else wanted[be_raw]
            except (KeyError, DatapathError):
                continue  # another backend's socket
            if _netlink.unmapped(ss.sock.dst) != b.address or ss.sock.dport != b.port:
                continue  # connected elsewhere since (the value outlives a reconnect)
            out.append(ss.sock)
    return out


def destroy(socks: list[Any]) -> int:
    """SOCK_DESTROY each socket; how many were aborted. Refused for all of
    them: DatapathError; for some: a warning."""
    if not socks:
        return 0
    _netlink = import_netlink()
    try:
        res = _netlink.destroy_sockets(socks)
    except OSError as e:
        raise DatapathError(f"sock_diag SOCK_DESTROY failed: {e}") from e
    gone = [sid for sid, err in res.failed if err == errno.ENOENT]  # closed since the dump
    other = {e: n for e, n in res.errors().items() if e != errno.ENOENT}
    if other:
        desc = ", ".join(f"{os.strerror(e)} x{n}" for e, n in other.items())
        if res.destroyed == 0 and len(gone) == 0:
            raise DatapathError(f"sock_diag SOCK_DESTROY refused for all {len(socks)} "
                                f"sockets: {desc} (needs CAP_NET_ADMIN and "
                                f"CONFIG_INET_DIAG_DESTROY)")
        log.warning("close_connections: %d aborted, %d failed: %s", res.destroyed,
                    sum(other.values()), desc)
    return res.destroyed
