"""Netlink for fast failover (pyroute2's message classes, our own socket):

- transport.py: the socket, batches of requests and their acks, dumps;
- sockets.py: sock_diag, find sockets (with their BPF socket storage) and
  abort them (SOCK_DESTROY);
- conntrack.py: ctnetlink, find and delete conntrack entries.

Importing the package loads all three, and pyroute2 (~10 MB, ~90 ms): the
daemon does it at start on purpose, so that the first abort of dead
connections does not wait for it.
"""

from prism_kernel.datapath.netlink import conntrack, sockets, transport

__all__ = ["conntrack", "sockets", "transport"]
